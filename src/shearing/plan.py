"""Print what a pruning run will do, without data or weights; or propose target shapes for a size.

    python -m shearing.plan yamls/pruning/llama2_7b_to_2.7b.yaml [key=value ...]
    python -m shearing.plan --source HF_DIR_OR_NAMED_SHAPE --target-params 56M [--candidates 5]
    python -m shearing.plan yamls/small/smollm2_135m_to_51m.yaml [key=value ...] --target-params 56M

Reads only the yaml and the source's ``config.json`` (or its named shape). With a yaml alone: source and
target shapes, exact parameter counts, and the mask families with their shapes and final target sparsities.
With ``--target-params N`` (``56M``, ``2.7B``, ``56000000``): uniform target shapes near N parameters
from the yaml's source or ``--source`` (``shearing.models.shapes.propose_targets``: the rules, the exact
counts and the ranking), one per layer count, best first, then the best one as a yaml line and as a
command-line override. With a yaml, that override is loaded with the yaml and planned before it is
printed, so what it says is what the run will build.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shearing.config import load_config
from shearing.models.shapes import (
    PRUNABLE_FIELDS,
    LlamaShape,
    TargetCandidate,
    count_params,
    default_multiples,
    propose_targets,
    resolve_source_shape,
)
from shearing.pruning.plan import PruningPlan


def render_plan(config_path: str, overrides: list[str] | None = None) -> str:
    cfg = load_config(config_path, overrides)
    if cfg.pruning is None:
        model = cfg.model.source
        if (
            isinstance(model, str)
            and "/" in model
            and not Path(model).exists()
            and cfg.model.source_shape is None
        ):
            # A CPT recipe's model is an earlier step's export: not there before that step ran.
            return f"{config_path}: no pruning section; model {model} is not there yet (an earlier step's export?)\n"
        source = resolve_source_shape(model, cfg.model.source_shape)
        return f"{config_path}: no pruning section; model {model} has {count_params(source):,} parameters\n"
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


def parse_params(text: str) -> int:
    """``"56M"`` -> 56_000_000 (K, M, B, T suffixes, powers of 1000; plain integers too)."""
    from shearing.data.prep import parse_token_count

    try:
        return parse_token_count(text)
    except ValueError:
        raise ValueError(
            f"--target-params {text!r} is not a positive whole number of parameters: write e.g. 56000000, "
            "56M or 2.7B"
        ) from None


def describe(shape: LlamaShape) -> str:
    tied = ", tied embeddings" if shape.tie_word_embeddings else ""
    return (
        f"hidden {shape.hidden_size:,}, {shape.num_hidden_layers} layers, {shape.num_attention_heads} heads over "
        f"{shape.num_key_value_heads} KV groups, MLP {shape.intermediate_size:,}, head_dim {shape.head_dim}, "
        f"vocab {shape.vocab_size:,}{tied}: {count_params(shape):,} parameters"
    )


def flow_mapping(shape: LlamaShape) -> str:
    """The five prunable fields as a yaml flow mapping (what ``variables.target_model`` takes)."""
    return "{" + ", ".join(f"{name}: {getattr(shape, name)}" for name in PRUNABLE_FIELDS) + "}"


def target_override(config_path: str, overrides: list[str], candidate: TargetCandidate) -> str:
    """The override that makes ``config_path``'s run build ``candidate``, checked by planning the run with it."""
    cfg = load_config(config_path, overrides)
    key = "variables.target_model" if "target_model" in cfg.variables else "pruning.target"
    override = f'{key}="{flow_mapping(candidate.shape)}"'
    plan = PruningPlan.from_config(
        load_config(config_path, [*overrides, f"{key}={flow_mapping(candidate.shape)}"])
    )
    planned = count_params(plan.target)
    assert planned == candidate.params, (planned, candidate)  # one counting function: they cannot differ
    return override


