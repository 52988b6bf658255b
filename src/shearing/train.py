"""Build and run a Composer ``Trainer`` from a run yaml: ``composer train.py <yaml> [key=value ...]``.

``train_from_yaml`` validates everything it can before loading weights or data (the config keys, the
source and target shapes, the data folder), then builds the pieces with small ``build_*`` functions:
model (mask-aware LLaMA + L0 module when the yaml has a ``pruning:`` section), dataloaders (through
llm-foundry's registry: ``text``, and ours, ``domain_mixture`` / ``domain_eval``), the optimizer with
separate learning rates for weights, mask logits and Lagrange multipliers, scheduler, algorithms
(``LagrangianPruning`` for pruning runs, plus any from the registry), callbacks and loggers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.optim import DecoupledAdamW
from composer.utils import dist, reproducibility
from llmfoundry.data.dataloader import build_dataloader
from llmfoundry.utils.builders import build_algorithm, build_callback, build_scheduler

import shearing.registry  # noqa: F401  (joins llm-foundry's registries)
from shearing import composer_compat
from shearing.callbacks.export import build_export_callback, check_export_config
from shearing.callbacks.guard import NonFiniteGuard
from shearing.checkpoints import check_save_folder, tidy_save_folder
from shearing.config import OptimizerConfig, RunConfig, load_config
from shearing.data.compat import check_run_data
from shearing.data.dataloader import loader_domains
from shearing.data.manifest import load_manifest
from shearing.loggers import build_loggers
from shearing.models.builder import tokenizer_path
from shearing.models.composer_model import ComposerShearedLlama
from shearing.models.shapes import resolve_source_shape
from shearing.parallelism import build_parallelism_config
from shearing.progress import announce_outputs, setup_console_logging
from shearing.pruning.plan import PruningPlan
from shearing.run_folder import (
    SupersededCheckpointSweep,
    check_run_record,
    finish_run,
    hold_save_folder,
    on_rank_zero,
    run_is_finished,
)
from shearing.trainer import ShearingTrainer
from shearing.validation import check_paths, validate_config

log = logging.getLogger(__name__)

composer_compat.apply()  # Composer 0.32 workarounds (multi-node signal files), once per process


# What a refused config raises: these, from the checks that run before the model is built (``refusing``).
REFUSALS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


@contextlib.contextmanager
def refusing():
    """Marks a ``REFUSALS`` exception raised inside as a refusal (``exc.shearing_refusal = True``; type and
    message unchanged), so that ``train.py`` prints it as one message and exits 2 instead of a traceback.
    Used only around the checks before the model is built: an error during training keeps its traceback."""
    try:
        yield
    except REFUSALS as e:
        e.shearing_refusal = True
        raise


def report_refusal(error: BaseException, stream=None) -> bool:
    """Print a refusal (see ``refusing``) as one block and return True; False for any other exception."""
    if not getattr(error, "shearing_refusal", False):
        return False
    stream = stream or sys.stderr
    rank = f" (rank {dist.get_global_rank()})" if dist.get_world_size() > 1 else ""
    print(f"\nshearing: the run was refused before it started{rank}:\n  {error}\n", file=stream, flush=True)
    return True


def validate_run(cfg: RunConfig, tokenizer=None) -> None:
    """Cheap checks that must fail before anything expensive starts (``shearing.validation`` holds most).

    ``tokenizer``: the model's tokenizer when the caller has loaded it already (else loaded for the data check).
    """
    if cfg.pruning is not None:  # shapes and mask families are consistent
        source = PruningPlan.from_config(cfg, need_checkpoint=True).source
    else:
        source = resolve_source_shape(cfg.model.source, cfg.model.source_shape, need_checkpoint=True)
    check_export_config(cfg)  # export.folder must never be (or contain) the run folder
    for key, loader in (("train_loader", cfg.train_loader), ("eval_loader", cfg.eval_loader)):
        if not loader:
            continue
        local = (loader.get("dataset") or {}).get("local")
        if local is not None and not Path(local).exists():
            raise FileNotFoundError(
                f"{key}.dataset.local={local} does not exist: set variables.data_local to a prepared data folder "
                "(data_prep/tokenize_domains.py writes one)"
            )
        if loader.get("name") in ("domain_mixture", "domain_eval"):
            seq_len = load_manifest(local).seq_len
            if seq_len != cfg.max_seq_len:
                raise ValueError(
                    f"max_seq_len={cfg.max_seq_len} but the data at {local} was packed into {seq_len}-token "
                    "sequences: set max_seq_len to match, or re-run data_prep/tokenize_domains.py --seq-len"
                )
    check_run_data(cfg, tokenizer_path(cfg), source.vocab_size, tokenizer)  # data tokenizer == model's
    if cfg.global_train_batch_size % dist.get_world_size():
        raise ValueError(
            f"global_train_batch_size {cfg.global_train_batch_size} is not divisible by the {dist.get_world_size()} ranks"
        )
    validate_config(cfg)


def build_tokenizer(cfg: RunConfig):
    path = tokenizer_path(cfg)
    if path is None:
        return None
    from shearing.data.tokenizer import load_hf_tokenizer

    try:
        return load_hf_tokenizer(path)
    except (OSError, ValueError) as e:
        if cfg.model.tokenizer:
            raise ValueError(f"model.tokenizer={path} could not be loaded: {e}") from None
        return None


def build_model(cfg: RunConfig) -> ComposerShearedLlama:
    """The run's Composer model, built by the registry entry ``model.name`` (default ``shearing_llama``),
    with the frozen distillation teacher as its ``teacher`` child when the yaml has ``distillation:``."""
    from llmfoundry import registry

    model = registry.models.get(cfg.model.name)(cfg)
    if cfg.distillation is not None:
        model.teacher = build_teacher_model(cfg)
    return model


def build_teacher_model(cfg: RunConfig):
    """``distillation.teacher`` (null: ``model.source``) loaded and frozen (``shearing.distill``)."""
    from shearing.distill import build_teacher

    d = cfg.distillation
    spec = d.teacher if d.teacher is not None else cfg.model.source
    return build_teacher(
        spec,
        attn_impl=cfg.model.attn_impl,
        seed=cfg.seed,
        alpha=d.alpha,
        temperature=d.temperature,
        chunk_size=d.chunk_size,
    )


def build_optimizer(model: ComposerShearedLlama, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """DecoupledAdamW over three groups: model weights (lr), mask logits (mask_lr), multipliers (lambda_lr)."""
    if cfg.name != "decoupled_adamw":
        raise ValueError(f"optimizer.name {cfg.name!r} is not supported; use decoupled_adamw")
    parts = model.parameter_groups()
    weights, masks, lambdas = parts["weights"], parts["masks"], parts["multipliers"]
    groups: list[dict[str, Any]] = [{"params": weights}]
    if masks:
        groups.append({"params": masks, "lr": cfg.mask_lr})
    if lambdas:
        groups.append({"params": lambdas, "lr": cfg.lambda_lr})
    optimizer = DecoupledAdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    if model.l0 is not None:
        model.l0.clamp_after_steps(optimizer)  # stored mask logits stay in [ln 0.01, ln 100] on every rank
    return optimizer


def build_loader(loader_cfg: dict[str, Any], tokenizer, batch_size: int):
    return build_dataloader(dict(loader_cfg), tokenizer, batch_size)


def build_evaluators(cfg: RunConfig, tokenizer) -> list[Evaluator]:
    if not cfg.eval_loader:
        return []
    loader = build_loader(cfg.eval_loader, tokenizer, cfg.device_eval_batch_size)
    return [
        Evaluator(
            label="eval", dataloader=loader, metric_names=["LanguageCrossEntropy", "LanguagePerplexity"]
        )
    ]


def build_algorithms(cfg: RunConfig) -> list:
    """The yaml's ``algorithms:`` plus, for a pruning run, ``pruning.algorithm`` (default
    ``lagrangian_pruning``), all built through llm-foundry's algorithm registry."""
    algorithms = [build_algorithm(name, kwargs or {}) for name, kwargs in cfg.algorithms.items()]
    if cfg.pruning is not None:
        algorithms.append(
            build_algorithm(cfg.pruning.algorithm, {"lagrangian_warmup": cfg.pruning.lagrangian_warmup})
        )
    return algorithms


