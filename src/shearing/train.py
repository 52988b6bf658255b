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
from typing import Any

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.optim import DecoupledAdamW
from composer.utils import dist, reproducibility
from llmfoundry.data.dataloader import build_dataloader
from llmfoundry.utils.builders import build_algorithm, build_callback, build_scheduler

import shearing.composer.registry  # noqa: F401  (joins llm-foundry's registries)
from shearing.checkpoints import check_save_folder, tidy_save_folder
from shearing.composer import compat as composer_compat
from shearing.composer.callbacks.export import ExportOnFitEnd, build_export_callback
from shearing.composer.callbacks.guard import NonFiniteGuard
from shearing.composer.loggers import build_loggers
from shearing.composer.model import ComposerShearedLlama
from shearing.composer.parallelism import build_parallelism_config
from shearing.composer.run_folder import (
    SupersededCheckpointSweep,
    check_run_record,
    hold_save_folder,
    on_rank_zero,
)
from shearing.composer.trainer import ShearingTrainer
from shearing.config import OptimizerConfig, RunConfig, load_config
from shearing.data.dataloader import loader_domains
from shearing.folders import EXPORT_SUMMARY
from shearing.io import read_json_or_none
from shearing.progress import announce_outputs, setup_console_logging
from shearing.refusals import refusing
from shearing.spec import RunSpec, resolve_run, tokenizer_path

log = logging.getLogger(__name__)

composer_compat.apply()  # Composer 0.32 workarounds (multi-node signal files), once per process


def validate_run(cfg: RunConfig, tokenizer=None) -> RunSpec:
    """Every check that must fail before anything expensive starts; the resolved, frozen ``RunSpec``
    (``shearing.spec.resolve_run``; ``shearing.validation`` holds most checks).

    ``tokenizer``: the model's tokenizer when the caller has loaded it already (else loaded for the data check).
    """
    return resolve_run(cfg, tokenizer)


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


def build_model(spec: RunSpec) -> ComposerShearedLlama:
    """The run's Composer model, built by the registry entry ``model.name`` (default ``shearing_llama``;
    called with the ``RunSpec``), with the frozen distillation teacher as its ``teacher`` child when the yaml
    has ``distillation:``."""
    from llmfoundry import registry

    cfg = spec.cfg
    model = registry.models.get(cfg.model.name)(spec)
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


def build_loader(spec: RunSpec, key: str, tokenizer, batch_size: int):
    """Loader ``key`` ("train_loader" / "eval_loader") through llm-foundry's registry; a domain loader gets
    the manifest the spec read (``dataset["manifest"]``, not a yaml key) instead of reading it again."""
    loader_cfg = dict(getattr(spec.cfg, key))
    manifest = spec.manifest(key)
    if manifest is not None:
        loader_cfg["dataset"] = {**loader_cfg["dataset"], "manifest": manifest}
    return build_dataloader(loader_cfg, tokenizer, batch_size)


def build_evaluators(spec: RunSpec, tokenizer) -> list[Evaluator]:
    if not spec.cfg.eval_loader:
        return []
    loader = build_loader(spec, "eval_loader", tokenizer, spec.cfg.device_eval_batch_size)
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


def resolve_reference_losses(spec: RunSpec, model: ComposerShearedLlama) -> Any:
    """``dynamic_loading.reference_losses`` as the callback takes it: ``source`` -> the source model's per-domain
    eval loss, computed now; ``teacher`` -> the distillation teacher's (already in memory), so the signal is the
    teacher-student gap; a mapping or a file path as written.

    SPEC §3 option (b). It costs one pass over the eval split before training; for large models compute
    it once with ``python -m shearing.reference_losses --model ...`` and pass the JSON file instead.
    """
    cfg = spec.cfg
    which = (cfg.callbacks.get("dynamic_loading") or {}).get("reference_losses")
    if which not in ("source", "teacher"):
        return which
    from shearing.reference_losses import domain_eval_losses

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    evaluated = model.model if which == "source" else model.teacher.model
    dataset = cfg.eval_loader["dataset"]  # validation: reference_losses source/teacher needs dataset.local
    losses = domain_eval_losses(
        evaluated.to(device),
        dataset["local"],
        batch_size=cfg.device_eval_batch_size,
        max_seqs=dataset.get("max_seqs_per_domain"),
        progress=dist.get_global_rank() == 0,
        manifest=spec.manifest("eval_loader"),
    )
    log.info("reference losses from the %s model: %s", which, losses)
    return losses


def build_callbacks(cfg: RunConfig, resolved: dict[str, dict[str, Any]] | None = None) -> list:
    """The yaml's ``callbacks:`` through llm-foundry's registry, each with the values ``resolved`` gives for
    its keys (e.g. dynamic loading's reference losses computed from the source), plus the guard and export."""
    # The non-finite guard comes first: it must stop a diverged step before the export or a checkpoint.
    guard = NonFiniteGuard(cfg.save_folder, cfg.save_interval)
    resolved = resolved or {}
    callbacks = [
        guard,
        *(
            build_callback(name, {**(kwargs or {}), **resolved.get(name, {})}, cfg)
            for name, kwargs in cfg.callbacks.items()
        ),
    ]
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


