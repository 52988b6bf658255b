"""Reading source models: a local Hugging Face checkpoint of a LLaMA-layout family (strictly) or a named
shape (random init, LLaMA).

Loads are strict: a key missing from the checkpoint or a key the model does not have is an error
listing them, never a silent partial load. The only keys tolerated are ones that carry no weights:
rotary ``inv_freq`` buffers written by old transformers versions, and an ``lm_head.weight`` absent
from a checkpoint with tied embeddings.

Which files hold the weights is decided as ``transformers.PreTrainedModel.from_pretrained`` decides it
for a local folder (4.51 and 5.x alike), in this order: the file ``config.json``'s ``transformers_weights``
names (5.x only: a ``.safetensors`` or ``.safetensors.index.json`` inside the folder; 4.51 ignores the key);
``model.safetensors``; else ``model.safetensors.index.json`` and exactly the shard files its ``weight_map``
names; else ``pytorch_model.bin``; else ``pytorch_model.bin.index.json`` and its shards. transformers 4.51
writes all four layouts; 5.x writes only the safetensors ones (``save_pretrained(safe_serialization=False)``
is ignored there). Any other file is ignored, so a Mistral-style folder with a ``consolidated.safetensors``
(the same weights under original names) next to the HF files loads what HF loads; a folder with none of
these (shards without their index, original-format or GGUF weights only) is refused naming what it holds.

Config: transformers 5.x writes RoPE settings as one ``rope_parameters`` dict (``rope_theta`` inside) where
4.x writes ``rope_theta`` and ``rope_scaling``; 4.x ignores ``rope_parameters`` and would silently fall back
to theta 10000. ``config_from_dict`` therefore turns a 5.x-written config into the 4.x fields when the
installed transformers is 4.x (and refuses a folder whose two forms disagree), so a source saved by 5.x
prunes with its own RoPE under 4.51. 5.x reads both forms itself, also together: ``portable_config_dict``
writes both, for a ``config.json`` that stock 4.x and 5.x load alike. Every safetensors file's header is checked (``check_safetensors_file``: it parses, and
the file is as long as the header says) before any tensor is read, so a truncated download is an
error naming the file, not a crash half-way through the load.

Every floating tensor is checked to be finite as its file is read (``check_finite_tensors``: a sum
per tensor, exact ``isfinite`` only where the sum is not finite; cheap next to reading the file), so a damaged source or teacher, or one saved in a
dtype its values overflowed (float16 past ±65504), is an error naming the file, the tensor and its NaN /
inf counts before training starts, not a NaN loss or a "reference loss must be finite" later.
``check_model_finite`` does the same for a model ``from_pretrained`` loaded (evaluation's loader).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PretrainedConfig

from shearing.models.family import FAMILIES, ModelFamily, family_of
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.shapes import (
    NAMED_CONFIG_EXTRAS,
    SHAPE_FIELDS,
    LlamaShape,
    is_checkpoint_dir,
    named_shape,
    read_config_json,
    shape_from_mapping,
)

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def config_from_shape(shape: LlamaShape, family: ModelFamily | str = "llama", **extra) -> PretrainedConfig:
    """An HF config of this shape in ``family``'s config class (``LlamaConfig`` by default; ``head_dim``
    always written explicitly)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    if shape.qkv_bias != family.qkv_bias:
        raise ValueError(
            f"shape has qkv_bias={shape.qkv_bias} but family {family.name} has qkv_bias={family.qkv_bias}"
        )
    fields = dict(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    fields.update(extra)
    return family.config_class(**fields)


def config_from_dict(raw: Mapping[str, Any]) -> PretrainedConfig:
    """An HF config of its family's class (``Qwen2Config`` for model_type qwen2, ...) from a config dict;
    ``head_dim`` set explicitly when the dict lacks it; RoPE fields in the installed transformers' form."""
    config_class = family_of(raw).config_class
    config = config_class.from_dict(rope_fields_for(config_class, raw))
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def rope_fields_for(config_class: type[PretrainedConfig], raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with its RoPE settings in the form ``config_class`` reads (see the module note): as is for a
    5.x class (it converts 4.x's ``rope_theta``/``rope_scaling`` itself); for a 4.x class,
    ``portable_config_dict`` less the 5.x-only ``rope_parameters`` and ``dtype``."""
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        return dict(raw)
    out = portable_config_dict(raw)
    out.pop("rope_parameters", None)
    out.pop("dtype", None)
    return out


def portable_config_dict(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict both transformers 4.x and 5.x read alike: a 5.x ``rope_parameters`` also written as
    4.x's ``rope_theta`` + ``rope_scaling`` (None for ``rope_type`` default), ``dtype`` also as
    ``torch_dtype``. 5.x reads the two forms together; a dict whose two forms disagree is refused."""
    out = dict(raw)
    if out.get("dtype") is not None and out.get("torch_dtype") is None:
        out["torch_dtype"] = out["dtype"]
    params = out.get("rope_parameters")
    if params is None:
        return out
    if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            f"config rope_parameters {params!r} is not one dict of RoPE settings (per-layer-type RoPE has no "
            f"transformers 4.x form; installed: {transformers.__version__}): use a LLaMA, Mistral or Qwen2 "
            "config with a single rope_parameters dict"
        )
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    legacy = {"rope_theta": params.get("rope_theta", out.get("rope_theta")), "rope_scaling": scaling}
    for key, value in legacy.items():
        if out.get(key) is not None and out[key] != value:
            raise ValueError(
                f"config has rope_parameters {dict(params)} and {key}={out[key]!r}, which disagree: remove "
                "one of the two (transformers 5 writes rope_parameters, 4.x writes rope_theta/rope_scaling)"
            )
    out.update({k: v for k, v in legacy.items() if v is not None or k == "rope_scaling"})
    return out


def read_hf_config(path: str | os.PathLike) -> PretrainedConfig:
    return config_from_dict(read_config_json(path))


SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
REFETCH = "download the checkpoint again (or re-save it with save_pretrained)"


def hf_weight_files(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> list[Path]:
    """The weight files ``from_pretrained`` would read from checkpoint folder ``path`` (see the module note);
    ``config``: its config.json when the caller has read it already."""
    root = Path(path)
    explicit = _explicit_weights(root, config)
    if explicit is not None:
        return _index_shards(explicit) if explicit.name.endswith(".index.json") else [explicit]
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        if (root / single).is_file():
            return [root / single]
        if (root / index).is_file():
            return _index_shards(root / index)
    raise ValueError(
        f"{root} holds none of {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS}, {BIN_INDEX}{_what_is_there(root)}: "
        "the source model must be a Hugging Face checkpoint folder (save_pretrained writes one)"
    )


def _explicit_weights(root: Path, config: Mapping[str, Any] | None = None) -> Path | None:
    """The file config.json's ``transformers_weights`` names (transformers 5.x), checked; None without one."""
    try:
        if config is None:
            config = json.loads((root / "config.json").read_text())
        name = config.get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None  # no or unreadable config.json: read_config_json reports it
    if name is None:
        return None
    target = (root / str(name)).resolve()
    if not str(name).endswith((".safetensors", ".safetensors.index.json")) or not target.is_relative_to(
        root.resolve()
    ):
        raise ValueError(
            f"{root / 'config.json'} sets transformers_weights={name!r}, which must name a .safetensors or "
            ".safetensors.index.json file inside the folder (as transformers 5 requires): fix or remove the key"
        )
    if not target.is_file():
        raise ValueError(
            f"{root / 'config.json'} sets transformers_weights={name!r} but {root / name} is not there: {REFETCH}"
        )
    return root / str(name)


SHARD_PATTERNS = {"model-*-of-*.safetensors": SAFE_INDEX, "pytorch_model-*-of-*.bin": BIN_INDEX}
OTHER_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def _what_is_there(root: Path) -> str:
    """What a folder without HF weight files holds instead, and the fix, for the refusal's message."""
    for pattern, index in SHARD_PATTERNS.items():
        shards = sorted(p.name for p in root.glob(pattern))
        if shards:
            return (
                f"; it has shard files ({', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}) but not "
                f"their {index}, which says which tensor is in which shard: copy it too, or {REFETCH}"
            )
    others = sorted({p.name for pattern in OTHER_WEIGHTS for p in root.glob(pattern)})
    if others:
        return (
            f"; its weights ({', '.join(others[:4])}{' ...' if len(others) > 4 else ''}) are not in a layout "
            "from_pretrained reads (original-format or GGUF weights need converting to a Hugging Face "
            "folder first)"
        )
    return ""


def _index_shards(index: Path) -> list[Path]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{index} is not a valid shard index (a JSON object with a 'weight_map' of tensor -> file; "
            f"{type(e).__name__}: {e}): {REFETCH}"
        ) from None
    shards = [index.parent / name for name in names]
    missing = [str(shard) for shard in shards if not shard.is_file()]
    if missing:
        raise ValueError(f"{index} names shard file(s) that are not there: {missing}; {REFETCH}")
    return shards


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Cheap integrity check of one safetensors file: its header parses and the file is as long as it says."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            problem = f"it is {size} bytes long, too short for a safetensors header"
        else:
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                problem = f"its header claims {header_len} bytes but the file has {size}"
            else:
                try:
                    header = json.loads(f.read(header_len))
                    end = max(
                        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                        default=0,
                    )
                except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                    problem = "its header is not safetensors JSON"
                else:
                    if 8 + header_len + end > size:
                        problem = f"it is truncated: the header needs {8 + header_len + end} bytes, the file has {size}"
    if problem:
        raise ValueError(f"{path} is not a readable safetensors file ({problem}): {REFETCH}")


def read_hf_state_dict(
    path: str | os.PathLike, config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors ``from_pretrained`` would load from HF checkpoint folder ``path`` (see ``hf_weight_files``)."""
    files = hf_weight_files(path, config)
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors_file(file)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                tensors = load_file(file)
            else:
                tensors = torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise ValueError(f"{file} could not be read ({type(e).__name__}: {e}): {REFETCH}") from None
        check_finite_tensors(tensors, file)
        state.update(tensors)
    return state


def nonfinite_counts(tensors: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """``name -> (NaN count, inf count, numel)`` for every floating tensor of ``tensors`` that is not finite."""
    bad = {}
    for name, tensor in tensors.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            continue
        # A NaN or inf makes the sum NaN or inf, and a sum is ~30x cheaper than isfinite on CPU; a finite
        # tensor whose sum overflows (float16) falls through to the exact test.
        if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
            continue
        bad[name] = (int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum()), tensor.numel())
    return bad


def _nonfinite_message(bad: Mapping[str, tuple[int, int, int]], where: str, extra: str = "") -> str:
    shown = [f"{name} ({nan:,} NaN and {inf:,} inf of {n:,} values)" for name, (nan, inf, n) in bad.items()]
    more = f"; and {len(shown) - 8} more tensor(s)" if len(shown) > 8 else ""
    return (
        f"{where} holds non-finite weights: {'; '.join(shown[:8])}{more}. The checkpoint is damaged, or was "
        "saved in a dtype its values overflowed (float16 holds at most ±65504); training or evaluating it "
        "would give NaN losses. Download it again, or re-convert it from the original weights in "
        f"float32/bfloat16{extra}"
    )


def check_finite_tensors(tensors: Mapping[str, Any], file: str | os.PathLike) -> None:
    """Refuse NaN/inf in the tensors read from weight ``file``, naming each bad tensor and its counts."""
    bad = nonfinite_counts(tensors)
    if bad:
        raise ValueError(_nonfinite_message(bad, f"weight file {file}"))


def check_model_finite(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """``check_finite_tensors`` for a model that ``from_pretrained`` loaded from HF checkpoint ``folder``
    (its weights as loaded, in the model's dtype; the message names the folder's weight files)."""
    bad = nonfinite_counts(dict(model.named_parameters()))
    if not bad:
        return
    files = ", ".join(str(f) for f in hf_weight_files(folder))
    dtype = next(model.parameters()).dtype
    cast = "; if it loads finite as float32, the cast to float16 overflowed: use bfloat16"
    raise ValueError(
        _nonfinite_message(bad, f"{files} (loaded as {dtype})", cast if dtype == torch.float16 else "")
    )


def load_state_dict_strict(model: MaskedLlamaForCausalLM, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``; any missing or unexpected key is an error naming the keys."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {where} does not match the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Is it a {family_of(model.config).architecture} checkpoint "
            "of this config?"
        )
    own = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(
                f"checkpoint {where}: {key} has shape {tuple(tensor.shape)} but the config gives {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)  # strictness checked above, with the tie handled


def load_source_model(
    spec: str | os.PathLike | Mapping[str, Any],
    attn_impl: str = "sdpa",
    seed: int = 17,
    raw_config: Mapping[str, Any] | None = None,
) -> tuple[MaskedLlamaForCausalLM, PretrainedConfig]:
    """The source model: an HF checkpoint directory (strict load), or a named shape or a mapping of shape
    fields (random init, seeded). ``raw_config``: the directory's config.json when the caller has read it
    (``shearing.spec.RunSpec.source_config``)."""
    if is_checkpoint_dir(spec):
        raw = dict(raw_config) if raw_config is not None else read_config_json(spec)
        config = config_from_dict(copy.deepcopy(raw))
        model = MaskedLlamaForCausalLM(config, attn_impl=attn_impl)
        load_state_dict_strict(model, read_hf_state_dict(spec, raw), where=str(spec))
        return model, config
    if isinstance(spec, Mapping):
        shape = shape_from_mapping(spec)
        extras = {k: v for k, v in spec.items() if k not in SHAPE_FIELDS}
    else:
        shape, extras = named_shape(str(spec)), NAMED_CONFIG_EXTRAS.get(str(spec), {})
    config = config_from_shape(shape, **extras)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedLlamaForCausalLM(config, attn_impl=attn_impl)
    return model, config
