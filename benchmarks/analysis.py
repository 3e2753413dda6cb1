"""Benchmark of the analysis on a paper-scale synthetic lake; prints figures, asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/analysis.py [--lake DIR] [--sample 4] [--small]

The lake (no model needed, :mod:`xici.testbed.synthetic_lake`): 783 questions in three groups like the
paper's datasets (383 x 12 languages, 250 x 31, 150 x 42: 18,646 sequences), about 100 tokens per sequence,
48 MoE layers x 128 experts, top-8, 32 distinct experts per sequence and layer, 6 generalists per layer,
15 planted experts per question, accuracy from 20% (English) down to 2%. It is written once into --lake
and reused by later runs (a temporary folder, deleted at the end, without --lake).

Timed, wall clock and CPU (this machine is shared, so wall time depends on the load, printed too):
1. building the means (seq_means + lang_means) from the Zarr gates;
2. one full analysis with Qwen3-30B-A3B's parameters (layers 6:42, tau 0.005, alpha 0.05, cap 25), then
   the same with ``--mwu exact`` (the permutation distribution for every expert, ties included);
3. a 30-point sweep, tau in {0.001, 0.003, 0.005, 0.01, 0.05} x max-experts in {5, 15, 25, 35, 45, 65},
   once the means exist;
4. the straightforward alternative: one scipy.stats.mannwhitneyu call per question and expert, on the
   deltas from the SQL macro ``deltas``. It takes minutes, so it is timed on --sample mixed questions and
   extrapolated to all of them (said so in the output); its results are checked against the analysis'.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from scipy.stats import mannwhitneyu

from xici.analysis.identify import analyze, compute_tests
from xici.analysis.means import ensure_means, run_info
from xici.analysis.params import expand, parse_sweep, resolve
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake

PAPER = SyntheticSpec(
    questions=((383, 12), (250, 31), (150, 42)),
    n_layers=48,
    n_experts=128,
    top_k=8,
    pool=32,
    tokens=(60, 140),
    planted=15,
    generalists=6,
    accuracy=(0.2, 0.02),
    difficulty=2.5,
    dataset="paper-scale",
    model="synthetic/qwen3-30b-a3b-shaped",
    sequences_per_commit=512,
)
SMALL = replace(PAPER, questions=((38, 12), (25, 31), (15, 42)), dataset="paper-shaped-tenth")
SWEEP = ["tau=0.001,0.003,0.005,0.01,0.05", "max-experts=5,15,25,35,45,65"]


@contextmanager
def timed(label: str, into: dict[str, float]) -> Any:
    """Print and keep the wall and CPU seconds of a block."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into[label] = time.perf_counter() - wall
    print(f"{label:<34} {into[label]:8.2f} s wall {time.process_time() - cpu:8.2f} s CPU", flush=True)


def forget_analyses(lake: Lake, run_id: int) -> None:
    """Drop the run's stored analyses, so the timed ones are computed, not reused."""

    def change(con: duckdb.DuckDBPyConnection) -> None:
        for table in ("analysis_experts", "analysis_questions"):
            con.execute(
                f"delete from {table} where analysis_id in "
                "(select analysis_id from analyses where run_id = ?)",
                [run_id],
            )
        con.execute("delete from analyses where run_id = ?", [run_id])

    lake.write(change)


