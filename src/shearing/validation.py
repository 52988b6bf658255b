"""Every check of a run config that can be made before the model loads: one place, one pass, cheap.

``validate_config(cfg)`` runs in ``train.validate_run``, before any weights are read and before the
source model's reference evaluation, so that a typo costs seconds, not the load of a 7B model. Each
check is a small function raising ``ValueError`` whose message names the field, the bad value and the
fix. The checks, in order:

1. Time strings (``check_times``). Composer reads a bare integer as *epochs*, and the domain-mixture
   stream is infinite, so ``eval_interval: 50`` would silently mean "never". A value without a unit,
   a malformed one (``300steps``) or a unit the field cannot use is refused; ``ep`` is refused
   everywhere when the train loader is the (endless) ``domain_mixture`` stream.
2. Keys (``check_loader_keys``, ``check_registry_kwargs``): the keys of ``train_loader`` /
   ``eval_loader``, of their ``dataset`` (for our ``domain_mixture`` / ``domain_eval`` datasets), and of
   every ``callbacks.*`` / ``algorithms.*`` / ``loggers.*`` entry are compared with the constructor
   signature of what llm-foundry's registry would build (``inspect.signature``); an unknown key gets a
   "did you mean", an unknown name the list of registered names. A signature with ``**kwargs`` accepts
   anything and is not checked.
3. Enumerated values (``check_choices``): precision (Composer 0.32: fp32, amp_bf16, amp_fp16, amp_fp8;
   plain ``bf16`` is not one), ``model.attn_impl``, ``export.dtype``, ``optimizer.name``,
   ``scheduler.name`` (foundry's scheduler registry), ``model.name`` / ``pruning.algorithm`` (foundry's
   models / algorithms registries), ``pruning.eval_masks``, ``pruning.init``,
   ``callbacks.dynamic_loading.update``.
4. Cross-field (``check_domains``, ``check_context_length``): with dynamic loading, the train and eval
   loaders read the same domains in the same order (their ``domains:`` lists, else the manifests'), a
   mapping of reference losses names exactly the train domains, and ``max_seq_len`` fits the source's
   ``max_position_embeddings`` and, for a source or teacher with a sliding window, the window
   (``shearing.models.family.check_sliding_window``).
   ``distillation:`` (``check_distillation``): alpha in [0, 1], temperature > 0, chunk_size >= 0, a teacher
   folder with the source's vocabulary and room for max_seq_len; ``reference_losses: teacher`` needs it.
   ``pruning.init: importance`` (``check_importance_init``): a positive ``calibration_sequences`` read from
   a ``domain_mixture`` train loader whose train split holds that many sequences.
5. Files (``check_source_files``, and the manifests read by 4): a damaged ``manifest.json``,
   ``config.json`` or safetensors file is an error naming the file; safetensors are checked by their
   headers only (``hf_io.check_safetensors_file``), so this costs no weight reads.
6. Numbers and paths (``check_numbers``, ``check_paths``), each by the rule of the component that reads
   it: batch sizes positive; optimizer learning rates finite (``lr`` > 0), betas in [0, 1), eps > 0,
   weight decay >= 0; ``max_seqs_per_domain`` positive; initial proportions (``train_loader.dataset.proportions``,
   ``dynamic_loading.initial_proportions`` as numbers) by the mixture's own ``validate_proportions`` against
   the train domains; ``eta``/``smoothing`` by the callback's ``check_update_options``; reference losses
   positive; ``autoresume`` with a
   ``save_folder``; a local ``load_path`` that exists; a ``save_folder`` that is not, and is not inside, the
   data or the source model's folder; every domain folder a loader reads holds its ``index.json``.
   Warned, not refused (a shortened smoke run of a recipe does both): in batches, a Lagrangian warmup
   longer than the run (the export gate will refuse the masks) and, with dynamic loading, an
   ``eval_interval`` longer than the run (the mixture never changes).

``local=False`` skips everything that reads files or asks about this machine (used for yamls that
point at folders which exist only on the cluster, e.g. when testing the committed recipes).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shearing.config import RunConfig
from shearing.run_files import RunFiles

log = logging.getLogger(__name__)

DOMAIN_LOADERS = ("domain_mixture", "domain_eval")
INFINITE_TRAIN_LOADERS = ("domain_mixture",)
EVAL_MASKS = ("expected", "final")
PRUNING_INITS = ("constant", "importance")
OPTIMIZERS = ("decoupled_adamw",)
UNIT_NAMES = {
    "ba": "batches",
    "sp": "samples",
    "tok": "tokens",
    "dur": "fraction of max_duration",
    "ep": "epochs",
}

# field -> (units it may use, whether zero is allowed); ``ep`` is dropped for endless train loaders.
TIME_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "max_duration": (("ba", "sp", "tok", "ep"), False),
    "eval_interval": (("ba", "sp", "tok", "dur", "ep"), False),
    "save_interval": (("ba", "sp", "tok", "dur", "ep"), False),
    "console_log_interval": (("ba", "ep"), False),
    "scheduler.t_warmup": (("ba", "sp", "tok", "dur", "ep"), True),
    "pruning.lagrangian_warmup": (("ba", "dur"), True),
}


def validate_config(cfg: RunConfig, local: bool = True, files: RunFiles | None = None) -> None:
    """All checks of the module docstring; ``local=False`` skips the ones that read files or the machine.
    ``files``: the run's ``RunFiles`` (``shearing.run_files``), through which each config.json and manifest is
    read once; a fresh one when not given."""
    files = files if files is not None else RunFiles()
    check_times(cfg)
    check_choices(cfg, local=local)
    check_loader_keys(cfg)
    check_registry_kwargs(cfg)
    check_dynamic_loading(cfg, local=local)
    check_distillation(cfg, local=local, files=files)
    check_importance_init(cfg, local=local, files=files)
    check_domains(cfg, local=local, files=files)
    check_context_length(cfg, local=local, files=files)
    check_numbers(cfg, local=local, files=files)
    if local:
        check_source_files(cfg, files=files)
        check_paths(cfg, files=files)


# ---------------------------------------------------------------------------------------------------
# 1. Time strings


def _get(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


def parse_time(field: str, value: Any, units: Sequence[str], allow_zero: bool = False, why: str = ""):
    """``value`` as a Composer ``Time`` in one of ``units``; else a ValueError that names the fix."""
    from composer.core import Time

    text = str(value).strip()
    example = next(iter(units))
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and not isinstance(value, bool):
        unit = "dur" if 0 < number < 1 and "dur" in units else ("ba" if "ba" in units else example)
        raise ValueError(
            f"{field}={value} has no unit: write '{text}{unit}' ({UNIT_NAMES[unit]}); "
            f"a bare number would be read as epochs. Units {field} accepts: {_units(units)}"
        )
    try:
        time = Time.from_timestring(text)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{field}={value!r} is not a time string ({e}): write a number and a unit, e.g. '300{example}'; "
            f"units {field} accepts: {_units(units)}"
        ) from None
    unit = time.unit.value
    if unit not in units:
        raise ValueError(
            f"{field}={value!r} is in {UNIT_NAMES.get(unit, unit)}, which {field} cannot use"
            f"{why if unit == 'ep' else ''}: "
            f"write it in {_units(units)} (e.g. '300{example}')"
        )
    if time.value < 0 or (time.value == 0 and not allow_zero) or (unit == "dur" and time.value > 1):
        bound = "between 0 and 1" if unit == "dur" else ("0 or more" if allow_zero else "positive")
        raise ValueError(f"{field}={value!r} must be {bound}")
    return time


def _units(units: Sequence[str]) -> str:
    return ", ".join(f"{u} ({UNIT_NAMES[u]})" for u in units)


def check_times(cfg: RunConfig) -> None:
    """Every duration field has a unit it can use (the module docstring, point 1)."""
    endless = (cfg.train_loader or {}).get("name") in INFINITE_TRAIN_LOADERS
    why = " (the domain_mixture train stream is endless, so an epoch never ends)" if endless else ""
    times = {}
    for field, (units, allow_zero) in TIME_FIELDS.items():
        value = _get(cfg, field)
        if value is None:
            continue
        if endless:
            units = tuple(u for u in units if u != "ep")
        times[field] = parse_time(field, value, units, allow_zero, why)
    warmup = times.get("pruning.lagrangian_warmup")
    if warmup is not None and warmup.unit.value == "dur" and times["max_duration"].unit.value != "ba":
        raise ValueError(
            f"pruning.lagrangian_warmup={cfg.pruning.lagrangian_warmup!r} is a fraction of max_duration, which "
            f"is {cfg.max_duration!r}: give max_duration in batches (e.g. '3200ba') or the warmup in batches"
        )


# ---------------------------------------------------------------------------------------------------
# 2. Keys against constructor signatures


def _params(target: Callable) -> tuple[list[str], list[str]] | None:
    """(accepted keyword names, required ones) of ``target``; None when it takes ``**kwargs``."""
    params = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in params if p.name in names and p.default is inspect.Parameter.empty]
    return names, required


def check_kwargs(where: str, kwargs: Any, target: Callable, reserved: Sequence[str] = ()) -> None:
    """``kwargs`` (a mapping from the yaml) fit ``target``'s signature; ``reserved`` are set by our code."""
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where} must be a mapping of arguments, got {kwargs!r}")
    spec = _params(target)
    if spec is None:
        return
    names, required = (
        [n for n in spec[0] if n not in reserved],
        [n for n in spec[1] if n not in reserved],
    )
    label = getattr(target, "__qualname__", str(target))
    for key in kwargs:
        if key in names:
            continue
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: unknown key {key!r}{hint}; {label} accepts {sorted(names)}")
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ValueError(f"{where} is missing required key(s) {missing}; {label} needs them")


