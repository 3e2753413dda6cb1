"""Summaries like the paper's Table 1 and the top of its Table 2, read from the view ``analysis_summary``.

Per analysis (a dataset and model, through its run): questions, languages, English accuracy, average
accuracy (the mean of the per-language accuracies), questions all correct / all incorrect / mixed (and
without any grade), mixed questions tested (large enough groups for ``min_group``), languages left out
for lack of a grade, blacklisted experts, questions with experts identified, and the average number of
experts over those questions.
"""

from __future__ import annotations

from typing import Any

import duckdb

from xici.errors import XiciError

#: Column of analysis_summary -> label, in display order (Table 1, then the top of Table 2).
LABELS: dict[str, str] = {
    "dataset": "dataset",
    "model": "model",
    "grader": "grader",
    "questions": "questions",
    "languages": "languages",
    "english_accuracy": "English accuracy",
    "average_accuracy": "average accuracy",
    "all_correct": "all correct",
    "all_wrong": "all incorrect",
    "mixed": "mixed",
    "tested": "mixed and tested (--min-group)",
    "ungraded": "no grade at all",
    "ungraded_languages": "(question, language) without grade",
    "blacklisted": "blacklisted experts",
    "with_experts": "questions with experts identified",
    "avg_experts": "average experts per question",
}


def summaries(con: duckdb.DuckDBPyConnection, analysis_id: int | None = None) -> list[dict[str, Any]]:
    """Rows of ``analysis_summary`` (one analysis, or all of them by id)."""
    if not con.execute("select count(*) from analyses").fetchall()[0][0]:
        return []
    where = "" if analysis_id is None else "where analysis_id = $id"
    cursor = con.execute(
        f"select * from analysis_summary {where} order by analysis_id",
        {} if analysis_id is None else {"id": analysis_id},
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def summary(con: duckdb.DuckDBPyConnection, analysis_id: int) -> dict[str, Any]:
    """The summary of one analysis; an unknown id is the user's mistake."""
    found = summaries(con, analysis_id)
    if not found:
        raise XiciError(
            f"there is no analysis {analysis_id} in this lake",
            where="the analysis id",
            fix="`xici analyze list` shows the stored analyses",
        )
    return found[0]
