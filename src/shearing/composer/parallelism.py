"""The yaml's ``fsdp_config`` -> Composer's parallelism config: FSDP2 by default, HYBRID_SHARD as a 2-D mesh.

Composer 0.32.1 has two FSDP paths. A plain dict under ``parallelism_config.fsdp`` becomes FSDP1
(``FSDPConfig``, CUDA only) unless the environment says ``FSDP_VERSION=2``, in which case
``FSDP2Config.from_compatible_attrs`` keeps the keys FSDP2 knows and drops the rest with a warning,
``sharding_strategy`` included, so HYBRID_SHARD silently became FULL_SHARD. FSDP2 (``fully_shard``,
DTensor parameters) is the path the project's multi-process tests run on CPU, so it is the default
here and needs no environment variable: ``build_parallelism_config`` builds the config object itself
(the environment variable is then ignored; a conflicting one is reported).

``fsdp_config`` keys (FSDP1 spellings accepted, translated):

- ``version``: 2 (default) or 1 (Composer's FSDP1, CUDA only; keys passed through unchanged; a pruning
  run whose ``mixed_precision`` is not FULL is warned that the L0 module is then gathered in bf16).
- ``sharding_strategy``: FULL_SHARD (``reshard_after_forward: true``), SHARD_GRAD_OP
  (``reshard_after_forward: false``), HYBRID_SHARD / _HYBRID_SHARD_ZERO2 (a 2-D device mesh:
  replicate across nodes, shard within a node, i.e. shard degree = local world size; reshard
  true / false). NO_SHARD is refused: drop ``fsdp_config`` for plain DDP.
- ``data_parallel_shard_degree`` / ``data_parallel_replicate_degree``: the mesh explicitly (-1 fills
  the rest); they override what HYBRID_SHARD derives.
- ``use_orig_params``: FSDP2 always keeps the original parameters; ``false`` is refused.
- FSDP1 tuning knobs without an FSDP2 meaning (``limit_all_gathers``, ``forward_prefetch``,
  ``backward_prefetch``, ``sync_module_states``, ``activation_checkpointing_reentrant``) are dropped
  with a log line; any other key that FSDP2 lacks is an error.
- FSDP2's own keys pass through: ``activation_checkpointing``, ``activation_cpu_offload``,
  ``state_dict_type``, ``load_monolith_rank0_only``, ``mixed_precision``, ``reshard_after_forward``,
  ``verbose``.

Composer's ``FSDP2Config`` reports a fixed 1-D mesh (shard degree -1, no replicate degree) to the
``State`` that builds the device mesh, and ``State`` overwrites any mesh set on the config; the
subclass ``MeshFSDP2Config`` carries the two degrees so ``State`` builds the 2-D (HSDP) mesh itself.

The L0 module computes in fp32 under mixed precision (``keep_fp32``). Composer's FSDP2 policy makes every
direct child of the ``ComposerModel`` one ``fully_shard`` unit with the model-wide ``MixedPrecisionPolicy``;
with ``precision: amp_bf16`` and ``mixed_precision: DEFAULT`` that gathers the mask logits and Lagrange
multipliers in bf16 for forward. bf16's spacing near ln 100 = 4.6 is 0.03: the 0.01 init noise and small
updates vanish and the expected sparsity / Lagrangian are quantised (the reference keeps them in fp32).
Composer offers no per-unit policy for a direct child (its ``fsdp_wrap_fn`` dicts are checked against
``FSDP2Config`` fields, which lack ``mp_policy``, and are not consulted for the child itself), and leaving
the module unsharded would make its parameters plain tensors among DTensors (no gradient reduction, and
``clip_grad_norm_`` cannot mix the two). So the L0 unit stays sharded like the rest (DTensor parameters,
gradients averaged by FSDP, checkpoints unchanged) and ``keep_fp32`` swaps its unit's policy for fp32
gather and fp32 reduction before FSDP2's lazy initialisation (the unit's first forward) reads it;
``ComposerShearedLlama.forward`` calls it before the L0 forward. The decoder layers keep bf16.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

FSDP2_KEYS = (
    "activation_checkpointing",
    "activation_cpu_offload",
    "state_dict_type",
    "load_monolith_rank0_only",
    "mixed_precision",
    "reshard_after_forward",
    "verbose",
)
FSDP1_ONLY_KEYS = (
    "limit_all_gathers",
    "forward_prefetch",
    "backward_prefetch",
    "sync_module_states",
    "activation_checkpointing_reentrant",
)
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")


FP32_POLICY_ATTR = "_shearing_fp32_policy"


def keep_fp32(module: Any) -> bool:
    """Make ``module``'s FSDP2 unit gather its parameters and reduce its gradients in fp32.

    Returns whether ``module`` is an FSDP2 unit (False, a no-op: not wrapped, or wrapped by FSDP1). Must run
    before the unit's first forward; afterwards it raises ``RuntimeError`` unless the unit already gathers
    in fp32 (FSDP2 sizes its all-gather buffers once, at the first forward).
    """
    import torch
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not isinstance(module, FSDPModule):
        return False
    if getattr(module, FP32_POLICY_ATTR, False):
        return True
    state = fully_shard.state(module)
    group = state._fsdp_param_group
    if group is None:  # no parameters of its own
        setattr(module, FP32_POLICY_ATTR, True)
        return True
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    if state._is_root is not None:  # lazily initialised: its forward already ran under the old policy
        dtypes = {p.param_dtype or p.orig_dtype for p in group.fsdp_params}
        if dtypes != {torch.float32}:
            raise RuntimeError(
                f"{type(module).__name__} already ran a forward under FSDP2 with parameters gathered in "
                f"{sorted(map(str, dtypes))}; call shearing.composer.parallelism.keep_fp32 on it before its first forward"
            )
    state._mp_policy = policy
    group.mp_policy = policy
    for fsdp_param in group.fsdp_params:
        fsdp_param.mp_policy = policy
    group._init_mp_dtypes()  # what lazy init does; run now so the policy is in force whatever runs first
    setattr(module, FP32_POLICY_ATTR, True)
    return True


def _mesh_config_class():
    from composer.utils.parallelism import FSDP2Config

    @dataclass
    class MeshFSDP2Config(FSDP2Config):
        """``FSDP2Config`` whose mesh degrees Composer's ``State`` reads to build a 1-D or 2-D mesh."""

        shard_degree: int = -1
        replicate_degree: int | None = None

        @property
        def data_parallel_shard_degree(self) -> int:
            return self.shard_degree

        @property
        def data_parallel_replicate_degree(self) -> int | None:
            return self.replicate_degree

    return MeshFSDP2Config


