"""A lake whose gate store is an fsspec URL (``Lake.use_gates``), on a real tiny model, DuckDB and Zarr.

Two kinds of URL work without a network: ``file://`` (a folder outside the lake, opened as a folder) and
``memory://`` (fsspec's in-process file system: it takes zarr's fsspec store, the one an ``s3://`` URL gets,
through create, append, resize, truncate, shards and deletes). Every lake is compared with a lake of the same
recording whose gate store is the plain ``gates.zarr`` folder.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_recorder_support import N_UNITS, assert_same_lake, new_lake, snapshot, stopping_checkpoint

from xici.cli.main import cli
from xici.errors import XiciError
from xici.recorder.run import RecordSpec, record
from xici.warehouse import GateStore, Lake, TokenArrays
from xici.warehouse.gates import FIELDS
from xici.warehouse.lake import TOKEN_RELATIONS

torch.set_num_threads(1)
MAX_NEW = 6
BATCH = 4


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint, tmp_path_factory) -> Path:
    return stopping_checkpoint(
        tiny_checkpoint("qwen3_moe"), tmp_path_factory.mktemp("stop") / "qwen", MAX_NEW
    )


def spec_for(model: Path) -> RecordSpec:
    return RecordSpec(model=str(model), dataset="toy", max_new_tokens=MAX_NEW, store_logits=True)


def token_rows(lake: Lake) -> dict[str, list[tuple]]:
    """Every row of the SQL token relations, sorted."""
    con = lake.connect(read_only=True)
    try:
        lake.register_token_relations(con)
        return {
            name: con.execute(f"select * from {name} order by all").fetchall() for name in TOKEN_RELATIONS
        }
    finally:
        con.close()


@pytest.fixture(scope="module")
def folder_lake(qwen: Path, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted recording in a lake with its gate store in the lake folder: snapshot and SQL rows."""
    lake = new_lake(tmp_path_factory.mktemp("folder") / "lake")
    record(lake, spec_for(qwen), device="cpu", batch_size=BATCH)
    assert lake.gates_location == lake.zarr_path and lake.zarr_path.is_dir()
    return {"snapshot": snapshot(lake), "rows": token_rows(lake)}


@pytest.fixture(params=["file", "memory"])
def gates_url(request, tmp_path: Path):
    """A gate store URL no lake uses yet: a folder outside the lake, or a place in fsspec's memory."""
    if request.param == "file":
        yield f"file://{tmp_path / 'elsewhere' / 'gates.zarr'}"
        return
    url = f"memory://xici-test/{uuid.uuid4().hex}/gates.zarr"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def stored_keys(url: str) -> set[str]:
    """The keys (file names, relative to the store) under a gate store URL."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return set()
    root = path.rstrip("/") + "/"
    return {name[len(root) :] if name.startswith(root) else name for name in fs.find(path)}


def arrays_like(gates: GateStore, run_id: int, n: int, value: int, shard: int | None = None) -> TokenArrays:
    """``n`` tokens of the run's shapes and dtypes, every value ``value``."""
    one = gates.read(run_id, 0, 1, logits=True, shard=shard)
    return TokenArrays(
        *(
            None if a is None else np.full((n, *a.shape[1:]), value, dtype=a.dtype)
            for a in (one.token_ids, one.topk_ids, one.topk_weights, one.router_logits)
        )
    )


