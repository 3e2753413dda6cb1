"""Where a report reads from: a read-only view of the warehouse, and which run and analysis it is about.

The report opens the warehouse read-only: it never changes the lake, and it can run beside other readers
(``xici sql``, the ``duckdb`` CLI). xici's views and macros (package :mod:`xici.sql`) are created in an
in-memory catalog next to the attached warehouse, because the warehouse holds them only after a first
analysis.

Defaults, when the user names nothing: the newest record run; of its analyses, one with the default
parameters of its model (:func:`xici.analysis.params.resolve` with the ``auto`` preset) before any other,
then one that has been ablated, then the newest. Ablation results are read with
:func:`xici.ablation.metrics.metrics_rows`, the ablation package's own reader of its tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb

from xici import sql
from xici.ablation.metrics import metrics_rows
from xici.analysis.params import find_preset, param_names, resolve
from xici.errors import XiciError
from xici.warehouse import Lake

#: The Stage 2 parameters that tell analyses of one run and grader apart (columns of ``analyses``).
PARAMS: tuple[str, ...] = tuple(name for name in param_names() if name != "grader")


@contextmanager
def reading(lake: Lake) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory connection with the warehouse attached read-only and xici's macros beside it."""
    con = lake.attached("lake")
    try:
        con.execute("set search_path = 'memory.main,lake.main'")
        sql.apply_views(con)
        yield con
    finally:
        con.close()


@dataclass(frozen=True)
class Run:
    """A record run: what was asked of which model, and the model's shape."""

    run_id: int
    dataset: str
    model: str
    architecture: str
    n_moe_layers: int
    n_experts: int
    top_k: int
    status: str

    @property
    def label(self) -> str:
        return f"run {self.run_id} ({self.dataset}, {self.model})"


@dataclass(frozen=True)
class Analysis:
    """A stored analysis: its run, grader and Stage 2 parameters (``PARAMS`` -> value)."""

    analysis_id: int
    run_id: int
    grader: str
    params: dict[str, float]

    def differs_only_in(self, other: Analysis, name: str) -> bool:
        """Same run, grader and parameters except ``name``: the two are points of one sweep."""
        return (self.run_id, self.grader) == (other.run_id, other.grader) and all(
            self.params[p] == other.params[p] for p in PARAMS if p != name
        )


@dataclass(frozen=True)
class Choice:
    """What the report is about: a run, the grader its accuracies use, its analysis (if any)."""

    run: Run
    grader: str | None
    analysis: Analysis | None


def record_runs(con: duckdb.DuckDBPyConnection) -> list[Run]:
    """Every record run, oldest first; an empty lake is a user mistake, said as such."""
    rows = con.execute(
        "select run_id, dataset, model, architecture, n_moe_layers, n_experts, top_k, status "
        "from runs where kind = 'record' order by run_id"
    ).fetchall()
    if not rows:
        raise XiciError(
            "this lake has no recording yet, so there is nothing to report",
            fix="record a dataset first (xici record --model M --dataset D), then xici analyze --run N",
        )
    return [Run(*row) for row in rows]


def analyses_of(con: duckdb.DuckDBPyConnection, run_id: int) -> list[Analysis]:
    """The run's analyses, oldest first."""
    columns = ", ".join(PARAMS)
    rows = con.execute(
        f"select analysis_id, run_id, grader, {columns} from analyses where run_id = ? order by analysis_id",
        [run_id],
    ).fetchall()
    return [Analysis(a, r, g, dict(zip(PARAMS, values, strict=True))) for a, r, g, *values in rows]


def is_default(run: Run, analysis: Analysis) -> bool:
    """The analysis used the defaults ``xici analyze`` picks for this run's model (any grader)."""
    preset = find_preset("auto", run.model, run.n_moe_layers)
    defaults = resolve(preset, run.n_moe_layers).as_dict()
    return all(analysis.params[p] == defaults[p] for p in PARAMS)


def default_analysis(con: duckdb.DuckDBPyConnection, run: Run) -> Analysis | None:
    """The analysis a report shows for ``run`` unless told otherwise (see the module docstring)."""
    candidates = analyses_of(con, run.run_id)
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda a: (is_default(run, a), bool(metrics_rows(con, [a.analysis_id])), a.analysis_id),
    )


def run_grader(con: duckdb.DuckDBPyConnection, run_id: int) -> str | None:
    """The grader that decided most of the run's answers (ties: by name); None when nothing is graded."""
    row = con.execute(
        "select g.grader from grades g join sequences s using (seq_id) where s.run_id = ? "
        "group by g.grader order by count(g.correct) desc, g.grader limit 1",
        [run_id],
    ).fetchone()
    return row[0] if row else None


def choose(
    con: duckdb.DuckDBPyConnection, run_id: int | None = None, analysis_id: int | None = None
) -> Choice:
    """The run and analysis named by ``--run`` / ``--analysis``, or the defaults."""
    runs = {run.run_id: run for run in record_runs(con)}
    analysis = None
    if analysis_id is not None:
        row = con.execute("select run_id from analyses where analysis_id = ?", [analysis_id]).fetchone()
        if row is None:
            raise XiciError(
                f"there is no analysis {analysis_id} in this lake",
                where="--analysis",
                fix="xici sql 'select * from analysis_summary' lists the analyses",
            )
        if run_id is not None and run_id != row[0]:
            raise XiciError(
                f"analysis {analysis_id} is of run {row[0]}, not of run {run_id}",
                where="--run / --analysis",
                fix="give only --analysis, or an analysis of the run",
            )
        run_id = row[0]
        analysis = next(a for a in analyses_of(con, run_id) if a.analysis_id == analysis_id)
    if run_id is None:
        run_id = max(runs)
    if run_id not in runs:
        raise XiciError(
            f"there is no record run {run_id} in this lake",
            where="--run",
            fix=f"pick one of the record runs: {', '.join(map(str, runs))}",
        )
    run = runs[run_id]
    if analysis is None:
        analysis = default_analysis(con, run)
    grader = analysis.grader if analysis is not None else run_grader(con, run_id)
    return Choice(run, grader, analysis)
