"""Sequence and language means, materialised once per run so analyses never rescan Zarr.

:func:`ensure_means` fills the tables ``seq_means`` and ``lang_means`` with what the SQL macros of the
same names (sql/seq_means.sql, sql/lang_means.sql) give over the run's gate sums (sql/gate_sums.sql).
``seq_means_builds`` records the run's sequence and token counts at build time; the next call compares
them with the run as it is now, and rebuilds only when the run has changed (sequences are only ever
appended, so the counts tell).

Where the rows come from, fastest first:

- A recording commits each sequence's ``seq_means`` rows with the sequence, computed from its gate sums
  (:meth:`xici.warehouse.Lake.commit_rows`, :mod:`xici.warehouse.sums_kernel`). When every sequence of the
  run has them, the build only adds up the language means from the gate sums (read in threads ahead, no
  row built): well under a full scan's time.
- A run whose sequences all kept gate sums but whose ``seq_means`` rows are not all there: every row is
  computed again from the sums and streamed into one INSERT.
- A run with a sequence recorded without gate sums (before xici kept them): the rows are computed while the
  run's gates are read from Zarr (:mod:`xici.analysis.means_kernel`, in the scan's threads, a read of whole
  sequences at a time) and streamed into one INSERT, so no row of ``token_gates`` is built and memory
  stays at a few reads however large the run.

Every path adds the weights as the same integers as gate_sums.sql and rounds and ranks as seq_means.sql
does, and adds up the language means on the way, so the means have the macros' bits (tested). A build is
one transaction: the old means deleted, the new ones and the build record inserted, all of it or none (an
interrupted build leaves the means it found), so the means that analyses read are always complete and
match their record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import duckdb
import numpy as np
import pyarrow as pa

from xici.errors import XiciError
from xici.progress import progress_bar
from xici.sql import apply_views
from xici.warehouse import Lake
from xici.warehouse.gates import SEQ_MEANS, UNITS, DamagedGates
from xici.warehouse.scan import read_ahead

_ROWS_VIEW = "xici_means_rows"
SUM_ROWS_PER_READ = 1 << 19  # gate sum rows per read (12 MB): 8 chunks


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

    def build(con: duckdb.DuckDBPyConnection) -> bool:
        apply_views(con)
        info = run_info(con, run_id)
        built = con.execute(
            "select n_sequences, n_tokens from seq_means_builds where run_id = ?", [run_id]
        ).fetchall()
        if built == [(info.n_sequences, info.n_tokens)]:
            return False
        for table in ("lang_means", "seq_means_builds"):
            con.execute(f"delete from {table} where run_id = ?", [run_id])
        if _recorded(con, info):
            languages = _add_languages(lake, con, info)
        else:
            con.execute("delete from seq_means where run_id = ?", [run_id])
            languages = _insert_seq_means(lake, con, info)
        con.register(_ROWS_VIEW, languages.rows())
        con.execute(f"insert into lang_means select ?, * from {_ROWS_VIEW}", [run_id])
        con.unregister(_ROWS_VIEW)
        con.execute(
            "insert into seq_means_builds (run_id, n_sequences, n_tokens) values (?, ?, ?)",
            [run_id, info.n_sequences, info.n_tokens],
        )
        return True

    return lake.write(build)


def _recorded(con: duckdb.DuckDBPyConnection, info: RunInfo) -> bool:
    """Whether the run's seq_means are all in the table, committed with its sequences (every sequence
    kept its gate sums, and each one with sums has rows)."""
    [(missing, with_sums, with_rows)] = con.execute(
        "select count(*) filter (where n_sums is null), count(*) filter (where n_sums > 0), "
        "(select count(distinct seq_id) from seq_means where run_id = $run) "
        "from sequences where run_id = $run",
        {"run": info.run_id},
    ).fetchall()
    return missing == 0 and with_sums == with_rows


def _add_languages(lake: Lake, con: duckdb.DuckDBPyConnection, info: RunInfo) -> _Languages:
    """The language means of a run whose seq_means were committed with its sequences, added up from its
    gate sums (the same sums as :func:`_insert_seq_means`, no rows built)."""
    languages = _Languages(con, info)
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"language means of run {info.run_id}", total=info.n_tokens)
        for tokens, (_, units, frequency) in _from_sums(lake, con, info, languages, emit=False):
            languages.add(units, frequency)
            bar.advance(task, tokens)
    return languages


class _Languages:
    """The run's languages, and its language means added up read after read (means_kernel)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, info: RunInfo) -> None:
        seqs = con.execute(
            "select seq_id, lang from sequences where run_id = ? order by seq_id", [info.run_id]
        ).fetchnumpy()
        self.seq_ids = seqs["seq_id"].astype(np.int64)
        self.names, self.of_seq, self.sizes = np.unique(
            seqs["lang"].astype(str), return_inverse=True, return_counts=True
        )
        self.n_experts = info.n_experts
        self.bins = info.n_moe_layers * info.n_experts
        self.units = np.zeros(len(self.names) * self.bins, np.int64)
        self.frequency = np.zeros(len(self.names) * self.bins, np.float64)

    def of(self, seq_ids: np.ndarray) -> np.ndarray:
        """The language (an index into ``names``) of each of ``seq_ids``."""
        return self.of_seq[np.searchsorted(self.seq_ids, seq_ids)].astype(np.int64)

    def add(self, units: np.ndarray, frequency: np.ndarray) -> None:
        self.units += units
        self.frequency += frequency

    def rows(self) -> pa.Table:
        """The lang_means rows (less run_id), as sql/lang_means.sql gives them: non-zero means only."""
        present = np.flatnonzero(self.units)
        lang, rest = np.divmod(present, self.bins)
        layer, expert = np.divmod(rest, self.n_experts)
        sizes = self.sizes[lang].astype(np.float64)
        return pa.table(
            {
                "lang": pa.array(self.names[lang]),
                "layer": layer.astype(np.int16),
                "expert": expert.astype(np.int16),
                "mean": self.units[present] / UNITS / sizes,
                "frequency": self.frequency[present] / sizes,
            }
        )