def test_a_recording_lands_at_the_url_and_reads_like_a_folder_lake(
    qwen: Path, folder_lake: dict[str, Any], gates_url: str, tmp_path: Path
) -> None:
    lake = new_lake(tmp_path / "lake")
    lake.use_gates(gates_url)
    result = record(lake, spec_for(qwen), device="cpu", batch_size=BATCH)
    assert (result.run_id, result.recorded) == (1, N_UNITS)

    assert not lake.zarr_path.exists()
    keys = stored_keys(gates_url)
    assert {"zarr.json", "runs/1/zarr.json", "runs/1/token_ids/zarr.json", "runs/1/token_ids/c/0"} <= keys
    assert {"runs/1/topk_ids/c/0/0/0", "runs/1/topk_weights/c/0/0/0", "runs/1/router_logits/c/0/0/0"} <= keys
    if gates_url.startswith("file://"):
        assert (tmp_path / "elsewhere" / "gates.zarr" / "runs" / "1" / "token_ids").is_dir()

    reopened = Lake(lake.root)  # finds the URL again in lake.json
    assert reopened.gates_location == gates_url
    assert_same_lake(snapshot(reopened), folder_lake["snapshot"])
    assert token_rows(reopened) == folder_lake["rows"]
    assert record(reopened, spec_for(qwen), device="cpu", batch_size=BATCH).already_finished


def test_resume_cuts_what_was_not_committed_and_equals_the_uninterrupted_run(
    qwen: Path, folder_lake: dict[str, Any], gates_url: str, tmp_path: Path
) -> None:
    class Stop(Exception):
        pass

    def stop(_) -> None:
        raise Stop

    lake = new_lake(tmp_path / "lake")
    lake.use_gates(gates_url)
    with pytest.raises(Stop):
        record(lake, spec_for(qwen), device="cpu", batch_size=BATCH, on_batch=stop)
    committed = lake.read(lambda con: lake.committed(con, 1)[0])
    gates = lake.gates()
    assert 0 < committed == gates.length(1) < 4096  # the first batch, inside the first chunk

    # What a crash leaves at the URL: tokens appended but never committed (into the next chunk), and the
    # shard of a worker that died before its first commit.
    gates.append(1, arrays_like(gates, 1, 5000, 7))
    shard = gates.add_shard(1)
    gates.append(1, arrays_like(gates, 1, 10, 9), shard=shard)
    assert gates.length(1) == committed + 5000 and gates.shards(1) == [shard]
    assert "runs/1/token_ids/c/1" in stored_keys(gates_url)

    result = record(Lake(lake.root), spec_for(qwen), device="cpu", batch_size=BATCH)
    assert (result.done_before, result.recorded) == (BATCH, N_UNITS - BATCH)
    keys = stored_keys(gates_url)
    assert "runs/1/token_ids/c/1" not in keys  # the cut chunk is deleted
    assert not any(k.startswith("runs/1/shards/0/") for k in keys)  # and the dead worker's shard
    assert lake.gates(read_only=True).shards(1) == []
    assert_same_lake(snapshot(lake), folder_lake["snapshot"])
    assert token_rows(lake) == folder_lake["rows"]


