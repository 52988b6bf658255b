"""Report sections about training: loss curves, per-domain loss against the reference, domain mixture.

Names read from ``metrics.jsonl``: ``loss/train/lm_loss`` (``loss/train/total`` when a run logs no
separate LM loss, e.g. continued pre-training), ``metrics/eval/LanguageCrossEntropy`` and
``metrics/eval/<domain>_LanguageCrossEntropy``; the mixture and the reference losses come from
``dynamic_loading.json`` (``shearing.composer.callbacks.dynamic_loading``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from shearing.reporting.document import Section, Table, Text, fmt
from shearing.reporting.figures import FigureWriter, domain_colors, ema, run_color
from shearing.reporting.runs import Run, Series

TRAIN_LOSS = ("loss/train/lm_loss", "loss/train/total")
EVAL_LOSS = "metrics/eval/LanguageCrossEntropy"
EVAL_PREFIX = "metrics/eval/"
DOMAIN_SUFFIX = "_LanguageCrossEntropy"
PLAIN = FuncFormatter(lambda v, _: f"{v:.3g}")  # 0.06 rather than 6 x 10^-2 on log axes


def train_loss(run: Run) -> tuple[str, Series] | None:
    for name in TRAIN_LOSS:
        if (series := run.series(name)) is not None:
            return name, series
    return None


# ------------------------------------------------------------------------------------ loss curves
def loss_curves(runs: list[Run], out: FigureWriter) -> Section:
    section = Section("Loss curves")
    curves = [(i, run, train_loss(run), run.series(EVAL_LOSS)) for i, run in enumerate(runs)]
    curves = [c for c in curves if c[2] is not None or c[3] is not None]
    if not curves:
        section.blocks.append(Text("No loss logged: no run has train or eval loss in metrics.jsonl."))
        return section
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = []
    for i, run, train, evals in curves:
        color = run_color(i)
        if train is not None:
            steps, values = train[1].steps, train[1].values
            span = max(1, len(values) // 25)
            if span > 1:
                ax_train.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax_train.plot(steps, ema(values, span), color=color, linewidth=1.8, label=run.name)
        if evals is not None:
            marker = "o" if len(evals.steps) <= 40 else None
            ax_eval.plot(evals.steps, evals.values, color=color, marker=marker, markersize=4, label=run.name)
        rows.append(
            [
                run.name,
                fmt(train[1].last()[0]) if train else "–",
                fmt(ema(train[1].values, max(1, len(train[1].values) // 25))[-1]) if train else "–",
                fmt(evals.last()[1]) if evals else "–",
                fmt(min(evals.values)) if evals else "–",
            ]
        )
    ax_train.set(title="Train LM loss (faint: per step; solid: moving average)", xlabel="step", ylabel="loss")
    ax_eval.set(title="Eval loss (all domains)", xlabel="step", ylabel="cross-entropy")
    for ax in (ax_train, ax_eval):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.has_data():
            ax.legend(loc="upper right")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    section.blocks.append(
        out.save(fig, "loss_curves", "Train LM loss and eval loss against step, one line per run.")
    )
    section.blocks.append(
        Table(
            ["run", "last step", "train loss (smoothed, last)", "eval loss (last)", "eval loss (best)"], rows
        )
    )
    return section


# -------------------------------------------------------------------------------- per-domain loss
def domain_losses(run: Run) -> tuple[int | None, dict[str, float]]:
    """The last evaluation's per-domain losses: from metrics.jsonl, else dynamic_loading.json."""
    names = [n for n in run.names_with_prefix(EVAL_PREFIX) if n.endswith(DOMAIN_SUFFIX)]
    if names:
        step = max(run.metrics[EVAL_PREFIX + n].steps[-1] for n in names)
        losses = {}
        for n in names:
            series = run.metrics[EVAL_PREFIX + n]
            if series.steps[-1] == step:
                losses[n[: -len(DOMAIN_SUFFIX)]] = series.values[-1]
        return step, losses
    history = (run.dynamic_loading or {}).get("history", [])
    for entry in reversed(history):
        if entry.get("losses"):
            return entry.get("step"), {d: float(v) for d, v in entry["losses"].items()}
    return None, {}


