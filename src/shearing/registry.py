"""Joins llm-foundry's registries, so yamls can name our dataloaders, callbacks and loggers.

Importing this module registers everything once; ``shearing.train`` imports it, and every rank that
runs ``train.py`` therefore sees the same names. Foundry's own entries (``text`` loader,
``lr_monitor``, ``speed_monitor``, ``gradient_clipping`` ...) stay available next to ours.
"""

from __future__ import annotations

import importlib

from llmfoundry import registry

# name -> "module:attribute" of what each registered name builds.
DATALOADERS = {
    "domain_mixture": "shearing.data.dataloader:build_domain_mixture_dataloader",
    "domain_eval": "shearing.data.dataloader:build_domain_eval_dataloader",
}
CALLBACKS = {
    "dynamic_loading": "shearing.callbacks.dynamic_loading:DynamicLoading",
}
LOGGERS = {
    "metrics_file": "shearing.loggers:MetricsFileLogger",
}


def _resolve(target: str):
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def register_all() -> None:
    for name, target in DATALOADERS.items():
        if name not in registry.dataloaders:
            registry.dataloaders.register(name, func=_resolve(target))
    for name, target in CALLBACKS.items():
        if name not in registry.callbacks:
            registry.callbacks.register(name, func=_resolve(target))
    for name, target in LOGGERS.items():
        if name not in registry.loggers:
            registry.loggers.register(name, func=_resolve(target))


register_all()