def check_run(cfg: RunConfig) -> tuple[RunSpec, Any]:
    """The run's spec and the model's tokenizer (None for a random-init source without one): every check of
    the config, its files and this machine, made before the save_folder is locked or anything loads; a
    refusal is a message, not a traceback (``refusing``)."""
    with refusing():
        tokenizer = build_tokenizer(cfg)  # loaded once: the data check and the loaders share it
        return validate_run(cfg, tokenizer), tokenizer


def build_trainer(spec: RunSpec, tokenizer: Any = None) -> Trainer:
    """The Composer trainer of a checked run (``check_run``); ``tokenizer``: the one ``check_run`` loaded."""
    cfg = spec.cfg
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg)
    with refusing():  # everything before the model is built: a refusal is a message, not a traceback
        announce_outputs(cfg)  # rank 0: where checkpoints and the export go, before anything loads
        parallelism = build_parallelism_config(cfg.fsdp_config, pruning=cfg.pruning is not None)  # FSDP2
        # a resume must continue the same run (source, target, families, data, ...)
        check_run_record(cfg, spec.record())
    reproducibility.seed_all(cfg.seed)
    model = build_model(spec)
    prepare_save_folder(cfg, model)
    device_batch_size = cfg.global_train_batch_size // dist.get_world_size()
    train_loader = build_loader(spec, "train_loader", tokenizer, device_batch_size)
    domains = loader_domains(train_loader)
    if domains:
        model.set_domains(domains)
    evaluators = build_evaluators(spec, tokenizer)
    if domains:
        for evaluator in evaluators:
            evaluator.metric_names = list(model.eval_metrics)
    resolved = {}
    if "dynamic_loading" in cfg.callbacks:  # the values the callback takes, resolved; cfg stays as written
        resolved["dynamic_loading"] = {
            "reference_losses": resolve_reference_losses(spec, model),
            "initial_proportions": spec.initial_proportions,
        }
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
        callbacks=build_callbacks(cfg, resolved),
        loggers=build_loggers(  # W&B / MLflow made safe for autoresume (shearing.composer.loggers)
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


def run_is_finished(trainer) -> bool:
    """The resumed timestamp has reached max_duration: Composer's ``fit()`` would refuse to train."""
    state = trainer.state
    if state.max_duration is None:
        return False
    return state.max_duration <= state.timestamp.get(state.max_duration.unit)


def finish_run(trainer) -> None:
    """Do what a finished run may still lack (the export at fit end, cut short by a crash); every rank calls it.

    The export is redone unless ``shearing_export.json`` in the export folder says it was written from
    this very batch. Rerunning a complete run is therefore a no-op that says where its result is.
    """
    state = trainer.state
    step = int(state.timestamp.batch)
    done = f"trained to batch {step} (max_duration {state.max_duration})"
    exports = [cb for cb in state.callbacks if isinstance(cb, ExportOnFitEnd)]
    guards = [cb for cb in state.callbacks if isinstance(cb, NonFiniteGuard)]
    messages = []
    for export in exports:
        # Rank 0's reading decides for every rank (the export is a collective): an export folder that only
        # rank 0's node sees must not make the other nodes skip it.
        written = [(read_json_or_none(export.folder / EXPORT_SUMMARY) or {}).get("checkpoint_batch")]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(written, src=0)
        if written[0] == step:
            messages.append(f"the export at {export.folder} is from batch {step}")
            continue
        for guard in guards:
            guard.check_weights(state, step, "before the export")
        log.info("the run is %s but its export at %s is missing or older: exporting now", done, export.folder)
        export.fit_end(state, trainer.logger)
        messages.append(f"exported it now to {export.folder}")
    if dist.get_global_rank() == 0:
        tail = "; ".join(messages) if messages else "nothing to export (export.on_fit_end is off)"
        message = f"the run is complete: {done}; {tail}. To train further, raise max_duration."
        log.info(message)
        print(message, flush=True)


def train_from_yaml(path: str | os.PathLike, overrides: list[str] | None = None) -> Trainer:
    """Load the yaml, build the trainer, train; returns the trainer (its state holds the result)."""
    setup_console_logging()  # rank 0 shows shearing's INFO lines (reference losses, export location)
    composer_compat.warn_if_torch_untested()  # a torch newer than the tested ones: said once, on rank 0
    with refusing():
        cfg = load_config(path, overrides)
    spec, tokenizer = check_run(cfg)  # before the save_folder is created (its lock)
    start_process_group(cfg)
    with contextlib.ExitStack() as held:
        with refusing():  # one run per save_folder (rank 0), released on any exit
            held.enter_context(hold_save_folder(cfg.save_folder))
        trainer = build_trainer(spec, tokenizer)
        if run_is_finished(trainer):  # Composer's fit() would raise "No training would occur"
            finish_run(trainer)
            return trainer
        if cfg.eval_first and int(trainer.state.timestamp.batch) == 0 and trainer.state.evaluators:
            trainer.eval()
        trainer.fit()
    return trainer
