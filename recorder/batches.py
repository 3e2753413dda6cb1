"""One lifecycle for every run asked in fixed batches (recording, ablation): arrays, lock, batches, finish.

Whoever asks (a recording, an ablation condition) first creates or finds its run row, then hands it here:
:func:`run_batches` creates the run's gate-store arrays, holds the run for writing (:meth:`Lake.writing`),
cuts whatever a killed writer left uncommitted, splits the units into the run's fixed batches, has a pool
(:mod:`xici.recorder.pool`) ask and commit the ones still pending, and marks the run finished once every
batch is in. Because batches are a fixed partition of the unit order, a run that is killed and run again
recomputes exactly the batches it had not committed, with the same padding and numerics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import torch

from xici.recorder.asking import Unit
from xici.recorder.pool import Job, Pool
from xici.warehouse import Lake


@dataclass(frozen=True)
class BatchDone:
    """Progress report after each committed batch."""

    run_id: int
    batch: int
    n_batches: int
    units_done: int
    n_units: int
    n_new: int


@dataclass(frozen=True)
class Batches:
    """What is left of a run: its fixed batches that still hold uncommitted units."""

    done_before: int
    n_batches: int
    pending: list[tuple[int, list[Unit]]]  # (batch index, its units not yet committed)


def pending_batches(lake: Lake, run_id: int, units: Sequence[Unit], batch_size: int) -> Batches:
    """Cut off tokens no row points at, then split the units into the run's fixed batches.

    Batches are always ``[i * batch_size, (i + 1) * batch_size)`` of the unit order, so a resumed run
    recomputes exactly the batches (same padding, same numerics) an uninterrupted run would have. Call it
    while holding :meth:`Lake.writing`.
    """
    done = lake.retrying(lambda _: lake.resume(run_id))
    n_batches = -(-len(units) // batch_size)
    pending = []
    for batch in range(n_batches):
        todo = [u for u in units[batch * batch_size : (batch + 1) * batch_size] if u.index not in done]
        if todo:
            pending.append((batch, todo))
    return Batches(len(done), n_batches, pending)


@dataclass
class BatchRun:
    """What :func:`run_batches` did: units committed before and now, batches asked, whether it finished."""

    run_id: int
    done_before: int
    asked: int = 0
    batches: int = 0
    finished: bool = False


def run_batches(
    lake: Lake,
    run_id: int,
    units: Sequence[Unit],
    pool: Pool,
    *,
    batch_size: int,
    arrays: Mapping[str, Any],
    masks: Callable[[Sequence[Unit]], torch.Tensor] | None = None,
    max_batches: int | None = None,
    on_batch: Callable[[BatchDone], None] | None = None,
    finishing: Callable[[], Callable[[duckdb.DuckDBPyConnection], None]] | None = None,
) -> BatchRun:
    """Ask and commit the run's pending batches (at most ``max_batches``); finish the run when all are in.

    ``arrays`` are :meth:`GateStore.create_run`'s options (shape, gate dtype, logits); ``masks`` builds a
    batch's expert masks (None: nothing off). ``finishing`` runs once every batch is committed, still holding
    the run, and returns what to write in the transaction that marks the run finished (the ablation's check
    and metrics), so a run is never finished without it.
    """
    lake.gates().create_run(run_id, **arrays)
    with lake.writing(run_id):
        batches = pending_batches(lake, run_id, units, batch_size)
        result = BatchRun(run_id, batches.done_before)
        jobs = [
            Job(batch, todo, None if masks is None else masks(todo))
            for batch, todo in batches.pending[:max_batches]
        ]
        with contextlib.closing(pool.run(lake, run_id, jobs)) as committed:
            for job in committed:
                result.asked += len(job.units)
                result.batches += 1
                if on_batch is not None:
                    units_done = result.done_before + result.asked
                    n_batches, n_units = batches.n_batches, len(units)
                    on_batch(BatchDone(run_id, job.batch, n_batches, units_done, n_units, len(job.units)))
        if len(jobs) < len(batches.pending):
            return result
        also = None if finishing is None else finishing()

        def finish(con: duckdb.DuckDBPyConnection) -> None:
            if also is not None:
                also(con)
            con.execute(
                "update runs set status = 'finished', finished_at = current_timestamp where run_id = ?",
                [run_id],
            )

        lake.write(finish)
        result.finished = True
        return result
