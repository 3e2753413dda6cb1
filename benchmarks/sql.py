"""Benchmark of ad-hoc SQL over the token relations against plain DuckDB on a Parquet copy; asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sql.py --lake DIR [--parquet DIR] [--rounds 3]

The lake is the paper-scale synthetic one of ``benchmarks/analysis.py`` (18,646 sequences, 1.86M tokens,
48 layers x 128 experts, top-8: 716M token_gates rows), written into --lake once and reused. The Parquet
copy (token_gates and sequences, written by ``xici sql --out``'s COPY through the token scans) is kept in
--parquet (default: next to the lake, ``<lake>-parquet``) and reused too.

Every query runs through :func:`xici.warehouse.query.query_connection` (what ``xici sql`` and ``lake.sql``
use; the start-up, registering the token relations, is timed with it) and through a plain DuckDB
connection whose ``token_gates`` and ``sequences`` are views of the Parquet files; rounds interleave the
two, and the figures are medians of wall seconds, with the ratio measured in the same run. Peak memory:
the largest resident size this process reached during the query, less the size before it.
Also timed: building the means on a copy of the warehouse that reads the same gate store, against the full
scan: as a recording leaves the lake (seq_means committed with the sequences; the build adds up lang_means
from the gate sums) and with seq_means lost (built again from the gate sums, every row); and what
committing the seq_means rows with the sequences costs a recording, in all.

Targets (issue 14): selective queries at most 2x Parquet plus under 1 s of start-up; full scans at most
1.5x Parquet, memory well under 1 GB; the means at most 1.5x a full scan.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np

from analysis import PAPER
from xici.analysis.means import ensure_means
from xici.testbed.synthetic_lake import write_synthetic_lake
from xici.warehouse import Lake
from xici.warehouse.query import copy_to, query_connection

QUERIES = {
    "100 sequences (seq_id filter)": (
        "selective",
        "select count(*), sum(weight) from token_gates where seq_id <= 100",
    ),
    "one question (join with sequences)": (
        "selective",
        "select layer, expert, sum(weight) from token_gates g join sequences s using (seq_id) "
        "where s.question_id = 'q00042' group by all order by all",
    ),
    "one language, 421 sequences (join)": (
        "selective",
        "select count(*), sum(weight) from token_gates g join sequences s using (seq_id) "
        "where s.lang = 'x-s41'",
    ),
    "self-join, 50 sequences": (
        "selective",
        "select count(*) from token_gates a join token_gates b using (seq_id, pos, layer) "
        "where a.seq_id <= 50 and a.expert < b.expert",
    ),
    "full scan: per layer count, sum(weight)": (
        "full",
        "select layer, count(*), sum(weight) from token_gates group by all order by all",
    ),
    "full scan: per expert, layers 10-20": (
        "full",
        "select expert, avg(weight) from token_gates where layer between 10 and 20 group by all order by all",
    ),
}


class PeakMemory:
    """The largest resident set size of this process while the block runs, above the size before it."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def parquet_copy(lake: Lake, folder: Path) -> None:
    """token_gates.parquet (through the token scans) and sequences.parquet, unless already there."""
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    query, out = "select * from token_gates", folder / "token_gates.parquet"
    con = query_connection(lake, query, out=out)
    try:
        copy_to(con, query, out)
    finally:
        con.close()
    lake.read(
        lambda con: con.execute(f"copy (from sequences) to '{folder / 'sequences.parquet'}' (format parquet)")
    )
    (folder / "done").write_text(f"{time.perf_counter() - start:.1f}\n")
    print(f"Parquet copy written in {time.perf_counter() - start:.0f} s")


def timed(run: Callable[[], object]) -> tuple[float, int, object]:
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
    return seconds, memory.grown, result


def xici_query(lake: Lake, query: str) -> Callable[[], object]:
    def run() -> object:
        con = query_connection(lake, query)
        try:
            return con.execute(query).fetchall()
        finally:
            con.close()

    return run


def parquet_query(folder: Path, query: str) -> Callable[[], object]:
    def run() -> object:
        con = duckdb.connect()
        try:
            for name in ("token_gates", "sequences"):
                con.execute(f"create view {name} as from read_parquet('{folder / name}.parquet')")
            return con.execute(query).fetchall()
        finally:
            con.close()

    return run


def startup(lake: Lake) -> float:
    """Seconds to open a query connection with token_gates registered."""
    start = time.perf_counter()
    con = query_connection(lake, "select 1 from token_gates")
    con.close()
    return time.perf_counter() - start