def _insert_seq_means(lake: Lake, con: duckdb.DuckDBPyConnection, info: RunInfo) -> _Languages:
    """Fill seq_means in one INSERT that DuckDB feeds from the rows of each read of the run as they are
    computed, so reading and computing overlap with inserting; returns the language means added up on the
    way. The rows come from the gate sums recorded with the sequences (:func:`_from_sums`) or, for a run
    with a sequence recorded without them, from its gates (:func:`_from_gates`)."""
    languages = _Languages(con, info)
    failed: list[BaseException] = []

    def batches(
        reads: Iterator[tuple[int, tuple[pa.RecordBatch, np.ndarray, np.ndarray]]],
    ) -> Iterator[pa.RecordBatch]:
        try:
            for tokens, (rows, units, frequency) in reads:
                languages.add(units, frequency)  # in read order: the same sums every time
                bar.advance(task, tokens)
                yield rows
        except BaseException as exc:  # DuckDB passes it on as text: keep it to raise as it was
            failed.append(exc)
            raise

    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"means of run {info.run_id}", total=info.n_tokens)
        reads = _from_sums(lake, con, info, languages) or _from_gates(lake, con, info, languages)
        con.register(_ROWS_VIEW, pa.RecordBatchReader.from_batches(SEQ_MEANS, batches(reads)))
        # One DuckDB thread (on the build's own connection): it fills whole row groups in order, which the
        # commit keeps as they are; with two, it wrote partial ones that the commit merged again (about
        # 1/3 more CPU, a 1/3 larger file). A failed read fails the INSERT and the transaction with it.
        con.execute("set threads = 1")
        try:
            con.execute(f"insert into seq_means select ?, * from {_ROWS_VIEW}", [info.run_id])
        except duckdb.Error:
            if failed:  # damaged gates, a weight that is not a number: the error as raised
                raise failed[0] from None
            raise
        con.unregister(_ROWS_VIEW)
    return languages


_Computed = tuple[int, tuple[pa.RecordBatch, np.ndarray, np.ndarray]]  # tokens read; rows, language sums


def _from_gates(
    lake: Lake, con: duckdb.DuckDBPyConnection, info: RunInfo, languages: _Languages
) -> Iterator[_Computed]:
    """The seq_means rows of each read of the run's gates (:meth:`TokenScan.per_read`, whole sequences)."""
    scan = lake.token_scan(con, "token_gates", run_ids=[info.run_id])  # now: DuckDB's connection is free
    work = partial(_seq_means_rows, info, languages)
    return scan.per_read(
        ["topk_ids", "topk_weights"],
        lambda seq_ids, lengths, arrays: (int(lengths.sum()), work(seq_ids, lengths, arrays)),
    )


