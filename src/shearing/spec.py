"""The run spec: a run config resolved once, before anything heavy, and never changed afterwards.

``resolve_run(cfg)`` reads the small files a run depends on, each once (``RunFiles``: the source's and the
teacher's ``config.json``, the data ``manifest.json``), runs every check of ``shearing.validation`` and the
cross-file checks (data packed at ``max_seq_len``, data tokenizer == model tokenizer, batch divisible by the
ranks), and returns a frozen ``RunSpec``: the source's shape and config, the ``PruningPlan``, the train and
eval domains, the model's tokenizer path. A refusal is raised before the model is built.

The pieces built from it take their part: the model builder the source config and the plan (no second read
of config.json, no second plan), the domain loaders their manifest, the run record is ``RunSpec.record()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shearing.config import RunConfig
from shearing.data.manifest import Manifest
from shearing.folders import DYNAMIC_LOADING_STEM
from shearing.models.shapes import LlamaShape, is_checkpoint_dir, resolve_source_shape
from shearing.pruning.plan import PruningPlan
from shearing.run_files import RunFiles
from shearing.validation import DOMAIN_LOADERS, configured_domains, validate_config

LOADER_KEYS = ("train_loader", "eval_loader")


def loader_local(loader: Any) -> str | None:
    """The ``dataset.local`` folder of a loader section (None when it has none)."""
    return ((loader or {}).get("dataset") or {}).get("local")


@dataclass(frozen=True)
class RunSpec:
    """A checked run: the yaml's config plus what was resolved from its files (see the module docstring)."""

    cfg: RunConfig
    files: RunFiles = field(repr=False, compare=False)
    source: LlamaShape
    source_config: dict[str, Any] | None  # the source folder's config.json; None for a named shape or mapping
    plan: PruningPlan | None  # pruning runs only
    train_domains: tuple[str, ...] | None  # a domain loader's domains, in domain_idx order
    eval_domains: tuple[str, ...] | None
    tokenizer_path: str | None  # model.tokenizer, else the source folder, else none
    initial_proportions: (
        Any  # dynamic_loading.initial_proportions as the callback takes it (a folder resolved)
    )

    def manifest(self, key: str) -> Manifest | None:
        """The manifest of loader ``key`` ("train_loader" / "eval_loader"), when it reads a prepared folder."""
        loader = getattr(self.cfg, key)
        local = loader_local(loader)
        if not loader or loader.get("name") not in DOMAIN_LOADERS or local is None:
            return None
        return self.files.manifest(local)

    def record(self) -> dict[str, Any]:
        """What must stay the same across a resume of this run (all JSON types): the run record that
        ``shearing.composer.run_folder.check_run_record`` writes and compares."""
        cfg, plan = self.cfg, self.plan
        source = cfg.model.source
        return {
            "source": dict(source) if isinstance(source, Mapping) else _resolved(source),
            "source_shape": self.source.prunable(),
            "target": None if plan is None else plan.target.prunable(),
            "families": None if plan is None else list(plan.families),
            "seed": cfg.seed,
            "max_seq_len": cfg.max_seq_len,
            "train_data": _resolved(loader_local(cfg.train_loader)),
            # a resume with another batch size or domain list would change what each step and domain_idx mean
            "global_train_batch_size": cfg.global_train_batch_size,
            "train_domains": None if self.train_domains is None else list(self.train_domains),
        }


def _resolved(path: Any) -> Any:
    """An existing local path as an absolute string (a resume may start from another working directory)."""
    return str(Path(path).resolve()) if isinstance(path, str | os.PathLike) and Path(path).exists() else path


def tokenizer_path(cfg: RunConfig) -> str | None:
    """``model.tokenizer``, else the source checkpoint directory, else none (random-init sources)."""
    path = cfg.model.tokenizer or (cfg.model.source if is_checkpoint_dir(cfg.model.source) else None)
    return str(Path(path).resolve()) if path else None


