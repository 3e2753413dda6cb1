"""Shared fixtures: tiny random MoE checkpoints, built once per test session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from xici.warehouse import Lake

# The test machines are small and shared. With two or more threads, in-process generation (transformers or
# vLLM on the CPU) was seen to slow down now and then to a few dozen tokens a second; with one thread every
# run was stable, so the tests run with one unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def rows(lake: Lake, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple]:
    """The rows of ``query`` on the lake's warehouse (read-only; tests import it from here)."""
    return lake.read(lambda con: con.execute(query, params or []).fetchall())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_checkpoint(architecture="qwen3_moe", **kwargs) -> Path``, cached by its arguments.

    The keyword arguments are those of :func:`xici.testbed.random_models.build_random_moe`; a checkpoint
    is read-only by convention, since other tests of the session share it.
    """
    from xici.testbed.random_models import build_random_moe

    built: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def build(architecture: str = "qwen3_moe", **kwargs: Any) -> Path:
        if "corpus" in kwargs and kwargs["corpus"] is not None:
            kwargs["corpus"] = tuple(kwargs["corpus"])
        key = (architecture, tuple(sorted(kwargs.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"ckpt-{architecture}")
            built[key] = build_random_moe(folder, architecture, **kwargs)
        return built[key]

    return build


#: Questions of the shipped testbed in ``testbed_lake`` (each in all 12 languages).
TESTBED_QUESTIONS = 10


@pytest.fixture(scope="session")
def testbed_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A lake of the shipped testbed: its first questions in all languages recorded twice (runs 1 and 2, with
    8 and 6 new tokens) and run 1 analysed with the defaults; returns (lake folder, run 2, the analysis).

    Shared by the tests of the Python API and of the plain DuckDB CLI; read-only by convention.
    """
    import torch

    from xici.analysis.identify import analyze
    from xici.analysis.means import run_info
    from xici.analysis.params import resolve
    from xici.corpora.store import import_dataset
    from xici.recorder.run import RecordSpec, record
    from xici.testbed.train import shipped_testbed
    from xici.warehouse import Lake

    torch.set_num_threads(1)
    testbed = shipped_testbed()
    lake = Lake(tmp_path_factory.mktemp("testbed") / "lake")
    import_dataset(lake, "testbed", testbed.dataset, "jsonl")
    for new_tokens in (8, 6):
        spec = RecordSpec(
            model=str(testbed.checkpoint),
            dataset="testbed",
            limit=TESTBED_QUESTIONS,
            max_new_tokens=new_tokens,
            dtype="float32",
        )
        run_id = record(lake, spec, device="cpu", batch_size=32).run_id
    info = lake.write(lambda con: run_info(con, 1))
    (analysis,) = analyze(lake, 1, [resolve(None, info.n_moe_layers)])
    return lake.root, run_id, analysis.analysis_id


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs to fill up; skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