def fsdp2_options(
    fsdp_config: Mapping[str, Any], world_size: int, local_world_size: int
) -> tuple[dict[str, Any], int, int | None]:
    """The FSDP2 keyword arguments and the (shard, replicate) mesh degrees for a yaml ``fsdp_config``."""
    options = {k: v for k, v in fsdp_config.items() if k != "version"}
    strategy = str(options.pop("sharding_strategy", "FULL_SHARD")).upper()
    if strategy == "NO_SHARD":
        raise ValueError(
            "fsdp_config.sharding_strategy=NO_SHARD: FSDP2 has no unsharded mode; remove fsdp_config to train "
            "with plain DDP"
        )
    if strategy not in STRATEGIES:
        raise ValueError(
            f"fsdp_config.sharding_strategy={strategy!r} is unknown; choose from {list(STRATEGIES)}"
        )
    if options.pop("use_orig_params", True) is False:
        raise ValueError(
            "fsdp_config.use_orig_params=false: FSDP2 always keeps the original parameters (the mask logits "
            "and multipliers need their own learning rates); remove the key or set it to true"
        )
    dropped = [key for key in FSDP1_ONLY_KEYS if key in options]
    for key in dropped:
        options.pop(key)
    if dropped:
        log.info("fsdp_config: %s are FSDP1-only settings, not used under FSDP2", dropped)
    shard = options.pop("data_parallel_shard_degree", None)
    replicate = options.pop("data_parallel_replicate_degree", None)
    unknown = sorted(set(options) - set(FSDP2_KEYS))
    if unknown:
        raise ValueError(
            f"fsdp_config has key(s) {unknown} that FSDP2 does not know; valid keys: version, sharding_strategy, "
            f"data_parallel_shard_degree, data_parallel_replicate_degree, use_orig_params, {list(FSDP2_KEYS)} "
            "(or set fsdp_config.version: 1 for Composer's FSDP1, CUDA only)"
        )
    hybrid = "HYBRID" in strategy
    options.setdefault("reshard_after_forward", strategy in ("FULL_SHARD", "HYBRID_SHARD"))
    if hybrid and shard is None:
        shard = local_world_size
        if world_size % shard:
            raise ValueError(
                f"fsdp_config.sharding_strategy={strategy} shards within a node of {local_world_size} ranks, but the "
                f"world size {world_size} is not a multiple of it: set data_parallel_shard_degree explicitly"
            )
    shard = -1 if shard is None else int(shard)
    replicate = None if replicate is None else int(replicate)
    if shard > 0 and replicate is None and shard != world_size:
        replicate = world_size // shard if world_size % shard == 0 else 0  # the rest replicates
    fixed = [d for d in (shard, replicate) if d is not None and d > 0]
    product = fixed[0] * fixed[1] if len(fixed) == 2 else (fixed[0] if fixed else 1)
    if (product != world_size) if len(fixed) == 2 else (world_size % product):
        raise ValueError(
            f"fsdp_config: data_parallel_shard_degree={shard} x data_parallel_replicate_degree={replicate} does "
            f"not fit the world size {world_size}: their product must equal it (-1 for one of them fills the rest)"
        )
    return options, shard, replicate


