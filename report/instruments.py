"""The instruments beyond Table 2 (docs/method.md, "Instruments"; "Rival localizers"), as report tables and
figures read from their views: rival localizers ablated side by side (``localizer_ablations``), the boost
(``boost_summary``), per-expert necessity (``expert_necessity``, ``asr_by_set_size``). Each builder returns
None when the lake holds nothing of the kind for the run, so the report leaves the part out.
"""

from __future__ import annotations

import duckdb
import numpy as np
from matplotlib.figure import Figure as MplFigure

from xici.ablation.conditions import LABELS
from xici.analysis.params import method_label
from xici.report.figures import _CONDITION_COLORS, Figure, _png, _title
from xici.report.tables import Column, Table


def _rows(con: duckdb.DuckDBPyConnection, query: str, params: list[object]) -> list[dict[str, object]]:
    cursor = con.execute(query, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _condition(condition: str) -> str:
    """A condition's name next to rival localizers: XICI's row is each localizer's own sets."""
    return "own sets" if condition == "xici" else LABELS[condition]


def _localizer_rows(con: duckdb.DuckDBPyConnection, run_id: int) -> list[dict[str, object]]:
    """The deactivation ablations of the run's analyses, one row per (analysis, condition)."""
    rows = _rows(
        con,
        "select * from localizer_ablations where run_id = ? order by analysis_id, "
        "question_limit nulls first, list_position(['xici', 'random', 'shuffle', 'none'], condition)",
        [run_id],
    )
    for row in rows:
        row["localizer"] = method_label(row)
    return rows


def localizers_table(con: duckdb.DuckDBPyConnection, run_id: int) -> Table | None:
    """Rate difference per localizer with its baselines, and how many experts it chose per question.

    Shown once the run has ablations of at least two localizers (or step ablations of XICI)."""
    rows = _localizer_rows(con, run_id)
    if len({row["localizer"] for row in rows}) < 2:
        return None
    columns = (
        Column("analysis", "int"),
        Column("localizer"),
        Column("questions with experts", "int"),
        Column("experts per question", "num"),
        Column("condition"),
        Column("questions ablated", "int"),
        Column("ASR", "pct"),
        Column("SGR", "pct"),
        Column("rate difference", "pct"),
        Column("violations", "int"),
    )
    body = tuple(
        (
            r["analysis_id"],
            r["localizer"],
            r["with_experts"],
            r["avg_experts"],
            _condition(r["condition"]),
            r["n_questions"],
            r["asr"],
            r["sgr"],
            r["rate_diff"],
            r["violations"],
        )
        for r in rows
    )
    caption = (
        "Each localizer's sets ablated like XICI's, with the same baselines (random sets of the same sizes, "
        "shuffled sets). Budget: by default a rival keeps per question no more experts than XICI's set of "
        "the same parameters. 'no language mean' / 'no blacklist': the method without that step."
    )
    return Table(f"Localizers of run {run_id}", columns, body, caption)


def localizers_figure(con: duckdb.DuckDBPyConnection, run_id: int) -> Figure | None:
    """Rate difference per localizer and condition (left), experts per question (right)."""
    rows = _localizer_rows(con, run_id)
    if len({row["localizer"] for row in rows}) < 2:  # as the table: only once there is a rival
        return None
    # one ablation per analysis: of all its questions with experts when run, else of the most questions
    widest = {}
    for row in rows:
        limit = row["question_limit"]
        best = widest.get(row["analysis_id"], limit)
        widest[row["analysis_id"]] = None if None in (best, limit) else max(best, limit)
    rows = [row for row in rows if row["question_limit"] == widest[row["analysis_id"]]]
    localizers = list(dict.fromkeys(f"{r['localizer']} ({r['analysis_id']})" for r in rows))
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    fig = MplFigure(figsize=(10.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 1.4))
    width = 0.8 / len(conditions)
    x = np.arange(len(localizers))
    for i, condition in enumerate(conditions):
        values = {
            f"{r['localizer']} ({r['analysis_id']})": r["rate_diff"]
            for r in rows
            if r["condition"] == condition
        }
        heights = [100 * (values.get(name) or 0.0) for name in localizers]
        bars = left.bar(
            x + (i - (len(conditions) - 1) / 2) * width,
            heights,
            width,
            color=_CONDITION_COLORS.get(condition, "#55A868"),
            label=_condition(condition),
        )
        left.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    left.set_xticks(x, localizers, rotation=20, ha="right", fontsize=8)
    left.axhline(0, color="black", lw=0.8)
    left.set_ylabel("rate difference, ASR − SGR (%)")
    left.legend(frameon=False, fontsize=8)
    left.grid(axis="y", alpha=0.3)
    _title(left, f"Localizers ablated on run {run_id}")
    sizes = {f"{r['localizer']} ({r['analysis_id']})": r["avg_experts"] or 0.0 for r in rows}
    right.barh(range(len(localizers)), [sizes[name] for name in localizers], color="#4C72B0")
    right.set_yticks(range(len(localizers)), localizers, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("experts per question (with experts)")
    right.grid(axis="x", alpha=0.3)
    return Figure(
        "localizers",
        "Localizers against the baselines",
        "Left: rate difference (ASR − SGR) of each localizer's own sets and of its baselines (random sets of "
        "the same sizes, shuffled sets), from its ablation of all questions with experts (or, when only "
        "that was run, of the most questions: xici ablate --questions N). Right: the average size of the "
        "sets it chose.",
        _png(fig),
    )


def boost_table(con: duckdb.DuckDBPyConnection, run_id: int) -> Table | None:
    """Gain and loss rates of boosted sets against random sets boosted the same way, with the routing
    check (how often the boosted experts were selected, before and after)."""
    rows = _rows(
        con,
        "select s.* from boost_summary s join analyses a using (analysis_id) where a.run_id = ? "
        "order by s.analysis_id, s.boost, list_position(['xici', 'random', 'shuffle', 'none'], s.condition)",
        [run_id],
    )
    if not rows:
        return None
    columns = (
        Column("analysis", "int"),
        Column("boost", "num"),
        Column("condition"),
        Column("questions", "int"),
        Column("wrong before", "int"),
        Column("gain rate", "pct"),
        Column("right before", "int"),
        Column("loss rate", "pct"),
        Column("selected before", "pct"),
        Column("selected boosted", "pct"),
    )
    body = tuple(
        (
            r["analysis_id"],
            r["boost"],
            LABELS[r["condition"]],
            r["n_questions"],
            r["n_wrong_before"],
            r["gain_rate"],
            r["n_correct_before"],
            r["loss_rate"],
            r["selected_before"],
            r["selected_after"],
        )
        for r in rows
    )
    caption = (
        "Each question's experts get DELTA added to their router logits and the question is asked again. "
        "Gain rate: of the pairs wrong before, the share now right; loss rate: of those right before, the "
        "share now wrong. Selected: of the (token, boosted expert) pairs, the share in which the expert was "
        "selected, in the recorded answers and in the boosted ones (the boost's routing check)."
    )
    return Table(f"Boost on run {run_id}", columns, body, caption)


def necessity_table(con: duckdb.DuckDBPyConnection, run_id: int) -> Table | None:
    """Per analysis: identified experts tested alone, and the share individually necessary for at least
    one language (with all but it off, how often the answers still break)."""
    rows = _rows(
        con,
        "select n.analysis_id, n.question_limit, count(*) as experts, "
        "count(*) filter (where n.n_now_wrong > 0) as necessary, "
        "sum(n.n_now_wrong) / nullif(sum(n.n_correct_before), 0) as asr_alone, "
        "sum(n.n_wrong_all_but_it) / nullif(sum(n.n_correct_before) filter "
        "(where n.n_wrong_all_but_it is not null), 0) as asr_all_but_one "
        "from expert_necessity n join analyses a using (analysis_id) where a.run_id = ? "
        "group by n.analysis_id, n.question_limit order by n.analysis_id, n.question_limit nulls first",
        [run_id],
    )
    if not rows:
        return None
    columns = (
        Column("analysis", "int"),
        Column("first questions", "int"),
        Column("experts switched off alone", "int"),
        Column("necessary for ≥ 1 language", "int"),
        Column("share necessary", "pct"),
        Column("ASR, one expert off", "pct"),
        Column("ASR, all but one off", "pct"),
    )
    body = tuple(
        (
            r["analysis_id"],
            r["question_limit"],
            r["experts"],
            r["necessary"],
            r["necessary"] / r["experts"],
            r["asr_alone"],
            r["asr_all_but_one"],
        )
        for r in rows
    )
    caption = (
        "Each identified expert switched off alone: it is necessary for a language when that language's "
        "correct answer turns wrong. ASR over the (expert, correct pair) combinations."
    )
    return Table(f"Per-expert necessity on run {run_id}", columns, body, caption)


def set_size_table(con: duckdb.DuckDBPyConnection, run_id: int) -> Table | None:
    """XICI's ASR by the size of the switched-off set (whole sets, the analysis' own ablation)."""
    rows = _rows(
        con,
        "select s.* from asr_by_set_size s join analyses a using (analysis_id) where a.run_id = ? "
        "and a.method = 'xici' order by s.analysis_id, s.question_limit nulls first, s.set_size",
        [run_id],
    )
    if not rows:
        return None
    columns = (
        Column("analysis", "int"),
        Column("first questions", "int"),
        Column("set size", "int"),
        Column("questions", "int"),
        Column("correct before", "int"),
        Column("ASR", "pct"),
    )
    body = tuple(
        (
            r["analysis_id"],
            r["question_limit"],
            r["set_size"],
            r["n_questions"],
            r["n_correct_before"],
            r["asr"],
        )
        for r in rows
    )
    return Table(f"ASR by set size on run {run_id}", columns, body, "Whole sets switched off (XICI's run).")


#: Language tags of same-language paraphrase variants (``xici testbed paraphrases`` writes x-para0, ...).
PARAPHRASE_PREFIX = "x-para"


def paraphrase_table(con: duckdb.DuckDBPyConnection) -> Table | None:
    """The paper's Table 3: a cross-lingual and a paraphrase recording of the same question ids by one
    model, side by side (each run with the analysis a report picks for it, and that analysis' XICI
    ablation). A recording is of paraphrases when every variant it asked is tagged ``x-para...``."""
    from xici.report.source import choose

    runs = con.execute(
        "select r.run_id, r.dataset, r.model, list(distinct s.lang) as langs, "
        "list(distinct s.question_id) as questions from runs r join sequences s using (run_id) "
        "where r.kind = 'record' group by all order by r.run_id"
    ).fetchall()
    paraphrased = {
        run_id for run_id, *_, langs, _ in runs if all(x.startswith(PARAPHRASE_PREFIX) for x in langs)
    }
    shown = []
    for run_id, dataset, model, langs, questions in runs:
        partners = [
            other
            for other, _, other_model, _, other_questions in runs
            if other != run_id
            and other_model == model
            and (run_id in paraphrased) != (other in paraphrased)
            and set(questions) & set(other_questions)
        ]
        if partners:
            shown.append((run_id, dataset, len(langs), len(questions)))
    if not shown:
        return None
    body = []
    for run_id, dataset, n_variants, n_questions in shown:
        analysis = choose(con, run_id).analysis
        summary = rates = None
        if analysis is not None:
            summary = con.execute(
                "select all_correct, all_wrong, mixed, with_experts, avg_experts from analysis_summary "
                "where analysis_id = ?",
                [analysis.analysis_id],
            ).fetchone()
            rates = con.execute(
                "select question_limit, n_questions, asr, sgr, rate_diff from localizer_ablations "
                "where analysis_id = ? and condition = 'xici' order by question_limit nulls first limit 1",
                [analysis.analysis_id],
            ).fetchone()
        body.append(
            (
                run_id,
                dataset,
                "paraphrases" if run_id in paraphrased else "languages",
                n_variants,
                n_questions,
                *(summary or (None,) * 5),
                *(rates or (None,) * 5),
            )
        )
    columns = (
        Column("run", "int"),
        Column("dataset"),
        Column("variants of a question"),
        Column("variants", "int"),
        Column("questions", "int"),
        Column("all correct", "int"),
        Column("all wrong", "int"),
        Column("mixed", "int"),
        Column("questions with experts", "int"),
        Column("experts per question", "num"),
        Column("first questions", "int"),
        Column("questions ablated", "int"),
        Column("ASR", "pct"),
        Column("SGR", "pct"),
        Column("rate difference", "pct"),
    )
    caption = (
        "The same questions asked across languages and as paraphrases in one language (variants tagged "
        "x-para...), each recording analysed and ablated on its own (the analysis the report picks for "
        "it; ablation rates of XICI's sets, of all its questions with experts or, when only that was run, of "
        "the first N: `xici ablate --questions N`)."
    )
    return Table("Table 3: languages against paraphrases", columns, tuple(body), caption)