def _registered(kind: str, name: str) -> tuple[Callable, tuple[str, ...]]:
    """What llm-foundry's registry ``kind`` builds for ``name``, and the arguments our code passes itself."""
    from llmfoundry import registry

    import shearing.composer.registry  # noqa: F401  (our names join foundry's registries)

    if kind == "callbacks" and name in registry.callbacks_with_config:
        return registry.callbacks_with_config.get(name), ("train_config",)
    table = getattr(registry, kind)
    if name not in table:
        known = sorted(table.get_all())
        if kind == "callbacks":
            known = sorted({*known, *registry.callbacks_with_config.get_all()})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{kind}.{name}: unknown name {name!r}{hint}; registered {kind}: {', '.join(known)}")
    return table.get(name), ()


def check_registry_kwargs(cfg: RunConfig) -> None:
    """Every ``callbacks.*``, ``algorithms.*`` and ``loggers.*`` entry names a registered class and its keys."""
    for kind in ("callbacks", "algorithms", "loggers"):
        for name, kwargs in (getattr(cfg, kind) or {}).items():
            target, reserved = _registered(kind, str(name))
            check_kwargs(f"{kind}.{name}", kwargs, target, reserved)


def _dataset_class(loader_name: str):
    """The dataset class of one of our domain loaders and its constructor arguments the builder fills in."""
    from shearing.data.dataloader import DomainEvalDataset, DomainMixtureDataset

    dataset = DomainMixtureDataset if loader_name == "domain_mixture" else DomainEvalDataset
    return dataset, dataset.NOT_YAML_KEYS