def render_proposal(
    wanted: int,
    source_spec: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    count: int = 5,
    tolerance: float = 0.02,
    hidden_multiple: int | None = None,
    mlp_multiple: int | None = None,
) -> str:
    """The ``--target-params`` report: candidates from ``source_spec`` or from ``config_path``'s source."""
    overrides = list(overrides or [])
    if config_path is not None:
        cfg = load_config(config_path, overrides)
        if cfg.pruning is None:
            raise ValueError(
                f"{config_path} has no pruning section: give a pruning recipe, or the model as --source"
            )
        source = resolve_source_shape(cfg.model.source, cfg.model.source_shape)
        where = f"{config_path}'s source {cfg.model.source}"
    else:
        try:
            source = resolve_source_shape(source_spec)
        except ValueError as e:
            raise ValueError(f"--source: {e}") from None
        where = str(source_spec)
    candidates = propose_targets(source, wanted, count, tolerance, hidden_multiple, mlp_multiple)
    hidden_unit, mlp_unit = default_multiples(source)
    kv = source.num_key_value_heads
    layout = (
        "one KV head per query head (multi-head attention)"
        if source.group_size == 1
        else f"KV groups dividing {kv}, at most {source.group_size} query heads each"
    )
    rows = [
        f"uniform targets near {wanted:,} parameters ({wanted / count_params(source):.1%} of the source)",
        f"source {where}: {describe(source)}",
        f"rules: every layer alike; head_dim {source.head_dim} kept; {layout}; hidden a multiple of "
        f"{hidden_multiple or hidden_unit}, MLP of {mlp_multiple or mlp_unit}; within {tolerance:.1%}",
        "",
        f"{'#':>3}{'layers':>8}{'hidden':>8}{'heads':>7}{'kv heads':>10}{'mlp':>8}{'parameters':>16}"
        f"{'deviation':>11}{'distortion':>12}",
    ]
    for i, c in enumerate(candidates, 1):
        s = c.shape
        rows.append(
            f"{i:>3}{s.num_hidden_layers:>8}{s.hidden_size:>8,}{s.num_attention_heads:>7}"
            f"{s.num_key_value_heads:>10}{s.intermediate_size:>8,}{c.params:>16,}{c.deviation:>+11.2%}"
            f"{c.distortion:>12.3f}"
        )
    best = candidates[0]
    rows += [
        "",
        "distortion 0: the source's proportions (attention and MLP width per hidden, query heads per KV group),",
        "depth shrunk as the square root of the width; the rules and the ranking: shearing/models/shapes.py",
        "",
        "candidate 1 as a run yaml's variable:",
        f"  target_model: {flow_mapping(best.shape)}",
    ]
    if config_path is not None:
        override = target_override(config_path, overrides, best)
        rows += [
            f"as an override of {config_path} (loaded and planned with it: {best.params:,} parameters):",
            f"  {override}",
        ]
    else:
        rows += [
            "as an override of a pruning recipe:",
            f'  variables.target_model="{flow_mapping(best.shape)}"',
        ]
    return "\n".join(rows) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shearing.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="a run yaml (its source and target)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the yaml")
    parser.add_argument(
        "--source", help="with --target-params: an HF model folder or a named shape, instead of a yaml"
    )
    parser.add_argument(
        "--target-params", help="propose uniform target shapes near this many parameters (56M, 2.7B)"
    )
    parser.add_argument("--candidates", type=int, default=5, help="how many shapes to list (default 5)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="largest |deviation| from --target-params (default 0.02)",
    )
    parser.add_argument("--hidden-multiple", type=int, help="hidden size granularity (default: head_dim)")
    parser.add_argument("--mlp-multiple", type=int, help="MLP width granularity (default: 256, 64, 16 or 8)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.config is None and args.source is None:
        parser.error("give a run yaml, or --source HF_DIR_OR_NAMED_SHAPE with --target-params")
    if args.config is not None and args.source is not None:
        parser.error("give either a run yaml or --source, not both (the yaml names its source)")
    if args.source is not None and args.target_params is None:
        parser.error("--source needs --target-params (a yaml alone prints its plan)")
    if args.candidates < 1:
        parser.error(f"--candidates must be at least 1, got {args.candidates}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.target_params is None:
            text = render_plan(args.config, args.overrides)
        else:
            text = render_proposal(
                parse_params(args.target_params),
                source_spec=args.source,
                config_path=args.config,
                overrides=args.overrides,
                count=args.candidates,
                tolerance=args.tolerance,
                hidden_multiple=args.hidden_multiple,
                mlp_multiple=args.mlp_multiple,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
