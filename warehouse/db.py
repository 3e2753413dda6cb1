"""The DuckDB warehouse file: connections and schema migrations.

Migrations are plain SQL files in ``warehouse/migrations`` named ``NNNN_name.sql``; each is applied once,
in order, in its own transaction, and recorded in ``schema_version``. A warehouse written by a newer xici is
refused rather than silently misread.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import duckdb

from xici import __version__
from xici.errors import XiciError

#: The storage format warehouses are created in. DuckDB 2.0 writes its own format (storage version 69) by
#: default, which the DuckDB 1.x CLIs people have installed (``pip install duckdb-cli``: 1.5) refuse to read;
#: the 1.4 format is read by DuckDB 1.4 and later, 2.0 included, and holds everything the warehouse needs.
STORAGE_VERSION = "v1.4.0"

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """All migrations shipped with this xici, in version order."""
    found = []
    for entry in resources.files("xici.warehouse").joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..N without gaps, found {versions}")
    return found


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The newest migration applied to this warehouse (0 for an empty file)."""
    # fetchall, not fetchone: a result left unfinished would block relations made on this connection later.
    [(exists,)] = con.execute(
        "select count(*) from information_schema.tables where table_name = 'schema_version'"
    ).fetchall()
    if not exists:
        return 0
    return con.execute("select coalesce(max(version), 0) from schema_version").fetchall()[0][0]


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Bring the warehouse to the newest schema; returns the version it ends at."""
    known = migrations()
    current = schema_version(con)
    if current > len(known):
        raise XiciError(
            f"this warehouse has schema version {current}, newer than this xici ({__version__}) knows "
            f"({len(known)})",
            fix="upgrade xici, or point --lake at another folder",
        )
    if current == 0:
        con.execute(
            "create table if not exists schema_version ("
            " version integer primary key, name varchar not null,"
            " xici_version varchar not null, applied_at timestamp not null default current_timestamp)"
        )
    for migration in known[current:]:
        with transaction(con):
            con.execute(migration.sql)
            con.execute(
                "insert into schema_version (version, name, xici_version) values (?, ?, ?)",
                [migration.version, migration.name, __version__],
            )
    return len(known)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One transaction on ``con``: all of the block lands, or none of it.

    On an error the transaction is rolled back and that error is raised. A commit that failed (a full disk)
    has already rolled back; the error of a second rollback would hide why it failed, so it is dropped.
    """
    con.execute("begin transaction")
    try:
        yield
        con.execute("commit")
    except BaseException:
        with suppress(duckdb.Error):
            con.execute("rollback")
        raise


class WarehouseLocked(XiciError):
    """Another process holds the warehouse file: DuckDB lets one process write it, and none read it
    meanwhile. :meth:`xici.warehouse.Lake.retrying` waits these out; anything else is not retried."""


def connect(path: Path, *, read_only: bool = False, migrating: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the warehouse file, migrating it first when opened for writing.

    This is where every connection to the warehouse is made (code goes through :meth:`Lake.read` and
    :meth:`Lake.write`). Another process's lock on the file raises :class:`WarehouseLocked`, any other
    failure to open it a plain :class:`XiciError`, instead of a DuckDB traceback. ``migrating=False`` opens
    a read-only connection on the file as it is, at whatever schema version (``xici lake check`` changes
    nothing).
    """
    if read_only and not path.exists():
        raise XiciError(
            "there is no warehouse here yet",
            where=str(path),
            fix="import a dataset first (xici datasets import ...), or pass the right --lake",
        )
    con = _open(path, read_only)
    if not read_only:
        migrate(con)
    elif migrating and schema_version(con) < len(migrations()):
        con.close()
        # A read-only connection cannot migrate: open once for writing to bring the file up to date.
        connect(path).close()
        con = _open(path, True)
    return con


def _create(path: Path) -> None:
    """Create an empty warehouse file in the storage format of :data:`STORAGE_VERSION`.

    DuckDB keeps a file's format for its whole life, so this one choice at creation decides which DuckDB
    versions (and CLIs) can open the lake.
    """
    con = duckdb.connect()
    try:
        con.execute(f"attach {_quoted(path)} as new_warehouse (storage_version '{STORAGE_VERSION}')")
    finally:
        con.close()


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to the file (created first when opened for writing), DuckDB's errors turned into
    ours."""
    try:
        if not read_only and not path.exists():
            _create(path)
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        raise _open_error(path, exc) from None


def attach_read_only(path: Path, alias: str) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB with the warehouse attached read-only as ``alias``.

    Unlike :func:`connect`, the connection is a database instance of its own: settings changed on it (the
    sandbox of ``xici sql``) reach no other connection of this process to the same file.
    """
    connect(path, read_only=True).close()  # no warehouse: XiciError saying what to run; old schema: migrated
    con = duckdb.connect()
    try:
        con.execute(f"attach {_quoted(path)} as {alias} (read_only)")
    except duckdb.IOException as exc:
        con.close()
        raise _open_error(path, exc) from None
    return con


def _open_error(path: Path, exc: duckdb.IOException) -> XiciError:
    """Why the warehouse file did not open: a lock (another process), the permissions, or a damaged file.

    Another process's lock is typed (:class:`WarehouseLocked`): DuckDB has no exception type of its own for
    it, so its message is read here, and only here."""
    text = str(exc)
    if "Could not set lock" in text:
        return WarehouseLocked(
            f"cannot open the warehouse: {exc}",
            where=str(path),
            fix="another xici process is writing this lake; wait for it to finish, then run the command "
            "again",
        )
    if "Permission denied" in text:
        return XiciError(
            f"cannot open the warehouse: {exc}",
            where=str(path),
            fix="check the permissions of the lake folder and its warehouse.duckdb",
        )
    return damaged(path, exc)


def damaged(path: Path, exc: Exception) -> XiciError:
    """The error for a warehouse file DuckDB cannot read (met when opening it, or later in a query)."""
    return XiciError(
        f"the warehouse file is damaged (truncated, or not a DuckDB database): {exc}",
        where=str(path),
        fix="restore warehouse.duckdb from a backup or copy; xici cannot repair it, and writes nothing to it "
        "until it reads again",
    )