def per_domain(runs: list[Run], out: FigureWriter) -> Section:
    section = Section("Per-domain loss vs reference")
    data = []
    for i, run in enumerate(runs):
        step, losses = domain_losses(run)
        refs = {d: float(v) for d, v in ((run.dynamic_loading or {}).get("reference_losses") or {}).items()}
        if losses:
            data.append((i, run, step, losses, refs))
    if not data:
        section.blocks.append(
            Text("No per-domain evaluation: no run logged metrics/eval/<domain>_LanguageCrossEntropy.")
        )
        return section
    listed = [d for _, run, *_ in data for d in (run.dynamic_loading or {}).get("domains") or []]
    domains = list(dict.fromkeys([*listed, *(d for *_, losses, refs in data for d in [*losses, *refs])]))
    with_refs = [entry for entry in data if any(d in entry[4] for d in entry[3])]
    width = 0.8 / len(data)
    fig_width = min(14.0, max(8.0, 0.5 * len(domains) * (1 + len(data)) + 2, 4.2 * len(with_refs)))
    fig = plt.figure(figsize=(fig_width, 7.6))
    grid = fig.add_gridspec(2, max(1, len(with_refs)), height_ratios=(1.25, 1.0))
    ax_loss = fig.add_subplot(grid[0, :])
    # The loss axis spans the losses and the references near them. A reference far away (a random-model
    # reference of a pre-training run: ln V) would squash every bar, so it is written as a number instead.
    values = [v for *_, losses, _ in data for v in losses.values()]
    lo, hi = min(values), max(values)
    near = [
        v
        for *_, losses, refs in data
        for d, v in refs.items()
        if d in losses and lo - 1.0 - (hi - lo) <= v <= hi + 1.0 + (hi - lo)
    ]
    lo, hi = min([lo, *near]), max([hi, *near])
    span = hi - lo
    ylim = (max(0.0, lo - max(0.5 * span, 0.05 * lo)), hi + 0.15 * max(span, 0.05))
    if any(v > ylim[1] for *_, losses, refs in data for d, v in refs.items() if d in losses):
        ylim = (ylim[0], ylim[1] + 0.3 * (ylim[1] - ylim[0]))  # headroom for the off-scale numbers
    rows, any_ref, far = [], False, False
    for k, (i, run, step, losses, refs) in enumerate(data):
        xs = [j + (k - (len(data) - 1) / 2) * width for j in range(len(domains))]
        color = run_color(i)
        pairs = [(x, d) for x, d in zip(xs, domains) if d in losses]
        ax_loss.bar(
            [x for x, _ in pairs], [losses[d] for _, d in pairs], width * 0.92, color=color, label=run.name
        )
        shown = [(x, d) for x, d in pairs if d in refs and ylim[0] <= refs[d] <= ylim[1]]
        if shown:
            any_ref = True
            ax_loss.hlines(
                [refs[d] for _, d in shown],
                [x - width * 0.46 for x, _ in shown],
                [x + width * 0.46 for x, _ in shown],
                colors="black",
                linewidth=2.2,
            )
        for x, d in pairs:
            if d in refs and not ylim[0] <= refs[d] <= ylim[1]:
                any_ref = far = True
                ax_loss.annotate(
                    f"ref {refs[d]:.2f}{'↑' if refs[d] > ylim[1] else '↓'}",
                    (x, ylim[1] if refs[d] > ylim[1] else ylim[0]),
                    ha="center",
                    va="top" if refs[d] > ylim[1] else "bottom",
                    fontsize=7,
                    rotation=90,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0},
                )
        for d in domains:
            if d in losses or d in refs:
                gap = losses[d] - refs[d] if d in losses and d in refs else None
                rows.append([run.name, d, fmt(step), fmt(losses.get(d)), fmt(refs.get(d)), fmt(gap)])
    ax_loss.set_ylim(*ylim)
    handles = [Patch(color=run_color(i), label=run.name) for i, run, *_ in data]
    if any_ref:
        handles.append(Line2D([], [], color="black", linewidth=2.2, label="reference loss"))
    title = "Last eval loss per domain (black line: reference"
    ax_loss.set(title=title + ("; off-scale references as numbers)" if far else ")"), ylabel="cross-entropy")
    rotate = len(domains) * (1 + len(data)) > 16
    ax_loss.set_xticks(
        range(len(domains)), domains, rotation=30 if rotate else 0, ha="right" if rotate else "center"
    )
    ax_loss.grid(axis="x", visible=False)
    # One gap panel per run, each on its own scale: runs against different references (a pruned run vs
    # its scaling-law target, a source run vs a random model) differ by orders of magnitude.
    for k, (i, run, _, losses, refs) in enumerate(with_refs):
        ax = fig.add_subplot(grid[1, k])
        names = [d for d in domains if d in losses and d in refs]
        ax.bar(range(len(names)), [losses[d] - refs[d] for d in names], 0.7, color=run_color(i))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(
            range(len(names)),
            names,
            rotation=45 if len(names) > 4 else 0,
            ha="right" if len(names) > 4 else "center",
        )
        ax.set_title(f"{run.name}: loss minus reference", fontsize=10)
        ax.grid(axis="x", visible=False)
        if k == 0:
            ax.set_ylabel("loss gap (> 0: behind)")
    if not with_refs:
        ax = fig.add_subplot(grid[1, 0])
        ax.text(
            0.5, 0.5, "no reference losses", ha="center", va="center", transform=ax.transAxes, color="grey"
        )
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False)
    section.blocks.append(
        out.save(
            fig,
            "domain_loss_vs_reference",
            "Per-domain loss of each run's last evaluation against its reference loss "
            "(the loss axis does not start at 0; the lower panels show each run's gap on its own scale).",
        )
    )
    if not any_ref:
        section.blocks.append(Text("No reference losses found (dynamic_loading.json reference_losses)."))
    section.blocks.append(Table(["run", "domain", "step", "eval loss", "reference", "gap"], rows))
    return section


