"""Damaged gate stores on real files: a missing or garbage chunk is an error naming the run, array and
sequences, never zeros, for every reader (GateStore reads, the token relations, the analysis)."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner, Result

from xici.cli.main import cli
from xici.errors import XiciError
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake
from xici.warehouse import gates as gates_module
from xici.warehouse.gates import Appended, DamagedGates, GateStore

SPEC = SyntheticSpec(questions=((24, 6),), accuracy=(0.7, 0.3), difficulty=0.5)


def xici(lake: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--lake", str(lake), *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "lake"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gates_module, "SUM_CHUNK_ROWS", 4096)  # gate sums in several chunks too
        write_synthetic_lake(Lake(root), SPEC)
    return root


@pytest.fixture
def lake(template: Path, tmp_path: Path) -> Lake:
    """A fresh copy of the intact synthetic lake."""
    shutil.copytree(template, tmp_path / "lake")
    return Lake(tmp_path / "lake")


def chunk(lake: Lake, field: str, index: int) -> Path:
    path = lake.zarr_path / "runs" / "1" / field / "c" / str(index)
    return next(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else path


def sequences_in(
    lake: Lake, lo: int, hi: int, start: str = "token_start", length: str = "n_tokens"
) -> list[int]:
    """seq_ids of run 1 whose tokens (or gate sum rows: ``sums_start``, ``n_sums``) overlap [lo, hi)."""
    return lake.read(
        lambda con: [
            r[0]
            for r in con.execute(
                f"select seq_id from sequences where run_id = 1 and {start} < ? and {start} + {length} > ? "
                "order by 1",
                [hi, lo],
            ).fetchall()
        ]
    )


def without_sums(lake: Lake) -> None:
    """Make run 1 look recorded before gate sums were kept: its means are then taken from its gates."""
    lake.write(lambda con: con.execute("update sequences set sums_start = null, n_sums = null"))


def test_missing_chunk_is_an_error_for_every_reader(lake: Lake) -> None:
    store = lake.gates(read_only=True)
    size = 4096
    assert store.length(1) > 2 * size
    chunk(lake, "topk_weights", 1).unlink()

    with pytest.raises(DamagedGates) as raised:
        store.read(1, size + 10, size + 20)
    damage = raised.value
    assert (damage.run_id, damage.field, damage.tokens) == (1, "topk_weights", (size, 2 * size))
    assert "chunk 1 is missing" in raised.value.message
    assert len(store.read(1, 0, size)) == size  # the intact chunk before it still reads

    without_sums(lake)  # so that the analysis reads the gates
    analyzed = xici(lake.root, "analyze", "--run", "1")
    assert analyzed.exit_code == 1 and "Traceback" not in analyzed.output
    first, *_, last = sequences_in(lake, size, 2 * size)
    assert f"run 1 are damaged: topk_weights, tokens {size}-{2 * size - 1} (seq_id " in analyzed.output
    assert f"{first}-{last}" in analyzed.output
    assert "xici lake check" in analyzed.output
    for command in (["sql", "select sum(weight) from token_gates"], ["runs", "compare", "1", "1"]):
        read = xici(lake.root, *command)
        assert read.exit_code == 1 and "Traceback" not in read.output, read.output
        assert read.output.startswith("Error: the token arrays of run 1 are damaged: topk_weights, tokens")
    assert lake.read(lambda con: con.execute("select count(*) from analyses").fetchone()[0]) == 0


def test_garbage_chunk_fails_its_checksum(lake: Lake) -> None:
    path = chunk(lake, "topk_ids", 2)  # an array the analysis reads (it never needs token_ids)
    path.write_bytes(os.urandom(path.stat().st_size))
    without_sums(lake)
    analyzed = xici(lake.root, "analyze", "--run", "1")
    assert analyzed.exit_code == 1 and "Traceback" not in analyzed.output
    assert "topk_ids, tokens 8192-12287" in analyzed.output
    assert "chunk 2 does not decode (Stored and computed checksum do not match" in analyzed.output


def test_a_short_array_is_damage_not_fewer_tokens(lake: Lake) -> None:
    store = lake.gates()
    length = store.length(1)
    store._group(1)["topk_ids"].resize((length - 5, *store._group(1)["topk_ids"].shape[1:]))
    with pytest.raises(DamagedGates, match=r"topk_ids.*the array ends at token"):
        store.read(1, length - 10, length)


def test_all_zero_chunk_is_written(tmp_path: Path) -> None:
    """A chunk of zeros has a file, so that a missing file is always damage."""
    from xici.warehouse import TokenArrays

    store = GateStore(tmp_path / "gates.zarr")
    store.create_run(7, n_layers=2, top_k=2, n_experts=4, chunk_tokens=8)
    zeros = TokenArrays(
        np.zeros(16, np.int32), np.zeros((16, 2, 2), np.uint8), np.zeros((16, 2, 2), np.float16)
    )
    store.append(7, zeros)
    assert np.array_equal(store.read(7, 0, 16).topk_weights, zeros.topk_weights)
    assert sorted(p.name for p in (tmp_path / "gates.zarr/runs/7/token_ids/c").iterdir()) == ["0", "1"]


def test_store_written_before_checksums_still_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays without the crc32c codec (an older lake) read as before; damage is still refused."""
    monkeypatch.setattr(gates_module, "_COMPRESSORS", gates_module._COMPRESSORS[:1])
    lake = Lake(tmp_path / "old")
    write_synthetic_lake(lake, SPEC)
    monkeypatch.undo()
    codecs = lake.gates(read_only=True)._group(1)["topk_weights"].metadata.codecs
    assert [c.to_dict()["name"] for c in codecs] == ["bytes", "blosc"]
    assert xici(lake.root, "analyze", "--run", "1").exit_code == 0

    path = chunk(lake, "topk_ids", 0)
    path.write_bytes(os.urandom(path.stat().st_size))
    with pytest.raises(DamagedGates, match="chunk 0 does not decode"):
        lake.gates(read_only=True).read(1, 0, 100)
    path.unlink()
    with pytest.raises(DamagedGates, match="chunk 0 is missing"):
        lake.gates(read_only=True).read(1, 0, 100)


