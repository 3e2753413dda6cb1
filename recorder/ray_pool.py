"""Scale-out on Ray: a run's batches asked by N workers, each a model engine in a Ray actor.

xici keeps no cluster code of its own: Ray places the workers (its CPUs and GPUs per worker), restarts
nothing behind our back, and reports a dead worker as an error on the batch it was asking. The protocol:

- Each worker is an :class:`~xici.recorder.asking.Asker` built from the same :class:`AskerSpec` as a
  single-process run, so it asks a batch exactly as this process would (same prompts, same padding: the
  batches are the run's fixed batches, handed out whole).
- Before a worker's first batch of a run, this process adds a shard to the run's Zarr group for it; the worker
  appends the batch's token arrays there and returns only the small :class:`~xici.recorder.pool.Written`.
- This process, the only writer of the warehouse, commits the batches in batch order (a finished batch waits
  for the ones before it). Each worker gets its batches in increasing order, so every shard is committed in
  the order it was written and its committed tokens are a prefix of it (:meth:`Lake.commit_rows` checks).
- A worker that dies is replaced by a new one on a new shard, which asks the lost batch first; the dead
  worker's shard keeps the batches it finished, and its unfinished tail is cut off when the run has gone
  through (:meth:`Lake.resume`). Killing the whole command loses only uncommitted batches, as without Ray.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections import deque
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from xici.corpora.graders import Grader
from xici.errors import XiciError
from xici.recorder.asking import AskerSpec
from xici.recorder.generator import resolve_device
from xici.recorder.pool import Job, RayOptions, Written, commit_written, write_answers
from xici.warehouse import GateStore, Lake

#: Environment variables (by prefix) passed on to the workers: offline hub, vLLM and tokenizer settings.
FORWARDED_ENV = ("HF_", "VLLM_", "TRANSFORMERS_", "TOKENIZERS_", "XICI_")
#: How many times one worker may be replaced after dying before the run stops with an error.
MAX_REPLACEMENTS = 3
#: Object store of a local Ray instance: only batch metadata travels through it.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


class Worker:
    """One engine in a Ray actor: asks batches and appends their tokens to a shard of the gate store."""

    def __init__(self, spec: AskerSpec, gates: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.asker = spec.open()
        self.gates = gates

    def metadata(self) -> dict[str, Any]:
        return self.asker.generator.metadata

    def ask(self, run_id: int, shard: int, job: Job) -> Written:
        answers = self.asker.ask(job.units, masks=job.masks)
        return write_answers(GateStore(self.gates), run_id, answers, shard)

    def close(self) -> None:
        self.asker.close()


_RemoteWorker = ray.remote(Worker)


class RayPool:
    """``options.workers`` workers on Ray asking a run's batches; this process commits them."""

    def __init__(self, spec: AskerSpec, options: RayOptions, gates: Path | str, grader: Grader) -> None:
        self.options = options
        self.grader = grader
        self._spec = spec
        self._gates = str(gates)
        connect(options)
        self._name = f"xici-{uuid.uuid4().hex[:8]}"
        self._gpus = _gpus_per_worker(spec, options)
        self._replaced = [0] * options.workers
        self._workers: list[Any] = []
        try:
            _check_resources(options, self._gpus)
            self._workers = [self._start(slot) for slot in range(options.workers)]
            engine = ray.get([w.metadata.remote() for w in self._workers])[0]
        except RayActorError as exc:
            self.close()
            raise XiciError(
                f"a Ray worker could not load the model: {exc}",
                where=f"--ray --workers {options.workers}",
                fix="check that every machine of the cluster has xici, the model and the same environment",
            ) from None
        except BaseException:
            self.close()
            raise
        self.metadata = {
            **engine,
            "ray_workers": options.workers,
            "ray_cpus_per_worker": options.cpus_per_worker,
            "ray_gpus_per_worker": self._gpus,
        }

    def _start(self, slot: int) -> Any:
        """A new worker for a slot, named so that it can be found (``ray list actors``)."""
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        env["OMP_NUM_THREADS"] = str(self.options.cpus_per_worker)
        remote = _RemoteWorker.options(
            name=f"{self._name}-{slot}-{self._replaced[slot]}",
            num_cpus=self.options.cpus_per_worker,
            num_gpus=self._gpus,
            max_restarts=0,
            runtime_env={"env_vars": env},
        )
        return remote.remote(self._spec, self._gates, self.options.cpus_per_worker)

    def _replace(self, slot: int, exc: RayActorError) -> None:
        """Start a new worker in place of a dead one, or stop the run when that slot died too often."""
        if self._replaced[slot] >= MAX_REPLACEMENTS:
            raise XiciError(
                f"Ray worker {slot} died {MAX_REPLACEMENTS + 1} times; the last time: {exc}",
                where=f"--ray --workers {self.options.workers}",
                fix="see the worker logs (ray logs, or /tmp/ray/session_latest/logs), then run the same "
                "command again: committed batches are kept",
            )
        ray.kill(self._workers[slot])
        self._replaced[slot] += 1
        self._workers[slot] = self._start(slot)

    def run(self, lake: Lake, run_id: int, jobs: Sequence[Job]) -> Generator[Job, None, None]:
        gates = lake.gates()
        order = [job.batch for job in jobs]
        queue = deque(jobs)
        first: dict[int, Job] = {}  # slot -> the batch its new worker asks before any other
        shards: dict[int, int] = {}  # slot -> the shard its worker appends to in this run
        running: dict[Any, tuple[int, Job]] = {}  # task -> (slot, job)
        finished: dict[int, Written] = {}  # batch -> written, waiting for the batches before it
        committed = 0
        try:
            while committed < len(order):
                busy = {slot for slot, _ in running.values()}
                for slot, worker in enumerate(self._workers):
                    if slot in busy or not (slot in first or queue):
                        continue
                    job = first.pop(slot) if slot in first else queue.popleft()
                    if slot not in shards:
                        shards[slot] = gates.add_shard(run_id)
                    running[worker.ask.remote(run_id, shards[slot], job)] = (slot, job)
                (task,), _ = ray.wait(list(running), num_returns=1)
                slot, job = running.pop(task)
                try:
                    finished[job.batch] = ray.get(task)
                except RayActorError as exc:
                    self._replace(slot, exc)
                    del shards[slot]
                    first[slot] = job
                    continue
                except RayTaskError as exc:
                    raise (exc.cause if isinstance(exc.cause, XiciError) else exc) from None
                while committed < len(order) and order[committed] in finished:
                    commit_written(lake, run_id, finished.pop(order[committed]), self.grader)
                    yield jobs[committed]
                    committed += 1
            lake.retrying(lambda _: lake.resume(run_id))  # cut what dead workers left past their last batch
        finally:
            if running:  # no worker may still write this run when the caller goes on
                ray.wait(list(running), num_returns=len(running))

    def close(self) -> None:
        """Shut the engines down and stop the workers (and the local Ray instance this pool started)."""
        for worker in self._workers:
            with contextlib.suppress(RayActorError):
                ray.get(worker.close.remote())
            ray.kill(worker)
        self._workers = []
        release()


