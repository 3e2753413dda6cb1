"""Faults of the machine and damaged inputs end in a message saying what, where and what to do, never in a
traceback, and leave the lake as it was: a full disk, a file size limit, no memory, a damaged warehouse,
lake.json or checkpoint. Real files throughout; where a condition needs root (a small tmpfs) the test
skips, and the file-size limit (RLIMIT_FSIZE) makes DuckDB meet a real OS write error without it."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
from click.testing import CliRunner, Result
from test_recorder_support import assert_same_lake, fill, new_lake, snapshot, xici_command, xici_env

from xici.cli.main import cli
from xici.errors import machine_fault
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake

torch.set_num_threads(1)

SYNTHETIC = SyntheticSpec(questions=((16, 10),), accuracy=(0.7, 0.3), difficulty=0.5)


def xici(lake: Lake, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--lake", str(lake.root), *args])


def clean_failure(result: Result, *phrases: str) -> None:
    """Exit 1 with one message holding every phrase, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    for phrase in phrases:
        assert phrase in result.output, (phrase, result.output)


def analyses(lake: Lake) -> list[tuple]:
    return lake.read(lambda con: con.execute("select * exclude (created_at) from analyses").fetchall())


def record_args(model: Path, *extra: str, dataset: str = "toy") -> list[str]:
    return [
        "record",
        "--model",
        str(model),
        "--dataset",
        dataset,
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        *extra,
    ]


def test_analyze_on_a_full_disk_says_so_and_runs_again(small_disk: Path, tmp_path: Path) -> None:
    clean = Lake(tmp_path / "clean")
    write_synthetic_lake(clean, SYNTHETIC)
    assert xici(clean, "analyze", "--run", "1").exit_code == 0
    lake = Lake(small_disk / "lake")
    write_synthetic_lake(lake, SYNTHETIC)
    filler = fill(small_disk)
    try:
        clean_failure(
            xici(lake, "analyze", "--run", "1"), "disk holding the lake is full", "run the same command"
        )
    finally:
        filler.unlink()
    assert analyses(lake) == []
    assert xici(lake, "analyze", "--run", "1").exit_code == 0
    assert analyses(lake) == analyses(clean)


def _file_size_limit() -> None:
    """In the child: writing past the first byte of any file fails with EFBIG (instead of a signal)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))


def test_a_warehouse_write_refused_by_the_os_is_named_not_hidden(tmp_path: Path) -> None:
    """DuckDB's failed commit used to be hidden by 'cannot rollback - no transaction is active'."""
    lake = Lake(tmp_path / "lake")
    write_synthetic_lake(lake, SYNTHETIC)
    limited = subprocess.run(
        xici_command(lake.root, "analyze", "--run", "1"),
        capture_output=True,
        text=True,
        env=xici_env(),
        timeout=600,
        preexec_fn=_file_size_limit,
    )
    assert limited.returncode == 1, limited.stderr
    assert (
        "size limit for files (File too large)" in limited.stderr and "run the same command" in limited.stderr
    )
    assert "Traceback" not in limited.stderr and "cannot rollback" not in limited.stderr
    assert analyses(lake) == []
    assert xici(lake, "analyze", "--run", "1").exit_code == 0


def test_out_of_memory_while_recording_says_so_and_resumes(tiny_checkpoint, tmp_path: Path) -> None:
    """The CPU allocator's real failure (an impossible allocation in a forward pass) in the second batch."""
    model = tiny_checkpoint("qwen3_moe")
    args = record_args(model, "--limit", "2", "--batch-size", "2")
    clean = new_lake(tmp_path / "clean")
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        assert xici(clean, *args).exit_code == 0
    finally:
        handle.remove()
    seen = 0

    def allocate_too_much(*_: object) -> None:
        nonlocal seen
        seen += 1
        if seen == calls // 2:
            torch.empty(1 << 50, dtype=torch.uint8)

    lake = new_lake(tmp_path / "lake")
    handle = torch.nn.modules.module.register_module_forward_hook(allocate_too_much)
    try:
        clean_failure(xici(lake, *args), "out of memory", "--batch-size", "run the same command again")
    finally:
        handle.remove()
    done = lake.read(lambda con: con.execute("select count(*) from sequences").fetchone()[0])
    assert 0 < done < 6
    again = xici(lake, *args)
    assert again.exit_code == 0 and f"resumed after {done} done" in again.output, again.output
    assert_same_lake(snapshot(lake), snapshot(clean))