def gate_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_lake_claims_its_gate_store(lake: Lake, tmp_path: Path) -> None:
    """The lake's id is drawn once; its store records it (an older, unclaimed store is claimed on write)."""
    lake_id = lake.identity()
    assert Lake(lake.root).identity() == lake_id and len(lake_id) == 36
    assert lake.gates(read_only=True).owner == lake_id
    other = Lake(tmp_path / "other")
    write_synthetic_lake(other, replace(SPEC, dataset="other"))
    assert other.identity() != lake_id


def test_an_unclaimed_store_is_claimed_by_its_own_lake_only(lake: Lake) -> None:
    store = lake.gates()
    del store._root.attrs["lake_id"]  # as a lake written before lakes had ids left it
    assert lake.gates(read_only=True).owner is None  # reading does not claim
    assert lake.gates().owner == lake.identity()  # its own runs: claimed on write


def test_a_recreated_warehouse_does_not_write_into_the_old_store(lake: Lake) -> None:
    before = gate_files(lake.zarr_path)
    lake.warehouse_path.unlink()
    again = Lake(lake.root)
    with pytest.raises(XiciError, match="belongs to another lake") as raised:
        write_synthetic_lake(again, SPEC)
    assert "xici lake check tells which runs the store holds" in raised.value.message
    assert gate_files(lake.zarr_path) == before
    assert again.read(lambda con: con.execute("select count(*) from runs").fetchall()) == [(0,)]

    # The same with a store written before lakes had ids: it holds runs this warehouse does not know.
    store = GateStore(lake.zarr_path)
    del store._root.attrs["lake_id"]
    unowned = gate_files(lake.zarr_path)
    with pytest.raises(XiciError, match="holds runs 1 that this lake's warehouse does not know"):
        write_synthetic_lake(Lake(lake.root), SPEC)
    assert gate_files(lake.zarr_path) == unowned


