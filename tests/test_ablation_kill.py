"""Kill a real ``xici ablate`` process with SIGKILL mid-run, run it again, and get the uninterrupted lake.

The kill lands at a random moment inside a batch (generation, the Zarr append or the warehouse commit) of
any condition, after at least one batch was committed. Repeat it with ``XICI_KILL_REPEATS=10``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import rows
from test_ablation_support import (
    ASKED,
    assert_same_full,
    copy_lake,
    full_snapshot,
    insert_analysis,
    record_toy,
    xici_sets,
)
from test_recorder_support import (
    run_xici,
    sigkill_inside_a_batch,
    stopping_checkpoint,
)

from xici.warehouse import Lake

N_UNITS = 3 * 3 * len(ASKED)  # three conditions, three languages; one unit per batch
REPEATS = int(os.environ.get("XICI_KILL_REPEATS", "2"))
ARGS = ("ablate", "--analysis", "1", "--batch-size", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint, tmp_path_factory) -> Lake:
    """A toy lake graded by the built-in 'match' grader (the subprocess knows no test grader)."""
    checkpoint = stopping_checkpoint(
        tiny_checkpoint("qwen3_moe"), tmp_path_factory.mktemp("stop") / "qwen", 8
    )
    lake = record_toy(checkpoint, tmp_path_factory.mktemp("recorded") / "lake", grader="match")
    n_layers = rows(lake, "select n_moe_layers from runs where run_id = 1")[0][0]
    insert_analysis(lake, 1, xici_sets(lake), layers=(0, n_layers), grader="match")
    return lake


@pytest.fixture(scope="module")
def uninterrupted(recorded: Lake, tmp_path_factory) -> dict:
    lake = copy_lake(recorded, tmp_path_factory.mktemp("reference") / "lake")
    done = run_xici(lake.root, *ARGS)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("committed") == N_UNITS
    return full_snapshot(lake)


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(REPEATS))
def test_sigkill_mid_ablation_then_resume_gives_the_uninterrupted_lake(
    repetition: int, recorded: Lake, uninterrupted: dict, tmp_path: Path
) -> None:
    lake = copy_lake(recorded, tmp_path / "lake")
    rng = random.Random(repetition)
    kill_after = rng.randint(1, N_UNITS // 2)
    sigkill_inside_a_batch(lake.root, list(ARGS), kill_after, rng)
    done = rows(lake, "select count(*) from sequences where run_id > 1")[0][0]
    unfinished = rows(lake, "select count(*) from runs where kind = 'ablation' and status = 'running'")[0][0]
    assert 0 < done < N_UNITS and unfinished <= 1, f"the kill should leave partial work ({done} units)"

    resumed = run_xici(lake.root, *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert ("resumed after" in resumed.stdout) == bool(unfinished)  # the kill may fall between two runs
    assert "XICI" in resumed.stdout and "shuffled" in resumed.stdout
    assert_same_full(full_snapshot(lake), uninterrupted)

    again = run_xici(lake.root, *ARGS)
    assert again.returncode == 0 and again.stdout.count("already finished") == 3
    assert_same_full(full_snapshot(lake), uninterrupted)
