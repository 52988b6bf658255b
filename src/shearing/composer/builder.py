"""The registered model builder (``model.name: shearing_llama``): a resolved run spec in, a Composer model out.

A builder registered under ``model.name`` is called with the run's ``shearing.spec.RunSpec`` (its ``cfg``
is the yaml's config): the source's config.json and the pruning plan come from it, read and built once.

Kept apart from ``shearing.train`` so the registry (and llm-foundry's entry points) can import it
without importing the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shearing.composer.model import ComposerShearedLlama
from shearing.models.hf_io import load_source_model
from shearing.pruning.l0 import L0Module

if TYPE_CHECKING:
    from shearing.spec import RunSpec


def build_sheared_llama(spec: RunSpec) -> ComposerShearedLlama:
    """``shearing_llama``: the mask-aware source model, plus the L0 module of the run's ``PruningPlan``.

    The plan goes into the run metadata (``extra_state``) so the checkpoint alone can be exported."""
    cfg = spec.cfg
    llama, hf_config = load_source_model(
        cfg.model.source, attn_impl=cfg.model.attn_impl, seed=cfg.seed, raw_config=spec.source_config
    )
    llama.activation_checkpointing = cfg.model.activation_checkpointing
    metadata: dict[str, Any] = {
        "hf_config": hf_config.to_dict(),
        "source": str(cfg.model.source),
        "tokenizer": spec.tokenizer_path,
        "target": None,
        "families": None,
        "plan": None,
    }
    l0 = None
    plan = spec.plan
    if plan is not None:
        l0 = L0Module.from_plan(plan, seed=cfg.seed)
        l0.use_final_masks = cfg.pruning.eval_masks == "final"
        if cfg.pruning.init == "importance":  # constant: the paper's init, already in place
            from shearing.pruning.importance import init_l0_from_importance

            init_l0_from_importance(l0, llama, cfg)
        metadata.update(target=plan.target.prunable(), families=list(plan.families), plan=plan.to_dict())
    return ComposerShearedLlama(llama, l0=l0, metadata=metadata)