def source_spec(cfg: RunConfig, files: RunFiles, need_checkpoint: bool = True):
    """(shape, config.json or None) of ``model.source``; config.json read through ``files``."""
    source = cfg.model.source
    config = files.config_json(source) if is_checkpoint_dir(source) else None
    shape = resolve_source_shape(
        source, cfg.model.source_shape, need_checkpoint=need_checkpoint, config=config
    )
    return shape, config


def resolve_run(cfg: RunConfig, tokenizer: Any = None, local: bool = True) -> RunSpec:
    """Check ``cfg`` completely and resolve it (module docstring); ``tokenizer``: the model's tokenizer when
    the caller has loaded it already (else loaded for the data check). ``local=False``: the checks that read
    files or ask about this machine are skipped (committed recipes pointing at cluster folders)."""
    from shearing.composer.callbacks.export import check_export_config
    from shearing.data.compat import check_run_data

    files = RunFiles()
    source, source_config = source_spec(cfg, files, need_checkpoint=local)
    plan = PruningPlan.from_config(cfg, source=source) if cfg.pruning is not None else None
    check_export_config(cfg)  # export.folder must never be (or contain) the run folder
    if local:
        check_loader_folders(cfg, files)
        check_run_data(cfg, tokenizer_path(cfg), source.vocab_size, tokenizer, manifests=files.manifest)
        check_world_size(cfg)
    validate_config(cfg, local=local, files=files)
    initial_proportions = resolve_initial_proportions(cfg, local)
    train = configured_domains("train_loader", cfg.train_loader, local, files)
    evaluation = configured_domains("eval_loader", cfg.eval_loader, local, files)
    return RunSpec(
        cfg=cfg,
        files=files,
        source=source,
        source_config=source_config,
        plan=plan,
        train_domains=None if train is None else tuple(train),
        eval_domains=None if evaluation is None else tuple(evaluation),
        tokenizer_path=tokenizer_path(cfg),
        initial_proportions=initial_proportions,
    )


def resolve_initial_proportions(cfg: RunConfig, local: bool = True) -> Any:
    """``dynamic_loading.initial_proportions`` as the callback takes it: a previous run's folder (``local``:
    looked for on this machine) becomes its final-proportions file, which must be there; numbers or a file
    path as written."""
    value = (cfg.callbacks.get("dynamic_loading") or {}).get("initial_proportions")
    if local and isinstance(value, str) and Path(value).is_dir():
        path = Path(value) / f"{DYNAMIC_LOADING_STEM}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"dynamic_loading.initial_proportions={value} is a folder without {path.name}: "
                "give the pruning run's save_folder (it writes that file) or a list of proportions"
            )
        return str(path)
    return value


def check_loader_folders(cfg: RunConfig, files: RunFiles) -> None:
    """Each loader's ``dataset.local`` exists; a domain loader's data was packed at ``max_seq_len``."""
    for key in LOADER_KEYS:
        loader = getattr(cfg, key)
        local = loader_local(loader)
        if local is None:
            continue
        if not Path(local).exists():
            raise FileNotFoundError(
                f"{key}.dataset.local={local} does not exist: set variables.data_local to a prepared data folder "
                "(data_prep/tokenize_domains.py writes one)"
            )
        if loader.get("name") in DOMAIN_LOADERS:
            seq_len = files.manifest(local).seq_len
            if seq_len != cfg.max_seq_len:
                raise ValueError(
                    f"max_seq_len={cfg.max_seq_len} but the data at {local} was packed into {seq_len}-token "
                    "sequences: set max_seq_len to match, or re-run data_prep/tokenize_domains.py --seq-len"
                )


def check_world_size(cfg: RunConfig) -> None:
    """The global batch splits evenly over the ranks."""
    from composer.utils import dist

    if cfg.global_train_batch_size % dist.get_world_size():
        raise ValueError(
            f"global_train_batch_size {cfg.global_train_batch_size} is not divisible by the "
            f"{dist.get_world_size()} ranks"
        )


__all__ = ["RunFiles", "RunSpec", "loader_local", "resolve_run", "source_spec", "tokenizer_path"]
