"""Figures for a notebook (``lake.plot_routing``, ``lake.plot_expert_map``): matplotlib Figures, not PNGs.

Drawn on :class:`matplotlib.figure.Figure` with the Agg canvas, like the report's figures, so no pyplot
state is touched; Jupyter shows a returned Figure, and ``fig.savefig(path)`` writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def routing_figure(weights: np.ndarray, tokens: Sequence[str], n_prompt: int, title: str) -> Figure:
    """Gate weights of one layer, experts (rows) x tokens (columns); a line where the answer starts."""
    n_tokens, n_experts = weights.shape
    fig = _figure(max(6.0, 1.5 + 0.22 * n_tokens), max(3.0, 1.2 + 0.06 * n_experts))
    ax = fig.add_subplot()
    image = ax.imshow(weights.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="gate weight (0: not selected)")
    ax.set_xticks(range(n_tokens), list(tokens), rotation=90, fontsize=7)
    ax.set_ylabel("expert")
    if n_prompt < n_tokens:
        ax.axvline(n_prompt - 0.5, color="white", lw=1.5, ls="--")
        ax.set_xlabel("token (after the dashed line: the answer)")
    else:
        ax.set_xlabel("token")
    ax.set_title(title)
    return fig


def expert_map_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """Delta of each of a question's experts (columns, by rank) in each language (rows, correct first)."""
    langs = list(dict.fromkeys((row["lang"], row["correct"]) for row in rows))
    experts = sorted({(row["rank"], row["layer"], row["expert"]) for row in rows})
    column = {key[1:]: i for i, key in enumerate(experts)}
    line = {lang: i for i, (lang, _) in enumerate(langs)}
    delta = np.zeros((len(langs), len(experts)))
    for row in rows:
        delta[line[row["lang"]], column[row["layer"], row["expert"]]] = row["delta"]
    fig = _figure(max(5.0, 2.5 + 0.45 * len(experts)), max(3.0, 1.2 + 0.3 * len(langs)))
    ax = fig.add_subplot()
    scale = float(np.abs(delta).max()) or 1.0
    image = ax.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="delta: mean gate weight minus the language's mean")
    marks = {True: "correct", False: "wrong", None: "ungraded"}
    ax.set_yticks(range(len(langs)), [f"{lang} ({marks[correct]})" for lang, correct in langs])
    ax.set_xticks(range(len(experts)), [f"L{layer}/E{expert}" for _, layer, expert in experts], rotation=90)
    ax.set_xlabel("expert of the question's set (MoE layer / expert), strongest first")
    n_correct = sum(1 for _, correct in langs if correct)
    if 0 < n_correct < len(langs):
        ax.axhline(n_correct - 0.5, color="black", lw=1)
    ax.set_title(title)
    return fig
