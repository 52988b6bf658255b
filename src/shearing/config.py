"""Typed run configuration: one yaml per run, a ``variables:`` block, validated before any work starts.

A run is ``composer train.py <yaml> [key=value ...]``. The yaml and the command-line overrides
(OmegaConf dot-list syntax, e.g. ``variables.target_model="{hidden_size: 2048, num_hidden_layers: 24}"``)
are merged, ``${variables.x}`` references resolved, and the result loaded into the dataclasses below.
An unknown or missing key is an error naming the key (and, for unknown keys, the closest known one),
so a typo never silently falls back to a default.

Every yaml exposes at least these variables: ``source_model`` (HF checkpoint dir or named shape),
``target_model`` (named shape or mapping of the five shape fields), ``data_local``, ``save_folder``,
``max_duration``, ``save_interval``, ``eval_interval``, ``seed``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REQUIRED_VARIABLES = (
    "source_model",
    "target_model",
    "data_local",
    "save_folder",
    "max_duration",
    "save_interval",
    "eval_interval",
    "seed",
)


@dataclass
class ModelConfig:
    """The model to start from."""

    source: Any  # HF checkpoint directory, or a named shape / mapping of shape fields for random init
    name: str = "shearing_llama"  # the llm-foundry models-registry entry that builds the Composer model
    source_shape: str | None = None  # named shape the recipe expects; checked against the checkpoint
    attn_impl: str = "sdpa"  # sdpa | flash | eager
    tokenizer: str | None = None  # tokenizer directory; default: the source directory
    activation_checkpointing: bool = False  # per-layer checkpointing without FSDP (FSDP has its own flag)


@dataclass
class PruningConfig:
    """Stage 1: learn masks that cut the source down to ``target``."""

    target: Any  # named shape, or mapping of the five shape fields
    families: list[str] = field(default_factory=lambda: ["hidden", "head", "intermediate", "layer"])
    lagrangian_warmup: str = "0.2dur"  # target sparsity ramps 0 -> final over this many steps
    eval_masks: str = "expected"  # expected: expected number of zeros per row | final: exact target
    algorithm: str = "lagrangian_pruning"  # the llm-foundry algorithms-registry entry that clocks the masks
    init: str = "constant"  # constant: the paper's all-on logits | importance: one-shot activation importance
    calibration_sequences: int = 256  # train sequences the importance init reads (init: importance)


@dataclass
class ExportConfig:
    """Write a Hugging Face directory when training ends (the target shape, for a pruning run)."""

    on_fit_end: bool = False
    folder: str | None = None  # default: <save_folder>/hf
    dtype: str = "float32"  # float32 | bfloat16 | float16
    gguf: str | None = None  # e.g. model.gguf: also write the model as GGUF (llama.cpp) inside the folder
    # The convergence gate (shearing.pruning.gate) refuses to export unconverged masks unless forced.
    force: bool = False  # export even when the gate fails (recorded as "forced" in shearing_export.json)
    max_sparsity_gap: float = 0.02  # |expected - target| sparsity per mask family, absolute
    max_loss_gap: float = 0.1  # eval loss under final masks minus under expected masks, nats
    min_kept_probability: float = 0.8  # decided masks: mean keep probability of the kept units, per family
    max_dropped_probability: float = 0.2  # ... and of the dropped units (shearing.pruning.gate)
    gate_eval_batches: int = 16  # eval batches per mask setting for the loss half of the gate (0: skip)


@dataclass
class DistillationConfig:
    """Distil from a frozen teacher: loss = alpha · τ² · KL(teacher ‖ student) at τ + (1 - alpha) · CE."""

    alpha: float = 0.5  # weight of the KD term, in [0, 1] (0: the plain LM loss, the KD term only logged)
    temperature: float = 1.0  # τ > 0, applied to both softmaxes
    chunk_size: int = 0  # sequence positions per teacher-logits chunk (0: the whole sequence at once)
    teacher: str | None = None  # HF checkpoint folder; null: model.source


@dataclass
class OptimizerConfig:
    """One DecoupledAdamW with three parameter groups: weights, mask logits, Lagrange multipliers."""

    name: str = "decoupled_adamw"
    lr: float = 1.0e-4
    mask_lr: float = 1.0
    lambda_lr: float = -1.0  # negative: gradient ascent, the max player of the min-max problem
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"  # cosine_with_warmup | linear_with_warmup | constant_with_warmup
    t_warmup: str = "0.1dur"
    alpha_f: float = 0.1


@dataclass
class RunConfig:
    variables: dict[str, Any]
    model: ModelConfig
    train_loader: dict[str, Any]
    max_duration: str
    global_train_batch_size: int
    max_seq_len: int
    seed: int
    eval_loader: dict[str, Any] | None = None
    pruning: PruningConfig | None = None
    distillation: DistillationConfig | None = None  # a teacher to distil from (shearing.distill)
    export: ExportConfig = field(default_factory=ExportConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_train_microbatch_size: Any = "auto"
    device_eval_batch_size: int = 8
    precision: str = "fp32"
    eval_interval: Any = (
        "1000ba"  # a bare number would be epochs of an endless stream: refused (validation.py)
    )
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    save_folder: str | None = None
    save_interval: Any = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool | None = None  # default: on whenever save_folder is set
    load_path: str | None = None
    run_name: str | None = None
    algorithms: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    loggers: dict[str, Any] = field(default_factory=dict)
    fsdp_config: dict[str, Any] | None = None
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = "1ba"
    dist_timeout: float = 600.0
    device: str | None = None  # default: gpu when available, else cpu

    @property
    def autoresume_enabled(self) -> bool:
        """``autoresume``, defaulting to on whenever there is a ``save_folder`` to resume from."""
        return self.save_folder is not None if self.autoresume is None else self.autoresume


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load, merge overrides, resolve and validate a run yaml."""
    path = Path(path)
    if path.is_dir():
        yamls = sorted(p.name for p in (*path.glob("*.yaml"), *path.glob("*.yml")))
        hint = (
            f", e.g. {path / yamls[0]} (the folder holds {', '.join(yamls)})" if yamls else " (it holds none)"
        )
        raise IsADirectoryError(
            f"run config {path} is a folder, not a yaml file: give the run's yaml file instead{hint}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        raw = OmegaConf.load(path)
        if overrides:
            bad = [item for item in overrides if "=" not in item]
            if bad:
                raise ValueError(f"overrides must look like key=value, got {bad}")
            check_variable_overrides(path, raw.get("variables"), overrides)
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
        container = OmegaConf.to_container(raw, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(container, dict):
        raise ValueError(f"{path}: a run config must be a mapping")
    translate_foundry_spellings(container, str(path))
    variables = container.get("variables")
    if not isinstance(variables, dict):
        raise ValueError(f"{path}: missing the 'variables:' block")
    missing = [name for name in REQUIRED_VARIABLES if name not in variables]
    if missing:
        raise ValueError(
            f"{path}: variables is missing {missing}; every run yaml sets {list(REQUIRED_VARIABLES)}"
        )
    return from_dict(RunConfig, container, where=str(path))


def check_variable_overrides(path: Path, variables: Any, overrides: list[str]) -> None:
    """A ``variables.NAME=...`` override must name a variable the yaml has: a typo (``variables.save_foldr``)
    would otherwise add an unused variable while the run writes to, or trains for, the yaml's own value."""
    known = list(variables or {})
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("variables."):
            continue
        name = key.split(".")[1]
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean variables.{close[0]}? " if close else ""
            raise ValueError(
                f"{key}: {path} has no variable {name!r}, so this override would change nothing: {hint}"
                f"its variables are {known}"
            )


# llm-foundry spelling -> shearing spelling (README "Configuration reference").
FOUNDRY_SPELLINGS = {
    "model.pretrained_model_name_or_path": "model.source",
    "model.name: hf_causal_lm": "(dropped: the default model builder, shearing_llama)",
    "model.pretrained: true": "(dropped: a checkpoint directory is loaded; a named shape is random init)",
    "tokenizer.name (top level)": "model.tokenizer",
    "tokenizer.kwargs.model_max_length": "max_seq_len (must agree; the data is packed to it)",
}


def _is_foundry_model(name: str) -> bool:
    """One of llm-foundry's own model builders (``mpt_causal_lm``, ``hf_t5``, ...): they build other models.

    ``hf_causal_lm`` is the foundry spelling of our default and is translated, not refused."""
    if name == "hf_causal_lm":
        return False
    from llmfoundry import registry

    if name not in registry.models:
        return False
    return getattr(registry.models.get(name), "__module__", "").startswith("llmfoundry")


def translate_foundry_spellings(container: dict[str, Any], where: str) -> None:
    """Rewrite llm-foundry's ``model`` / ``tokenizer`` spellings into ours, in place; refuse what has no match.

    llm-foundry yamls say ``model: {name: hf_causal_lm, pretrained_model_name_or_path: P, pretrained: true}``
    and a top-level ``tokenizer: {name: P, kwargs: {model_max_length: N}}``. They map one-to-one onto
    ``model.source`` and ``model.tokenizer`` (``FOUNDRY_SPELLINGS``); anything else in those blocks is an
    error that shows the shearing spelling, never silently ignored.
    """
    model = container.get("model")
    if isinstance(model, dict):
        if "pretrained_model_name_or_path" in model:
            value = model.pop("pretrained_model_name_or_path")
            if model.get("source") not in (None, value):
                raise ValueError(
                    f"{where}: model.pretrained_model_name_or_path={value!r} and model.source={model['source']!r} "
                    "disagree: they are the same key (llm-foundry / shearing spelling); keep model.source"
                )
            model["source"] = value
        name = model.pop("name", "hf_causal_lm")
        if _is_foundry_model(name):
            raise ValueError(
                f"{where}: model.name={name!r} is not supported: shearing always builds its mask-aware LLaMA "
                "from model.source (an HF LLaMA checkpoint directory or a named shape); drop model.name "
                "(or name a shearing model builder registered in llm-foundry's models registry)"
            )
        if name != "hf_causal_lm":
            model["name"] = name  # a shearing builder (checked against the registry by validation)
        pretrained = model.pop("pretrained", True)
        if pretrained is not True:
            raise ValueError(
                f"{where}: model.pretrained={pretrained!r}: for a random init set model.source to a named shape "
                "(e.g. llama2_1.3b) or a shape mapping instead; a checkpoint directory is always loaded"
            )
    tokenizer = container.pop("tokenizer", None)
    if tokenizer is None:
        return
    if not isinstance(tokenizer, dict) or set(tokenizer) - {"name", "kwargs"} or "name" not in tokenizer:
        raise ValueError(
            f"{where}: top-level tokenizer={tokenizer!r}: the llm-foundry form is tokenizer: {{name: PATH, "
            "kwargs: {model_max_length: N}}; the shearing spelling is model.tokenizer: PATH"
        )
    if not isinstance(model, dict):
        raise ValueError(f"{where}: a top-level tokenizer block needs a model: section (model.source)")
    if model.get("tokenizer") not in (None, tokenizer["name"]):
        raise ValueError(
            f"{where}: tokenizer.name={tokenizer['name']!r} and model.tokenizer={model['tokenizer']!r} disagree: "
            "they are the same key (llm-foundry / shearing spelling); keep model.tokenizer"
        )
    kwargs = dict(tokenizer.get("kwargs") or {})
    max_len = kwargs.pop("model_max_length", None)
    if kwargs:
        raise ValueError(
            f"{where}: tokenizer.kwargs {sorted(kwargs)} are not supported: the data is tokenized beforehand by "
            "data_prep/tokenize_domains.py (its flags set BOS/EOS); keep only tokenizer.name (= model.tokenizer)"
        )
    if max_len is not None and max_len != container.get("max_seq_len"):
        raise ValueError(
            f"{where}: tokenizer.kwargs.model_max_length={max_len!r} but max_seq_len={container.get('max_seq_len')!r}: "
            "the data is packed to max_seq_len; set them equal or drop model_max_length"
        )
    model["tokenizer"] = tokenizer["name"]


def from_dict(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``raw``; unknown or missing keys are errors naming the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}; known keys: {sorted(fields)}")
    hints_by_name = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing required key {name!r}")
            continue
        values[name] = _convert(hints_by_name[name], raw[name], f"{where}: {name}")
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where} has an invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_convert(args[0], item, where) for item in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value
