"""Report sections about pruning: the constraint over time, the kept structure, parameter counts.

Curves come from the per-step statistics ``LagrangianPruning`` logs (``pruning/expected_sparsity/<f>``,
``pruning/target_sparsity/<f>``, ``pruning/lambda_{1,2}/<f>``, ``pruning/{expected,target}_num_params``);
the structure and the counts from the export summary ``shearing_export.json`` (``shearing.export``):
``source``/``target`` shapes with ``num_params``, and ``kept`` = ``{"hidden": [...], "layers":
[{"source_layer", "heads", "kv_heads", "intermediate"}]}`` in source indices. A source layer missing from
``kept.layers`` was dropped.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D

from shearing.reporting.document import Section, Table, Text, fmt
from shearing.reporting.figures import HUMAN, FigureWriter, run_color
from shearing.reporting.runs import Run

SPARSITY = "pruning/expected_sparsity/"
TARGET = "pruning/target_sparsity/"
LAMBDA = ("pruning/lambda_1/", "pruning/lambda_2/")
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


# ------------------------------------------------------------------------------ constraint curves
def pruning_curves(runs: list[Run], out: FigureWriter) -> Section:
    section = Section("Pruning: expected sparsity and λ over time")
    data = [(i, run) for i, run in enumerate(runs) if run.names_with_prefix(SPARSITY)]
    if not data:
        section.blocks.append(Text("No pruning statistics logged (pruning/expected_sparsity/<family>)."))
        return section
    families = list(dict.fromkeys(f for _, run in data for f in run.names_with_prefix(SPARSITY)))
    fig, axes = plt.subplots(
        2, len(families), figsize=(3.1 * len(families) + 1, 6.2), squeeze=False, sharex="col"
    )
    rows = []
    for col, family in enumerate(families):
        ax_s, ax_l = axes[0, col], axes[1, col]
        for i, run in data:
            color = run_color(i)
            if (s := run.series(SPARSITY + family)) is not None:
                ax_s.plot(s.steps, s.values, color=color, linewidth=1.6)
            if (t := run.series(TARGET + family)) is not None:
                ax_s.plot(t.steps, t.values, color=color, linewidth=1.2, linestyle="--")
            for prefix, style in zip(LAMBDA, ("-", ":")):
                if (lam := run.series(prefix + family)) is not None:
                    ax_l.plot(lam.steps, lam.values, color=color, linewidth=1.4, linestyle=style)
            if s is not None:
                rows.append(
                    [run.name, family, fmt(s.last()[0]), fmt(s.last()[1]), fmt(t.last()[1] if t else None)]
                )
        ax_s.set_ylim(-0.02, max(ax_s.get_ylim()[1], 0.05))
        ax_s.set_title(family)
        ax_l.set_xlabel("step")
        ax_l.axhline(0.0, color="grey", linewidth=0.6)
    axes[0, 0].set_ylabel("sparsity")
    axes[1, 0].set_ylabel("Lagrange multiplier")
    handles = [Line2D([], [], color=run_color(i), linewidth=2, label=run.name) for i, run in data]
    handles += [
        Line2D([], [], color="black", linestyle="-", label="expected sparsity / λ₁"),
        Line2D([], [], color="black", linestyle="--", label="target sparsity (ramp)"),
        Line2D([], [], color="black", linestyle=":", label="λ₂"),
    ]
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(handles), 6),
        frameon=False,
        bbox_to_anchor=(0.5, 1.0),
    )
    section.blocks.append(
        out.save(
            fig,
            "pruning_sparsity_lambda",
            "Expected sparsity per mask family (solid) against the target ramp (dashed); multipliers λ₁ (solid) and λ₂ (dotted) below.",
        )
    )
    section.blocks.append(Table(["run", "family", "last step", "expected sparsity", "target sparsity"], rows))
    params = [(i, run) for i, run in data if run.series("pruning/expected_num_params") is not None]
    if params:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for i, run in params:
            e, t = run.series("pruning/expected_num_params"), run.series("pruning/target_num_params")
            ax.plot(e.steps, e.values, color=run_color(i), linewidth=1.6, label=f"{run.name} expected")
            if t is not None:
                ax.plot(
                    t.steps,
                    t.values,
                    color=run_color(i),
                    linestyle="--",
                    linewidth=1.2,
                    label=f"{run.name} target",
                )
        ax.yaxis.set_major_formatter(HUMAN)
        ax.set(title="Expected parameter count under the masks", xlabel="step", ylabel="parameters")
        ax.legend(loc="upper right")
        fig.tight_layout()
        section.blocks.append(
            out.save(
                fig,
                "pruning_num_params",
                "Expected number of parameters (solid) against the final target (dashed).",
            )
        )
    return section


# ------------------------------------------------------------------------------- kept structure
def bins_for(size: int) -> int:
    """Columns for ``size`` channels: one per channel up to 256, else 128 bins."""
    return size if size <= 256 else 128


def binned_fraction(indices: list[int], size: int, bins: int) -> np.ndarray:
    """Fraction of channels kept in each of ``bins`` equal slices of ``range(size)``."""
    kept = np.zeros(size)
    kept[list(indices)] = 1.0
    edges = np.linspace(0, size, bins + 1).round().astype(int)
    return np.array([kept[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])


def structure_figure(run: Run):
    source, kept = run.export["source"], run.export["kept"]
    L, H = source["num_hidden_layers"], source["num_attention_heads"]
    G, F, D = source.get("num_key_value_heads") or H, source["intermediate_size"], source["hidden_size"]
    layers = {entry["source_layer"]: entry for entry in kept["layers"]}
    heads = np.full((L, H), np.nan)
    ffn = np.full((L, bins_for(F)), np.nan)
    for layer, entry in layers.items():
        heads[layer] = 0.0
        heads[layer, entry["heads"]] = 1.0
        ffn[layer] = binned_fraction(entry["intermediate"], F, bins_for(F))

    fig = plt.figure(figsize=(13, 2.4 + 0.26 * max(L, 4)), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[max(L, 4), 2.2], width_ratios=[1, 1.6])
    ax_h, ax_f, ax_d = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    rows = (L - 0.5, -0.5)  # imshow extent: row i centred on y = i, layer 0 on top

    two = ListedColormap(["#f2c4b4", "#2a6f97"]).with_extremes(bad="#c8c8c8")
    ax_h.imshow(np.ma.masked_invalid(heads), cmap=two, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for g in range(1, G if G < H else 0):  # MHA: every head is its own group, no lines
        ax_h.axvline(g * H / G - 0.5, color="white", linewidth=2)
    ax_h.set_xticks(range(0, H, max(1, H // 8)))
    groups = f"white lines: the {G} KV groups" if G < H else "MHA"
    ax_h.set(xlabel=f"query head ({groups})", ylabel="source layer")
    ax_h.set_title("Attention heads: blue kept, pink pruned", loc="left")

    viridis = plt.get_cmap("viridis").with_extremes(bad="#c8c8c8")
    image = ax_f.imshow(
        np.ma.masked_invalid(ffn),
        cmap=viridis,
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
        extent=(0, F, *rows),
    )
    per_bin = "" if bins_for(F) == F else f", {F / bins_for(F):.0f} per column"
    ax_f.set(xlabel=f"intermediate channel ({F:,}{per_bin})")
    ax_f.set_title("MLP channels: kept fraction", loc="left")
    fig.colorbar(image, ax=[ax_f, ax_d], fraction=0.03, pad=0.01, label="kept fraction (grey: layer dropped)")

    step = max(1, L // 32)
    for ax in (ax_h, ax_f):
        ax.grid(False)
        ticks = list(range(0, L, step))
        ax.set_yticks(ticks, [f"{i} (dropped)" if i not in layers else str(i) for i in ticks])
        for label in ax.get_yticklabels():
            if label.get_text().endswith("(dropped)"):
                label.set_color("#b00020")

    hidden = binned_fraction(kept["hidden"], D, bins_for(D))[None, :]
    ax_d.imshow(
        hidden, cmap=viridis, vmin=0, vmax=1, aspect="auto", interpolation="nearest", extent=(0, D, 1, 0)
    )
    ax_d.grid(False)
    ax_d.set_yticks([])
    per_bin = "" if bins_for(D) == D else f", {D / bins_for(D):.0f} per column"
    ax_d.set(xlabel=f"hidden channel ({D:,}{per_bin})")
    ax_d.set_title(f"Hidden channels (all layers): {len(kept['hidden']):,} of {D:,} kept", loc="left")
    fig.suptitle(f"{run.name}: kept structure, {len(layers)} of {L} layers kept (grey rows: dropped)")
    return fig


def kept_structure(runs: list[Run], out: FigureWriter) -> Section:
    section = Section("Kept structure heat map")
    data = [run for run in runs if run.export and (run.export.get("kept") or {}).get("layers")]
    if not data:
        section.blocks.append(
            Text("No export with kept indices (shearing_export.json with a non-empty kept).")
        )
        return section
    for run in data:
        dropped = sorted(
            set(range(run.export["source"]["num_hidden_layers"]))
            - {e["source_layer"] for e in run.export["kept"]["layers"]}
        )
        section.blocks.append(
            out.save(
                structure_figure(run),
                f"kept_structure_{run.name}",
                f"{run.name}: kept heads, MLP channels and hidden channels per source layer ({run.export_path}).",
            )
        )
        section.blocks.append(Text(f"{run.name}: dropped source layers: {dropped or 'none'}."))
    return section


# ------------------------------------------------------------------------------ parameter counts
def parameter_counts(runs: list[Run], out: FigureWriter) -> Section:
    section = Section("Parameter counts")
    data = [run for run in runs if run.export]
    if not data:
        section.blocks.append(Text("No export summary (shearing_export.json) in any run."))
        return section
    for run in data:
        source, target = run.export["source"], run.export["target"]
        rows = []
        for name in (*SHAPE_FIELDS, "num_params"):
            s, t = source.get(name), target.get(name)
            ratio = fmt(t / s, 3) if isinstance(s, int | float) and isinstance(t, int | float) and s else "–"
            rows.append([name, fmt(s), fmt(t), ratio])
        if (e := run.series("pruning/expected_num_params")) is not None:
            rows.append(["expected num_params at the last step (masks)", "", fmt(round(e.last()[1])), ""])
        caption = f"{run.name} ({run.export_path}; dtype {run.export.get('dtype', '?')})"
        section.blocks.append(Table(["", "source", "target", "target / source"], rows, caption=caption))
    return section