def means_copy(lake: Lake, into: Path) -> Lake:
    """A lake with a copy of the warehouse and the same gate store, so that building means writes nowhere
    else (the benchmark lake may be shared)."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(lake.warehouse_path, into / lake.warehouse_path.name)
    (into / "lake.json").write_text(json.dumps({"gates": str(Path(lake.gates_location).absolute())}) + "\n")
    return Lake(into)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lake", type=Path, required=True, help="folder of the paper-scale lake (reused)")
    parser.add_argument("--parquet", type=Path, help="folder of the Parquet copy (default: <lake>-parquet)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="run only the queries whose label contains this")
    parser.add_argument("--no-means", action="store_true", help="skip the means build")
    args = parser.parse_args()
    folder = args.parquet or args.lake.with_name(args.lake.name + "-parquet")
    print(
        f"xici SQL benchmark: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"load average {os.getloadavg()[0]:.1f}, DuckDB {duckdb.__version__}"
    )
    lake = Lake(args.lake)
    run_id = write_synthetic_lake(lake, PAPER).run_id
    parquet_copy(lake, folder)
    size = sum(p.stat().st_size for p in folder.glob("*.parquet"))
    print(f"lake {args.lake} (run {run_id}); Parquet copy {folder}: {size / 1e9:.2f} GB")

    starts = [startup(lake) for _ in range(args.rounds)]
    print(f"start-up (query connection with token_gates): median {statistics.median(starts):.2f} s")
    print(f"{'query':<42} {'xici s':>8} {'parquet s':>9} {'ratio':>6} {'xici MB':>8} {'pq MB':>6}  same")
    full_scan = []
    for label, (kind, query) in QUERIES.items():
        if args.only and args.only not in label:
            continue
        ours, theirs, ours_mb, theirs_mb, same = [], [], [], [], True
        for _ in range(args.rounds):
            a, a_mb, a_rows = timed(xici_query(lake, query))
            b, b_mb, b_rows = timed(parquet_query(folder, query))
            same = same and _close(a_rows, b_rows)
            ours.append(a), theirs.append(b), ours_mb.append(a_mb), theirs_mb.append(b_mb)
        if kind == "full" and "per layer" in label:
            full_scan = ours
        x, p = statistics.median(ours), statistics.median(theirs)
        memory = f"{max(ours_mb) / 1e6:8.0f} {max(theirs_mb) / 1e6:6.0f}"
        print(
            f"{label:<42} {x:8.2f} {p:9.2f} {x / p:6.2f} {memory}  {'yes' if same else 'NO'}  "
            f"(rounds: {_ratios(ours, theirs)})",
            flush=True,
        )
    if args.no_means or not full_scan:
        return
    full = QUERIES["full scan: per layer count, sum(weight)"][1]
    with tempfile.TemporaryDirectory(prefix="xici-means-") as scratch:
        copy = means_copy(lake, Path(scratch) / "lake")
        for label, lost in MEANS.items():
            builds, scans, peaks = [], [], []
            for _ in range(args.rounds):
                copy.write(lambda con, lost=lost: con.execute(f"{lost}; delete from seq_means_builds"))
                seconds, mb, _ = timed(lambda: ensure_means(copy, run_id))
                builds.append(seconds), peaks.append(mb)
                scans.append(timed(xici_query(lake, full))[0])
            m, s = statistics.median(builds), statistics.median(scans)
            print(
                f"{label}: {m:.2f} s, full scan {s:.2f} s: {m / s:.2f}x "
                f"(rounds: {_ratios(builds, scans)}); peak {max(peaks) / 1e6:.0f} MB"
            )
        seconds, commits = committed_means(copy, run_id)
        print(
            f"seq_means committed with the sequences, as recording does: {seconds:.2f} s in all for the run "
            f"({commits} commits of {PAPER.sequences_per_commit} sequences, {seconds / commits * 1e3:.0f} ms "
            "each)"
        )


# The means build, after what it finds: seq_means committed with the sequences (what a recording leaves),
# or none (a lake whose seq_means were lost: built again from the gate sums, every row).
MEANS = {
    "means (lang_means; seq_means as recorded)": "select 1",
    "means (seq_means from the gate sums + lang_means)": "delete from seq_means",
}


def committed_means(lake: Lake, run_id: int) -> tuple[float, int]:
    """Seconds to commit the run's seq_means rows as recording does (:meth:`Lake._commit_seq_means`, from
    the gate sums read back), in transactions of ``sequences_per_commit`` sequences, on the lake's copy."""
    lake.write(lambda con: con.execute("delete from seq_means; delete from seq_means_builds"))
    seqs = lake.read(
        lambda con: con.execute(
            "select seq_id, n_tokens, sums_start, n_sums from sequences where run_id = ? order by seq_id",
            [run_id],
        ).fetchnumpy()
    )
    step, total = PAPER.sequences_per_commit, 0.0
    for first in range(0, len(seqs["seq_id"]), step):
        part = {name: values[first : first + step] for name, values in seqs.items()}
        sums_at = np.append(part["sums_start"], part["sums_start"][-1] + part["n_sums"][-1])

        def commit(con: duckdb.DuckDBPyConnection, part: dict = part, sums_at: np.ndarray = sums_at) -> None:
            lake._commit_seq_means(
                con, run_id, None, list(part["seq_id"]), part["n_tokens"], list(part["n_sums"]), sums_at
            )

        start = time.perf_counter()
        lake.write(commit)
        total += time.perf_counter() - start
    return total, -(-len(seqs["seq_id"]) // step)


def _ratios(ours: list[float], theirs: list[float]) -> str:
    return ", ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs, strict=True))


def _close(a: object, b: object) -> bool:
    """Whether two results agree, floats to 1e-6 relative (sums in different orders)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


if __name__ == "__main__":
    main()
