"""Who asks a run's batches: this process (:class:`LocalPool`) or Ray workers (:mod:`xici.recorder.ray_pool`).

A pool takes the batches of a run that are left (:class:`Job`: the fixed batch number, its units, their
expert masks) and yields each one once it is committed, in batch order. Committing is split in two so that
it can happen in two processes: whoever asks a batch appends its token arrays to the gate store
(:func:`write_answers`, to its own shard on a Ray worker) and hands back a :class:`Written`; the one process
that writes the warehouse commits it (:func:`commit_written`: sequence rows, grades and thinking parts in one
transaction). Both pools commit the same batches in the same order, so the warehouse rows, seq_ids and
grades of a run do not depend on how many workers asked it.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import duckdb
import torch

from xici.corpora.graders import Grade, Grader, get_grader
from xici.errors import XiciError
from xici.recorder.asking import Answer, Asker, AskerSpec, Unit, check_backend
from xici.recorder.generator import resolve_device
from xici.recorder.grading import store_grades, store_thinking
from xici.warehouse import GateStore, Lake
from xici.warehouse.gates import Appended, Shard


@dataclass(frozen=True)
class Job:
    """One fixed batch of a run to ask: its number, its units not yet committed, and their expert masks
    (bool ``[len(units), n_moe_layers, n_experts]``, True = off; None: nothing off)."""

    batch: int
    units: list[Unit]
    masks: torch.Tensor | None = None


@dataclass(frozen=True)
class Written:
    """A batch asked, its tokens and gate sums appended to the gate store (``appended``): everything the
    warehouse commit needs, and small enough to send between processes."""

    rows: list[dict[str, Any]]
    shard: Shard
    appended: Appended
    grades: list[Grade]
    thinking: list[str | None]


def write_answers(gates: GateStore, run_id: int, answers: Sequence[Answer], shard: Shard = None) -> Written:
    """Append the answers' token arrays to the run's arrays (or to ``shard``); nothing is committed yet."""
    return Written(
        [a.sequence_row() for a in answers],
        shard,
        gates.append_sequences(run_id, [a.generation.routing for a in answers], shard),
        [a.grade for a in answers],
        [a.thinking for a in answers],
    )


def commit_written(lake: Lake, run_id: int, written: Written, grader: Grader) -> None:
    """Commit a written batch: its sequence rows, grades and thinking parts, all or nothing."""

    def also(con: duckdb.DuckDBPyConnection, seq_ids: list[int]) -> None:
        store_grades(con, seq_ids, grader, written.grades)
        store_thinking(con, seq_ids, written.thinking)

    try:
        lake.retrying(
            lambda _: lake.commit_rows(run_id, written.rows, written.appended, shard=written.shard, also=also)
        )
    except duckdb.IOException as exc:
        raise XiciError(
            f"writing the warehouse failed: {exc}",
            where=str(lake.warehouse_path),
            fix="free space or fix permissions, then run the same command again: committed batches are kept "
            "and the run continues where it stopped",
        ) from None


class Pool(Protocol):
    """Asks a run's batches and commits them (see the module notes)."""

    #: The grader the answers are graded with (its name and version go with the grades).
    grader: Grader
    #: The engine's settings (``backend`` among them), stored with the runs the pool creates.
    metadata: dict[str, Any]

    def run(self, lake: Lake, run_id: int, jobs: Sequence[Job]) -> Generator[Job, None, None]:
        """Ask the jobs and yield each one once committed, in the order given. Call it while holding
        :meth:`Lake.writing`; a caller that stops iterating leaves the rest uncommitted."""
        ...

    def close(self) -> None: ...


class LocalPool:
    """Asks every batch in this process, one after the other."""

    def __init__(self, asker: Asker) -> None:
        self.asker = asker
        self.grader = asker.grader
        self.metadata = asker.generator.metadata

    def run(self, lake: Lake, run_id: int, jobs: Sequence[Job]) -> Generator[Job, None, None]:
        for job in jobs:
            answers = self.asker.ask(job.units, masks=job.masks)
            commit_written(lake, run_id, write_answers(lake.gates(), run_id, answers), self.grader)
            yield job

    def close(self) -> None:
        self.asker.close()


@dataclass(frozen=True)
class RayOptions:
    """How to scale a run out on Ray (``xici record --ray``): operational, not part of any run's key.

    ``address`` None starts a local Ray instance (or uses the one this process already joined);
    ``gpus_per_worker`` None is the vLLM tensor-parallel size (1 for transformers) on a GPU, 0 on the CPU.
    """

    workers: int = 1
    address: str | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise XiciError("--workers must be at least 1", where=f"--workers {self.workers}")
        if self.cpus_per_worker < 1:
            raise XiciError(
                "--cpus-per-worker must be at least 1", where=f"--cpus-per-worker {self.cpus_per_worker}"
            )
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise XiciError(
                "--gpus-per-worker cannot be negative", where=f"--gpus-per-worker {self.gpus_per_worker}"
            )


def placement(
    device: str, ray: RayOptions | None, backend: str, engine_options: Mapping[str, Any] | None
) -> str:
    """``--device`` resolved where the model will run, here or on the Ray cluster's workers (``auto`` is then
    ``cuda`` when the cluster has GPUs, even where this process has none), after refusing a backend or
    engine options that cannot run there."""
    if ray is None:
        device = resolve_device(device)
        check_backend(backend, device, engine_options)
        return device
    check_backend(backend, "auto", engine_options)  # each worker checks its own device as it loads the model
    return _ray_pool().cluster_device(device, ray)


def release(ray: RayOptions | None) -> None:
    """Stop the local Ray instance :func:`placement` started, where no pool was opened after all (a run
    already finished); a pool stops it itself when closed."""
    if ray is not None:
        _ray_pool().release()


def open_pool(spec: AskerSpec, ray: RayOptions | None, lake: Lake) -> Pool:
    """The asker of ``spec`` in this process, or ``ray.workers`` of them on Ray writing ``lake``'s gate
    store. Close it when done."""
    if ray is None:
        return LocalPool(spec.open())
    location = lake.gates_location  # a folder: as an absolute path, since workers run elsewhere
    gates = location.absolute() if isinstance(location, Path) else location
    return _ray_pool().RayPool(spec, ray, gates, get_grader(spec.grader, **spec.grader_options))


def _ray_pool() -> ModuleType:
    """:mod:`xici.recorder.ray_pool`, which needs Ray (an optional extra)."""
    try:
        from xici.recorder import ray_pool
    except ImportError:
        raise XiciError(
            "Ray is not installed",
            where="--ray",
            fix="pip install 'xici[ray]' (on every machine of the cluster), or leave --ray out",
        ) from None
    return ray_pool