def resolve_reference_losses(cfg: RunConfig, model: ComposerShearedLlama) -> None:
    """``dynamic_loading.reference_losses: source`` -> the source model's per-domain eval loss, computed now;
    ``teacher`` -> the distillation teacher's (already in memory), so the signal is the teacher-student gap.

    SPEC §3 option (b). It costs one pass over the eval split before training; for large models compute
    it once with ``python -m shearing.reference_losses --model ...`` and pass the JSON file instead.
    """
    options = cfg.callbacks.get("dynamic_loading")
    which = (options or {}).get("reference_losses")
    if which not in ("source", "teacher"):
        return
    dataset = (cfg.eval_loader or {}).get("dataset") or {}
    if "local" not in dataset:
        raise ValueError(f"dynamic_loading.reference_losses={which} needs an eval_loader with dataset.local")
    if which == "teacher" and getattr(model, "teacher", None) is None:
        raise ValueError(
            "dynamic_loading.reference_losses=teacher needs a distillation: section (the teacher to evaluate)"
        )
    from shearing.reference_losses import domain_eval_losses

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    evaluated = model.model if which == "source" else model.teacher.model
    losses = domain_eval_losses(
        evaluated.to(device),
        dataset["local"],
        batch_size=cfg.device_eval_batch_size,
        max_seqs=dataset.get("max_seqs_per_domain"),
        progress=dist.get_global_rank() == 0,
    )
    log.info("reference losses from the %s model: %s", which, losses)
    options["reference_losses"] = losses