def scipy_loop(
    lake: Lake, run_id: int, sample: int, check: Callable[[str, np.ndarray, np.ndarray], None]
) -> tuple:
    """Seconds per question of a per-expert scipy loop over `sample` mixed questions, and their count."""
    params = resolve(None, PAPER.n_layers)

    def loop(con: duckdb.DuckDBPyConnection) -> tuple[float, int]:
        mixed = [
            r[0]
            for r in con.execute(
                "select question_id from question_outcomes(?, 'match') where outcome = 'mixed' order by 1",
                [run_id],
            ).fetchall()
        ]
        picked = [mixed[i] for i in np.linspace(0, len(mixed) - 1, sample).astype(int)]
        seconds = 0.0
        for qid in picked:
            rows = con.execute(
                "select d.layer, d.expert, g.correct, d.delta from deltas(?) d "
                "join sequence_grades(?, 'match') g using (seq_id) "
                "where d.question_id = ? and g.correct is not null and d.layer >= ? and d.layer < ? "
                "order by d.layer, d.expert, g.correct desc, g.lang",
                [run_id, run_id, qid, params.layer_start, params.layer_stop],
            ).fetchnumpy()
            n = len(rows["delta"]) // ((params.layer_stop - params.layer_start) * PAPER.n_experts)
            deltas = rows["delta"].reshape(-1, n)
            correct = rows["correct"].reshape(-1, n)[0]
            start = time.perf_counter()
            results = [mannwhitneyu(d[correct], d[~correct], alternative="greater") for d in deltas]
            seconds += time.perf_counter() - start
            check(qid, np.array([r.statistic for r in results]), np.array([r.pvalue for r in results]))
        return seconds / len(picked), len(mixed)

    return lake.read(loop)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lake", type=Path, help="folder to keep the synthetic lake in (reused if present)")
    parser.add_argument("--sample", type=int, default=4, help="questions timed with the scipy loop")
    parser.add_argument("--small", action="store_true", help="a tenth of the questions, for a quick look")
    args = parser.parse_args()
    spec = SMALL if args.small else PAPER
    root = args.lake or Path(tempfile.mkdtemp(prefix="xici-bench-"))
    times: dict[str, float] = {}
    print(
        f"xici analysis benchmark: {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()[0]:.1f} "
        "(wall times grow with other users' load)"
    )
    try:
        lake = Lake(root)
        with timed("synthetic lake (write or reuse)", times):
            run_id = write_synthetic_lake(lake, spec).run_id
        info = lake.read(lambda con: run_info(con, run_id))
        stored = lake.gates(read_only=True).nbytes_stored(run_id)
        print(
            f"lake: {info.n_sequences:,} sequences, {info.n_tokens:,} tokens, {info.n_moe_layers} layers x "
            f"{info.n_experts} experts, top-{info.top_k}; Zarr {stored / 1e9:.2f} GB"
        )
        # time a real build
        lake.write(lambda con: con.execute("delete from seq_means_builds where run_id = ?", [run_id]))
        with timed("build means", times):
            ensure_means(lake, run_id)
        [(rows,)] = lake.read(
            lambda con: con.execute("select count(*) from seq_means where run_id = ?", [run_id]).fetchall()
        )
        print(f"seq_means: {rows:,} non-zero rows ({rows / info.n_sequences:.0f} per sequence)")

        forget_analyses(lake, run_id)
        params = resolve(None, info.n_moe_layers)
        with timed("one analysis (layers 6:42)", times):
            [record] = analyze(lake, run_id, [params])
        [(mixed, with_experts, avg)] = lake.read(
            lambda con: con.execute(
                "select mixed, with_experts, avg_experts from analysis_summary where analysis_id = ?",
                [record.analysis_id],
            ).fetchall()
        )
        print(f"  {mixed} mixed questions, {with_experts} with experts, {avg:.1f} experts on average")
        with timed("one analysis, --mwu exact", times):
            analyze(lake, run_id, [replace(params, mwu="exact")])
        grid = expand(params, parse_sweep(SWEEP), info.n_moe_layers)
        forget_analyses(lake, run_id)
        with timed(f"sweep of {len(grid)} points", times):
            analyze(lake, run_id, grid)

        tests = lake.read(
            lambda con: compute_tests(con, info, "match", "auto", params.layer_start, params.layer_stop)
        )
        index = {q: i for i, q in enumerate(tests.question_ids)}

        def check(qid: str, u: np.ndarray, p: np.ndarray) -> None:
            # exact p-values are the exact quotient, scipy's may be an ulp away
            same = np.array_equal(u, tests.u[index[qid]]) and np.allclose(
                p, tests.p[index[qid]], rtol=1e-12, atol=0
            )
            print(f"  {qid}: scipy loop {'==' if same else '!='} vectorised results")

        per_question, n_mixed = scipy_loop(lake, run_id, args.sample, check)
        loop = per_question * n_mixed
        print(
            f"{'scipy loop, per question':<34} {per_question:8.2f} s wall (timed on {args.sample} questions; "
            f"extrapolated to {n_mixed}: {loop:.0f} s)"
        )
        print(f"one analysis is {loop / times['one analysis (layers 6:42)']:.0f}x faster than the scipy loop")
        print("targets here: one analysis < 10 s, the 30-point sweep < 60 s once the means exist")
    finally:
        if args.lake is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