def build_parallelism_config(
    fsdp_config: Mapping[str, Any] | None,
    pruning: bool = False,
    world_size: int | None = None,
    local_world_size: int | None = None,
) -> dict[str, Any] | None:
    """Composer's ``parallelism_config`` for a yaml ``fsdp_config`` (None: no FSDP)."""
    if not fsdp_config:
        return None
    from composer.utils import dist

    world_size = dist.get_world_size() if world_size is None else world_size
    local_world_size = dist.get_local_world_size() if local_world_size is None else local_world_size
    version = int(fsdp_config.get("version", 2))
    if version not in (1, 2):
        raise ValueError(
            f"fsdp_config.version={version}: use 2 (FSDP2, the default) or 1 (Composer's FSDP1, CUDA)"
        )
    env = os.environ.get("FSDP_VERSION")
    if env is not None and env != str(version):
        log.warning("FSDP_VERSION=%s in the environment is ignored: fsdp_config.version is %d", env, version)
    if version == 1:
        from composer.utils.parallelism import FSDPConfig

        options = {k: v for k, v in fsdp_config.items() if k != "version"}
        if pruning and options.get("use_orig_params") is False:
            raise ValueError(
                "fsdp_config.use_orig_params=false with a pruning run: one flat parameter would hold both the mask "
                "logits (lr optimizer.mask_lr) and the multipliers (negative lr); set use_orig_params: true"
            )
        mixed = options.get("mixed_precision", "DEFAULT")
        if pruning and not (isinstance(mixed, str) and mixed.upper() == "FULL"):
            # Composer's FSDP1 wraps the L0 module with the model-wide MixedPrecision and has no per-unit
            # override for a direct child of the ComposerModel; keep_fp32 handles FSDP2 only.
            log.warning(
                "fsdp_config.version=1 with mixed_precision=%s: under FSDP1 the mask logits and Lagrange "
                "multipliers are gathered in the low-precision dtype (bf16 with precision amp_bf16, rounding "
                "them by up to 0.016); use fsdp_config.version: 2 (the L0 module stays fp32) or "
                "mixed_precision: FULL",
                mixed,
            )
        return {"fsdp": FSDPConfig(**options)}
    options, shard, replicate = fsdp2_options(fsdp_config, world_size, local_world_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
        config = _mesh_config_class()(**options, shard_degree=shard, replicate_degree=replicate)
    return {"fsdp": config}


__all__ = ["build_parallelism_config", "fsdp2_options", "keep_fp32"]