def check_loader_keys(cfg: RunConfig) -> None:
    """``train_loader`` / ``eval_loader`` keys against the registered builder, and our datasets' keys."""
    for key, loader in (("train_loader", cfg.train_loader), ("eval_loader", cfg.eval_loader)):
        if loader is None:
            continue
        if not isinstance(loader, Mapping) or "name" not in loader:
            raise ValueError(
                f"{key} must be a mapping with a 'name' (e.g. name: domain_mixture), got {loader!r}"
            )
        name = str(loader["name"])
        builder, _ = _registered("dataloaders", name)
        rest = {k: v for k, v in loader.items() if k != "name"}
        check_kwargs(key, rest, builder, reserved=("tokenizer", "device_batch_size"))
        if name in DOMAIN_LOADERS:
            dataset_cls, reserved = _dataset_class(name)
            check_kwargs(f"{key}.dataset", loader.get("dataset"), dataset_cls, reserved)


# ---------------------------------------------------------------------------------------------------
# 3. Enumerated values


def _choice(field: str, value: Any, choices: Sequence[str], extra: str = "") -> None:
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{field}={value!r} is not one of {list(choices)}{hint}{extra}")


def check_choices(cfg: RunConfig, local: bool = True) -> None:
    """Fields with a fixed set of values (the module docstring, point 3)."""
    from composer.core import Precision
    from llmfoundry import registry

    from shearing.composer.callbacks.dynamic_loading import UPDATES
    from shearing.export.hf import DTYPES
    from shearing.models.llama import ATTN_IMPLS

    precisions = [p.value for p in Precision]
    _choice("precision", cfg.precision, precisions, " (Composer's names; bf16 autocast is amp_bf16)")
    _choice("model.attn_impl", cfg.model.attn_impl, ATTN_IMPLS)
    _choice("export.dtype", cfg.export.dtype, list(DTYPES))
    _choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    _choice("scheduler.name", cfg.scheduler.name, sorted(registry.schedulers.get_all()))
    _choice(
        "model.name", cfg.model.name, sorted(registry.models.get_all()), " (llm-foundry's models registry)"
    )
    if cfg.pruning is not None:
        _choice("pruning.eval_masks", cfg.pruning.eval_masks, EVAL_MASKS)
        _choice("pruning.init", cfg.pruning.init, PRUNING_INITS)
        _choice(
            "pruning.algorithm",
            cfg.pruning.algorithm,
            sorted(registry.algorithms.get_all()),
            " (llm-foundry's algorithms registry)",
        )
    options = (cfg.callbacks or {}).get("dynamic_loading") or {}
    if "update" in options:
        _choice("callbacks.dynamic_loading.update", options["update"], UPDATES)
    if local and cfg.precision != "fp32":
        import torch

        on_cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
        if on_cpu:
            raise ValueError(
                f"precision={cfg.precision!r} needs a GPU but this run is on the CPU "
                f"(device={cfg.device!r}): set precision: fp32, or run on a GPU"
            )


