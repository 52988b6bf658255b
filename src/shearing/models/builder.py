"""The registered model builder (``model.name: shearing_llama``): a run config in, a Composer model out.

Kept apart from ``shearing.train`` so the registry (and llm-foundry's entry points) can import it
without importing the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shearing.config import RunConfig
from shearing.models.composer_model import ComposerShearedLlama
from shearing.models.hf_io import load_source_model
from shearing.models.shapes import is_checkpoint_dir
from shearing.pruning.l0 import L0Module
from shearing.pruning.plan import PruningPlan


def tokenizer_path(cfg: RunConfig) -> str | None:
    """``model.tokenizer``, else the source checkpoint directory, else none (random-init sources)."""
    path = cfg.model.tokenizer or (cfg.model.source if is_checkpoint_dir(cfg.model.source) else None)
    return str(Path(path).resolve()) if path else None


def build_sheared_llama(cfg: RunConfig) -> ComposerShearedLlama:
    """``shearing_llama``: the mask-aware source model, plus the L0 module of the run's ``PruningPlan``.

    The plan goes into the run metadata (``extra_state``) so the checkpoint alone can be exported."""
    llama, hf_config = load_source_model(cfg.model.source, attn_impl=cfg.model.attn_impl, seed=cfg.seed)
    llama.activation_checkpointing = cfg.model.activation_checkpointing
    metadata: dict[str, Any] = {
        "hf_config": hf_config.to_dict(),
        "source": str(cfg.model.source),
        "tokenizer": tokenizer_path(cfg),
        "target": None,
        "families": None,
        "plan": None,
    }
    l0 = None
    if cfg.pruning is not None:
        plan = PruningPlan.from_config(cfg)
        l0 = L0Module.from_plan(plan, seed=cfg.seed)
        l0.use_final_masks = cfg.pruning.eval_masks == "final"
        if cfg.pruning.init == "importance":  # constant: the paper's init, already in place
            from shearing.pruning.importance import init_l0_from_importance

            init_l0_from_importance(l0, llama, cfg)
        metadata.update(target=plan.target.prunable(), families=list(plan.families), plan=plan.to_dict())
    return ComposerShearedLlama(llama, l0=l0, metadata=metadata)
