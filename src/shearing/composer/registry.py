"""Joins llm-foundry's registries, so yamls can name (and swap) our model, algorithm, dataloaders,
callbacks and loggers.

The same table is declared twice, on purpose: as entry points in ``pyproject.toml``
(``[project.entry-points.llmfoundry_<registry>]``, which llm-foundry's registries read, so an installed
``shearing`` is visible to any llm-foundry program), and here, for a source tree used without installing.
``tests/test_registry.py`` keeps the two equal. Importing this module registers whatever the entry points
did not; ``shearing.train`` imports it. A yaml swaps a piece by naming another registered entry:
``model.name`` (default ``shearing_llama``), ``pruning.algorithm`` (default ``lagrangian_pruning``), a
loader's ``name``, a ``callbacks:`` / ``loggers:`` key. Foundry's own entries (``text`` loader,
``lr_monitor``, ``speed_monitor``, ``gradient_clipping`` ...) stay available next to ours.
"""

from __future__ import annotations

import importlib

from llmfoundry import registry

# name -> "module:attribute" of what each registered name builds.
MODELS = {
    "shearing_llama": "shearing.composer.builder:build_sheared_llama",
}
ALGORITHMS = {
    "lagrangian_pruning": "shearing.composer.callbacks.pruning:LagrangianPruning",
}
DATALOADERS = {
    "domain_mixture": "shearing.data.dataloader:build_domain_mixture_dataloader",
    "domain_eval": "shearing.data.dataloader:build_domain_eval_dataloader",
}
CALLBACKS = {
    "dynamic_loading": "shearing.composer.callbacks.dynamic_loading:DynamicLoading",
}
LOGGERS = {
    "metrics_file": "shearing.composer.loggers:MetricsFileLogger",
}


def _resolve(target: str):
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


# llm-foundry registry -> our table (the entry-point group is ``llmfoundry_<registry>``).
TABLES = {
    "models": MODELS,
    "algorithms": ALGORITHMS,
    "dataloaders": DATALOADERS,
    "callbacks": CALLBACKS,
    "loggers": LOGGERS,
}


def register_all() -> None:
    for registry_name, table in TABLES.items():
        target_registry = getattr(registry, registry_name)
        for name, target in table.items():
            if name not in target_registry:  # an installed package's entry point counts as registered
                target_registry.register(name, func=_resolve(target))


register_all()