# ---------------------------------------------------------------------------------------------------
# 4. Cross-field: domains, reference losses, context length


def check_importance_init(cfg: RunConfig, local: bool = True, files: RunFiles | None = None) -> None:
    """``pruning.init: importance`` reads ``calibration_sequences`` train sequences of the domain-mixture data."""
    if cfg.pruning is None:
        return
    n = cfg.pruning.calibration_sequences
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(
            f"pruning.calibration_sequences={n!r} must be a positive integer (a few hundred sequences suffice)"
        )
    if cfg.pruning.init != "importance":
        return
    loader = cfg.train_loader or {}
    local_path = (loader.get("dataset") or {}).get("local")
    if loader.get("name") not in INFINITE_TRAIN_LOADERS or local_path is None:
        raise ValueError(
            "pruning.init=importance reads its calibration sequences from a prepared data folder, but "
            f"train_loader is {loader.get('name')!r} without dataset.local: use train_loader.name: "
            "domain_mixture with dataset.local, or pruning.init: constant"
        )
    if not local:
        return
    from shearing.data.shards import _split_root

    _, split, manifest = _split_root(local_path, "train", (files or RunFiles()).manifest(local_path))
    domains = (loader.get("dataset") or {}).get("domains") or manifest.domain_names
    have = sum(getattr(manifest.domains[d], split).sequences for d in domains if d in manifest.domains)
    if have < n:
        raise ValueError(
            f"pruning.calibration_sequences={n} but the {split} split at {local_path} holds only {have} "
            "sequences: lower pruning.calibration_sequences"
        )


