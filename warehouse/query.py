"""SQL over the lake: one read-only connection on which a query sees the warehouse and the token relations.

``xici sql`` and the Python entry points open their connections here, so whatever guards or speeds up ad-hoc
SQL (a sandbox, filter pushdown into the Zarr reads) is written once and serves both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import duckdb

from xici.errors import XiciError
from xici.warehouse.lake import TOKEN_RELATIONS, Lake


def mentioned_relations(query: str) -> list[str]:
    """The token relations a query names (whole words, any case): only those are streamed from Zarr."""
    return [name for name in TOKEN_RELATIONS if re.search(rf"\b{name}\b", query, flags=re.IGNORECASE)]


def _check_runs(lake: Lake, con: duckdb.DuckDBPyConnection, run_ids: Sequence[int], names: list[str]) -> None:
    """Refuse unknown runs, and token_logits where no selected run stored logits."""
    known = {r[0] for r in con.execute("select run_id from runs").fetchall()}
    unknown = sorted(set(run_ids) - known)
    if unknown:
        raise XiciError(f"there is no run {', '.join(map(str, unknown))} in this lake", where="--run")
    if "token_logits" in names:
        gates = lake.gates(read_only=True)
        selected = run_ids or sorted(known)
        if not any(gates.has_run(r) and "router_logits" in gates.fields(r) for r in selected):
            raise XiciError(
                "no selected run stored router logits, so token_logits is empty",
                where="--run" if run_ids else "the query",
                fix="record with --store-logits, or use token_gates (the weights actually used)",
            )


def query_connection(lake: Lake, query: str, run_ids: Sequence[int] = ()) -> duckdb.DuckDBPyConnection:
    """A read-only warehouse connection on which ``query`` can run; the caller closes it.

    The token relations the query names are registered on it, restricted to ``run_ids`` when given.
    """
    con = lake.connect(read_only=True)
    try:
        names = mentioned_relations(query)
        if names:
            _check_runs(lake, con, run_ids, names)
            lake.register_token_relations(con, run_ids=run_ids or None, names=names)
    except BaseException:
        con.close()
        raise
    return con
