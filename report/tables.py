"""The report's tables as data: the paper's Table 1 (consistency) and Table 2 (identification, ablation).

Each builder returns a :class:`Table` of raw values (counts, shares in [0, 1]) with a formatting kind per
column, so tests compare numbers and the renderers format them one way for Markdown and HTML alike. The
numbers come from xici's macros and views (``language_accuracy``, ``question_outcomes``,
``analysis_summary``) and from the ablation package's reader :func:`xici.ablation.metrics.metrics_rows`.

Like the paper's Table 2, the identification and ablation tables add, for a model analysed on several
datasets, a row pooled over them: counts summed, shares recomputed from the summed counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import duckdb

from xici.ablation.metrics import MetricsRow, metrics_rows, overall
from xici.report.source import Analysis, Choice, Run, analyses_of

_FORMATS: dict[str, Callable[[Any], str]] = {
    "text": str,
    "int": lambda v: str(int(v)),
    "pct": lambda v: f"{100 * v:.1f}%",
    "pct2": lambda v: f"{100 * v:.2f}%",
    "num": lambda v: f"{v:.1f}",
}


class Column(NamedTuple):
    name: str
    kind: str = "text"  # a key of _FORMATS; shares are stored in [0, 1] and shown as percentages


@dataclass(frozen=True)
class Table:
    """Rows of raw values under named, typed columns; ``caption`` says what to read them as."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[Any, ...], ...]
    caption: str = ""

    def column(self, name: str) -> list[Any]:
        """The raw values of one column, top to bottom."""
        j = [c.name for c in self.columns].index(name)
        return [row[j] for row in self.rows]

    def formatted(self) -> list[list[str]]:
        """Every cell as text; a missing value is a dash."""
        return [
            ["–" if v is None else _FORMATS[c.kind](v) for c, v in zip(self.columns, row, strict=True)]
            for row in self.rows
        ]


def describe(analysis: Analysis) -> str:
    """The parameters of an analysis in one short line."""
    p = analysis.params
    return (
        f"α {p['alpha']:g}, τ {p['tau']:g}, layers {int(p['layer_start'])}:{int(p['layer_stop'])}, "
        f"cap {int(p['max_experts'])}, blacklist top {p['blacklist_top']:g} in > {p['blacklist_share']:g}"
    )


def _by_model(choices: Sequence[Choice]) -> list[list[tuple[Run, Analysis]]]:
    """The analysed (run, analysis) pairs grouped by model, in order of first appearance."""
    groups: dict[str, list[tuple[Run, Analysis]]] = {}
    for choice in choices:
        if choice.analysis is not None:
            groups.setdefault(choice.run.model, []).append((choice.run, choice.analysis))
    return list(groups.values())


def consistency_table(con: duckdb.DuckDBPyConnection, runs: Sequence[Run]) -> Table:
    """Table 1: per record run and grader, how consistently the model answers across languages."""
    rows, ungraded, no_grades = [], 0, []
    for run in runs:
        graders = con.execute(
            "select distinct g.grader from grades g join sequences s using (seq_id) where s.run_id = ? "
            "order by 1",
            [run.run_id],
        ).fetchall()
        if not graders:
            no_grades.append(run.run_id)
        for (grader,) in graders:
            languages, english, average = con.execute(
                "select count(*), any_value(accuracy) filter (where lang = 'en'), avg(accuracy) "
                "from language_accuracy(?, ?)",
                [run.run_id, grader],
            ).fetchone()
            questions, all_correct, all_wrong, mixed, none = con.execute(
                "select count(*), count_if(outcome = 'all_correct'), count_if(outcome = 'all_wrong'), "
                "count_if(outcome = 'mixed'), count_if(outcome = 'ungraded') from question_outcomes(?, ?)",
                [run.run_id, grader],
            ).fetchone()
            ungraded += none
            rows.append(
                (
                    run.dataset,
                    run.model,
                    run.run_id,
                    grader,
                    questions,
                    languages,
                    english,
                    average,
                    all_correct,
                    all_wrong,
                    mixed,
                )
            )
    notes = ["Average accuracy is the mean of the per-language accuracies."]
    if ungraded:
        notes.append(f"{ungraded} questions have no decided grade in any language and count in no outcome.")
    if no_grades:
        runs_text = ", ".join(map(str, no_grades))
        notes.append(f"Not graded yet, so left out: run {runs_text} (`xici grade --run N --grader match`).")
    columns = (
        Column("dataset"),
        Column("model"),
        Column("run", "int"),
        Column("grader"),
        Column("questions", "int"),
        Column("languages", "int"),
        Column("English accuracy", "pct"),
        Column("average accuracy", "pct"),
        Column("all correct", "int"),
        Column("all incorrect", "int"),
        Column("mixed", "int"),
    )
    return Table("Table 1: consistency per dataset and model", columns, tuple(rows), " ".join(notes))


