"""Ablation metrics (method.md, Stage 3), a pure function of the stored grades.

Over the (question, language) pairs of an ablation run (only questions with experts are asked), with the
grade before ablation from the recorded run and the grade after from the ablation run, both by the
analysis' grader:

- ASR, ablation success rate: of the pairs correct before, the share now wrong;
- SGR, spurious gain rate: of the pairs wrong before, the share now right;
- rate difference: ASR - SGR;
- questions now wrong in every language (every pair graded wrong after ablation).

A pair whose grade before or after is undecided (NULL or missing) is in neither share and is counted
apart. Counts are stored per run (``ablation_metrics``); rates over several runs (the overall row of
several datasets) are pooled over their pairs, i.e. recomputed from the summed counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import duckdb

from xici.ablation.conditions import CONDITIONS, label

_COUNTS_SQL = """
WITH info AS (
    SELECT source_run_id, grader FROM ablations WHERE run_id = $run
), pairs AS (
    SELECT a.question_id, gb.correct AS before, ga.correct AS after
    FROM sequences a
    CROSS JOIN info
    LEFT JOIN grades ga ON ga.seq_id = a.seq_id AND ga.grader = info.grader
    LEFT JOIN sequences b
           ON b.run_id = info.source_run_id AND b.question_id = a.question_id AND b.lang = a.lang
    LEFT JOIN grades gb ON gb.seq_id = b.seq_id AND gb.grader = info.grader
    WHERE a.run_id = $run
), questions AS (
    SELECT question_id, count(*) = count(*) FILTER (WHERE after = false) AS all_wrong
    FROM pairs GROUP BY question_id
)
-- count(*) FILTER, not count_if: DuckDB's count_if is NULL when every input is NULL.
SELECT (SELECT count(*) FROM questions),
       count(*),
       count(*) FILTER (WHERE before IS NULL OR after IS NULL),
       count(*) FILTER (WHERE before AND after IS NOT NULL),
       count(*) FILTER (WHERE before AND NOT after),
       count(*) FILTER (WHERE NOT before AND after IS NOT NULL),
       count(*) FILTER (WHERE NOT before AND after),
       (SELECT count(*) FILTER (WHERE all_wrong) FROM questions)
FROM pairs
"""


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True)
class Metrics:
    """The counts of one ablation run (or several, summed); the rates follow from them."""

    n_questions: int
    n_pairs: int
    n_undecided: int
    n_correct_before: int
    n_now_wrong: int
    n_wrong_before: int
    n_now_right: int
    n_all_wrong: int

    @property
    def asr(self) -> float | None:
        return _share(self.n_now_wrong, self.n_correct_before)

    @property
    def sgr(self) -> float | None:
        return _share(self.n_now_right, self.n_wrong_before)

    @property
    def rate_diff(self) -> float | None:
        return None if self.asr is None or self.sgr is None else self.asr - self.sgr

    @classmethod
    def pooled(cls, parts: Iterable[Metrics]) -> Metrics:
        parts = list(parts)
        return cls(*(sum(getattr(p, f.name) for p in parts) for f in fields(cls)))


_COLUMNS = [f.name for f in fields(Metrics)]


def compute_metrics(con: duckdb.DuckDBPyConnection, run_id: int) -> Metrics:
    """The metrics of an ablation run from its grades and those of the recorded run."""
    return Metrics(*con.execute(_COUNTS_SQL, {"run": run_id}).fetchone())


def store_metrics(con: duckdb.DuckDBPyConnection, run_id: int) -> Metrics:
    """(Re)compute a run's metrics and store them (inside the caller's transaction)."""
    metrics = compute_metrics(con, run_id)
    names = ["run_id", *_COLUMNS, "asr", "sgr", "rate_diff"]
    values = [run_id, *(getattr(metrics, n) for n in names[1:])]
    con.execute(
        f"insert or replace into ablation_metrics ({', '.join(names)}, computed_at) "
        f"values ({', '.join('?' for _ in names)}, current_timestamp)",
        values,
    )
    return metrics


@dataclass(frozen=True)
class MetricsRow:
    """One row of Table 2: a condition of an analysis (or of several, pooled, with ``analysis_id`` None)."""

    analysis_id: int | None
    dataset: str
    model: str
    condition: str
    random_pool: str | None  # the random baseline's pool; None for the other conditions
    seed: int | None
    metrics: Metrics
    checked_tokens: int
    violations: int

    @property
    def label(self) -> str:
        """The row's name in Table 2 (a random set names its pool)."""
        return label(self.condition, self.random_pool)


def metrics_rows(
    con: duckdb.DuckDBPyConnection, analysis_ids: Sequence[int] | None = None
) -> list[MetricsRow]:
    """Stored metrics of finished ablation runs, by analysis, then condition (XICI first) and seed."""
    # Table 2 is the deactivation of whole sets; boosts and per-expert runs have tables of their own.
    where = "where coalesce(b.mode, 'deactivate') = 'deactivate' and b.position is null"
    where += "" if analysis_ids is None else " and b.analysis_id in (select unnest($ids))"
    counts = ", ".join("m." + c for c in _COLUMNS)
    rows = con.execute(
        f"select b.analysis_id, r.dataset, r.model, b.condition, b.random_pool, b.seed, {counts}, "
        "b.checked_tokens, b.violations from ablations b join ablation_metrics m using (run_id) "
        f"join runs r on r.run_id = b.source_run_id {where} "
        "order by b.analysis_id, list_position($conditions, b.condition), b.random_pool, b.seed nulls first",
        {"conditions": list(CONDITIONS), **({} if analysis_ids is None else {"ids": list(analysis_ids)})},
    ).fetchall()
    n = len(_COLUMNS)
    return [MetricsRow(*r[:6], Metrics(*r[6 : 6 + n]), *r[6 + n :]) for r in rows]


def overall(rows: Sequence[MetricsRow]) -> list[MetricsRow]:
    """Per (condition, random pool, seed), the rows of all analyses pooled into one."""
    groups: dict[tuple[str, str | None, int | None], list[MetricsRow]] = {}
    for row in rows:
        groups.setdefault((row.condition, row.random_pool, row.seed), []).append(row)
    return [
        MetricsRow(
            None,
            ", ".join(dict.fromkeys(r.dataset for r in group)),
            ", ".join(dict.fromkeys(r.model for r in group)),
            condition,
            pool,
            seed,
            Metrics.pooled(r.metrics for r in group),
            sum(r.checked_tokens for r in group),
            sum(r.violations for r in group),
        )
        for (condition, pool, seed), group in sorted(groups.items(), key=lambda item: _order(*item[0]))
    ]


def _order(condition: str, pool: str | None, seed: int | None) -> tuple[int, str, int]:
    return CONDITIONS.index(condition), pool or "", -1 if seed is None else seed