@pytest.mark.parametrize("cut", ["half", "empty", "garbage"])
def test_a_damaged_warehouse_is_called_damaged(tmp_path: Path, cut: str) -> None:
    lake = Lake(tmp_path / "lake")
    write_synthetic_lake(lake, SYNTHETIC)
    data = lake.warehouse_path.read_bytes()
    damaged = {"half": data[: len(data) // 2], "empty": b"", "garbage": b"not a database " * 100}[cut]
    lake.warehouse_path.write_bytes(damaged)
    for args in (["runs", "list"], ["analyze", "--run", "1"], ["report"]):
        result = xici(lake, *args)
        clean_failure(result, "warehouse file is damaged", "restore warehouse.duckdb")
        assert "another xici process" not in result.output and "permissions" not in result.output
    assert lake.warehouse_path.read_bytes() == damaged


@pytest.mark.parametrize("text", ["{not json", "[]", '{"gates": 1, ', '{"elsewhere": "x"}'])
def test_a_lake_json_that_is_not_the_settings_is_named(tmp_path: Path, text: str) -> None:
    lake = Lake(tmp_path / "lake")
    write_synthetic_lake(lake, SYNTHETIC)
    (lake.root / "lake.json").write_text(text)
    for args in (["sql", "select count(*) from token_gates"], ["analyze", "--run", "1"]):
        clean_failure(xici(lake, *args), "lake's settings are not readable", "lake.json")
    assert (lake.root / "lake.json").read_text() == text


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_checkpoint_is_refused_before_a_run_starts(
    tiny_checkpoint, tmp_path: Path, damage: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(len(data)))
    lake = new_lake(tmp_path / "lake")
    clean_failure(
        xici(lake, *record_args(model, "--limit", "1")), "model.safetensors is damaged", str(weights)
    )
    assert lake.read(lambda con: con.execute("select count(*) from runs").fetchone()[0]) == 0


def test_prompts_longer_than_the_context_are_refused_before_a_run(tiny_checkpoint, tmp_path: Path) -> None:
    from xici.corpora.store import import_dataset

    model = tiny_checkpoint("qwen3_moe")
    limit = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    rows = [
        {"question_id": "q1", "lang": "en", "question": "what is the capital?", "answers": ["Paris"]},
        {"question_id": "q1", "lang": "fr", "question": "quelle ville? " * limit, "answers": ["Paris"]},
        {"question_id": "q2", "lang": "en", "question": "river?", "answers": ["river"]},
    ]
    source = tmp_path / "long.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lake = Lake(tmp_path / "lake")
    import_dataset(lake, "long", source, "jsonl")
    refused = xici(lake, *record_args(model, "--gates-url", str(tmp_path / "elsewhere.zarr"), dataset="long"))
    clean_failure(refused, "1 prompt(s)", f"context of {limit} tokens", "q1 (fr,", "--max-new-tokens")
    assert "q2" not in refused.output and "q1 (en" not in refused.output
    assert lake.read(lambda con: con.execute("select count(*) from runs").fetchone()[0]) == 0
    assert not (lake.root / "lake.json").exists()  # the refused recording's --gates-url is not kept


def test_a_refused_gates_url_recording_leaves_no_setting_and_no_run(tiny_checkpoint, tmp_path: Path) -> None:
    model = tiny_checkpoint("qwen3_moe")
    lake = new_lake(tmp_path / "lake")
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"")
    cases = [
        (record_args(model, "--gates-url", f"file://{not_a_folder}/gates.zarr"), "Not a directory"),
        (record_args(broken, "--gates-url", str(tmp_path / "g1.zarr")), "model.safetensors is damaged"),
        (record_args(model, "--gates-url", str(tmp_path / "g2.zarr"), "--languages", "xx"), "no language xx"),
    ]
    for args, why in cases:
        clean_failure(xici(lake, *args), why)
        assert not (lake.root / "lake.json").exists(), args
        assert lake.read(lambda con: con.execute("select count(*) from runs").fetchone()[0]) == 0
    url = str(tmp_path / "g3.zarr")
    assert xici(lake, *record_args(model, "--gates-url", url, "--limit", "1")).exit_code == 0
    assert Lake(lake.root).gates_location == url


def test_analyze_refuses_an_unfinished_run_unless_partial(tiny_checkpoint, tmp_path: Path) -> None:
    from xici.recorder.run import RecordSpec, record

    lake = new_lake(tmp_path / "lake")
    spec = RecordSpec(model=str(tiny_checkpoint("qwen3_moe")), dataset="toy", max_new_tokens=3)

    def stop(done) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(lake, spec, device="cpu", batch_size=6, on_batch=stop)
    refused = xici(lake, "analyze", "--run", "1")
    clean_failure(refused, "run 1 is not finished: 6 of 15 units", "--partial", "resumes")
    assert analyses(lake) == []
    partial = xici(lake, "analyze", "--run", "1", "--partial")
    assert partial.exit_code == 0, partial.output
    assert "Warning: run 1 is not finished: 6 of 15 units" in partial.output
    assert len(analyses(lake)) == 1


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (
            SyntheticSpec(questions=((6, 5),), accuracy=(1.0, 1.0), difficulty=0.0),
            "No question is mixed (6 all",
        ),
        (SyntheticSpec(questions=((6, 5),), accuracy=(0.0, 0.0), difficulty=0.0), "0 all correct, 6 all"),
    ],
)
def test_an_analysis_with_no_mixed_question_says_why(tmp_path: Path, spec: SyntheticSpec, why: str) -> None:
    lake = Lake(tmp_path / "lake")
    write_synthetic_lake(lake, spec)
    out = xici(lake, "analyze", "--run", "1")
    assert out.exit_code == 0, out.output
    assert why in " ".join(out.output.split()), out.output