# --------------------------------------------------------------------------------- mixture history
def proportions(runs: list[Run], out: FigureWriter) -> Section:
    section = Section("Domain proportions over time")
    data = [
        (i, run) for i, run in enumerate(runs) if run.dynamic_loading and run.dynamic_loading.get("history")
    ]
    if not data:
        section.blocks.append(Text("No dynamic_loading.json with a history in any run."))
        return section
    domains = list(
        dict.fromkeys(
            d
            for _, run in data
            for d in run.dynamic_loading.get("domains") or run.dynamic_loading["history"][0]["proportions"]
        )
    )
    colors = domain_colors(domains)
    fig, axes = plt.subplots(
        len(data),
        2,
        figsize=(14, 2.8 + 2.4 * len(data)),
        squeeze=False,
        gridspec_kw={"width_ratios": (1, 1.15)},
    )
    rows = []
    for (ax, ax_lines), (_, run) in zip(axes, data):
        history = run.dynamic_loading["history"]
        steps = [e["step"] if e.get("effective_step") is None else e["effective_step"] for e in history]
        end = max([steps[-1], *(s for s in [run.last_step()] if s is not None)])
        if end <= steps[-1]:
            end = steps[-1] + max(1, (steps[-1] - steps[0]) // 50)
        xs = [*steps, end]
        bottom = [0.0] * len(xs)
        for d in domains:
            values = [float(e["proportions"].get(d, 0.0)) for e in history]
            values.append(values[-1])
            top = [b + v for b, v in zip(bottom, values)]
            ax.fill_between(xs, bottom, top, step="post", color=colors[d], label=d, linewidth=0)
            bottom = top
            # Lines, on a log axis: a shift of a 2% domain is as visible as one of a 67% domain.
            ax_lines.step(xs, values, where="post", color=colors[d], linewidth=1.6, label=d)
            if len(history) <= 41:
                ax_lines.plot(steps, values[:-1], "o", color=colors[d], markersize=3)
        if len(steps) <= 21:  # mark the updates while they stay readable
            for s in steps[1:]:
                ax.axvline(s, color="white", linewidth=0.6, alpha=0.6)
        update = run.dynamic_loading.get("update")
        title = f"{run.name}: {len(history) - 1} updates" + (f" ({update})" if update else "")
        ax.set(xlim=(xs[0], xs[-1]), ylim=(0, 1), ylabel="proportion", title=title)
        ax.grid(False)
        ax_lines.set_yscale("log")
        ax_lines.set(xlim=(xs[0], xs[-1]), ylabel="proportion (log)", title=f"{run.name}: per domain")
        ax_lines.yaxis.set_major_formatter(PLAIN)
        ax_lines.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))  # 0.02, 0.05, 0.2, 0.5
        ax_lines.yaxis.set_minor_formatter(PLAIN)
        first, last = history[0]["proportions"], history[-1]["proportions"]
        for d in domains:
            rows.append([run.name, d, fmt(first.get(d)), fmt(last.get(d)), fmt(history[-1]["step"])])
    for ax in axes[-1]:
        ax.set_xlabel("step (a new mixture applies from its effective step)")
    handles = [Patch(color=colors[d], label=d) for d in domains]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="domain", frameon=False)
    fig.tight_layout()
    section.blocks.append(
        out.save(
            fig,
            "domain_proportions",
            "Training-mixture proportions per domain, one row per run: stacked (left) and one line per "
            "domain on a log scale (right), so small shifts stay visible.",
        )
    )
    section.blocks.append(Table(["run", "domain", "initial", "final", "final update at step"], rows))
    return section
