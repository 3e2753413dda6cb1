"""Grades of recorded answers: written with the sequences at record time, re-written by ``xici grade``.

A sequence has at most one grade per grader name (the newest version wins), so re-grading upserts. A
re-grade commits every :data:`REGRADE_CHUNK` answers and, unless forced, leaves the answers already graded by
the same grader and version as they are: a killed re-grade (an LLM judge is slow) continues where it stopped.
The thinking part of a response (:mod:`xici.corpora.thinking`) is stored next to its sequence here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from xici.corpora.graders import Grade, GradeItem, get_grader
from xici.errors import XiciError
from xici.warehouse import Lake


def store_grades(
    con: duckdb.DuckDBPyConnection, seq_ids: Sequence[int], grader: Any, grades: Sequence[Grade]
) -> None:
    """Insert or replace the grades of these sequences by this grader (inside the caller's transaction)."""
    con.executemany(
        "insert or replace into grades (seq_id, grader, grader_version, correct, detail, graded_at)"
        " values (?, ?, ?, ?, ?, current_timestamp)",
        [
            [seq_id, grader.name, grader.version, grade.correct, grade.detail]
            for seq_id, grade in zip(seq_ids, grades, strict=True)
        ],
    )


def store_thinking(
    con: duckdb.DuckDBPyConnection, seq_ids: Sequence[int], thinking: Sequence[str | None]
) -> None:
    """Insert the thinking parts of new sequences (None: no thinking, no row), in the caller's transaction."""
    rows = [[seq_id, text] for seq_id, text in zip(seq_ids, thinking, strict=True) if text is not None]
    if rows:
        con.executemany("insert into thinking (seq_id, thinking_text) values (?, ?)", rows)


@dataclass(frozen=True)
class LanguageAccuracy:
    """Graded answers of one language of a run."""

    lang: str
    n: int
    correct: int
    undecided: int

    @property
    def accuracy(self) -> float:
        decided = self.n - self.undecided
        return self.correct / decided if decided else float("nan")


def accuracy(con: duckdb.DuckDBPyConnection, run_id: int, grader: str) -> list[LanguageAccuracy]:
    """Per language of the run: sequences, correct answers, and answers the grader could not decide."""
    rows = con.execute(
        "select s.lang, count(*), count(*) filter (where g.correct),"
        " count(*) filter (where g.correct is null)"
        " from sequences s join grades g on g.seq_id = s.seq_id and g.grader = ?"
        " where s.run_id = ? group by s.lang order by s.lang",
        [grader, run_id],
    ).fetchall()
    return [LanguageAccuracy(*row) for row in rows]


#: Answers graded and committed together by :func:`regrade`.
REGRADE_CHUNK = 256


@dataclass(frozen=True)
class RegradeProgress:
    """Where a re-grade stands: answers graded so far of those it grades, and answers it kept as they were."""

    done: int
    total: int
    kept: int


def regrade(
    lake: Lake,
    run_id: int,
    grader_name: str,
    *,
    force: bool = False,
    chunk_size: int = REGRADE_CHUNK,
    on_progress: Callable[[RegradeProgress], None] | None = None,
    **options: Any,
) -> list[LanguageAccuracy]:
    """Grade the sequences of a run with a grader (built with ``options``), without re-recording.

    Answers already graded by this grader and version are kept unless ``force``; the others are graded and
    committed ``chunk_size`` at a time, with ``on_progress`` called before the first and after each chunk.
    Returns the accuracy per language over all of the run's grades by this grader.
    """
    grader = get_grader(grader_name, **options)

    def read(con: duckdb.DuckDBPyConnection) -> tuple[str, list[tuple[Any, ...]], int]:
        dataset = con.execute("select dataset from runs where run_id = ?", [run_id]).fetchone()
        if dataset is None:
            raise XiciError(f"there is no run {run_id} in this lake", where="--run")
        rows = con.execute(
            "select s.seq_id, s.lang, p.question, p.answers, s.response_text, g.grader_version"
            " from sequences s"
            " join prompts p on p.dataset = ? and p.question_id = s.question_id and p.lang = s.lang"
            " left join grades g on g.seq_id = s.seq_id and g.grader = ?"
            " where s.run_id = ? order by s.seq_id",
            [dataset[0], grader.name, run_id],
        ).fetchall()
        n_sequences = con.execute("select count(*) from sequences where run_id = ?", [run_id]).fetchone()[0]
        return dataset[0], rows, n_sequences

    dataset, rows, n_sequences = lake.read(read)
    if len(rows) != n_sequences:
        raise XiciError(
            f"{n_sequences - len(rows)} sequences of run {run_id} have no prompt in dataset {dataset!r}",
            where="prompts table",
            fix="re-import the dataset the run was recorded from",
        )
    todo = [row for row in rows if force or row[5] != grader.version]
    progress = RegradeProgress(0, len(todo), len(rows) - len(todo))
    if on_progress is not None:
        on_progress(progress)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        items = [GradeItem(q, list(answers), text, lang) for _, lang, q, answers, text, _ in chunk]
        grades = grader.grade(items)
        seq_ids = [row[0] for row in chunk]
        lake.write(lambda con, seq_ids=seq_ids, grades=grades: store_grades(con, seq_ids, grader, grades))
        progress = RegradeProgress(progress.done + len(chunk), progress.total, progress.kept)
        if on_progress is not None:
            on_progress(progress)
    return lake.read(lambda con: accuracy(con, run_id, grader.name))