def configured_domains(
    key: str, loader: Mapping[str, Any] | None, local: bool, files: RunFiles | None = None
) -> list[str] | None:
    """The domains a domain loader reads: its ``dataset.domains``, else its manifest's (``local`` only)."""
    if not loader or loader.get("name") not in DOMAIN_LOADERS:
        return None
    dataset = loader.get("dataset") or {}
    listed = dataset.get("domains")
    path = dataset.get("local")
    manifest = None
    if local and path is not None and Path(path).exists():
        manifest = (files or RunFiles()).manifest(path)
    if listed is not None:
        if isinstance(listed, str) or not isinstance(listed, Sequence) or not listed:
            raise ValueError(
                f"{key}.dataset.domains must be a non-empty list of domain names, got {listed!r}"
            )
        listed = [str(d) for d in listed]
        if len(set(listed)) != len(listed):
            raise ValueError(f"{key}.dataset.domains={listed} repeats a domain: list each domain once")
        if manifest is not None:
            unknown = [d for d in listed if d not in manifest.domains]
            if unknown:
                raise ValueError(
                    f"{key}.dataset.domains names {unknown}, which the data at {path} does not hold "
                    f"(its manifest has {manifest.domain_names}): fix the list or variables.data_local"
                )
        return listed
    return manifest.domain_names if manifest is not None else None


def check_domains(cfg: RunConfig, local: bool = True, files: RunFiles | None = None) -> None:
    """With dynamic loading: train and eval domains agree, and a reference-loss mapping names exactly them."""
    files = files if files is not None else RunFiles()
    train = configured_domains("train_loader", cfg.train_loader, local, files)
    evaluation = configured_domains("eval_loader", cfg.eval_loader, local, files)
    options = (cfg.callbacks or {}).get("dynamic_loading")
    if options is None:
        return
    if train is not None and evaluation is not None and train != evaluation:
        if set(train) != set(evaluation):
            only_train = [d for d in train if d not in evaluation]
            only_eval = [d for d in evaluation if d not in train]
            detail = f"only in train: {only_train}, only in eval: {only_eval}"
        else:
            detail = "the same domains in another order"
        raise ValueError(
            f"dynamic loading needs the eval loader to read the train loader's domains in the same order, but "
            f"train_loader reads {train} and eval_loader reads {evaluation} ({detail}): set both "
            "dataset.domains to the same list (domain_idx indexes it)"
        )
    refs = options.get("reference_losses")
    if isinstance(refs, Mapping) and train is not None:
        missing = [d for d in train if d not in refs]
        extra = [str(d) for d in refs if d not in train]
        if missing or extra:
            raise ValueError(
                f"callbacks.dynamic_loading.reference_losses names {list(map(str, refs))} but the train domains "
                f"are {train} (missing: {missing}, not trained on: {extra}): give one loss per train domain"
            )
        for domain, value in refs.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(
                    f"callbacks.dynamic_loading.reference_losses.{domain}={value!r} must be a finite number"
                )


