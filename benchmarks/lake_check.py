"""Benchmark of ``xici lake check`` and of the chunk checksums behind it; prints figures, asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lake_check.py --lake DIR [--tokens 400000]

1. The lake check (:func:`xici.warehouse.check.check_lake` and the analyses' check, as ``xici lake check``
   runs them) on the paper-scale synthetic lake of ``benchmarks/analysis.py`` (783 questions, 18,646
   sequences, 1.86M tokens, 48 layers x 128 experts, top-8), written into --lake once and reused. A lake
   written before chunk checksums existed is checked by decoding its chunks; one written since by its
   checksums: the script says which it found. Nothing is written to the lake.
2. What the checksums cost, on --tokens tokens of paper-shaped top-8 routing written in chunks of 4,096 tokens
   like the gate store's, by the real writer and reader (:class:`xici.warehouse.GateStore`): appending,
   reading and verifying (``GateStore.verify``, what the lake check runs) with Zarr's crc32c codec after
   blosc against blosc alone (arrays written before checksums); interleaved repetitions, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import google_crc32c
import numpy as np

from xici.analysis.identify import changed_analyses
from xici.testbed.synthetic_lake import write_synthetic_lake
from xici.warehouse import Lake, gates
from xici.warehouse.check import check_lake, open_as_is
from xici.warehouse.gates import GateStore, TokenArrays

LAYERS, TOP_K = 48, 8
COMMIT = 16_384  # tokens appended per commit, as a recording batch does


def lake_check(root: Path) -> None:
    from analysis import PAPER  # benchmarks/analysis.py, next to this script: the same lake

    lake = Lake(root)
    if not lake.warehouse_path.exists():
        start = time.perf_counter()
        write_synthetic_lake(lake, PAPER)
        print(f"wrote the paper-scale lake into {root} in {time.perf_counter() - start:.0f} s")
    wall, cpu = time.perf_counter(), time.process_time()
    con = open_as_is(lake)
    try:
        findings = check_lake(lake, con)
        changed = changed_analyses(con)
    finally:
        con.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    store = GateStore(lake.gates_location, read_only=True)
    size = sum(store.nbytes_stored(r) for r in store.run_ids())
    checksums = all(store.has_checksums(r) for r in store.run_ids())
    print(
        f"1. lake check of {root}: {wall:.1f} s wall, {cpu:.1f} s CPU, {size / 1e9:.2f} GB of chunks "
        f"({'checked by checksum' if checksums else 'written before checksums: decoded'}); "
        f"{'all hold' if all(f.ok for f in findings) and not changed else 'PROBLEMS FOUND'}"
    )
    for finding in findings:
        print(f"   {finding.check:<9} {'ok' if finding.ok else 'FAIL'}  {finding.detail}")


def routing(n_tokens: int) -> TokenArrays:
    """Top-8 ids and float16 weights with the structure of real routing (popular experts, descending
    weights), so compression behaves as on a recording."""
    rng = np.random.default_rng(0)
    popularity = rng.permutation(128)
    ids = popularity[np.minimum(rng.zipf(1.4, size=(n_tokens, LAYERS, TOP_K)) - 1, 127)].astype(np.uint8)
    weights = np.sort(rng.dirichlet(np.ones(TOP_K), size=(n_tokens, LAYERS)), axis=-1)[..., ::-1]
    token_ids = rng.integers(0, 151_000, size=n_tokens, dtype=np.int32)
    return TokenArrays(token_ids, ids, weights.astype(np.float16))


def checksum_cost(n_tokens: int, rounds: int) -> None:
    """The real writer, verified reader and verify(), with the codecs of arrays written before checksums
    (blosc) and since (blosc + crc32c)."""
    data = routing(n_tokens)
    variants = {"blosc": gates._COMPRESSORS[:1], "blosc+crc32c": gates._COMPRESSORS}
    times: dict[tuple[str, str], list[float]] = {}

    @contextmanager
    def timed(step: str, label: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        times.setdefault((step, label), []).append(time.perf_counter() - start)

    for _ in range(rounds):
        for label, compressors in variants.items():
            gates._COMPRESSORS = compressors
            with tempfile.TemporaryDirectory() as tmp:
                store = GateStore(Path(tmp) / "gates.zarr")
                store.create_run(1, n_layers=LAYERS, top_k=TOP_K, n_experts=128)
                with timed("write", label):
                    for start in range(0, n_tokens, COMMIT):
                        store.append(1, _part(data, start, min(start + COMMIT, n_tokens)))
                with timed("read", label):
                    store.read(1, 0, n_tokens)
                with timed("check", label):
                    list(store.verify(1, n_tokens))
    gates._COMPRESSORS = variants["blosc+crc32c"]
    print(
        f"2. checksums on {n_tokens:,} tokens x {LAYERS} layers x top-{TOP_K}, appended {COMMIT:,} at a time "
        f"(medians of {rounds} interleaved rounds):"
    )
    for step in ("write", "read", "check"):
        plain, crc = (statistics.median(times[step, label]) for label in variants)
        how = " (blosc: decoded; crc32c: checksums of the stored bytes)" if step == "check" else ""
        print(f"   {step:<5} {plain:6.2f} s blosc, {crc:6.2f} s blosc+crc32c, ratio {crc / plain:.3f}{how}")
    blob = np.random.default_rng(1).bytes(256 << 20)
    start = time.perf_counter()
    google_crc32c.value(blob)
    speed = len(blob) / (time.perf_counter() - start) / 1e9
    print(f"   crc32c alone ({google_crc32c.implementation} implementation): {speed:.1f} GB/s")


def _part(data: TokenArrays, start: int, stop: int) -> TokenArrays:
    return TokenArrays(data.token_ids[start:stop], data.topk_ids[start:stop], data.topk_weights[start:stop])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lake", type=Path, required=True, help="the paper-scale lake (written if absent)")
    parser.add_argument("--tokens", type=int, default=400_000, help="tokens of the checksum measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"xici lake check benchmark: {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()[0]:.1f}"
    )
    lake_check(args.lake)
    checksum_cost(args.tokens, args.rounds)


if __name__ == "__main__":
    main()
