"""A read-only consistency check of a lake (``xici lake check``, an fsck).

What it checks: the warehouse's schema version; the lake's identity against the gate store's owner; that
every committed sequence's tokens and gate sums are in the gate store, every chunk present and intact
(checksums, or a decode for arrays written before checksums); that the store holds nothing the warehouse does
not account for (arrays of unknown runs, shards without a committed sequence, tokens or gate sum rows past the
committed ones of a finished run); and runs left 'running' by a process that is gone. The analyses' part
(inputs changed since) is :func:`xici.analysis.identify.changed_analyses`.

Nothing is written: the warehouse is opened read-only at the schema version it has (an older one is not
migrated), the gate store read-only and without being claimed. Chunks with checksums are checked without
decompressing them, so the check reads each stored byte once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from xici.warehouse.db import connect, migrations, schema_version
from xici.warehouse.gates import SUMS, GateStore, Shard, id_ranges
from xici.warehouse.lake import Lake

#: Problems listed in a finding's detail before the rest is counted.
_LISTED = 8

# (run, shard) -> (sequences, committed tokens, committed gate sum rows)
Committed = dict[tuple[int, Shard], tuple[int, int, int]]


@dataclass(frozen=True)
class Finding:
    """One check: what was checked, whether it holds, and what was found."""

    check: str
    ok: bool
    detail: str


def open_as_is(lake: Lake) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the warehouse at the schema version it has (waiting out writers' locks)."""
    return lake.retrying(lambda _: connect(lake.warehouse_path, read_only=True, migrating=False))


def check_lake(
    lake: Lake,
    con: duckdb.DuckDBPyConnection,
    *,
    on_tokens: Callable[[int, int], None] | None = None,
) -> list[Finding]:
    """Every check but the analyses' (see the module notes); ``on_tokens(done, total)`` reports how far the
    chunk check is, in tokens times arrays."""
    version, known = schema_version(con), len(migrations())
    if version > known:
        return [Finding("schema", False, f"version {version}, newer than this xici knows ({known}): upgrade")]
    behind = "" if version == known else "; the next command that writes migrates it"
    findings = [Finding("schema", True, f"version {version} of {known}{behind}")]
    store = GateStore(lake.gates_location, read_only=True)
    runs = dict(con.execute("select run_id, status from runs").fetchall())
    identity = _identity(con, store, runs)
    findings.append(identity)
    has_sums = con.execute(
        "select count(*) from information_schema.columns"
        " where table_name = 'sequences' and column_name = 'n_sums'"
    ).fetchone()[0]
    sums = "coalesce(max(sums_start + n_sums), 0)" if has_sums else "0"  # older schemas: no gate sums
    committed = {
        (run_id, shard): (n, end, sum_rows)
        for run_id, shard, n, end, sum_rows in con.execute(
            f"select run_id, shard, count(*), max(token_start + n_tokens), {sums} from sequences group by all"
        ).fetchall()
    }
    if identity.ok:
        findings.append(_tokens(con, store, committed, on_tokens))
        findings.append(_orphans(store, runs, committed))
    else:
        findings.append(Finding("tokens", False, "not checked: the gate store is not this lake's"))
    findings.append(_running(lake, con))
    return findings


def without_warehouse(lake: Lake) -> list[Finding]:
    """A lake folder whose warehouse is missing: what its gate store still holds."""
    store = GateStore(lake.gates_location, read_only=True)
    owner = f" (it belongs to lake {store.owner})" if store.owner else ""
    return [
        Finding("schema", False, f"there is no {lake.warehouse_path.name} in {lake.root}"),
        Finding("identity", False, f"the gate store at {store.location} holds {_held(store)}{owner}"),
    ]


def _of(run_id: int, shard: Shard) -> str:
    return f"run {run_id}" if shard is None else f"shard {shard} of run {run_id}"


def _held(store: GateStore) -> str:
    """The runs a gate store holds, with their tokens (all shards)."""
    runs = [
        f"{run_id} ({sum(store.length(run_id, s) for s in [None, *store.shards(run_id)]):,} tokens)"
        for run_id in store.run_ids()
    ]
    return f"runs {', '.join(runs)}" if runs else "no run"


def _identity(con: duckdb.DuckDBPyConnection, store: GateStore, runs: dict[int, str]) -> Finding:
    """The gate store is this lake's, or unclaimed and holding only this warehouse's runs."""
    has_id = con.execute(
        "select count(*) from information_schema.tables where table_name = 'lake'"
    ).fetchall()
    lake_id = str(con.execute("select lake_id from lake").fetchall()[0][0]) if has_id[0][0] else None
    owner, where = store.owner, store.location
    if owner is not None and owner != lake_id:
        return Finding(
            "identity",
            False,
            f"the gate store at {where} belongs to lake {owner}, not to this one ({lake_id or 'no id yet'}); "
            f"it holds {_held(store)}",
        )
    strangers = [r for r in store.run_ids() if r not in runs]
    if owner is None and strangers:
        return Finding(
            "identity",
            False,
            f"the gate store at {where} holds runs this warehouse does not know "
            f"({', '.join(map(str, strangers))}); it holds {_held(store)}",
        )
    mine = f"lake {lake_id}" if lake_id else "no id yet (older schema: drawn by the next command that writes)"
    claimed = "its own" if owner else "not claimed yet (the next write claims it)"
    return Finding("identity", True, f"{mine}; gate store at {where}: {claimed}")


