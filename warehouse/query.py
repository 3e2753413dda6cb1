"""SQL over the lake: one read-only connection on which a query sees the warehouse and the token relations.

``xici sql`` and the Python entry points open their connections here, so whatever guards or speeds up ad-hoc
SQL (a sandbox, filter pushdown into the Zarr reads) is written once and serves both.

The guard has two layers. The query must be one statement that only reads (a SELECT, an EXPLAIN of one, or a
PRAGMA that only describes); anything else (ATTACH, DETACH, COPY, INSTALL, LOAD, SET, CREATE, ...) is refused
naming the statement, before the warehouse is opened. Then the connection is DuckDB's own sandbox: a new
in-memory database with the warehouse attached read-only, external access off except for the current folder,
the gate store and the paths the caller allows to be read (the user's own Parquet / CSV / JSON files), and its
configuration locked, so no statement can turn any of this back on. The one file it may write is the
caller's ``out``, written by :func:`copy_to`, never by the query.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import duckdb

from xici.errors import XiciError
from xici.warehouse.gates import DamagedGates, local_folder
from xici.warehouse.lake import Lake
from xici.warehouse.pushdown import sequence_restrictions
from xici.warehouse.scan import DUCKDB_SETTINGS, TOKEN_RELATIONS, ScanStats

# The warehouse's name in a query (catalog), as when the file is opened directly.
CATALOG = "warehouse"

# File suffix -> options of DuckDB's COPY ... TO.
FORMATS = {
    ".csv": "format csv, header true",
    ".parquet": "format parquet",
    ".json": "format json, array true",
    ".jsonl": "format json",
    ".ndjson": "format json",
}

# PRAGMAs that only describe (all others change a setting, profile into a file, or import a database).
_DESCRIBING_PRAGMAS = frozenset(
    {
        "table_info",
        "show",
        "show_tables",
        "show_tables_expanded",
        "show_databases",
        "database_list",
        "database_size",
        "storage_info",
        "metadata_info",
        "functions",
        "collations",
        "version",
        "platform",
        "user_agent",
    }
)


def statement(query: str) -> str:
    """The query as it is run: surrounding blanks and trailing semicolons taken off."""
    return query.strip().rstrip(";").strip()


def mentioned_relations(query: str) -> list[str]:
    """The token relations a query names (whole words, any case): only those are streamed from Zarr."""
    return [name for name in TOKEN_RELATIONS if re.search(rf"\b{name}\b", query, flags=re.IGNORECASE)]


def check_read_only(query: str) -> None:
    """Refuse a query that is not exactly one statement that only reads, naming what it is."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise query_error(exc) from None
    if not statements:
        raise XiciError(
            "the query is empty", fix='give one SELECT statement, e.g. xici sql "select * from runs"'
        )
    if len(statements) > 1:
        raise XiciError(
            f"the query holds {len(statements)} statements; xici sql runs one at a time",
            fix="run them one by one (or join them into one SELECT)",
        )
    statement = statements[0]
    try:
        kind = statement.type.name
    except ValueError:  # a statement type the Python module cannot name (e.g. UPDATE EXTENSIONS)
        kind = "unknown"
    if kind == "SELECT":
        return
    if kind == "EXPLAIN":
        # EXPLAIN ANALYZE runs its statement: it may only explain a read.
        inner = re.sub(r"^\s*explain\s+(analyze\s+)?", "", statement.query, flags=re.IGNORECASE)
        if inner != statement.query:
            check_read_only(inner)
            return
    if kind == "PRAGMA" and _pragma_name(statement.query) in _DESCRIBING_PRAGMAS:
        return
    raise XiciError(
        f"xici sql is read-only and refuses {_keywords(statement.query)} (it runs one SELECT, EXPLAIN, "
        "DESCRIBE, SHOW or a PRAGMA that only describes)",
        where="the query",
        fix="write a result to a file with --out; read your own files with read_parquet / read_csv / "
        "read_json inside the SELECT",
    )


def _keywords(query: str) -> str:
    """The statement's leading words, as the user would name it (COPY, ATTACH, PRAGMA enable_profiling)."""
    words = re.findall(r"[A-Za-z_]+", query)[:2]
    if not words:
        return "this"
    if words[0].lower() == "pragma" and len(words) > 1:
        return f"PRAGMA {words[1].lower()}"
    if words[0].lower() in ("create", "drop", "alter", "update", "force") and len(words) > 1:
        return " ".join(words).upper()
    return words[0].upper()


def _pragma_name(query: str) -> str:
    match = re.match(r"\s*pragma\s+([A-Za-z_]+)", query, flags=re.IGNORECASE)
    return match.group(1).lower() if match else ""