def check_dynamic_loading(cfg: RunConfig, local: bool = True) -> None:
    """What the dynamic-loading callback will need at its first event, checked now."""
    options = (cfg.callbacks or {}).get("dynamic_loading")
    if options is None:
        return
    name = (cfg.train_loader or {}).get("name")
    if name != "domain_mixture":
        raise ValueError(
            f"callbacks.dynamic_loading re-weights a domain mixture, but train_loader.name={name!r}: "
            "use train_loader.name: domain_mixture, or remove the callback"
        )
    refs = options.get("reference_losses")
    if refs == "teacher" and cfg.distillation is None:
        raise ValueError(
            "callbacks.dynamic_loading.reference_losses='teacher' uses the distillation teacher's per-domain eval "
            "loss, but the run has no distillation: section: add one (distillation: {alpha: 0.5}), or use "
            "reference_losses: source"
        )
    if refs in ("source", "teacher"):
        dataset = (cfg.eval_loader or {}).get("dataset") or {}
        if "local" not in dataset:
            raise ValueError(
                f"callbacks.dynamic_loading.reference_losses={refs!r} evaluates the {refs} model on the eval "
                "split: add an eval_loader (name: domain_eval) with dataset.local"
            )
    elif isinstance(refs, str) and local and not Path(refs).is_file():
        raise ValueError(
            f"callbacks.dynamic_loading.reference_losses={refs!r} is neither 'source' nor an existing file (nor "
            "'teacher'): give a mapping {domain: loss}, 'source', 'teacher' (with a distillation: section), or a "
            "ref.json written by python -m shearing.reference_losses"
        )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_distillation(cfg: RunConfig, local: bool = True, files: RunFiles | None = None) -> None:
    """``distillation:``: alpha in [0, 1], temperature > 0, chunk_size >= 0, and a teacher folder whose
    vocabulary is the source's (its logits are compared token by token) and whose context fits max_seq_len."""
    d = cfg.distillation
    if d is None:
        return
    if not _finite(d.alpha) or not 0.0 <= d.alpha <= 1.0:
        raise ValueError(
            f"distillation.alpha={d.alpha!r} must be a number in [0, 1] (the weight of the KD term; 1 - alpha "
            "weighs the LM cross-entropy)"
        )
    if not _finite(d.temperature) or d.temperature <= 0:
        raise ValueError(
            f"distillation.temperature={d.temperature!r} must be a positive number (1.0: plain softmax)"
        )
    if d.chunk_size < 0:
        raise ValueError(
            f"distillation.chunk_size={d.chunk_size} must be 0 (the whole sequence at once) or a positive number "
            "of sequence positions per teacher-logits chunk"
        )
    if d.teacher is None or not local:
        return
    from shearing.models.family import check_sliding_window
    from shearing.models.shapes import is_checkpoint_dir, source_max_positions

    files = files if files is not None else RunFiles()
    if not is_checkpoint_dir(d.teacher):
        raise ValueError(
            f"distillation.teacher={d.teacher!r} is not a Hugging Face checkpoint folder (config.json and weights): "
            "give such a folder (save_pretrained writes one), or null to distil from model.source"
        )
    teacher = files.config_json(d.teacher)
    check_sliding_window(teacher, cfg.max_seq_len, f"{d.teacher}/config.json")
    source_vocab = _source_vocab_size(cfg.model.source, files)
    if source_vocab is not None and teacher.get("vocab_size") != source_vocab:
        raise ValueError(
            f"distillation.teacher={d.teacher} has vocab_size={teacher.get('vocab_size')} but model.source has "
            f"{source_vocab}: the KD loss compares the two models' next-token distributions, so they must share "
            "a tokenizer; give a teacher of the same vocabulary"
        )
    limit = source_max_positions(d.teacher, teacher)
    if cfg.max_seq_len > limit:
        raise ValueError(
            f"max_seq_len={cfg.max_seq_len} is longer than distillation.teacher's max_position_embeddings={limit}: "
            f"lower max_seq_len to at most {limit}, or use another teacher"
        )
    check_weight_files(d.teacher, teacher)


def _source_vocab_size(source: Any, files: RunFiles) -> int | None:
    """The source's vocabulary (checkpoint, named shape or shape mapping); None when the source itself is
    unusable, which the source checks report."""
    from shearing.models.shapes import is_checkpoint_dir, resolve_source_shape

    try:
        config = files.config_json(source) if is_checkpoint_dir(source) else None
        return resolve_source_shape(source, config=config).vocab_size
    except ValueError:
        return None


def check_context_length(cfg: RunConfig, local: bool = True, files: RunFiles | None = None) -> None:
    """``max_seq_len`` must fit the source's ``max_position_embeddings`` (config.json or the named shape)."""
    from shearing.models.family import check_sliding_window
    from shearing.models.shapes import is_checkpoint_dir, source_max_positions

    source = cfg.model.source
    if is_checkpoint_dir(source) and not local:
        return
    if isinstance(source, str) and not is_checkpoint_dir(source):
        from shearing.models.shapes import NAMED_SHAPES

        if source not in NAMED_SHAPES:
            return  # a path that is not there: resolve_source_shape says so
    config = (files or RunFiles()).config_json(source) if is_checkpoint_dir(source) else None
    limit = source_max_positions(source, config)
    if cfg.max_seq_len > limit:
        raise ValueError(
            f"max_seq_len={cfg.max_seq_len} is longer than the source's max_position_embeddings={limit} "
            f"({source}): lower max_seq_len to at most {limit} (and prepare the data at that length)"
        )
    if config is not None:  # a sliding window must not take effect within max_seq_len
        check_sliding_window(config, cfg.max_seq_len, f"{source}/config.json")