def test_shards_of_a_url_store(gates_url: str) -> None:
    gates = GateStore(gates_url)
    gates.create_run(
        7, n_layers=2, top_k=3, n_experts=300, gate_dtype="float32", store_logits=True, chunk_tokens=4
    )
    rng = np.random.default_rng(0)

    def tokens(n: int) -> TokenArrays:
        return TokenArrays(
            rng.integers(0, 1000, n).astype(np.int32),
            rng.integers(0, 300, (n, 2, 3)).astype(np.uint16),
            rng.random((n, 2, 3), dtype=np.float32),
            rng.random((n, 2, 300), dtype=np.float32),
        )

    def part(arrays: TokenArrays, start: int, stop: int) -> TokenArrays:
        return TokenArrays(*(getattr(arrays, name)[start:stop] for name in FIELDS))

    def same(got: TokenArrays, want: TokenArrays) -> None:
        for name in FIELDS:
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and np.array_equal(a, b), name

    own = tokens(6)
    assert gates.append(7, own) == 0
    assert gates.shards(7) == []
    assert (gates.add_shard(7), gates.add_shard(7)) == (0, 1)
    first, second, other = tokens(10), tokens(3), tokens(5)
    assert gates.append(7, first, shard=0) == 0
    assert gates.append(7, second, shard=0) == 10
    assert gates.append(7, other, shard=1) == 0

    reader = GateStore(gates_url, read_only=True)  # a fresh store, as another process opens it
    assert reader.shards(7) == [0, 1] and reader.has_run(7, 1) and not reader.has_run(7, 2)
    assert reader.fields(7, 1) == ["token_ids", "topk_ids", "topk_weights", "router_logits"]
    assert [reader.length(7, s) for s in (None, 0, 1)] == [6, 13, 5]
    same(reader.read(7, 0, 6, logits=True), own)
    same(reader.read(7, 2, 13, logits=True, shard=0), part(TokenArrays.concat([first, second]), 2, 13))
    same(reader.read(7, 0, 5, logits=True, shard=1), other)
    assert reader.read(7, 0, 5, shard=1).router_logits is None

    gates.truncate(7, 4, shard=0, sums=0)
    assert gates.length(7, 0) == 4 and gates.length(7) == 6
    more = tokens(2)
    assert gates.append(7, more, shard=0) == 4
    same(
        GateStore(gates_url, read_only=True).read(7, 0, 6, logits=True, shard=0),
        TokenArrays.concat([part(first, 0, 4), more]),
    )

    gates.drop_shard(7, 1)
    assert gates.shards(7) == [0]
    assert not any(k.startswith("runs/7/shards/1/") for k in stored_keys(gates_url))
    assert gates.add_shard(7) == 1 and gates.length(7, 1) == 0  # a new shard starts empty
    with pytest.raises(XiciError, match="shard 5 of run 7 has no token arrays"):
        gates.read(7, 0, 1, shard=5)


def test_use_gates_is_set_once_and_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"file://{tmp_path / 'elsewhere' / 'gates.zarr'}"
    lake = Lake(tmp_path / "lake")
    assert lake.gates_location == lake.zarr_path
    lake.use_gates(url)
    settings = lake.root / "lake.json"
    assert json.loads(settings.read_text()) == {"gates": url}
    assert Lake(lake.root).gates_location == url
    assert not lake.zarr_path.exists()

    Lake(lake.root).use_gates(url)  # the same place again: nothing to do
    Lake(lake.root).use_gates(url + "/")
    assert json.loads(settings.read_text()) == {"gates": url}

    with pytest.raises(XiciError) as refused:
        Lake(lake.root).use_gates("memory://somewhere/else.zarr")
    assert (
        refused.value.what == f"this lake keeps its token arrays at {url}, not memory://somewhere/else.zarr"
    )
    assert refused.value.where == "--gates-url" and "start a new lake" in refused.value.fix
    assert json.loads(settings.read_text()) == {"gates": url}

    # A lake that already has its gate store in the folder keeps it.
    plain = Lake(tmp_path / "plain")
    plain.gates().create_run(1, n_layers=1, top_k=1, n_experts=2)
    plain.use_gates(str(plain.zarr_path))
    with pytest.raises(XiciError, match=r"keeps its token arrays at .*plain/gates\.zarr, not file://"):
        plain.use_gates(url)
    assert not (plain.root / "lake.json").exists()

    # A relative folder or file:// URL is remembered as the place it names now, for commands run elsewhere.
    monkeypatch.chdir(tmp_path)
    Lake(tmp_path / "relative").use_gates("shared/gates.zarr")
    Lake(tmp_path / "relative-url").use_gates("file://shared/url.zarr")
    monkeypatch.chdir(tmp_path / "lake")
    assert Lake(tmp_path / "relative").gates_location == str(tmp_path / "shared" / "gates.zarr")
    assert Lake(tmp_path / "relative-url").gates_location == f"file://{tmp_path / 'shared' / 'url.zarr'}"

    # A URL that fsspec cannot open is refused before the lake is bound to it.
    fresh = Lake(tmp_path / "fresh")
    with pytest.raises(XiciError) as unknown:
        fresh.use_gates("nosuchscheme://bucket/gates.zarr")
    assert "cannot open the gate store at nosuchscheme://bucket/gates.zarr" in unknown.value.what
    assert unknown.value.where == "--gates-url" and unknown.value.fix
    assert not (fresh.root / "lake.json").exists()
    with pytest.raises(XiciError, match="cannot open the gate store"):
        GateStore("nosuchscheme://bucket/gates.zarr", read_only=True)