#: Whether this process started the Ray instance it is connected to (and so stops it when done).
_started_here = False


def connect(options: RayOptions) -> None:
    """Join the Ray cluster at ``options.address``, or start a local instance; nothing when connected."""
    global _started_here
    if ray.is_initialized():
        return
    settings: dict[str, Any] = {"namespace": "xici", "log_to_driver": False, "include_dashboard": False}
    if options.address is None:  # a new local instance, even where RAY_ADDRESS names a running cluster
        settings.update(address="local", object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    else:
        settings["address"] = options.address
    try:
        ray.init(**settings)
    except (ConnectionError, RuntimeError) as exc:
        raise XiciError(
            f"cannot join the Ray cluster at {options.address}: {exc}",
            where="--ray-address",
            fix="start the cluster first (ray start --head on one machine, ray start --address on the "
            "others), or leave --ray-address out for a local instance",
        ) from None
    _started_here = options.address is None


def release() -> None:
    """Stop the local Ray instance this process started (a cluster it joined is left as it is)."""
    global _started_here
    if _started_here:
        ray.shutdown()
        _started_here = False


def cluster_device(device: str, options: RayOptions) -> str:
    """``--device`` for the workers: ``auto`` is ``cuda`` when the cluster has GPUs (the machine that runs
    xici need not have one), ``cuda`` needs a GPU somewhere in the cluster."""
    if device.startswith("cuda:"):
        raise XiciError(
            f"--device {device} names one GPU, but each Ray worker sees only the GPUs Ray gives it",
            where=f"--device {device}",
            fix="use --device auto (or cuda) with --ray, and --gpus-per-worker for how many GPUs each "
            "worker gets",
        )
    connect(options)
    return resolve_device(device, cuda=ray.cluster_resources().get("GPU", 0) > 0)


def _gpus_per_worker(spec: AskerSpec, options: RayOptions) -> float:
    if options.gpus_per_worker is not None:
        return options.gpus_per_worker
    if not spec.device.startswith("cuda"):
        return 0
    return float(spec.engine_options.get("tensor_parallel_size", 1))


def _check_resources(options: RayOptions, gpus: float) -> None:
    """Refuse workers the cluster cannot ever place (Ray would wait for them forever)."""
    total = ray.cluster_resources()
    wanted = {"CPU": options.workers * options.cpus_per_worker, "GPU": options.workers * gpus}
    for name, need in wanted.items():
        if need > total.get(name, 0):
            raise XiciError(
                f"{options.workers} workers need {need:g} {name}s, but the Ray cluster has "
                f"{total.get(name, 0):g}",
                where=f"--workers {options.workers}",
                fix="use fewer --workers, --cpus-per-worker or --gpus-per-worker, or add machines to the "
                "cluster",
            )