def test_machine_faults_are_named_from_the_real_errors(tmp_path: Path) -> None:
    """The errors machine_fault reads, raised for real by DuckDB, torch and the OS."""
    con = duckdb.connect()
    con.execute("set memory_limit = '2MB'")
    con.execute("set temp_directory = ''")  # nowhere to spill: the query itself must fail
    with pytest.raises(duckdb.Error) as duck:
        con.execute("select list(range) from range(3000000)").fetchall()
    with pytest.raises(RuntimeError) as allocator:
        torch.empty(1 << 50, dtype=torch.uint8)
    for exc in (duck.value, allocator.value, MemoryError()):
        fault = machine_fault(exc)
        assert fault is not None and fault.what.startswith("out of memory"), exc
    child = (
        "import os\nfrom xici.errors import machine_fault\nfd = os.open('f', os.O_WRONLY | os.O_CREAT)\n"
        "try:\n    os.write(fd, b'x')\n    os.write(fd, b'x')\nexcept OSError as exc:\n"
        "    print(machine_fault(exc).what)"
    )
    limited = subprocess.run(
        [sys.executable, "-c", child],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit,
    )
    assert limited.stdout.strip() == "a file of the lake reached the size limit for files (File too large)"
    wrapped = RuntimeError("a batch failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert machine_fault(wrapped).what == "the disk holding the lake is full (No space left on device)"
    assert machine_fault(ValueError("no such column")) is None
    assert machine_fault(PermissionError(errno.EACCES, "Permission denied", "/some/model")) is None


def test_a_recording_the_os_stops_writing_leaves_no_run_and_resumes(tiny_checkpoint, tmp_path: Path) -> None:
    """Under a file-size limit the first write of the run fails: one message, no run row, and the same
    command without the limit records the run."""
    lake = new_lake(tmp_path / "lake")
    args = record_args(tiny_checkpoint("qwen3_moe"), "--limit", "1")
    limited = subprocess.run(
        xici_command(lake.root, *args),
        capture_output=True,
        text=True,
        env=xici_env(),
        timeout=600,
        preexec_fn=_file_size_limit,
    )
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr
    assert "File too large" in limited.stderr and "run the same command again" in limited.stderr
    assert lake.read(lambda con: con.execute("select count(*) from runs").fetchone()[0]) == 0
    again = xici(lake, *args)
    assert again.exit_code == 0 and "Run 1: recorded 3 of 3 units." in again.output, again.output
