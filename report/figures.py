"""The report's figures: the numbers each one needs, read from the warehouse, drawn as PNG with matplotlib.

Figures are drawn on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through pyplot,
so no global backend or figure registry is touched and nothing needs a display. Each ``*_figure`` function
returns a :class:`Figure` (PNG bytes and what it shows), or None when the lake has nothing to draw yet.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass

import duckdb
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from xici.ablation.metrics import Metrics, metrics_rows
from xici.report.source import Analysis, Choice, analyses_of

DPI = 110
_BAR = "#4C72B0"
_HIGHLIGHT = "#DD8452"
_EXCLUDED = "#BBBBBB"
_CONDITION_COLORS = {"xici": "#C44E52", "random": "#8C8C8C", "shuffle": "#4C72B0", "none": "#55A868"}

#: Parameters whose sweeps get a figure (layer windows are pairs and are not plotted): (name, axis label).
SWEPT: dict[str, tuple[str, str]] = {
    "max_experts": ("the cap", "max experts per question (cap)"),
    "tau": ("τ", "τ, median-difference threshold"),
    "alpha": ("α", "α, significance of the test"),
    "blacklist_top": ("the blacklist top", "blacklist: top share of a sequence's ranking"),
    "blacklist_share": ("the blacklist share", "blacklist: share of sequences"),
}

#: Every file name a report can write, so a new report can remove the ones an older report left behind.
FIGURE_NAMES: tuple[str, ...] = (
    "accuracy_by_language",
    "experts_per_layer",
    "ablated_experts",
    "ablation",
    "localizers",
    *(f"sweep_{name}" for name in SWEPT),
)


@dataclass(frozen=True)
class Figure:
    """A drawn figure: file stem (one of FIGURE_NAMES), title, a caption saying how to read it, PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _png(fig: MplFigure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _title(ax: Axes, text: str) -> None:
    """A title wrapped to the axes' figure width (about ten characters per inch at the default size)."""
    ax.set_title(textwrap.fill(text, width=int(10 * ax.get_figure().get_figwidth())))


def _shade_excluded(ax: Axes, analysis: Analysis, n_layers: int) -> None:
    """Grey bands over the MoE layers the analysis left out (method.md, Stage 2, step 1)."""
    start, stop = int(analysis.params["layer_start"]), int(analysis.params["layer_stop"])
    label = "excluded layers"
    for lo, hi in ((0, start), (stop, n_layers)):
        if hi > lo:
            ax.axvspan(lo - 0.5, hi - 0.5, color=_EXCLUDED, alpha=0.35, lw=0, label=label)
            label = None
    ax.set_xlim(-0.5, n_layers - 0.5)
    step = max(1, int(np.ceil(n_layers / 24)))
    ax.set_xticks(range(0, n_layers, step))


def accuracy_figure(con: duckdb.DuckDBPyConnection, choice: Choice) -> Figure | None:
    """Accuracy per language of the chosen run, best first, English highlighted, the average as a line."""
    if choice.grader is None:
        return None
    rows = con.execute(
        "select lang, accuracy from language_accuracy(?, ?) where accuracy is not null "
        "order by accuracy desc, lang",
        [choice.run.run_id, choice.grader],
    ).fetchall()
    if not rows:
        return None
    langs = [lang for lang, _ in rows]
    accuracy = np.array([a for _, a in rows]) * 100
    fig = MplFigure(figsize=(max(6.0, 1.5 + 0.28 * len(langs)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    colors = [_HIGHLIGHT if lang == "en" else _BAR for lang in langs]
    ax.bar(range(len(langs)), accuracy, color=colors, width=0.8)
    ax.axhline(accuracy.mean(), color="black", ls="--", lw=1, label=f"average {accuracy.mean():.1f}%")
    ax.set_xticks(range(len(langs)), langs, rotation=90 if len(langs) > 10 else 0)
    ax.set_xlim(-0.7, len(langs) - 0.3)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("language (English highlighted)" if "en" in langs else "language")
    _title(ax, f"Accuracy per language: {choice.run.label}, grader {choice.grader}")
    ax.legend(loc="upper right", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return Figure(
        "accuracy_by_language",
        "Accuracy per language",
        "Share of the graded answers that are correct, per language, sorted; the dashed line is the mean "
        "over languages (the table's average accuracy).",
        _png(fig),
    )


def experts_per_layer_figure(con: duckdb.DuckDBPyConnection, choice: Choice) -> Figure | None:
    """How many identified (question, expert) entries fall in each MoE layer, excluded layers shaded."""
    if choice.analysis is None:
        return None
    n_layers = choice.run.n_moe_layers
    counts = np.zeros(n_layers, dtype=int)
    for layer, count in con.execute(
        "select layer, count(*) from analysis_experts where analysis_id = ? group by layer",
        [choice.analysis.analysis_id],
    ).fetchall():
        counts[layer] = count
    fig = MplFigure(figsize=(max(6.0, 1.5 + 0.16 * n_layers), 3.6), layout="constrained")
    ax = fig.add_subplot()
    _shade_excluded(ax, choice.analysis, n_layers)
    ax.bar(range(n_layers), counts, color=_BAR, width=0.8, label="identified experts")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("experts, summed over questions")
    ax.set_ylim(0, 1.25 * max(1, counts.max()))  # room for the legend
    _title(ax, f"Identified experts per layer: analysis {choice.analysis.analysis_id} of {choice.run.label}")
    ax.legend(loc="upper right", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return Figure(
        "experts_per_layer",
        "Identified experts per layer",
        f"Each question's expert set counted by MoE layer, summed over questions ({counts.sum()} in all). "
        "Grey: layers the analysis excludes.",
        _png(fig),
    )


def ablated_experts_figure(con: duckdb.DuckDBPyConnection, choice: Choice) -> Figure | None:
    """How much of the model the ablation switches off: slots ever used per layer, and set sizes."""
    if choice.analysis is None:
        return None
    analysis, run = choice.analysis, choice.run
    share = np.zeros(run.n_moe_layers)
    for layer, n in con.execute(
        "select layer, count(distinct expert) from analysis_experts where analysis_id = ? group by layer",
        [analysis.analysis_id],
    ).fetchall():
        share[layer] = 100 * n / run.n_experts
    sizes = np.array(
        [
            n
            for (n,) in con.execute(
                "select n_experts from analysis_questions where analysis_id = ? and n_experts > 0",
                [analysis.analysis_id],
            ).fetchall()
        ],
        dtype=int,
    )
    cap = int(analysis.params["max_experts"])
    fig = MplFigure(figsize=(11.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.4, 1))
    _shade_excluded(left, analysis, run.n_moe_layers)
    left.bar(range(run.n_moe_layers), share, color=_BAR, width=0.8)
    left.set_ylim(0, max(5.0, 1.15 * share.max()))
    left.set_xlabel("MoE layer")
    left.set_ylabel(f"% of the layer's {run.n_experts} experts")
    left.set_title("Experts in at least one question's set")
    left.grid(axis="y", alpha=0.3)
    top = max(cap, int(sizes.max()) if sizes.size else 1)
    right.hist(sizes, bins=np.arange(0.5, top + 1.5), color=_BAR, edgecolor="white")
    right.axvline(cap + 0.5, color="black", ls="--", lw=1, label=f"cap {cap}")
    right.set_xlim(0.5, top + 1.5)
    right.set_xlabel("experts in the question's set")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("questions")
    right.set_title(f"Set sizes ({sizes.size} questions with experts)")
    right.legend(loc="best", frameon=False)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Ablated experts: analysis {analysis.analysis_id} of {run.label}")
    return Figure(
        "ablated_experts",
        "Share of experts ablated",
        "Left: per MoE layer, the share of its experts that at least one question switches off. Right: how "
        "many experts a question switches off, over the questions with experts.",
        _png(fig),
    )


def _by_condition(con: duckdb.DuckDBPyConnection, analysis_id: int) -> dict[tuple[str, str], Metrics]:
    """An analysis' ablation metrics per (condition, its label) (XICI first), a baseline's seeds pooled; a
    random baseline of each pool is its own condition."""
    groups: dict[tuple[str, str], list[Metrics]] = {}
    for row in metrics_rows(con, [analysis_id]):
        groups.setdefault((row.condition, row.label), []).append(row.metrics)
    return {key: Metrics.pooled(parts) for key, parts in groups.items()}


def ablation_figure(con: duckdb.DuckDBPyConnection, choice: Choice) -> Figure | None:
    """ASR, SGR and rate difference of XICI's sets next to both baselines."""
    if choice.analysis is None:
        return None
    metrics = _by_condition(con, choice.analysis.analysis_id)
    if not metrics:
        return None
    fig = MplFigure(figsize=(7.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    names = ("ASR", "SGR", "rate difference")
    width = 0.8 / len(metrics)
    for i, ((condition, label), m) in enumerate(metrics.items()):
        values = [100 * (v or 0.0) for v in (m.asr, m.sgr, m.rate_diff)]
        x = np.arange(len(names)) + (i - (len(metrics) - 1) / 2) * width
        # a second random pool gets a hatch, so the two grey bars are told apart
        hatch = "//" if condition == "random" and "minus" in label else None
        bars = ax.bar(x, values, width, color=_CONDITION_COLORS[condition], label=label, hatch=hatch)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("% of (question, language) pairs")
    _title(
        ax, f"Ablation against the baselines: analysis {choice.analysis.analysis_id} of {choice.run.label}"
    )
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    return Figure(
        "ablation",
        "Ablation against the baselines",
        "Switching off each question's experts (XICI) against random sets of the same size (from the pool "
        "the legend names), against another question's experts (shuffled) and, where run, against asking "
        "again with nothing off (the noise floor); a baseline run with several seeds is pooled over them.",
        _png(fig),
    )


def sweep_figures(con: duckdb.DuckDBPyConnection, choice: Choice) -> list[Figure]:
    """One figure per parameter swept around the chosen analysis (other parameters and grader equal)."""
    base = choice.analysis
    if base is None:
        return []
    analyses = analyses_of(con, choice.run.run_id)
    figures = []
    for name in SWEPT:
        points = {a.params[name]: a for a in analyses if a.differs_only_in(base, name)}  # newest wins
        if len(points) >= 2:
            figures.append(_sweep_figure(con, base, name, dict(sorted(points.items()))))
    return figures


def _sweep_figure(
    con: duckdb.DuckDBPyConnection, base: Analysis, name: str, points: dict[float, Analysis]
) -> Figure:
    """Questions with experts, experts per question and (when ablated) rate differences per sweep point.

    Points sit evenly spaced in sweep order (values like τ 0, 0.001 … 0.05 span decades and include 0).
    """
    values = list(points)
    x = np.arange(len(values))
    mixed, with_experts, per_question = np.array(
        [
            con.execute(
                "select mixed, with_experts, coalesce(avg_experts, 0) from analysis_summary "
                "where analysis_id = ?",
                [a.analysis_id],
            ).fetchone()
            for a in points.values()
        ],
        dtype=float,
    ).T
    ablations = [_by_condition(con, a.analysis_id) for a in points.values()]
    panels = 3 if sum(map(bool, ablations)) >= 2 else 2  # one ablated point is the ablation figure again
    fig = MplFigure(figsize=(4.2 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels)
    axes[0].plot(x, with_experts, "o-", color=_BAR, label="with experts")
    axes[0].plot(x, mixed, ":", color="black", label="mixed (upper bound)")
    axes[0].set_ylim(0, 1.15 * max(1.0, mixed.max()))
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("questions")
    axes[0].set_title("Questions with experts")
    axes[0].legend(loc="lower left", frameon=False, fontsize=8)
    axes[1].plot(x, per_question, "o-", color=_BAR)
    axes[1].set_ylim(0, 1.15 * max(1.0, per_question.max()))
    axes[1].set_ylabel("experts per question")
    axes[1].set_title("Experts per question")
    if panels == 3:
        for key in dict.fromkeys(key for found in ablations for key in found):
            at = [i for i, found in enumerate(ablations) if key in found]
            rd = [100 * (ablations[i][key].rate_diff or 0.0) for i in at]
            axes[2].plot(at, rd, "o-", color=_CONDITION_COLORS[key[0]], label=key[1])
        axes[2].axhline(0, color="black", lw=0.8)
        axes[2].set_ylabel("rate difference (%)")
        axes[2].set_title("Ablation: ASR − SGR")
        axes[2].legend(frameon=False, fontsize=8)
    for ax in axes:
        ax.set_xticks(x, [f"{v:g}" for v in values])
        ax.set_xlim(-0.4, len(values) - 0.6)
        ax.axvline(values.index(base.params[name]), color=_HIGHLIGHT, lw=1, ls="--")
        ax.set_xlabel(SWEPT[name][1])
        ax.grid(alpha=0.3)
    fig.suptitle(f"Sweep of {SWEPT[name][0]}: run {base.run_id} (dashed: the analysis shown)")
    return Figure(
        f"sweep_{name}",
        f"Sweep of {SWEPT[name][0]}",
        f"Analyses of run {base.run_id} that differ from analysis {base.analysis_id} "
        f"only in {name}: " + ", ".join(f"{v:g} (analysis {a.analysis_id})" for v, a in points.items()) + ".",
        _png(fig),
    )