# ---------------------------------------------------------------------------------------------------
# 5. Files


def check_source_files(cfg: RunConfig, files: RunFiles | None = None) -> None:
    """A source checkpoint folder: config.json parses and every weight file HF would read is intact."""
    from shearing.models.shapes import is_checkpoint_dir

    if not is_checkpoint_dir(cfg.model.source):
        return
    config = (files or RunFiles()).config_json(cfg.model.source)
    check_weight_files(cfg.model.source, config)


def check_weight_files(folder: Any, config: Mapping[str, Any] | None = None) -> None:
    """Every safetensors file HF would read from checkpoint ``folder`` is intact (headers only, no weights)."""
    from shearing.models.hf_io import check_safetensors_file, hf_weight_files

    for file in hf_weight_files(folder, config):
        if file.suffix == ".safetensors":
            check_safetensors_file(file)


# ---------------------------------------------------------------------------------------------------
# 6. Numbers and paths


def _positive_int(field: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r} must be a positive integer: {fix}")


def _batches(field: str, value: Any) -> int | None:
    """``value`` in batches when it is written in batches, else None (other units are not compared)."""
    if value is None:
        return None
    from composer.core import Time

    time = Time.from_timestring(str(value).strip())
    return int(time.value) if time.unit.value == "ba" else None