def test_a_url_store_not_written_yet_reads_as_empty(gates_url: str, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    lake.use_gates(gates_url)
    gates = lake.gates(read_only=True)
    assert not gates.has_run(1) and gates.shards(1) == []
    with pytest.raises(XiciError, match="run 1 has no token arrays"):
        gates.length(1)
    with pytest.raises(XiciError, match="run 1 has no token arrays"):
        gates.read(1, 0, 1)
    assert token_rows(lake) == {name: [] for name in TOKEN_RELATIONS}
    assert snapshot(lake)["arrays"] == {}
    assert stored_keys(gates_url) == set()  # reading created nothing there
    assert not (tmp_path / "elsewhere").exists()


def test_stored_size_of_a_url_store(gates_url: str, tmp_path: Path) -> None:
    gates = GateStore(gates_url)
    gates.create_run(1, n_layers=2, top_k=2, n_experts=4)
    gates.append(
        1, TokenArrays(np.arange(50, dtype=np.int32), np.ones((50, 2, 2), np.uint8), np.ones((50, 2, 2)))
    )
    if gates_url.startswith("file://"):
        folder = tmp_path / "elsewhere" / "gates.zarr" / "runs" / "1"
        assert gates.nbytes_stored(1) == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) > 0
    else:
        with pytest.raises(ValueError, match="only measured for a local gate store"):
            gates.nbytes_stored(1)


def test_record_cli_with_gates_url(qwen: Path, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    url = f"file://{tmp_path / 'elsewhere' / 'gates.zarr'}"
    args = ["--lake", str(lake.root), "record", "--model", str(qwen), "--dataset", "toy", "--languages", "en"]
    args += ["--max-new-tokens", "3", "--device", "cpu", "--gates-url", url]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "Run 1: recorded 5 of 5 units." in first.output
    assert Lake(lake.root).gates_location == url and not lake.zarr_path.exists()
    assert GateStore(url, read_only=True).length(1) == lake.read(lambda con: lake.committed(con, 1)[0]) > 0
    again = CliRunner().invoke(cli, args)  # the same URL again is fine
    assert again.exit_code == 0 and "already finished" in again.output
    other = CliRunner().invoke(cli, [*args[:-1], f"file://{tmp_path / 'other.zarr'}"])
    assert other.exit_code == 1 and "Traceback" not in other.output
    assert f"this lake keeps its token arrays at {url}" in other.output


def test_two_lakes_never_share_a_gate_store(qwen: Path, tmp_path: Path) -> None:
    """A second lake with the same --gates-url, and a lake whose warehouse was recreated, are refused before
    they write anything: the first lake's arrays stay as they were."""
    url = f"file://{tmp_path / 'shared' / 'gates.zarr'}"
    record_args = ["record", "--model", str(qwen), "--dataset", "toy", "--languages", "en"]
    record_args += ["--max-new-tokens", "3", "--device", "cpu", "--gates-url", url]
    first = new_lake(tmp_path / "first")
    assert CliRunner().invoke(cli, ["--lake", str(first.root), *record_args]).exit_code == 0
    store = tmp_path / "shared" / "gates.zarr"
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}

    second = new_lake(tmp_path / "second")
    refused = CliRunner().invoke(cli, ["--lake", str(second.root), *record_args])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "the gate store belongs to another lake" in refused.output and "xici lake check" in refused.output
    assert not (second.root / "lake.json").exists()  # the refused URL is not kept

    first.warehouse_path.unlink()
    recreated = new_lake(first.root)
    again = CliRunner().invoke(cli, ["--lake", str(first.root), *record_args[:-2]])
    assert again.exit_code == 1 and "the gate store belongs to another lake" in again.output
    assert recreated.read(lambda con: con.execute("select count(*) from runs").fetchall()) == [(0,)]
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