def resolve_initial_proportions(cfg: RunConfig) -> None:
    """``dynamic_loading.initial_proportions`` may name a previous run's folder: use its final proportions."""
    options = cfg.callbacks.get("dynamic_loading") or {}
    spec = options.get("initial_proportions")
    if isinstance(spec, str) and Path(spec).is_dir():
        from shearing.callbacks.dynamic_loading import FILE_STEM

        path = Path(spec) / f"{FILE_STEM}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"dynamic_loading.initial_proportions={spec} is a folder without {path.name}: "
                "give the pruning run's save_folder (it writes that file) or a list of proportions"
            )
        options["initial_proportions"] = str(path)


def build_callbacks(cfg: RunConfig) -> list:
    # The non-finite guard comes first: it must stop a diverged step before the export or a checkpoint.
    guard = NonFiniteGuard(cfg.save_folder, cfg.save_interval)
    callbacks = [guard, *(build_callback(name, kwargs or {}, cfg) for name, kwargs in cfg.callbacks.items())]
    export = build_export_callback(cfg)  # checks export.folder against the run folder again
    if export is not None:
        callbacks.append(export)
    return callbacks


def prepare_save_folder(cfg: RunConfig, model: ComposerShearedLlama) -> None:
    """Rank 0: a writable folder with room for a checkpoint, what failed writes left cleared away, and a
    readable latest checkpoint to resume. Every rank calls it; a refusal on rank 0 stops them all."""
    if cfg.save_folder is None:
        return
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # a frozen teacher is not saved

    def prepare() -> None:
        check_save_folder(cfg.save_folder, checkpoint_bytes=params * 4 * 3)  # fp32 weights + two Adam moments
        if cfg.autoresume_enabled:
            tidy_save_folder(cfg.save_folder)

    on_rank_zero("the save_folder checks", prepare)  # the other ranks wait here: none reads the folder yet