def _check_runs(lake: Lake, con: duckdb.DuckDBPyConnection, run_ids: Sequence[int], names: list[str]) -> None:
    """Refuse unknown runs, and token_logits where no selected run stored logits."""
    known = {r[0] for r in con.execute("select run_id from runs").fetchall()}
    unknown = sorted(set(run_ids) - known)
    if unknown:
        raise XiciError(f"there is no run {', '.join(map(str, unknown))} in this lake", where="--run")
    if "token_logits" in names:
        gates = lake.gates(read_only=True, con=con)
        selected = run_ids or sorted(known)
        if not any(gates.has_run(r) and "router_logits" in gates.fields(r) for r in selected):
            raise XiciError(
                "no selected run stored router logits, so token_logits is empty",
                where="--run" if run_ids else "the query",
                fix="record with --store-logits, or use token_gates (the weights actually used)",
            )


def query_connection(
    lake: Lake,
    query: str,
    run_ids: Sequence[int] = (),
    *,
    out: Path | None = None,
    allow_read: Sequence[Path] = (),
    stats: ScanStats | None = None,
    runs_once: bool = True,
) -> duckdb.DuckDBPyConnection:
    """A sandboxed read-only connection on which ``query`` can run; the caller closes it.

    The query is checked first (:func:`check_read_only`). The token relations it names are registered,
    restricted to ``run_ids`` when given, and, when the connection runs the query and nothing else
    (``runs_once``), to the sequences its joins with ``sequences`` keep (:mod:`xici.warehouse.pushdown`):
    another query naming a token relation on the same connection would read it narrowed. Files it may
    read: the current folder, the gate store and ``allow_read`` (files or folders); the one it may write:
    ``out``, through :func:`copy_to`. ``stats`` counts the tokens the token scans read from Zarr.
    """
    check_read_only(query)
    if out is not None:
        lake.check_output(out)
        output_options(out)
    con = lake.attached(CATALOG)
    try:
        con.execute(f"use {CATALOG}")
        gates = local_folder(lake.gates_location)
        names = mentioned_relations(query)
        for name, value in DUCKDB_SETTINGS.items() if names else ():
            con.execute(f"set {name} = {value}")
        _sandbox(con, [Path.cwd(), *([] if gates is None else [gates]), *allow_read], out)
        if names:
            _check_runs(lake, con, run_ids, names)
            # In the sandbox: this runs parts of the query.
            only = sequence_restrictions(con, query) if runs_once else {}
            lake.register_token_relations(
                con, run_ids=run_ids or None, names=names, only_seq_ids=only, stats=stats
            )
    except BaseException:
        con.close()
        raise
    return con


def _sandbox(con: duckdb.DuckDBPyConnection, readable: Sequence[Path], out: Path | None) -> None:
    """Turn on DuckDB's sandbox for ``con``: files only in ``readable``, ``out``'s part file, no extensions
    to install or load, spilling to a temporary folder of this process, and every setting locked."""
    folders = [str(p.resolve()).rstrip(os.sep) + os.sep for p in readable if p.is_dir()]
    files = [str(p.resolve()) for p in readable if not p.is_dir()]
    if out is not None:
        files.append(str(_part_file(out)))
    spill = Path(tempfile.gettempdir()) / f"xici-sql-{os.getpid()}"
    for name, value in (
        ("temp_directory", str(spill)),
        ("allowed_directories", folders),
        ("allowed_paths", files),
        ("enable_external_access", False),
        ("autoinstall_known_extensions", False),
        ("autoload_known_extensions", False),
        ("lock_configuration", True),
    ):
        con.execute(f"set {name} = {_literal(value)}")


def _literal(value: bool | str | list[str]) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return "'" + value.replace("'", "''") + "'"


def query_error(exc: duckdb.Error) -> XiciError:
    """The message for a query that failed to run on a :func:`query_connection`."""
    damage = DamagedGates.found_in(str(exc))
    if damage is not None:
        return damage
    if isinstance(exc, duckdb.PermissionException):
        return XiciError(
            f"the query was refused by the sandbox: {exc}",
            fix="xici sql reads files only in the current folder and the paths given with --allow-read "
            "(absolute paths without '..'); add the file or its folder with --allow-read",
        )
    return XiciError(f"the query failed: {exc}", fix="Check the SQL; xici sql --help lists the tables")


def output_options(out: Path) -> str:
    """DuckDB's COPY options for ``out``, from its suffix."""
    if out.suffix.lower() not in FORMATS:
        raise XiciError(
            f"cannot tell the output format from {out.name!r}",
            where="--out",
            fix=f"end the file name with one of {', '.join(FORMATS)}",
        )
    return FORMATS[out.suffix.lower()]


def _part_file(out: Path) -> Path:
    """Where a result is written before it replaces ``out`` (so a failed query leaves no half file)."""
    out = out.expanduser().resolve()
    return out.with_name(f".{out.name}.part")


def copy_to(con: duckdb.DuckDBPyConnection, query: str, out: Path) -> int:
    """Write the result of ``query`` to ``out`` (the connection's ``out``); returns the rows written."""
    part = _part_file(out)
    target = str(part).replace("'", "''")
    try:
        written = con.execute(
            f"copy ({query}\n) to '{target}' ({output_options(out)}, use_tmp_file false)"
        ).fetchone()[0]
        part.replace(out.expanduser().resolve())
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return written
