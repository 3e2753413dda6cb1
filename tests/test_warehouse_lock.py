"""Another process's lock on the warehouse file is a typed error where the connection is made, and the lake's
one way in (read/write) waits it out; other failures to open are reported at once, never retried."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from xici.errors import XiciError
from xici.warehouse import Lake
from xici.warehouse.db import WarehouseLocked, connect


def hold(path: Path, seconds: float) -> subprocess.Popen[str]:
    """A second process holding the warehouse open for writing for ``seconds`` (returns once it holds it)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            f"time.sleep({seconds}); c.close()",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_warehouse_raises_the_lock_error_and_read_write_wait_for_it(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    lake.write(lambda con: con.execute("create table t as select 1 as x"))
    holder = hold(lake.warehouse_path, 1.5)
    try:
        with pytest.raises(WarehouseLocked) as locked:
            connect(lake.warehouse_path, read_only=True)
        assert isinstance(locked.value, XiciError) and locked.value.where == str(lake.warehouse_path)
        start = time.monotonic()
        assert lake.read(lambda con: con.execute("select x from t").fetchall()) == [(1,)]
        waited = time.monotonic() - start
        lake.write(lambda con: con.execute("insert into t values (2)"))
    finally:
        holder.wait(timeout=30)
    assert waited > 0.5  # it met the lock and waited rather than failing
    assert lake.read(lambda con: con.execute("select x from t order by x").fetchall()) == [(1,), (2,)]


def test_a_damaged_warehouse_is_an_error_at_once_not_a_lock(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    lake.root.mkdir()
    lake.warehouse_path.write_bytes(b"not a database" * 100)
    start = time.monotonic()
    with pytest.raises(XiciError, match="damaged") as failed:
        lake.read(lambda con: con.execute("select 1").fetchall())
    assert not isinstance(failed.value, WarehouseLocked)
    assert time.monotonic() - start < 5  # not retried for LOCK_WAIT_S