def _tokens(
    con: duckdb.DuckDBPyConnection,
    store: GateStore,
    committed: Committed,
    on_tokens: Callable[[int, int], None] | None,
) -> Finding:
    """Every committed token range present and intact."""
    present = {key: store.has_run(*key) for key in committed}
    total = sum(end * len(store.fields(*key)) for key, (_, end, _) in committed.items() if present[key])
    done, problems, checksummed = 0, [], 0

    def advance(tokens: int) -> None:
        nonlocal done
        done += tokens
        if on_tokens is not None:
            on_tokens(done, total)

    for (run_id, shard), (n, end, sums) in sorted(
        committed.items(), key=lambda i: (i[0][0], -1 if i[0][1] is None else i[0][1])
    ):
        if not present[(run_id, shard)]:
            problems.append(f"{_of(run_id, shard)}: {n:,} sequences committed, but no token arrays")
            continue
        checksummed += store.has_checksums(run_id, shard)
        for damage in store.verify(run_id, end, shard, sums=sums, progress=advance):
            start, length = ("sums_start", "n_sums") if damage.field == SUMS else ("token_start", "n_tokens")
            seq_ids = con.execute(
                "select seq_id from sequences where run_id = ? and shard is not distinct from ?"
                f" and {start} < ? and {start} + {length} > ?",
                [run_id, shard, damage.tokens[1], damage.tokens[0]],
            ).fetchnumpy()["seq_id"]
            problems.append(damage.naming(f"seq_id {id_ranges(seq_ids)}").what)
    if problems:
        return Finding("tokens", False, _listed(problems))
    n_sequences = sum(n for n, _, _ in committed.values())
    n_tokens = sum(end for _, end, _ in committed.values())
    n_sums = sum(sums for _, _, sums in committed.values())
    older = "" if checksummed == len(committed) else ", the older ones decoded"
    return Finding(
        "tokens",
        True,
        f"{n_sequences:,} sequences, {n_tokens:,} tokens, {n_sums:,} gate sum rows: every chunk present and "
        "intact (token arrays of "
        f"{checksummed} of {len(committed)} runs and shards with checksums{older})",
    )


def _orphans(store: GateStore, runs: dict[int, str], committed: Committed) -> Finding:
    """Arrays the warehouse does not account for."""
    problems = []
    for run_id in store.run_ids():
        if run_id not in runs:
            problems.append(f"run {run_id}: token arrays of no run of this warehouse")
            continue
        if runs[run_id] != "finished":
            continue  # resuming cuts whatever a stopped writer left
        for shard in [None, *store.shards(run_id)]:
            _, end, sums = committed.get((run_id, shard), (0, 0, 0))
            if shard is not None and end == 0:
                problems.append(f"{_of(run_id, shard)}: a shard without any committed sequence")
                continue
            if store.length(run_id, shard) > end:
                extra = store.length(run_id, shard) - end
                problems.append(f"{_of(run_id, shard)}: {extra:,} tokens past the committed ones")
            if store.sums_length(run_id, shard) > sums:
                extra = store.sums_length(run_id, shard) - sums
                problems.append(f"{_of(run_id, shard)}: {extra:,} gate sum rows past the committed ones")
    if problems:
        return Finding("orphans", False, _listed(problems))
    return Finding("orphans", True, "none: every array belongs to a run and holds only committed tokens")


def _running(lake: Lake, con: duckdb.DuckDBPyConnection) -> Finding:
    """Runs left 'running' by a process that is gone (one being written now is fine)."""
    rows = con.execute(
        "select r.run_id, r.kind, r.n_units, (select count(*) from sequences s where s.run_id = r.run_id)"
        " from runs r where r.status = 'running' order by 1"
    ).fetchall()
    now = [run_id for run_id, *_ in rows if lake.is_being_written(run_id)]
    left = [f"run {r} ({kind}, {done} of {n_units} units)" for r, kind, n_units, done in rows if r not in now]
    writing = f"; being written now: run {', '.join(map(str, now))}" if now else ""
    if left:
        return Finding(
            "running",
            False,
            f"left running: {', '.join(left)}; run the command that started each again to finish it{writing}",
        )
    return Finding("running", True, f"none left running{writing}")


def _listed(problems: list[str]) -> str:
    more = len(problems) - _LISTED
    return "; ".join(problems[:_LISTED]) + (f"; and {more} more" if more > 0 else "")
