"""The pruning plan: source shape, target shape and the mask families between them, decided once.

A ``PruningPlan`` is built from a run's config before anything loads (validation, ``python -m shearing.plan``),
used to build the L0 module, stored in the checkpoint's run metadata, and read back by the export, so the
source -> target -> families chain is resolved in one place. Families (SPEC §1) and the rules that pick them
are documented on ``plan_families``; the mask side of each family is in ``shearing.pruning.l0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shearing.models.shapes import LlamaShape, resolve_source_shape, resolve_target_shape

PLAN_VERSION = 1

USER_FAMILIES = ("hidden", "head", "intermediate", "layer", "head_layer", "mlp")
DEFAULT_FAMILIES = ("hidden", "head", "intermediate", "layer")


@dataclass(frozen=True)
class FamilySpec:
    """One mask family: the shape of its logits and how many units each row keeps at the end."""

    name: str
    shape: tuple[int, ...]
    keep: int  # units kept per row (per group for a grouped ``head`` family)
    group: int = 0  # > 0: the final top-k of a row is taken per block of ``group`` units

    @property
    def row_size(self) -> int:
        return self.shape[-1]

    @property
    def kept_per_row(self) -> int:
        return self.keep * (self.row_size // self.group) if self.group else self.keep

    @property
    def target_sparsity(self) -> float:
        if self.group:
            return 1.0 - self.keep / self.group
        return 1.0 - self.keep / self.row_size


def plan_families(
    source: LlamaShape, target: LlamaShape, families: Sequence[str] = DEFAULT_FAMILIES
) -> list[FamilySpec]:
    """The mask families a pruning run from ``source`` to ``target`` needs, given the allowed ``families``."""
    unknown = [name for name in families if name not in USER_FAMILIES]
    if unknown:
        raise ValueError(f"pruning.families has unknown name(s) {unknown}; choose from {list(USER_FAMILIES)}")
    if "layer" in families and ({"head_layer", "mlp"} & set(families)):
        raise ValueError("pruning.families: use either 'layer' or the 'head_layer'/'mlp' pair, not both")
    if ("head_layer" in families) != ("mlp" in families):
        raise ValueError(
            "pruning.families: 'head_layer' and 'mlp' go together (they drop whole layers together)"
        )

    L, H, G = source.num_hidden_layers, source.num_attention_heads, source.num_key_value_heads
    specs: list[FamilySpec] = []

    def need(family: str, field: str) -> bool:
        if getattr(target, field) == getattr(source, field):
            return False
        if family not in families:
            raise ValueError(
                f"the target changes {field} ({getattr(source, field)} -> {getattr(target, field)}) but "
                f"pruning.families {list(families)} has no '{family}' mask to do it: add '{family}'"
            )
        return True

    if need("hidden", "hidden_size"):
        specs.append(FamilySpec("hidden", (source.hidden_size,), target.hidden_size))
    if source.group_size == 1:
        if need("head", "num_attention_heads"):
            specs.append(FamilySpec("head", (L, H), target.num_attention_heads))
    else:
        if target.num_key_value_heads < G:
            if "head" not in families:
                raise ValueError(
                    f"the target changes num_key_value_heads ({G} -> {target.num_key_value_heads}) but "
                    f"pruning.families {list(families)} has no 'head' mask to do it: add 'head'"
                )
            specs.append(FamilySpec("kv_group", (L, G), target.num_key_value_heads))
        per_group = target.num_attention_heads // target.num_key_value_heads
        if per_group < source.group_size:
            if "head" not in families:
                raise ValueError(
                    f"the target keeps {per_group} of {source.group_size} query heads per KV group but "
                    f"pruning.families {list(families)} has no 'head' mask to do it: add 'head'"
                )
            specs.append(FamilySpec("head", (L, H), per_group, group=source.group_size))
    if need("intermediate", "intermediate_size"):
        specs.append(FamilySpec("intermediate", (L, source.intermediate_size), target.intermediate_size))
    if target.num_hidden_layers < L:
        if "layer" in families:
            specs.append(FamilySpec("layer", (L,), target.num_hidden_layers))
        elif "head_layer" in families:
            specs.append(FamilySpec("head_layer", (L,), target.num_hidden_layers))
            specs.append(FamilySpec("mlp", (L,), target.num_hidden_layers))
        else:
            raise ValueError(
                f"the target changes num_hidden_layers ({L} -> {target.num_hidden_layers}) but pruning.families "
                f"{list(families)} has no 'layer' (or 'head_layer' + 'mlp') mask to do it: add 'layer'"
            )
    return specs


@dataclass(frozen=True)
class PruningPlan:
    """Everything a pruning run decides from its config: the two shapes, the allowed families, the mask specs."""

    source: LlamaShape
    target: LlamaShape
    families: tuple[str, ...] = DEFAULT_FAMILIES
    specs: tuple[FamilySpec, ...] = ()

    @classmethod
    def build(
        cls, source: LlamaShape, target: LlamaShape, families: Sequence[str] = DEFAULT_FAMILIES
    ) -> PruningPlan:
        return cls(source, target, tuple(families), tuple(plan_families(source, target, families)))

    @classmethod
    def from_config(
        cls, cfg: Any, need_checkpoint: bool = False, source: LlamaShape | None = None
    ) -> PruningPlan:
        """The plan of a run config with a ``pruning:`` section (reads only the source's config.json, and not
        that when the caller passes the ``source`` shape it resolved)."""
        if cfg.pruning is None:
            raise ValueError("the run has no pruning section: there is no pruning plan")
        if source is None:
            source = resolve_source_shape(
                cfg.model.source, cfg.model.source_shape, need_checkpoint=need_checkpoint
            )
        target = resolve_target_shape(source, cfg.pruning.target)
        if target == source:
            raise ValueError(
                f"pruning.target={cfg.pruning.target!r} is the source's own shape ({source.to_dict()}): there is "
                "nothing to prune; give a smaller target (python -m shearing.plan --target-params proposes some), "
                "or drop the pruning: section to continue pre-training the source as it is"
            )
        return cls.build(source, target, cfg.pruning.families)

    @property
    def spec_by_name(self) -> dict[str, FamilySpec]:
        return {spec.name: spec for spec in self.specs}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the checkpoint metadata (the specs are re-derived on load and checked)."""
        return {
            "version": PLAN_VERSION,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "families": list(self.families),
            "specs": [
                {"name": s.name, "shape": list(s.shape), "keep": s.keep, "group": s.group} for s in self.specs
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        plan = cls.build(LlamaShape(**data["source"]), LlamaShape(**data["target"]), tuple(data["families"]))
        stored = [dict(spec, shape=list(spec["shape"])) for spec in data.get("specs", [])]
        derived = plan.to_dict()["specs"]
        if stored and stored != derived:
            raise ValueError(
                f"the checkpoint's pruning plan {stored} differs from the one this version derives ({derived}): "
                "export it with the shearing version that wrote it"
            )
        return plan

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: LlamaShape) -> PruningPlan | None:
        """The plan in a checkpoint's run metadata; older checkpoints stored only target and families."""
        if meta.get("plan") is not None:
            return cls.from_dict(meta["plan"])
        if meta.get("target") is None:
            return None
        return cls.build(source, source.with_target(meta["target"]), meta.get("families") or DEFAULT_FAMILIES)


__all__ = ["DEFAULT_FAMILIES", "USER_FAMILIES", "FamilySpec", "PruningPlan", "plan_families"]