def start_process_group(cfg: RunConfig) -> None:
    """Multi-process runs: the process group now (the Trainer would start it later and reuses it), so that
    global rank 0's save_folder verdicts (lock, shared-folder check, run record) reach every rank and a
    refusal stops every node at once instead of leaving them waiting ``dist_timeout`` for rank 0."""
    if dist.get_world_size() > 1:
        dist.initialize_dist(cfg.device, cfg.dist_timeout)


def build_trainer(cfg: RunConfig) -> Trainer:
    with refusing():  # everything before the model is built: a refusal is a message, not a traceback
        tokenizer = build_tokenizer(cfg)  # loaded once: the data check and the loaders share it
        validate_run(cfg, tokenizer)
        announce_outputs(cfg)  # rank 0: where checkpoints and the export go, before anything loads
        parallelism = build_parallelism_config(cfg.fsdp_config, pruning=cfg.pruning is not None)  # FSDP2
        check_run_record(cfg)  # a resume must continue the same run (source, target, families, data, ...)
    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg)
    prepare_save_folder(cfg, model)
    device_batch_size = cfg.global_train_batch_size // dist.get_world_size()
    train_loader = build_loader(cfg.train_loader, tokenizer, device_batch_size)
    domains = loader_domains(train_loader)
    if domains:
        model.set_domains(domains)
    evaluators = build_evaluators(cfg, tokenizer)
    if domains:
        for evaluator in evaluators:
            evaluator.metric_names = list(model.eval_metrics)
    resolve_reference_losses(cfg, model)
    resolve_initial_proportions(cfg)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(
        cfg.scheduler.name, {"t_warmup": cfg.scheduler.t_warmup, "alpha_f": cfg.scheduler.alpha_f}
    )
    trainer = ShearingTrainer(  # Composer's Trainer; absent domains log no train loss
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluators or None,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=build_algorithms(cfg),
        callbacks=build_callbacks(cfg),
        loggers=build_loggers(  # W&B / MLflow made safe for autoresume (shearing.loggers)
            cfg.loggers, save_folder=cfg.save_folder, run_name=cfg.run_name, autoresume=cfg.autoresume_enabled
        ),
        max_duration=cfg.max_duration,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        device=cfg.device,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        precision=cfg.precision,
        parallelism_config=parallelism,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=cfg.autoresume_enabled,
        load_path=cfg.load_path,
        seed=cfg.seed,
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
        dist_timeout=cfg.dist_timeout,
    )
    if cfg.save_folder is not None:  # after Composer's saver, which the Trainer appended last
        trainer.state.callbacks.append(
            SupersededCheckpointSweep(cfg.save_folder, cfg.save_num_checkpoints_to_keep)
        )
    return trainer


def train_from_yaml(path: str | os.PathLike, overrides: list[str] | None = None) -> Trainer:
    """Load the yaml, build the trainer, train; returns the trainer (its state holds the result)."""
    setup_console_logging()  # rank 0 shows shearing's INFO lines (reference losses, export location)
    composer_compat.warn_if_torch_untested()  # a torch newer than the tested ones: said once, on rank 0
    with refusing():
        cfg = load_config(path, overrides)
        check_paths(cfg)  # before the save_folder is created (its lock), and again in validate_run
    start_process_group(cfg)
    with contextlib.ExitStack() as held:
        with refusing():  # one run per save_folder (rank 0), released on any exit
            held.enter_context(hold_save_folder(cfg.save_folder))
        trainer = build_trainer(cfg)
        if run_is_finished(trainer):  # Composer's fit() would raise "No training would occur"
            finish_run(trainer)
            return trainer
        if cfg.eval_first and int(trainer.state.timestamp.batch) == 0 and trainer.state.evaluators:
            trainer.eval()
        trainer.fit()
    return trainer
