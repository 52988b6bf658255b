"""Print what a pruning run will do, without data or weights.

    python -m shearing.plan yamls/pruning/llama2_7b_to_2.7b.yaml [key=value ...]

Reads only the yaml and the source's ``config.json`` (or its named shape): source and target shapes,
exact parameter counts, and the mask families with their shapes and final target sparsities.
"""

from __future__ import annotations

import sys

from shearing.config import load_config
from shearing.models.shapes import PRUNABLE_FIELDS, count_params, resolve_source_shape
from shearing.pruning.plan import PruningPlan


def render_plan(config_path: str, overrides: list[str] | None = None) -> str:
    cfg = load_config(config_path, overrides)
    if cfg.pruning is None:
        source = resolve_source_shape(cfg.model.source, cfg.model.source_shape)
        return f"{config_path}: no pruning section; model {cfg.model.source} has {count_params(source):,} parameters\n"
    plan = PruningPlan.from_config(cfg)
    source, target, families = plan.source, plan.target, plan.specs
    rows = [f"plan for {config_path}", "", f"{'field':<22}{'source':>16}{'target':>16}"]
    for name in (*PRUNABLE_FIELDS, "head_dim", "vocab_size"):
        rows.append(f"{name:<22}{getattr(source, name):>16,}{getattr(target, name):>16,}")
    rows.append(
        f"{'tie_word_embeddings':<22}{str(source.tie_word_embeddings):>16}{str(target.tie_word_embeddings):>16}"
    )
    source_params, target_params = count_params(source), count_params(target)
    rows += [
        f"{'parameters':<22}{source_params:>16,}{target_params:>16,}",
        f"{'kept fraction':<22}{'':>16}{target_params / source_params:>16.4f}",
        "",
        f"{'mask family':<16}{'shape':>14}{'kept per row':>16}{'target sparsity':>18}",
    ]
    for spec in families:
        shape = "x".join(str(s) for s in spec.shape)
        kept = f"{spec.keep}/{spec.group} per group" if spec.group else f"{spec.kept_per_row}/{spec.row_size}"
        rows.append(f"{spec.name:<16}{shape:>14}{kept:>16}{spec.target_sparsity:>18.4f}")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m shearing.plan <run.yaml> [key=value ...]"
    if argv and argv[0] in ("-h", "--help"):
        print(f"{usage}\n\n{__doc__.strip()}")
        return 0
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    try:
        print(render_plan(argv[0], argv[1:]), end="")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
