"""``xici sql`` cannot change the lake: statements that write are refused, the connection is DuckDB's sandbox,
and outputs of sql, export and report never land in the warehouse or the gate store. On a recorded lake."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import torch
from click.testing import CliRunner
from test_recorder_support import direct, new_lake

from xici.cli.main import cli
from xici.errors import XiciError
from xici.recorder.run import RecordSpec, record
from xici.warehouse import Lake
from xici.warehouse.query import query_connection

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lake(tiny_checkpoint, tmp_path_factory) -> Lake:
    lake = new_lake(tmp_path_factory.mktemp("sandbox") / "lake")
    model = str(tiny_checkpoint("qwen3_moe"))
    record(
        lake, RecordSpec(model=model, dataset="toy", max_new_tokens=3, limit=2), device="cpu", batch_size=8
    )
    return lake


def xici(lake: Lake, *args: str):
    return CliRunner().invoke(cli, ["--lake", str(lake.root), *args])


def fingerprint(lake: Lake) -> dict[str, str]:
    """Every file of the lake folder and its content hash: equal before and after means nothing changed."""
    return {
        str(p.relative_to(lake.root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(lake.root.rglob("*"))
        if p.is_file() and p.suffix != ".lock"
    }


def rows(lake: Lake) -> list[int]:
    return [direct(lake, f"select count(*) from {t}")[0][0] for t in ("runs", "sequences", "grades")]


def test_the_reported_attack_changes_nothing(lake: Lake, tmp_path: Path) -> None:
    before, counts = fingerprint(lake), rows(lake)
    scratch = tmp_path / "scratch.duckdb"
    attack = (
        f"attach '{scratch}' as s (READ_WRITE); use s; detach warehouse; "
        f"attach '{lake.warehouse_path}' as w (READ_WRITE); delete from w.grades; delete from w.runs"
    )
    out = xici(lake, "sql", attack)
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "6 statements" in out.output
    for statement in attack.split("; "):
        one = xici(lake, "sql", statement)
        assert one.exit_code == 1 and "read-only and refuses" in one.output, statement
    zarr_json = lake.zarr_path / "runs" / "1" / "topk_weights" / "zarr.json"
    copy = xici(lake, "sql", f"copy (select 1) to '{zarr_json}' (format csv)")
    assert copy.exit_code == 1 and "refuses COPY" in copy.output
    assert fingerprint(lake) == before and rows(lake) == counts
    assert not scratch.exists()


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        ("attach 'x.duckdb' as x", "ATTACH"),
        ("detach warehouse", "DETACH"),
        ("copy runs to 'runs.csv'", "COPY"),
        ("copy runs from 'runs.csv'", "COPY"),
        ("install httpfs", "INSTALL"),
        ("load json", "LOAD"),
        ("set threads = 1", "SET"),
        ("reset threads", "RESET"),
        ("use memory", "USE"),
        ("pragma enable_profiling", "PRAGMA enable_profiling"),
        ("pragma memory_limit = '1GB'", "PRAGMA memory_limit"),
        ("import database 'somewhere'", "IMPORT"),
        ("export database 'somewhere'", "EXPORT"),
        ("create table x as select 1", "CREATE TABLE"),
        ("insert into runs select * from runs", "INSERT"),
        ("update runs set status = 'x'", "UPDATE RUNS"),
        ("call checkpoint()", "CALL"),
        ("checkpoint", "CHECKPOINT"),
        ("vacuum", "VACUUM"),
        ("begin transaction", "BEGIN"),
        ("explain analyze copy (select 1) to 'x.csv'", "COPY"),
        ("update extensions", "UPDATE EXTENSIONS"),
    ],
)
def test_each_writing_statement_is_refused_by_name(
    lake: Lake, statement: str, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = xici(lake, "sql", statement)
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert f"refuses {named} " in out.output, out.output
    assert list(tmp_path.iterdir()) == []


def test_reading_statements_still_run(lake: Lake) -> None:
    for query in (
        "show tables",
        "describe runs",
        "pragma table_info('runs')",
        "explain select count(*) from tokens",
        "explain analyze select count(*) from sequences",
        "select * from pragma_version()",
        "summarize select * from sequences",
    ):
        out = xici(lake, "sql", query)
        assert out.exit_code == 0, (query, out.output)


@pytest.mark.parametrize("query", ["", "   ", ";", "/* only a comment */"])
def test_an_empty_query_is_refused(lake: Lake, query: str) -> None:
    out = xici(lake, "sql", query)
    assert out.exit_code == 1 and "the query is empty" in out.output and "Traceback" not in out.output


def test_own_files_are_readable_from_the_current_folder_and_allowed_paths(
    lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    seq_ids = [s for (s,) in direct(lake, "select seq_id from sequences")]
    (here / "mine.csv").write_text("seq_id,label\n" + "".join(f"{s},s{s}\n" for s in seq_ids))
    (elsewhere / "other.csv").write_text("a\n1\n")
    monkeypatch.chdir(here)
    join = xici(
        lake,
        "sql",
        "select count(*) as n from tokens join read_csv('mine.csv') using (seq_id)",
        "--out",
        "n.csv",
    )
    assert join.exit_code == 0, join.output
    n_tokens = direct(lake, "select sum(n_tokens) from sequences")[0][0]
    assert (here / "n.csv").read_text().splitlines() == ["n", str(n_tokens)]

    other = str(elsewhere / "other.csv")
    refused = xici(lake, "sql", f"select * from '{other}'")
    assert refused.exit_code == 1 and "sandbox" in refused.output and "--allow-read" in refused.output
    secret = xici(lake, "sql", "select * from read_text('/etc/hostname')")
    assert secret.exit_code == 1 and "sandbox" in secret.output
    for allowed in (elsewhere, elsewhere / "other.csv"):
        ok = xici(lake, "sql", f"select a from '{other}'", "--allow-read", str(allowed))
        assert ok.exit_code == 0 and " 1 " in ok.output, ok.output


def test_outputs_never_land_in_the_lake(lake: Lake, tmp_path: Path) -> None:
    before = fingerprint(lake)
    inside = [
        lake.zarr_path / "zarr.json",
        lake.zarr_path / "runs" / "1" / "token_ids" / "zarr.json",
        lake.zarr_path / "new.csv",
        lake.warehouse_path,
        lake.root / "warehouse.duckdb.wal",
        lake.root / "lake.json",
    ]
    for path in inside + [p.with_name(p.name + ".csv") for p in inside]:
        sql = xici(lake, "sql", "select 1 as a", "--out", str(path))
        assert sql.exit_code == 1 and "inside the lake's own files" in sql.output, (path, sql.output)
        export = xici(lake, "export", "experts", "--analysis", "1", "--out", str(path))
        assert export.exit_code == 1 and "inside the lake's own files" in export.output, export.output
    link = tmp_path / "link.csv"
    link.symlink_to(lake.zarr_path / "zarr.json")
    through_link = xici(lake, "sql", "select 1 as a", "--out", str(link))
    assert through_link.exit_code == 1 and "inside the lake's own files" in through_link.output
    for folder in (lake.root, lake.zarr_path / "runs"):
        report = xici(lake, "report", "--out", str(folder))
        assert report.exit_code == 1 and "inside the lake's own files" in report.output, report.output
    assert fingerprint(lake) == before
    someones = tmp_path / "photos"
    someones.mkdir()
    (someones / "ablation.png").write_bytes(b"a photo")
    report = xici(lake, "report", "--out", str(someones))
    assert report.exit_code == 1 and "holds other files and no earlier report" in report.output
    assert [p.name for p in someones.iterdir()] == ["ablation.png"]
    assert (someones / "ablation.png").read_bytes() == b"a photo"
    fine = xici(lake, "sql", "select 1 as a", "--out", str(lake.root / "result.csv"))
    assert fine.exit_code == 0 and (lake.root / "result.csv").read_text() == "a\n1\n"
    (lake.root / "result.csv").unlink()


def test_a_failed_query_leaves_an_existing_out_file_alone(lake: Lake, tmp_path: Path) -> None:
    out = tmp_path / "keep.parquet"
    out.write_bytes(b"earlier result")
    failed = xici(lake, "sql", "select error('boom') from sequences", "--out", str(out))
    assert failed.exit_code == 1 and "boom" in failed.output
    assert out.read_bytes() == b"earlier result"
    assert list(tmp_path.iterdir()) == [out]


def test_the_python_connection_is_sandboxed_and_private(lake: Lake, tmp_path: Path) -> None:
    """query_connection (under the Python API too) refuses the same statements and its locked settings
    reach no other connection of the process."""
    with pytest.raises(XiciError, match="refuses ATTACH"):
        query_connection(lake, f"attach '{tmp_path / 'x.duckdb'}' as x")
    con = query_connection(lake, "select count(*) from token_gates")
    try:
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("set enable_external_access = true")
        with pytest.raises(duckdb.Error):
            con.execute(f"copy (select 1) to '{tmp_path / 'x.csv'}'")
        with pytest.raises(duckdb.Error):
            con.execute("delete from runs")
        assert con.execute("select count(*) from token_gates").fetchone()[0] > 0
        # Another connection of this process to the same warehouse keeps its full access.
        other = duckdb.connect(str(lake.warehouse_path), read_only=True)
        other.execute(f"copy (select 1 as a) to '{tmp_path / 'y.csv'}'")
        other.close()
        assert lake.read(
            lambda c: c.execute("select current_setting('enable_external_access')").fetchone()[0]
        )
    finally:
        con.close()
    assert (tmp_path / "y.csv").exists() and not (tmp_path / "x.csv").exists()


def test_sql_waits_for_a_writer_holding_the_warehouse(lake: Lake) -> None:
    """A recording holds the warehouse only while it commits: a query meeting that lock waits, then runs."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            "time.sleep(1.5); c.close()",
            str(lake.warehouse_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        out = xici(lake, "sql", "select count(*) as n from runs")
        waited = time.monotonic() - start
    finally:
        holder.wait(timeout=30)
    assert out.exit_code == 0, out.output
    assert waited > 0.5  # it met the lock rather than running before the writer took it


def test_selects_that_would_change_a_setting_meet_the_locked_sandbox(lake: Lake, tmp_path: Path) -> None:
    """Table functions are SELECTs, so the statement check lets them through: the locked configuration of
    DuckDB's sandbox is what stops them."""
    for query in (
        f"select * from enable_logging(storage = 'file', storage_path = '{tmp_path / 'logs'}')",
        "select * from enable_profiling()",
    ):
        out = xici(lake, "sql", query)
        assert out.exit_code == 1 and "the configuration has been locked" in out.output, out.output
    assert list(tmp_path.iterdir()) == []