def check(lake: Lake) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit code of xici lake check and its table: {check: (ok | FAIL, what was found)}."""
    result = CliRunner().invoke(cli, ["--lake", str(lake.root), "lake", "check"], env={"COLUMNS": "400"})
    assert "Traceback" not in result.output
    rows = {}
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 3 and cells[0]:
            rows[cells[0]] = (cells[1], cells[2])
    return result.exit_code, rows


def test_lake_check_passes_an_intact_lake_and_changes_nothing(lake: Lake) -> None:
    assert xici(lake.root, "analyze", "--run", "1").exit_code == 0
    before = gate_files(lake.root)
    code, rows = check(lake)
    assert code == 0, rows
    assert list(rows) == ["schema", "identity", "tokens", "orphans", "running", "analyses"]
    assert all(status == "ok" for status, _ in rows.values())
    n = lake.read(
        lambda con: con.execute("select count(*), sum(n_tokens), sum(n_sums) from sequences").fetchall()[0]
    )
    assert n[2] > n[0]
    assert rows["tokens"][1].startswith(
        f"{n[0]:,} sequences, {n[1]:,} tokens, {n[2]:,} gate sum rows: every chunk present and intact"
    )
    assert lake.identity() in rows["identity"][1]
    assert gate_files(lake.root) == before  # warehouse and gate store untouched


def test_lake_check_finds_damage(lake: Lake) -> None:
    chunk(lake, "topk_weights", 1).unlink()
    garbage = chunk(lake, "token_ids", 3)
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    code, rows = check(lake)
    assert code == 1 and rows["tokens"][0] == "FAIL"
    first, *_, last = sequences_in(lake, 4096, 8192)
    assert f"topk_weights, tokens 4096-8191 (seq_id {first}-{last}): chunk 1 is missing" in rows["tokens"][1]
    assert (
        "token_ids, tokens 12288-" in rows["tokens"][1] and "chunk 3 fails its checksum" in rows["tokens"][1]
    )
    assert [name for name, (status, _) in rows.items() if status == "FAIL"] == ["tokens"]


def test_lake_check_finds_orphans_runs_left_running_and_changed_analyses(lake: Lake) -> None:
    assert xici(lake.root, "analyze", "--run", "1").exit_code == 0
    store = lake.gates()
    store.append(1, store.read(1, 0, 3))  # tokens no sequence row points at
    store.create_run(9, n_layers=SPEC.n_layers, top_k=SPEC.top_k, n_experts=SPEC.n_experts)

    def change(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("update grades set correct = not correct where seq_id = 1")
        con.execute("update runs set status = 'running'")

    lake.write(change)
    code, rows = check(lake)
    assert code == 1
    assert "run 9: token arrays of no run of this warehouse" in rows["orphans"][1]
    assert "left running: run 1 (record, 144 of 144 units)" in rows["running"][1]
    assert rows["analyses"] == ("FAIL", "analysis 1 (run 1): analyse the run again")
    with lake.writing(1):  # a run being written now is not left running
        assert "being written now: run 1" in check(lake)[1]["running"][1]
    lake.write(lambda con: con.execute("update runs set status = 'finished'"))
    assert "run 1: 3 tokens past the committed ones" in check(lake)[1]["orphans"][1]


def test_lake_check_names_the_runs_of_another_lakes_store(lake: Lake) -> None:
    lake.warehouse_path.unlink()
    write_synthetic_lake(Lake(lake.root / "scratch"), SPEC)  # any warehouse: a new id
    shutil.copy(lake.root / "scratch" / "warehouse.duckdb", lake.warehouse_path)
    code, rows = check(lake)
    assert code == 1 and rows["identity"][0] == "FAIL"
    assert "belongs to lake" in rows["identity"][1]
    tokens = GateStore(lake.zarr_path, read_only=True).length(1)
    assert f"it holds runs 1 ({tokens:,} tokens)" in rows["identity"][1]
    assert rows["tokens"] == ("FAIL", "not checked: the gate store is not this lake's")


def test_lake_check_of_a_folder_without_its_warehouse(lake: Lake) -> None:
    tokens = GateStore(lake.zarr_path, read_only=True).length(1)
    lake.warehouse_path.unlink()
    code, rows = check(lake)
    assert code == 1 and rows["schema"] == ("FAIL", f"there is no warehouse.duckdb in {lake.root}")
    assert f"holds runs 1 ({tokens:,} tokens) (it belongs to lake " in rows["identity"][1]
    assert not lake.warehouse_path.exists()


def test_lake_check_does_not_migrate_an_older_warehouse(lake: Lake) -> None:
    """A lake from before lake ids: checked as it is (the next writing command migrates it)."""
    version = lake.read(lambda con: con.execute("select max(version) from schema_version").fetchone()[0])
    lake.write(lambda con: con.execute("delete from schema_version where version >= 8; drop table lake"))
    del GateStore(lake.zarr_path)._root.attrs["lake_id"]
    before = gate_files(lake.root)
    code, rows = check(lake)
    assert code == 0, rows
    assert rows["schema"][1] == f"version 7 of {version}; the next command that writes migrates it"
    assert rows["identity"][1].startswith("no id yet (older schema")
    assert "not claimed yet" in rows["identity"][1]
    assert gate_files(lake.root) == before


def test_lake_check_reads_shards(lake: Lake) -> None:
    """A scaled-out run's shards: committed ones are checked chunk by chunk, empty ones are orphans."""
    store = lake.gates()
    committed, spare = store.add_shard(1), store.add_shard(1)
    tokens = store.read(1, 0, 5000)
    store.append(1, tokens, shard=committed)
    row = dict.fromkeys(("question_id", "lang", "prompt_text", "response_text", "finish_reason"), "x")
    rows = [{**row, "unit": 10_000 + i, "n_prompt_tokens": 1, "n_generated": 1} for i in range(2)]
    lake.commit_rows(1, rows, Appended(0, [2500, 2500]), shard=committed)
    code, found = check(lake)
    assert found["tokens"][0] == "ok" and "146 sequences" in found["tokens"][1]
    assert "token arrays of 2 of 2 runs and shards with checksums" in found["tokens"][1]
    assert found["orphans"] == ("FAIL", f"shard {spare} of run 1: a shard without any committed sequence")
    store.drop_shard(1, spare)
    assert check(lake)[0] == 0

    (lake.zarr_path / "runs/1/shards" / str(committed) / "topk_ids/c/1/0/0").unlink()
    code, found = check(lake)
    assert code == 1
    assert found["tokens"][1].startswith(f"the token arrays of shard {committed} of run 1 are damaged")


