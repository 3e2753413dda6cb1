"""Helpers shared by the ablation tests: a recorded toy lake, analyses written straight into the analysis
tables (full control over the expert sets), lake snapshots with the ablation tables. (No tests here.)"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from conftest import rows
from test_recorder_support import assert_same_lake, new_lake, snapshot

from xici.corpora.graders import Grade, register_grader
from xici.recorder.run import RecordSpec, record
from xici.warehouse import Lake

MAX_NEW = 8
ASKED = ("q01", "q02", "q03")  # the toy questions given experts; q04 and q05 have none


class LengthParity:
    """Mixed verdicts on random models: even-length answers are right, odd wrong, empty undecided."""

    name = "length-parity"
    version = "1"

    def grade(self, items):
        return [Grade(None if not i.response else len(i.response) % 2 == 0, "") for i in items]


register_grader("length-parity", LengthParity)


def record_toy(checkpoint: Path, root: Path, *, grader: str = "length-parity") -> Lake:
    """A lake holding the toy dataset recorded with ``checkpoint`` (run 1)."""
    lake = new_lake(root)
    spec = RecordSpec(model=str(checkpoint), dataset="toy", max_new_tokens=MAX_NEW, grader=grader)
    record(lake, spec, device="cpu", batch_size=8)
    return lake


def copy_lake(lake: Lake, root: Path) -> Lake:
    shutil.copytree(lake.root, root)
    return Lake(root)


def insert_analysis(
    lake: Lake,
    run_id: int,
    sets: dict[str, Sequence[tuple[int, int]]],
    *,
    layers: tuple[int, int],
    grader: str = "length-parity",
    blacklist: tuple[float, float] = (0.01, 0.05),
) -> int:
    """An analysis of ``run_id`` whose expert sets are ``sets`` (question -> pairs, best first)."""

    def insert(con: duckdb.DuckDBPyConnection) -> int:
        analysis_id = con.execute("select coalesce(max(analysis_id), 0) + 1 from analyses").fetchone()[0]
        con.execute(
            "insert into analyses (analysis_id, analysis_key, run_id, grader, alpha, tau, layer_start,"
            " layer_stop, max_experts, blacklist_top, blacklist_share, params, n_languages, n_blacklisted)"
            " values (?, ?, ?, ?, 0.05, 0.005, ?, ?, 25, ?, ?, '{}', 3, 0)",
            [analysis_id, f"test-{analysis_id}-{sorted(sets.items())}", run_id, grader, *layers, *blacklist],
        )
        questions = [
            r[0]
            for r in con.execute(
                "select distinct question_id from sequences where run_id = ?", [run_id]
            ).fetchall()
        ]
        for question in questions:
            pairs = sets.get(question, ())
            con.execute(
                "insert into analysis_questions values (?, ?, 'mixed', 1, 2, 0, ?, ?, ?)",
                [analysis_id, question, len(pairs), len(pairs), len(pairs)],
            )
            for rank, (layer, expert) in enumerate(pairs, 1):
                con.execute(
                    "insert into analysis_experts (analysis_id, question_id, rank, layer, expert, u, p,"
                    " median_diff) values (?, ?, ?, ?, ?, 1.0, 0.01, 0.1)",
                    [analysis_id, question, rank, layer, expert],
                )
        return analysis_id

    return lake.write(insert)


def routing(lake: Lake, run_id: int) -> dict[tuple[str, str], np.ndarray]:
    """(question, lang) -> topk_ids [tokens, layers, k] of that sequence, read straight from Zarr."""
    gates = lake.gates(read_only=True)
    return {
        (q, lang): gates.read(run_id, start, start + n).topk_ids.astype(np.int64)
        for q, lang, start, n in rows(
            lake, "select question_id, lang, token_start, n_tokens from sequences where run_id = ?", [run_id]
        )
    }


def used_experts(lake: Lake, run_id: int, question: str, place: int = 0) -> list[tuple[int, int]]:
    """Per MoE layer, the expert the question's recorded tokens selected ``place``-th most often (0: most;
    ties: lowest id), so that different places give different sets that were all in use."""
    ids = np.concatenate([a for (q, _), a in routing(lake, run_id).items() if q == question])
    n_experts = rows(lake, "select n_experts from runs where run_id = ?", [run_id])[0][0]
    counts = [np.bincount(ids[:, layer].ravel(), minlength=n_experts) for layer in range(ids.shape[1])]
    return [(layer, int(np.argsort(-c, kind="stable")[place])) for layer, c in enumerate(counts)]


def xici_sets(lake: Lake) -> dict[str, list[tuple[int, int]]]:
    """Question i of ASKED loses, at every layer, its i-th most used expert in run 1 (in use, not alike)."""
    return {q: used_experts(lake, 1, q, place) for place, q in enumerate(ASKED)}


def full_snapshot(lake: Lake) -> dict[str, Any]:
    """:func:`snapshot` plus the ablation tables (timestamps left out)."""
    state = snapshot(lake)
    con = lake.connect(read_only=True)
    try:
        state["ablations"] = con.execute("select * from ablations order by run_id").fetchall()
        state["ablation_experts"] = con.execute(
            "select * from ablation_experts order by run_id, question_id, layer, expert"
        ).fetchall()
        state["ablation_metrics"] = con.execute(
            "select * exclude (computed_at) from ablation_metrics order by run_id"
        ).fetchall()
    finally:
        con.close()
    return state


def assert_same_full(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert_same_lake(got, want)
    for table in ("ablations", "ablation_experts", "ablation_metrics"):
        assert got[table] == want[table], f"{table} differs"
