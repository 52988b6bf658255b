"""Shared matplotlib plumbing: the Agg backend, one colour per run, saving figures into the report."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: reports are written by training machines and CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from shearing.reporting.document import Figure  # noqa: E402

DPI = 110
RUN_COLORS = plt.get_cmap("tab10").colors
DOMAIN_CMAP = "tab20"

plt.rcParams.update(
    {
        "figure.facecolor": "white",
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 10,
        "axes.titlesize": 11,
        "legend.fontsize": 9,
    }
)


def run_color(index: int):
    return RUN_COLORS[index % len(RUN_COLORS)]


def domain_colors(domains: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap(DOMAIN_CMAP if len(domains) > 10 else "tab10")
    return {d: cmap(i % cmap.N) for i, d in enumerate(domains)}


def human(value: float, _pos=None) -> str:
    """1234567 -> '1.23M' (axis labels for parameter counts)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


HUMAN = FuncFormatter(human)


def ema(values: list[float], points: int) -> list[float]:
    """Exponential moving average with a span of ``points`` (bias-corrected, so it starts on the data)."""
    alpha = 2.0 / (points + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "figure"


class FigureWriter:
    """Saves figures as PNGs under ``<output>/figures`` with unique names; returns document blocks."""

    def __init__(self, output: Path):
        self.root = output
        self.folder = output / "figures"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._used: set[str] = set()

    def save(self, fig, name: str, caption: str) -> Figure:
        stem, n = slug(name), 1
        while f"{stem}{'' if n == 1 else f'_{n}'}" in self._used:
            n += 1
        stem = f"{stem}{'' if n == 1 else f'_{n}'}"
        self._used.add(stem)
        path = self.folder / f"{stem}.png"
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        return Figure(path=path, caption=caption)