def test_damaged_gate_sums_are_an_error_never_means(lake: Lake) -> None:
    """The language means are added up from the gate sums recorded with the sequences: a missing or
    garbled chunk of them stops the build naming the sequences it holds, and xici lake check finds both."""
    size = 4096  # the template's
    assert lake.gates(read_only=True).sums_length(1) > 2 * size
    chunk(lake, "gate_sums", 0).unlink()
    analyzed = xici(lake.root, "analyze", "--run", "1")
    assert analyzed.exit_code == 1 and "Traceback" not in analyzed.output
    first, *_, last = sequences_in(lake, 0, size, "sums_start", "n_sums")
    assert f"run 1 are damaged: gate_sums, rows 0-{size - 1} (seq_id {first}-{last})" in analyzed.output
    assert "chunk 0 is missing" in analyzed.output
    garbage = chunk(lake, "gate_sums", 1)
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    code, rows = check(lake)
    assert code == 1 and rows["tokens"][0] == "FAIL"
    assert f"gate_sums, rows 0-{size - 1} (seq_id {first}-{last}): chunk 0 is missing" in rows["tokens"][1]
    assert (
        f"gate_sums, rows {size}-" in rows["tokens"][1] and "chunk 1 fails its checksum" in rows["tokens"][1]
    )
    assert lake.read(lambda con: con.execute("select count(*) from lang_means").fetchone()[0]) == 0
    shutil.rmtree(lake.zarr_path / "runs/1/gate_sums")  # the whole array gone
    analyzed = xici(lake.root, "analyze", "--run", "1")
    assert analyzed.exit_code == 1 and "Traceback" not in analyzed.output
    assert (
        "gate_sums, rows 0-" in analyzed.output
        and "committed rows, but there is no gate_sums" in analyzed.output
    )
    assert "there is no gate_sums array" in check(lake)[1]["tokens"][1]


def test_gate_sums_a_crash_left_are_cut_and_found(lake: Lake) -> None:
    """Gate sums appended without their commit (a crash) are orphans for xici lake check, and resuming
    the run cuts them with the tokens, so the next commit follows the committed rows."""
    store = lake.gates()
    committed = store.sums_length(1)
    appended = store.append_sequences(1, [store.read(1, 0, 40), store.read(1, 40, 100)])
    assert appended.sums_start == committed and all(n > 0 for n in appended.n_sums)
    extra = sum(appended.n_sums)
    assert f"run 1: {extra:,} gate sum rows past the committed ones" in check(lake)[1]["orphans"][1]
    lake.resume(1)
    assert store.sums_length(1) == committed and check(lake)[0] == 0
    row = dict.fromkeys(("question_id", "lang", "prompt_text", "response_text", "finish_reason"), "x")
    appended = store.append_sequences(1, [store.read(1, 0, 40)])
    lake.commit_rows(1, [{**row, "unit": 10_000, "n_prompt_tokens": 1, "n_generated": 1}], appended)
    assert lake.read(
        lambda con: con.execute(
            "select sums_start, n_sums from sequences order by seq_id desc limit 1"
        ).fetchall()
    ) == [(committed, appended.n_sums[0])]
    assert check(lake)[0] == 0
