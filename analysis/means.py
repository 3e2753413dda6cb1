"""Sequence and language means, materialised once per run so analyses never rescan Zarr.

:func:`ensure_means` runs the SQL macro ``seq_means`` (sql/seq_means.sql) over the run's gate sums
(sql/gate_sums.sql), taken while its ``token_gates`` are read from Zarr, into the table of the same name,
then fills ``lang_means`` from the macro ``lang_means`` (sql/lang_means.sql). ``seq_means_builds`` records
the run's sequence and token counts at build time; the next call compares them with the run as it is now,
and rebuilds only when the run has changed (sequences are only ever appended, so the counts tell).

The run is aggregated and committed in parts of whole sequences, so memory stays at one part however
large the run; the gate sums of a part are taken in numpy, in the integers gate_sums.sql adds, so the
means have the same bits as the macros over every row of token_gates (tested) while some 40 times fewer
rows reach DuckDB. The build record is written last, in the transaction that also fills ``lang_means``: a
build interrupted midway leaves rows without a record, and the next call, finding no matching record,
deletes them and starts over. So the means that analyses read are always complete.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from xici.errors import XiciError
from xici.progress import progress_bar
from xici.sql import apply_views
from xici.warehouse import Lake
from xici.warehouse.scan import ScanStats

_SUMS_VIEW = "xici_gate_sums"
# Gate sums per insert: fewer, larger statements cost less (about 1/5 less CPU than one per read).
ROWS_PER_INSERT = 1 << 20


@dataclass(frozen=True)
class RunInfo:
    """What the analysis needs to know about a run."""

    run_id: int
    dataset: str
    model: str
    n_moe_layers: int
    n_experts: int
    top_k: int
    n_sequences: int
    n_tokens: int
    n_units: int
    status: str

    @property
    def unfinished(self) -> bool:
        """Units of the run are still missing (it is being recorded, or was stopped before the end)."""
        return self.status != "finished" and self.n_sequences < self.n_units


def run_info(con: duckdb.DuckDBPyConnection, run_id: int) -> RunInfo:
    """The run's shape and size; a run that does not exist or has no sequences is the user's mistake."""
    rows = con.execute(
        "select r.dataset, r.model, r.n_moe_layers, r.n_experts, r.top_k, count(s.seq_id), "
        "coalesce(sum(s.n_tokens), 0), r.n_units, r.status "
        "from runs r left join sequences s on s.run_id = r.run_id "
        "where r.run_id = ? and r.kind = 'record' group by all",
        [run_id],
    ).fetchall()
    if not rows:
        raise XiciError(
            f"there is no recording run {run_id} in this lake",
            where="--run",
            fix="pass the id of a recording run (xici sql 'select run_id, dataset, model from runs')",
        )
    info = RunInfo(run_id, *rows[0])
    if info.n_sequences == 0:
        raise XiciError(
            f"run {run_id} has no sequences yet", where="--run", fix="record it first (xici record)"
        )
    return info


def ensure_means(lake: Lake, run_id: int) -> bool:
    """Build the run's means unless they match the run as it is now; returns whether they were built."""

    def stale(con: duckdb.DuckDBPyConnection) -> RunInfo | None:
        """The run's info when its means must be built (the old ones deleted), None when they are current."""
        apply_views(con)
        info = run_info(con, run_id)
        built = con.execute(
            "select n_sequences, n_tokens from seq_means_builds where run_id = ?", [run_id]
        ).fetchall()
        if built == [(info.n_sequences, info.n_tokens)]:
            return None
        for table in ("seq_means", "lang_means", "seq_means_builds"):
            con.execute(f"delete from {table} where run_id = ?", [run_id])
        return info

    info = lake.write(stale)
    if info is None:
        return False
    lake.write(lambda con: _insert_seq_means(lake, con, info), atomic=False)

    def finish(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("insert into lang_means select * from lang_means(?)", [run_id])
        con.execute(
            "insert into seq_means_builds (run_id, n_sequences, n_tokens) values (?, ?, ?)",
            [run_id, info.n_sequences, info.n_tokens],
        )

    lake.write(finish)
    return True


def _insert_seq_means(lake: Lake, con: duckdb.DuckDBPyConnection, info: RunInfo) -> None:
    """Fill seq_means a part at a time: the macro over the gate sums of some whole sequences
    (:meth:`TokenScan.gate_sums`, about ``ROWS_PER_INSERT`` of them), committed on its own."""
    stats = ScanStats()
    scan = lake.token_scan(con, "token_gates", run_ids=[info.run_id], stats=stats)
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"means of run {info.run_id}", total=info.n_tokens)
        stats.on_change = lambda s: bar.update(task, completed=s.read)
        parts: list[pa.RecordBatch] = []
        for part in itertools.chain(scan.gate_sums(), [None]):  # None: the end, insert the rest
            if part is not None:
                parts.append(part)
            if parts and (part is None or sum(p.num_rows for p in parts) >= ROWS_PER_INSERT):
                con.register(_SUMS_VIEW, pa.Table.from_batches(parts))
                con.execute(f"insert into seq_means select * from seq_means('{_SUMS_VIEW}')")
                con.unregister(_SUMS_VIEW)
                parts = []


def weight_per_token(con: duckdb.DuckDBPyConnection, run_id: int) -> float | None:
    """The gate weight a token's selected experts carry in all, read from the run's first sequence.

    1 for gates that renormalise; ``routed_scaling_factor`` for DeepSeek-V3-style gates (2.5 there); below
    1 for softmax gates that do not renormalise. m summed over a layer's experts is the sequence's mean of
    that sum, so the average over layers is the scale that m, deltas and tau live on (docs/method.md,
    "Weights and the scale of tau"). None before the means are built.
    """
    [(total,)] = con.execute(
        "select sum(m) / any_value(r.n_moe_layers) from seq_means m join runs r using (run_id) "
        "where m.run_id = $run and m.seq_id = (select min(seq_id) from sequences where run_id = $run)",
        {"run": run_id},
    ).fetchall()
    return total