def identification_table(con: duckdb.DuckDBPyConnection, choices: Sequence[Choice]) -> Table:
    """Table 2, top: per run (its chosen analysis), questions with experts and how many experts."""
    rows = []
    for group in _by_model(choices):
        counts = []
        for run, analysis in group:
            mixed, with_experts, experts, blacklisted = con.execute(
                "select mixed, with_experts, experts, blacklisted from analysis_summary "
                "where analysis_id = ?",
                [analysis.analysis_id],
            ).fetchone()
            counts.append((mixed, with_experts, experts))
            rows.append(
                _identification_row(
                    run, run.dataset, analysis.analysis_id, counts[-1], blacklisted, describe(analysis)
                )
            )
        if len(group) > 1:
            mixed, with_experts, experts = (sum(c) for c in zip(*counts, strict=True))
            pooled = "all: " + ", ".join(run.dataset for run, _ in group)
            rows.append(
                _identification_row(group[0][0], pooled, None, (mixed, with_experts, experts), None, "pooled")
            )
    columns = (
        Column("dataset"),
        Column("model"),
        Column("analysis", "int"),
        Column("mixed questions", "int"),
        Column("questions with experts", "int"),
        Column("experts per question", "num"),
        Column("blacklisted experts", "int"),
        Column("experts ablated", "pct2"),
        Column("parameters"),
    )
    caption = (
        "Experts per question is averaged over the questions with experts; experts ablated is that average "
        "as a share of all routed experts (MoE layers × experts per layer). A pooled row sums the analyses "
        "of one model above it."
    )
    return Table("Table 2a: identification", columns, tuple(rows), caption)


def _identification_row(
    run: Run,
    dataset: str,
    analysis_id: int | None,
    counts: tuple[int, int, int],
    blacklisted: int | None,
    parameters: str,
) -> tuple[Any, ...]:
    """One row from (mixed questions, questions with experts, experts summed over questions)."""
    mixed, with_experts, experts = counts
    per_question = experts / with_experts if with_experts else None
    share = None if per_question is None else per_question / (run.n_moe_layers * run.n_experts)
    return (
        dataset,
        run.model,
        analysis_id,
        mixed,
        with_experts,
        per_question,
        blacklisted,
        share,
        parameters,
    )


def ablation_table(con: duckdb.DuckDBPyConnection, choices: Sequence[Choice]) -> Table:
    """Table 2, bottom: XICI's sets against the random-set and question-shuffle baselines."""
    rows = []
    for group in _by_model(choices):
        found = metrics_rows(con, [analysis.analysis_id for _, analysis in group])
        rows += [_ablation_row(r) for r in found]
        # Pool a (condition, pool, seed) over the model's analyses only where every ablated one has it.
        ablated = {r.analysis_id for r in found}
        covered: dict[tuple[str, str | None, int | None], set[int | None]] = {}
        for r in found:
            covered.setdefault((r.condition, r.random_pool, r.seed), set()).add(r.analysis_id)
        if len(ablated) > 1:
            complete = [r for r in found if covered[r.condition, r.random_pool, r.seed] == ablated]
            rows += [_ablation_row(r) for r in overall(complete)]
    columns = (
        Column("dataset"),
        Column("model"),
        Column("analysis", "int"),
        Column("condition"),
        Column("seed", "int"),
        Column("originally correct pairs", "int"),
        Column("ASR", "pct"),
        Column("SGR", "pct"),
        Column("rate difference", "pct"),
        Column("questions all wrong after", "int"),
        Column("violations", "int"),
    )
    caption = (
        "Over the (question, language) pairs of the questions with experts. ASR: share of the pairs answered "
        "correctly before that are wrong with the experts switched off; SGR: share of the wrong ones now "
        "right; rate difference = ASR − SGR. Random set: as many experts per question, drawn from the "
        "analysed layers (window) or from those minus the blacklisted generalists, as the row says; "
        "shuffled: each question asked with another question's experts; nothing off: each question asked "
        "again the same way with no expert off, the noise floor of re-asking (0.0% on a deterministic run "
        "means the answers did not change). Violations: "
        "selections of a switched-off expert in the recorded routing (0: proven off). Rows without an "
        "analysis pool the model's analyses above them, for the conditions and seeds all of them have."
    )
    return Table("Table 2b: ablation", columns, tuple(rows), caption)


def _ablation_row(row: MetricsRow) -> tuple[Any, ...]:
    m = row.metrics
    return (
        row.dataset,
        row.model,
        row.analysis_id,
        row.label,
        row.seed,
        m.n_correct_before,
        m.asr,
        m.sgr,
        m.rate_diff,
        m.n_all_wrong,
        row.violations,
    )


def analyses_table(con: duckdb.DuckDBPyConnection, choice: Choice) -> Table:
    """Every analysis of the chosen run, so a user can pick another with ``--analysis``."""
    rows = []
    for analysis in analyses_of(con, choice.run.run_id):
        with_experts, avg_experts = con.execute(
            "select with_experts, avg_experts from analysis_summary where analysis_id = ?",
            [analysis.analysis_id],
        ).fetchone()
        ablated = "yes" if metrics_rows(con, [analysis.analysis_id]) else ""
        shown = "yes" if choice.analysis == analysis else ""
        rows.append(
            (
                analysis.analysis_id,
                analysis.grader,
                describe(analysis),
                with_experts,
                avg_experts,
                ablated,
                shown,
            )
        )
    columns = (
        Column("analysis", "int"),
        Column("grader"),
        Column("parameters"),
        Column("questions with experts", "int"),
        Column("experts per question", "num"),
        Column("ablated"),
        Column("shown"),
    )
    return Table(f"Analyses of run {choice.run.run_id}", columns, tuple(rows))
