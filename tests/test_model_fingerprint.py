"""A run knows its model: the checkpoint's fingerprint is stored at record time, and ablating, judging with
the recorded model and resuming a recording refuse a checkpoint whose files changed (real tiny checkpoints,
real safetensors files, a real lake)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_ablation_support import copy_lake, insert_analysis, record_toy, rows, xici_sets
from test_recorder_support import stopping_checkpoint

from xici.cli.main import cli
from xici.errors import XiciError
from xici.recorder.fingerprint import changes, checkpoint_folder, fingerprint
from xici.recorder.run import RecordSpec, record
from xici.warehouse import Lake

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint, tmp_path_factory) -> tuple[Lake, Path]:
    """(a lake with run 1 recorded from a checkpoint of its own and analysis 1 of it, that checkpoint)."""
    checkpoint = stopping_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path_factory.mktemp("own") / "ckpt", 8)
    lake = record_toy(checkpoint, tmp_path_factory.mktemp("recorded") / "lake")
    n_layers = rows(lake, "select n_moe_layers from runs where run_id = 1")[0][0]
    insert_analysis(lake, 1, xici_sets(lake), layers=(0, n_layers))
    return lake, checkpoint


@pytest.fixture
def lake(recorded, tmp_path) -> Lake:
    return copy_lake(recorded[0], tmp_path / "lake")


@pytest.fixture
def replaced_weights(recorded) -> Iterator[Path]:
    """The recorded checkpoint with other weights of the same names and shapes (restored afterwards)."""
    weights = recorded[1] / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    save_file({name: t + 0.01 for name, t in tensors.items()}, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == len(original)
    yield weights
    weights.write_bytes(original)


def ablate(lake: Lake, *args: str):
    command = [
        "--lake",
        str(lake.root),
        "ablate",
        "--analysis",
        "1",
        "--baselines",
        "none",
        "--device",
        "cpu",
    ]
    return CliRunner().invoke(cli, [*command, *args])


def params(lake: Lake, run_id: int) -> dict:
    return json.loads(rows(lake, "select params from runs where run_id = ?", [run_id])[0][0])


def test_the_fingerprint_names_every_file(recorded) -> None:
    lake, checkpoint = recorded
    stored = params(lake, 1)["model_fingerprint"]
    files = stored["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files.keys()
    assert files["model.safetensors"]["size"] == (checkpoint / "model.safetensors").stat().st_size
    assert fingerprint(str(checkpoint)) == stored


def test_large_files_are_hashed_from_their_header_and_samples(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"w": torch.arange(300_000, dtype=torch.float32)}, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    before = fingerprint(str(folder), full_hash_bytes=1024)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 1  # the last block is always sampled
    (folder / "model.safetensors").write_bytes(data)
    after = fingerprint(str(folder), full_hash_bytes=1024)
    assert changes(before, after) == ["model.safetensors changed content"]
    (folder / "model.safetensors").write_bytes(data[:-4])
    (folder / "extra.json").write_text("{}")
    (folder / "README.md").write_text("notes: no part of the model")
    (folder / "LICENSE").write_text("no part of the model either")
    (folder / "config.json").unlink()
    assert changes(before, fingerprint(str(folder), full_hash_bytes=1024)) == [
        "config.json is missing",
        "extra.json was added",
        f"model.safetensors changed size ({len(data):,} -> {len(data) - 4:,} bytes)",
    ]


def test_replaced_weights_are_refused_unless_allowed(lake: Lake, replaced_weights: Path) -> None:
    refused = ablate(lake)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "is not the one run 1 was recorded with: model.safetensors changed content" in refused.output
    assert "--allow-changed-model" in refused.output
    assert rows(lake, "select count(*) from runs") == [(1,)]

    judged = CliRunner().invoke(cli, ["--lake", str(lake.root), "grade", "--run", "1", "--grader", "judge"])
    assert judged.exit_code == 1 and "model.safetensors changed content" in judged.output
    assert "--judge-model" in judged.output

    allowed = ablate(lake, "--allow-changed-model")
    assert allowed.exit_code == 0, allowed.output
    stored = params(lake, 2)
    assert stored["allow_changed_model"] is True
    assert stored["model_changes"] == ["model.safetensors changed content"]
    assert stored["model_fingerprint"] == fingerprint(str(replaced_weights.parent))


def test_a_resumed_recording_refuses_changed_weights(lake: Lake, recorded, replaced_weights: Path) -> None:
    lake.write(lambda con: con.execute("update runs set status = 'running'"))
    spec = RecordSpec(model=str(recorded[1]), dataset="toy", max_new_tokens=8, grader="length-parity")
    with pytest.raises(XiciError, match=r"model\.safetensors changed content"):
        record(lake, spec, device="cpu")
    assert "allow_changed_model" not in params(lake, 1) or not params(lake, 1)["allow_changed_model"]
    record(lake, spec, device="cpu", allow_changed_model=True)
    stored = params(lake, 1)
    assert stored["allow_changed_model"] is True
    assert stored["model_changes"] == ["model.safetensors changed content"]
    assert rows(lake, "select status from runs where run_id = 1") == [("finished",)]


def test_a_moved_checkpoint_is_named_again(lake: Lake, recorded, tmp_path: Path) -> None:
    checkpoint = recorded[1]
    moved = tmp_path / "moved"
    shutil.move(checkpoint, moved)
    try:
        lost = ablate(lake)
        assert (
            lost.exit_code == 1
            and f"the checkpoint run 1 was recorded with is not at {checkpoint}" in lost.output
        )
        assert "pass --model with the folder it is in now" in lost.output
        found = ablate(lake, "--model", str(moved))
        assert found.exit_code == 0, found.output
        stored = params(lake, 2)
        assert stored["model"] == str(moved) and stored["model_changes"] == []
        assert stored["allow_changed_model"] is False
    finally:
        shutil.move(moved, checkpoint)


def test_a_hub_id_is_fingerprinted_from_the_hub_cache(recorded, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--xici-test--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(recorded[1], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert checkpoint_folder("xici-test/tiny") == snapshot
    assert fingerprint("xici-test/tiny") == fingerprint(str(recorded[1]))
    assert checkpoint_folder("xici-test/not-cached") is None and fingerprint("xici-test/not-cached") is None