def check_numbers(cfg: RunConfig, local: bool = True, files: RunFiles | None = None) -> None:
    """Batch sizes, optimizer numbers, proportions, dynamic-loading options and warmups (point 6)."""
    _positive_int("global_train_batch_size", cfg.global_train_batch_size, "the sequences per optimizer step")
    if cfg.device_train_microbatch_size != "auto":
        _positive_int(
            "device_train_microbatch_size",
            cfg.device_train_microbatch_size,
            "the sequences per forward on each device, or 'auto' (GPU only)",
        )
    _positive_int("device_eval_batch_size", cfg.device_eval_batch_size, "the sequences per eval forward")
    opt = cfg.optimizer
    for name in ("lr", "mask_lr", "lambda_lr", "eps", "weight_decay"):
        value = getattr(opt, name)
        if not _finite(value):
            raise ValueError(f"optimizer.{name}={value!r} must be a finite number")
    if opt.lr <= 0 or opt.eps <= 0 or opt.weight_decay < 0:
        raise ValueError(
            f"optimizer: need lr > 0, eps > 0 and weight_decay >= 0, got lr={opt.lr}, eps={opt.eps}, "
            f"weight_decay={opt.weight_decay}"
        )
    betas = list(opt.betas or ())
    if len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"optimizer.betas={opt.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    eval_dataset = (cfg.eval_loader or {}).get("dataset") or {}
    if eval_dataset.get("max_seqs_per_domain") is not None:
        _positive_int(
            "eval_loader.dataset.max_seqs_per_domain",
            eval_dataset["max_seqs_per_domain"],
            "how many eval sequences of each domain to read, or null for all of them",
        )
    domains = configured_domains("train_loader", cfg.train_loader, local, files)
    options = (cfg.callbacks or {}).get("dynamic_loading")
    candidates = [
        (
            "train_loader.dataset.proportions",
            ((cfg.train_loader or {}).get("dataset") or {}).get("proportions"),
        )
    ]
    if options is not None:
        candidates.append(
            ("callbacks.dynamic_loading.initial_proportions", options.get("initial_proportions"))
        )
    from shearing.data.mixture import validate_proportions

    for field, value in candidates:
        if value is None or isinstance(value, str):  # a str is a run folder or a file (read later)
            continue
        try:
            validate_proportions(
                value, domains if domains is not None else [str(i) for i in range(len(value))]
            )
        except ValueError as e:
            raise ValueError(f"{field}={value!r}: {e}") from None
    if options is not None:
        from shearing.composer.callbacks.dynamic_loading import check_update_options

        check_update_options(
            options.get("update", "paper"), options.get("eta", 1.0), options.get("smoothing", 1e-4)
        )
        refs = options.get("reference_losses")
        if isinstance(refs, Mapping):
            for domain, value in refs.items():
                if _finite(value) and value <= 0:
                    raise ValueError(
                        f"callbacks.dynamic_loading.reference_losses.{domain}={value!r} must be positive: a "
                        "reference loss is a cross-entropy the pruned model should reach (the source's own, say)"
                    )
    run = _batches("max_duration", cfg.max_duration)
    if run is None:
        return
    # Legal, and what a shortened smoke run of a recipe does, but rarely meant in a real run: said before
    # the model loads (a warning, not a refusal: the export gate still refuses unconverged masks).
    warmup = _batches("pruning.lagrangian_warmup", cfg.pruning.lagrangian_warmup if cfg.pruning else None)
    if warmup is not None and warmup > run:
        log.warning(
            "pruning.lagrangian_warmup=%r is longer than max_duration=%r: the target sparsity ramp ends at %.0f%% "
            "of the target and the export gate will refuse the masks; write the warmup as a fraction (e.g. "
            "0.2dur) or in batches at most max_duration",
            cfg.pruning.lagrangian_warmup,
            cfg.max_duration,
            100 * run / warmup,
        )
    interval = _batches("eval_interval", cfg.eval_interval)
    if options is not None and interval is not None and interval > run:
        log.warning(
            "eval_interval=%r is longer than max_duration=%r: dynamic loading updates the mixture after an "
            "evaluation, so this run trains on its initial proportions throughout; lower eval_interval for the "
            "mixture to adapt",
            cfg.eval_interval,
            cfg.max_duration,
        )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(cfg: RunConfig, files: RunFiles | None = None) -> None:
    """``autoresume``, ``load_path`` and ``save_folder`` against this machine's folders (point 6)."""
    if cfg.autoresume and cfg.save_folder is None:
        raise ValueError(
            "autoresume=true needs a save_folder to resume from: set variables.save_folder (or save_folder), "
            "or drop autoresume"
        )
    if cfg.load_path and "://" not in str(cfg.load_path) and not Path(cfg.load_path).exists():
        raise FileNotFoundError(
            f"load_path={cfg.load_path} does not exist: give a Composer checkpoint file (a save_folder's "
            "latest-rank0.pt or ep*-ba*-rank0.pt), or drop load_path"
        )
    for key, loader in (("train_loader", cfg.train_loader), ("eval_loader", cfg.eval_loader)):
        local = ((loader or {}).get("dataset") or {}).get("local")
        domains = configured_domains(key, loader, True, files)
        for domain in domains or ():
            index = Path(local) / domain / "index.json"
            if not index.is_file():
                raise FileNotFoundError(
                    f"{key}.dataset.local={local}: domain {domain!r} has no {index} (its manifest lists it): the "
                    "data folder is incomplete; re-run data_prep/tokenize_domains.py into a new folder, or copy "
                    "the missing domain folder back"
                )
    if cfg.save_folder is None or "://" in str(cfg.save_folder):
        return
    save = Path(cfg.save_folder).expanduser().resolve()
    protected = []
    if isinstance(cfg.model.source, str) and Path(cfg.model.source).is_dir():
        protected.append(("model.source", Path(cfg.model.source)))
    for key, loader in (("train_loader", cfg.train_loader), ("eval_loader", cfg.eval_loader)):
        local = ((loader or {}).get("dataset") or {}).get("local")
        if local is not None:
            folder = Path(local)
            protected.append(
                (f"{key}.dataset.local", folder.parent if folder.name in ("train", "eval") else folder)
            )
    for key, folder in protected:
        if _inside(save, folder.expanduser().resolve()):
            raise ValueError(
                f"save_folder={cfg.save_folder} is inside {key} ({folder}): checkpoints and the export would be "
                "written among the inputs; set variables.save_folder to a folder of its own"
            )