def _from_sums(
    lake: Lake, con: duckdb.DuckDBPyConnection, info: RunInfo, languages: _Languages, *, emit: bool = True
) -> Iterator[_Computed] | None:
    """The seq_means rows of the run's sequences from their recorded gate sums, read about
    ``SUM_ROWS_PER_READ`` rows at a time in threads ahead; None when a sequence has none (see
    :mod:`xici.warehouse.gates`)."""
    seqs = con.execute(
        "select coalesce(shard, -1) as shard, seq_id, n_tokens, sums_start, n_sums from sequences "
        "where run_id = ? order by shard, sums_start",
        [info.run_id],
    ).fetchnumpy()
    if np.ma.is_masked(seqs["n_sums"]) or np.ma.is_masked(seqs["sums_start"]):
        return None
    gates = lake.gates(read_only=True, con=con)
    shards, starts = seqs["shard"].astype(np.int64), seqs["sums_start"].astype(np.int64)
    counts = seqs["n_sums"].astype(np.int64)
    seq_ids, lengths = seqs["seq_id"].astype(np.int64), seqs["n_tokens"].astype(np.int64)

    def reads() -> Iterator[np.ndarray]:
        """Indices of the sequences of each read: consecutive in one shard, about SUM_ROWS_PER_READ rows."""
        breaks = np.flatnonzero(np.diff(shards)) + 1
        for part in np.split(np.arange(len(seq_ids)), breaks):
            blocks = np.cumsum(counts[part]) // SUM_ROWS_PER_READ
            for block in np.split(part, np.flatnonzero(np.diff(blocks)) + 1):
                if len(block):
                    yield (block,)

    def compute(which: np.ndarray) -> _Computed:
        shard = int(shards[which[0]])
        lo, hi = int(starts[which[0]]), int(starts[which[-1]] + counts[which[-1]])
        try:
            sums = gates.read_sums(info.run_id, lo, hi, None if shard < 0 else shard)
        except DamagedGates as exc:
            raise exc.hitting(starts[which], counts[which], seq_ids[which], "seq_id") from None
        rows = _rows_from_sums(
            info, languages, sums, starts[which] - lo, counts[which], lengths[which], seq_ids[which], emit
        )
        return int(lengths[which].sum()), rows

    return read_ahead(reads(), compute)


def _rows_from_sums(
    info: RunInfo,
    languages: _Languages,
    sums: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    lengths: np.ndarray,
    seq_ids: np.ndarray,
    emit: bool,
) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
    """The seq_means rows (less run_id; none unless ``emit``) of some sequences from their gate sums (rows
    ``starts`` to ``starts + counts`` of ``sums``), and their language means (unscaled sums, per language,
    layer and expert)."""
    from xici.warehouse.sums_kernel import seq_means  # numba: loaded only when means are built

    lang_units, frequency = np.zeros_like(languages.units), np.zeros_like(languages.frequency)
    rows = seq_means(
        sums,
        starts,
        counts,
        lengths,
        seq_ids,
        info.n_experts,
        langs=languages.of(seq_ids),
        per_lang=languages.bins,
        lang_units=lang_units,
        lang_frequency=frequency,
        emit=emit,
    )
    return rows, lang_units, frequency


def _seq_means_rows(
    info: RunInfo,
    languages: _Languages,
    seq_ids: np.ndarray,
    lengths: np.ndarray,
    arrays: dict[str, np.ndarray],
) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
    """The seq_means rows (less run_id) of whole sequences read at once, and their language means
    (unscaled sums, per language, layer and expert)."""
    from xici.analysis.means_kernel import ranks, seq_means_rows  # numba: loaded only when means are built

    ids, weights = arrays["topk_ids"], arrays["topk_weights"]
    tokens = len(ids)
    if tokens and int(ids.max()) >= info.n_experts:
        raise XiciError(
            f"run {info.run_id} routes a token to expert {int(ids.max())}, but its model has "
            f"{info.n_experts} experts",
            where=f"the gate store, sequences {int(seq_ids[0])} to {int(seq_ids[-1])}",
            fix="re-record the run: its gate store does not match the run's model",
        )
    half = weights.dtype == np.float16
    bound = min(len(seq_ids) * languages.bins, ids.size)
    seq, bins, units = (np.empty(bound, np.int64) for _ in range(3))
    selected, first_row = np.empty(bound, np.int32), np.empty(len(seq_ids), np.int64)
    lang_units, frequency = np.zeros_like(languages.units), np.zeros_like(languages.frequency)
    rows = seq_means_rows(
        ids.reshape(tokens, -1),
        (weights.view(np.uint16) if half else weights).reshape(tokens, -1),
        half,
        info.n_experts,
        info.top_k,
        lengths,
        languages.of(seq_ids),
        lang_units,
        frequency,
        seq,
        bins,
        units,
        selected,
        first_row,
    )
    if rows < 0:
        raise XiciError(
            f"sequence {int(seq_ids[-1 - rows])} of run {info.run_id} has a gate weight that is not a "
            "finite number, so its means are undefined",
            where="the gate store",
            fix="re-record the sequence's run",
        )
    seq, bins, units, selected = seq[:rows], bins[:rows], units[:rows], selected[:rows]
    # Rows by sequence, then m descending: numpy's sort of one integer key where both fit in 63 bits.
    shift = int(units.max(initial=0)).bit_length()
    if shift + len(seq_ids).bit_length() <= 63:
        order = np.argsort((seq << shift) | ((1 << shift) - 1 - units))
    else:
        order = np.lexsort((-units, seq))
    layer, expert = np.divmod(bins, info.n_experts)
    columns = [
        seq_ids[seq],
        layer.astype(np.int16),
        expert.astype(np.int16),
        units / UNITS,
        ranks(order, seq, units, first_row),
        selected,
    ]
    return pa.RecordBatch.from_arrays([pa.array(c) for c in columns], schema=SEQ_MEANS), lang_units, frequency


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
