"""Token relations as DuckDB scans that read from Zarr only what a query asks for, as often as it asks.

A registered :class:`TokenScan` is not a stream of rows but a source DuckDB opens once per scan of the
relation (a self-join opens it twice). Each time, DuckDB says which columns it needs and which filters it
would apply; the scan then

- reads only the sequences whose ``seq_id`` a filter can keep, only the tokens whose ``pos`` it can keep,
  and only the Zarr chunks that hold them (a chunk between two wanted sequences that holds neither is
  skipped); filters on ``layer`` (and on ``expert`` of ``token_logits``) drop the other layers' values
  after the read, before any row is built;
- reads only the Zarr arrays the requested columns need (a ``count(*)`` over some sequences reads none);
- applies every filter it accepted exactly, so DuckDB does not apply it again (those the reads already
  enforce, on seq_id, layer or a span of pos, are not evaluated on the rows);
- reads each Zarr chunk once (a sequence that crosses a chunk edge is split between two reads), and
  prepares the next reads, and their Arrow rows, in threads while DuckDB consumes the current ones, so
  memory stays at a few chunks whatever the run's size.

A filter on ``sequences`` (question, language, run) joined to a token relation does not reach the scan by
itself: :func:`xici.warehouse.pushdown.sequence_restrictions` turns it into a set of seq_ids beforehand.

DuckDB's scan protocol for Python objects (``duckdb._sources``, DuckDB 2.0) is what offers the filters; the
public ``register`` takes only pyarrow and pandas objects, so the scan is registered through the connection's
``_register_arrow_source`` (both pinned by the ``duckdb`` requirement in pyproject.toml).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import duckdb
import numpy as np
import pyarrow as pa
from duckdb._sources import ArrowScanSource
from duckdb._sources.nodes import Binary, Col, In, Lit, Node, Untranslatable
from duckdb._sources.to_arrow import nan_may_satisfy, to_arrow

from xici.warehouse.gates import DamagedGates, GateStore, sequence_positions

T = TypeVar("T")

TOKEN_RELATIONS = {
    "tokens": pa.schema([("seq_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32())]),
    "token_gates": pa.schema(
        [
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("expert", pa.int16()),
            ("weight", pa.float32()),
        ]
    ),
    "token_logits": pa.schema(
        [
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("expert", pa.int16()),
            ("logit", pa.float32()),
        ]
    ),
}

# The Zarr array each value column comes from (seq_id, pos and layer come from the sequence rows alone).
_SOURCES = {
    "tokens": {"token_id": "token_ids"},
    "token_gates": {"expert": "topk_ids", "weight": "topk_weights"},
    "token_logits": {"logit": "router_logits"},
}
_VALUES = {"tokens": "token_ids", "token_gates": "topk_weights", "token_logits": "router_logits"}

# A query's scan reads CHUNKS_PER_READ Zarr chunks at a time (each chunk once), whole-sequence reads
# (per_read, for the means) up to TOKENS_PER_READ tokens; READ_AHEAD reads, and their rows, are prepared
# in threads ahead of the consumer (Zarr decodes outside the GIL). Rows handed to DuckDB per Arrow batch:
# about ROWS_PER_BATCH. One chunk per read: as fast as four for full scans, faster for sequences spread
# over the run; reading in DuckDB's own scan threads instead was no faster (benchmarks/README.md).
CHUNKS_PER_READ = 1
ROWS_PER_BATCH = 1 << 20
TOKENS_PER_READ = 16384
READ_AHEAD = 2
# DuckDB settings for a connection that scans token relations. A Python source gives DuckDB no column
# statistics, so it cannot tell that layer and expert (SMALLINT) hold few values and groups by them with its
# general hash table (about twice the CPU of a `group by layer` on Parquet, whose statistics bound them);
# perfect hash tables that may span a SMALLINT's whole range (16 bits and one for NULL) group them by index.
DUCKDB_SETTINGS = {"perfect_ht_threshold": 17}


@dataclass
class ScanStats:
    """Tokens the scans of a connection planned to read and have read from Zarr (tests, progress bars)."""

    planned: int = 0
    read: int = 0
    scans: int = 0
    on_change: Callable[[ScanStats], None] | None = field(default=None, repr=False)

    def _add(self, *, planned: int = 0, read: int = 0, scans: int = 0) -> None:
        self.planned += planned
        self.read += read
        self.scans += scans
        if self.on_change is not None:
            self.on_change(self)


@dataclass(frozen=True)
class RunLayout:
    """The sequences of one run a scan may read, and the shape of its arrays."""

    run_id: int
    shards: np.ndarray  # -1: the run's own arrays
    starts: np.ndarray
    lengths: np.ndarray
    seq_ids: np.ndarray
    tail: tuple[int, ...]  # per-token shape of the value array: () for tokens, (layers, k or experts)
    chunk_tokens: int


def run_layouts(
    con: duckdb.DuckDBPyConnection, gates: GateStore, name: str, run_ids: Sequence[int] | None
) -> list[RunLayout]:
    """The runs a token relation covers (those with router logits only, for ``token_logits``)."""
    where = "" if run_ids is None else f"where run_id in ({', '.join(str(int(r)) for r in run_ids)})"
    seqs = con.execute(
        "select run_id, coalesce(shard, -1) as shard, seq_id, token_start, n_tokens from sequences "
        f"{where} order by run_id, shard, token_start"
    ).fetchnumpy()
    layouts = []
    for run_id in np.unique(seqs["run_id"]).tolist():
        if _VALUES[name] not in gates.fields(run_id):
            continue
        pick = seqs["run_id"] == run_id
        array = gates.array(run_id, _VALUES[name])
        layouts.append(
            RunLayout(
                run_id,
                seqs["shard"][pick].astype(np.int64),
                seqs["token_start"][pick].astype(np.int64),
                seqs["n_tokens"][pick].astype(np.int64),
                seqs["seq_id"][pick].astype(np.int64),
                tuple(array.shape[1:]),
                int(array.chunks[0]),
            )
        )
    return layouts


_COMPARE = {
    "=": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}


def may_hold(node: Node, column: str, values: np.ndarray) -> np.ndarray:
    """Which of ``values`` of ``column`` some row satisfying ``node`` can have (False: surely none).

    Conservative: a predicate on other columns, or one it does not follow (NOT), keeps every value.
    """
    everything = np.ones(len(values), dtype=bool)
    if isinstance(node, Binary) and node.op in ("AND", "OR"):
        left, right = may_hold(node.left, column, values), may_hold(node.right, column, values)
        return left & right if node.op == "AND" else left | right
    if isinstance(node, Binary) and isinstance(node.left, Col) and isinstance(node.right, Lit):
        if node.left.parts != (column,) or not isinstance(node.right.value, int):
            return everything
        return _COMPARE[node.op](values, node.right.value) if node.op in _COMPARE else everything
    if isinstance(node, In) and isinstance(node.operand, Col) and node.operand.parts == (column,):
        wanted = [v.value for v in node.values if isinstance(v, Lit)]
        if len(wanted) != len(node.values) or not all(isinstance(v, int) for v in wanted):
            return everything
        return np.isin(values, np.array(wanted, dtype=np.int64))
    return everything


def _exact_column(node: Node) -> str | None:
    """The one column ``node`` reads, when :func:`may_hold` follows all of it (AND, OR, comparisons and IN
    lists of integers); None otherwise."""
    if isinstance(node, Binary) and node.op in ("AND", "OR"):
        left, right = _exact_column(node.left), _exact_column(node.right)
        return left if left == right else None
    if isinstance(node, Binary) and isinstance(node.left, Col) and isinstance(node.right, Lit):
        exact = node.op in _COMPARE and isinstance(node.right.value, int) and len(node.left.parts) == 1
        return node.left.parts[0] if exact else None
    if isinstance(node, In) and isinstance(node.operand, Col) and len(node.operand.parts) == 1:
        exact = all(isinstance(v, Lit) and isinstance(v.value, int) for v in node.values)
        return node.operand.parts[0] if exact else None
    return None


class TokenScan(ArrowScanSource):
    """One token relation of a lake, scanned afresh (its own columns and filters) each time DuckDB asks."""

    schema_is_stable = True

    def __init__(
        self,
        gates: GateStore,
        name: str,
        layouts: list[RunLayout],
        *,
        only_seq_ids: np.ndarray | None = None,
        stats: ScanStats | None = None,
    ) -> None:
        super().__init__(name)
        self.gates = gates
        self.name = name
        self.schema = TOKEN_RELATIONS[name]
        self.layouts = layouts
        self.only_seq_ids = only_seq_ids
        self.stats = stats if stats is not None else ScanStats()

    def __arrow_c_schema__(self) -> object:
        return self.schema.__arrow_c_schema__()

    def rows(self) -> int | None:
        """Rows of a full scan, so that DuckDB's planner knows the relation is large."""
        return int(sum(r.lengths.sum() * int(np.prod(r.tail)) for r in self.layouts))

    def accepts(self, predicate: Node) -> bool:
        """Filters pyarrow evaluates exactly as DuckDB would (the scan applies them itself)."""
        try:
            to_arrow(predicate, self.schema)
        except Untranslatable:
            return False
        return not nan_may_satisfy(predicate, self.schema)

    def stream(self, columns: Sequence[int] | None, filters: Sequence[Node]) -> tuple[object, bool]:
        """A new Arrow stream of exactly ``columns``, the ``filters`` applied (DuckDB's scan protocol)."""
        names = self.schema.names if columns is None else [self.schema.names[i] for i in columns]
        plans = [self._plan(layout, filters) for layout in self.layouts]
        # Filters the plans do not enforce exactly are applied to the rows built.
        rest = [p for p in filters if not self._enforced(p, plans)]
        condition = None
        for predicate in rest:
            term = to_arrow(predicate, self.schema)
            condition = term if condition is None else condition & term
        # Columns built: those asked for and those the remaining filters read.
        needed = set(names) | {n for p in rest for n in self.schema.names if _mentions(p, n)}
        out = pa.schema([self.schema.field(n) for n in names])
        self.stats._add(planned=sum(int(p.lengths.sum()) for p in plans), scans=1)
        batches = self._batches(plans, needed, names, condition)
        return pa.RecordBatchReader.from_batches(out, batches).__arrow_c_stream__(), True

    # -- planning ------------------------------------------------------------------------------------------

    def _enforced(self, predicate: Node, plans: list[_Plan]) -> bool:
        """Whether the plans keep exactly the rows ``predicate`` keeps: it reads one column, in a way
        :func:`may_hold` follows, and the plans select whole values of that column (seq_id, layer,
        expert of token_logits; pos where the positions kept are one span)."""
        column = _exact_column(predicate)
        if column == "pos":
            return all(plan.pos_exact for plan in plans)
        if column == "expert":
            return self.name == "token_logits"
        return column == "seq_id" or (column == "layer" and self.name != "tokens")

    def _plan(self, layout: RunLayout, filters: Sequence[Node]) -> _Plan:
        keep = np.ones(len(layout.seq_ids), dtype=bool)
        if self.only_seq_ids is not None:
            keep &= np.isin(layout.seq_ids, self.only_seq_ids)
        longest = int(layout.lengths.max(initial=0))
        positions = np.arange(longest)
        pos_ok = np.ones(longest, dtype=bool)
        layers = np.arange(layout.tail[0]) if layout.tail else None
        layer_ok = None if layers is None else np.ones(len(layers), dtype=bool)
        experts = np.arange(layout.tail[1]) if self.name == "token_logits" else None
        expert_ok = None if experts is None else np.ones(len(experts), dtype=bool)
        for predicate in filters:
            keep &= may_hold(predicate, "seq_id", layout.seq_ids)
            pos_ok &= may_hold(predicate, "pos", positions)
            if layers is not None:
                layer_ok &= may_hold(predicate, "layer", layers)
            if experts is not None:
                expert_ok &= may_hold(predicate, "expert", experts)
        # Positions: the span from the first to the last one a filter can keep, in every sequence.
        kept_pos = np.flatnonzero(pos_ok)
        first = int(kept_pos[0]) if len(kept_pos) else 0
        last = int(kept_pos[-1]) + 1 if len(kept_pos) else 0
        lengths = np.clip(layout.lengths, None, last) - first
        keep &= lengths > 0
        if (layers is not None and not layer_ok.any()) or (experts is not None and not expert_ok.any()):
            keep[:] = False
        return _Plan(
            layout,
            layout.shards[keep],
            layout.starts[keep] + first,
            lengths[keep],
            layout.seq_ids[keep],
            first,
            None if layers is None else layers[layer_ok],
            None if experts is None else experts[expert_ok],
            bool(pos_ok[first:last].all()),
        )

    # -- reading -------------------------------------------------------------------------------------------

    def _batches(
        self, plans: list[_Plan], needed: set[str], names: list[str], condition: object
    ) -> Iterator[pa.RecordBatch]:
        fields = sorted({_SOURCES[self.name][c] for c in needed if c in _SOURCES[self.name]})
        columns = _Columns()

        def rows(plan: _Plan, read: _Read, block: dict) -> list[pa.RecordBatch]:
            # Batches of about equal size, at most _tokens_per_batch tokens each.
            n = int(read.lengths.sum())
            size = -(-n // -(-n // _tokens_per_batch(plan)))
            batches = []
            for first in range(0, n, size):
                part = slice(first, min(first + size, n))
                batch = self._rows(plan, read, part, block, needed, columns)
                if condition is not None:
                    batch = batch.filter(condition)
                batches.append(batch.select(names))
            return batches

        reads = ((plan, read) for plan in plans for read in _chunk_reads(plan, CHUNKS_PER_READ))
        for batches in self._prepared(reads, fields, rows):
            yield from batches

    def _prepared(
        self,
        reads: Iterable[tuple[_Plan, _Read]],
        fields: list[str],
        work: Callable[[_Plan, _Read, dict], T],
    ) -> Iterator[T]:
        """``work(plan, read, arrays)`` for every read, in order, done in ``READ_AHEAD`` threads ahead of the
        consumer (Zarr decoding and most numpy work run outside the GIL)."""

        def task(plan: _Plan, read: _Read) -> tuple[int, T]:
            return int(read.lengths.sum()), work(plan, read, self._read(plan, read, fields))

        for tokens, result in read_ahead(reads, task):
            self.stats._add(read=tokens)
            yield result

    def per_read(
        self, fields: list[str], work: Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], T]
    ) -> Iterator[T]:
        """``work(seq_ids, lengths, arrays)`` for every read of a full scan, in order: whole sequences of
        ``lengths`` tokens each, one after the other in ``arrays`` (the Zarr arrays ``fields``), done in
        threads ahead of the consumer. For aggregates per sequence taken as the run is read (the means,
        :mod:`xici.analysis.means`), without building rows for DuckDB."""
        plans = [self._plan(layout, []) for layout in self.layouts]
        self.stats._add(planned=sum(int(p.lengths.sum()) for p in plans), scans=1)

        def task(plan: _Plan, read: _Read, block: dict[str, np.ndarray]) -> T:
            return work(plan.seq_ids[read.seqs], read.lengths, block)

        reads = ((plan, read) for plan in plans for read in _sequence_reads(plan, TOKENS_PER_READ))
        yield from self._prepared(reads, fields, task)

    def _read(self, plan: _Plan, read: _Read, fields: list[str]) -> dict[str, np.ndarray]:
        """The tokens of a read's pieces, one after the other, per Zarr array (every layer and expert)."""
        if not fields:
            return {}
        try:
            block = self.gates.read_fields(
                plan.layout.run_id, read.lo, read.hi, fields, shard=None if read.shard < 0 else read.shard
            )
        except DamagedGates as exc:
            raise exc.hitting(read.starts, read.lengths, plan.seq_ids[read.seqs], "seq_id") from None
        if read.lengths.sum() == read.hi - read.lo:  # no tokens between the pieces
            return block
        take = np.repeat(read.starts - read.lo, read.lengths) + sequence_positions(read.lengths)
        return {name: array[take] for name, array in block.items()}

    def _rows(
        self, plan: _Plan, read: _Read, tokens: slice, block: dict, needed: set[str], columns: _Columns
    ) -> pa.RecordBatch:
        """The Arrow rows of the read's wanted tokens ``tokens`` (a slice of its pieces laid one after the
        other), with the columns in ``needed`` only."""
        n = tokens.stop - tokens.start
        width = _width(plan)
        rows = n * width

        def each_row(values: np.ndarray) -> Callable[[np.ndarray], None]:
            """Fill a column with one value per token, repeated on the token's rows."""
            return lambda out: out.reshape(n, width).__setitem__(slice(None), values[:, None])

        def kept(source: str) -> np.ndarray:
            """The tokens' values of a Zarr array, in the layers (and experts) the plan keeps: a view where
            those are a range, copied once, into the column, whatever they are."""
            values = block[source][tokens]
            if values.ndim == 3:
                values = values[:, _indexer(plan.layers, values.shape[1])]
                if source == "router_logits":
                    values = values[:, :, _indexer(plan.experts, values.shape[2])]
            return values

        arrays: dict[str, pa.Array] = {}
        if "seq_id" in needed:
            seq_ids = np.repeat(plan.seq_ids[read.seqs], read.lengths)[tokens]
            arrays["seq_id"] = columns.filled(np.int64, rows, each_row(seq_ids))
        if "pos" in needed:
            # A piece may start inside its sequence (a read starts at a chunk boundary).
            into = (read.starts - plan.starts[read.seqs]).astype(np.int32) + np.int32(plan.first_pos)
            pos = (np.repeat(into, read.lengths) + sequence_positions(read.lengths))[tokens]
            arrays["pos"] = columns.filled(np.int32, rows, each_row(pos))
        if "layer" in needed:
            per_token = np.repeat(plan.layers.astype(np.int16), _per_layer(plan))
            arrays["layer"] = columns.repeated(plan, "layer", per_token, n)
        if "expert" in needed:
            if self.name == "token_logits":
                per_token = np.tile(plan.experts.astype(np.int16), len(plan.layers))
                arrays["expert"] = columns.repeated(plan, "expert", per_token, n)
            else:
                arrays["expert"] = columns.filled(np.int16, rows, copied(kept("topk_ids")))
        for column, source in _SOURCES[self.name].items():
            if column in needed and column != "expert":
                values = kept(source)
                if column in ("weight", "logit"):
                    arrays[column] = columns.filled(
                        np.float32, rows, lambda out, values=values: float32(values, out)
                    )
                else:
                    arrays[column] = columns.filled(np.int32, rows, copied(values))
        schema = pa.schema([f for f in self.schema if f.name in arrays])
        return pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)


class _Columns:
    """Memory for the Arrow columns of one stream. Columns are written into buffers of Arrow's own memory
    pool: DuckDB's scan threads release a batch without taking the GIL (a buffer over a numpy array must
    take it to drop the array, and waits up to Python's switch interval while a reading thread runs Python),
    and the pool reuses the memory of released batches (fresh memory costs page faults and zeroing). Columns
    that repeat from token to token (layer; expert of token_logits) are built once per plan and shared."""

    def __init__(self) -> None:
        self._repeated: dict[tuple[int, str], pa.Array] = {}

    @staticmethod
    def filled(dtype: type, rows: int, fill: Callable[[np.ndarray], object]) -> pa.Array:
        """A column of ``rows`` values of ``dtype`` that ``fill(out)`` writes."""
        kind = np.dtype(dtype)
        data = pa.allocate_buffer(rows * kind.itemsize)
        fill(np.frombuffer(data, dtype=kind))
        return pa.Array.from_buffers(pa.from_numpy_dtype(kind), rows, [None, data])

    def repeated(self, plan: _Plan, name: str, per_token: np.ndarray, n: int) -> pa.Array:
        """The column whose values are ``per_token`` for each of ``n`` tokens."""
        key = (id(plan), name)
        tiled = self._repeated.get(key)
        if tiled is None:
            many = _tokens_per_batch(plan)
            tiled = self.filled(per_token.dtype, many * len(per_token), copied(np.tile(per_token, many)))
            tiled = self._repeated.setdefault(key, tiled)
        return tiled.slice(0, n * len(per_token))


def copied(values: np.ndarray) -> Callable[[np.ndarray], None]:
    """A ``fill`` that copies ``values`` (any shape, as many) into the column, converting them."""
    return lambda out: np.copyto(out.reshape(values.shape), values, casting="unsafe")


@dataclass(frozen=True)
class _Plan:
    """What one scan reads of one run: sequences (their wanted token spans), layers and experts."""

    layout: RunLayout
    shards: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    seq_ids: np.ndarray
    first_pos: int
    layers: np.ndarray | None
    experts: np.ndarray | None
    pos_exact: bool  # the positions kept are those from first_pos on, all of them


@dataclass(frozen=True)
class _Read:
    """One Zarr read: tokens ``[lo, hi)`` of one shard (-1: the run's own arrays), and the pieces of planned
    sequences in it (``seqs`` indexes the plan's sequences; a piece is a whole sequence or, in a read of
    whole chunks, the part of one that lies in them), in token order."""

    shard: int
    lo: int
    hi: int
    seqs: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def float32(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``values`` as float32 (DuckDB takes no Arrow float16), written into ``out`` (contiguous, as many
    values, any shape) when given. Float16 that are all finite and not negative, as gate weights are, are
    widened by their bits: the exponent and mantissa moved into place and the exponent bias fixed by one
    exact multiplication, about 3x faster than numpy's conversion; the same values bit for bit, subnormals
    included (they pass through a float32 subnormal)."""
    out = np.empty(values.shape, dtype=np.float32) if out is None else out.reshape(values.shape)
    bits = values.view(np.uint16) if values.dtype == np.float16 else None
    # Numpy's conversion for other types, for a sign bit, infinity or NaN, and where this thread flushes
    # denormals (torch.set_flush_denormal, as the demo sets), which reads a float32 subnormal as 0, for a
    # non-zero float16 subnormal.
    if (
        bits is None
        or bits.size == 0
        or bits.max() >= 0x7C00
        or (_flushes_denormals() and (bits - np.uint16(1)).min() < 0x03FF)
    ):
        np.copyto(out, values, casting="same_kind")
        return out
    wide = out.view(np.uint32)
    np.copyto(wide, bits)
    wide <<= 13
    out *= np.float32(2.0**112)
    return out


_SMALLEST_SUBNORMAL = np.array([np.finfo(np.float32).smallest_subnormal])


def _flushes_denormals() -> bool:
    """Whether this thread's floating point flushes subnormal inputs or results to 0."""
    return bool((_SMALLEST_SUBNORMAL * np.float32(1))[0] == 0)


def read_ahead(items: Iterable[tuple], task: Callable[..., T], ahead: int = READ_AHEAD) -> Iterator[T]:
    """``task(*item)`` for every item, in order, done in ``ahead`` threads ahead of the consumer (Zarr
    decoding and compiled or numpy work run outside the GIL), so that at most ``ahead`` results wait."""
    items = iter(items)
    pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="xici-read")
    pending = deque(pool.submit(task, *item) for item in itertools.islice(items, ahead))
    try:
        while pending:
            result = pending.popleft().result()
            following = next(items, None)
            if following is not None:
                pending.append(pool.submit(task, *following))
            yield result
    finally:  # the consumer may stop early (DuckDB's LIMIT, an error): drop the work prepared ahead
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _per_layer(plan: _Plan) -> int:
    """Rows per token and layer: the experts kept (token_logits) or the top-k (token_gates)."""
    if plan.experts is not None:
        return len(plan.experts)
    return plan.layout.tail[1] if plan.layout.tail else 1


def _mentions(node: Node, column: str) -> bool:
    if isinstance(node, Col):
        return node.parts[0] == column
    return any(_mentions(child, column) for child in node._children())


def _sequence_reads(plan: _Plan, tokens_per_read: int) -> Iterator[_Read]:
    """The planned sequences, whole, in groups read at once: one shard, at most ``tokens_per_read`` tokens
    spanned (one sequence at least), and no chunk inside that holds none of their tokens (it is not read).
    A chunk shared by two groups is decoded by both."""
    order = np.lexsort((plan.starts, plan.shards))
    size = plan.layout.chunk_tokens
    i = 0
    while i < len(order):
        j = i + 1
        first = order[i]
        while j < len(order):
            nxt, prev = order[j], order[j - 1]
            end = plan.starts[nxt] + plan.lengths[nxt]
            if (
                plan.shards[nxt] != plan.shards[first]
                or end - plan.starts[first] > tokens_per_read
                or plan.starts[nxt] // size > (plan.starts[prev] + plan.lengths[prev] - 1) // size + 1
            ):
                break
            j += 1
        which = order[i:j]
        starts, lengths = plan.starts[which], plan.lengths[which]
        yield _Read(
            int(plan.shards[first]), int(starts[0]), int(starts[-1] + lengths[-1]), which, starts, lengths
        )
        i = j


def _chunk_reads(plan: _Plan, chunks_per_read: int) -> Iterator[_Read]:
    """The planned tokens in reads of whole chunks: every chunk that holds some is read once, in runs of
    at most ``chunks_per_read`` neighbouring chunks; chunks that hold none are not read. A sequence that
    crosses a read's edge is split between two reads, so for queries on rows (not per sequence)."""
    size = plan.layout.chunk_tokens
    for shard in np.unique(plan.shards):
        seqs = np.flatnonzero(plan.shards == shard)
        seqs = seqs[np.argsort(plan.starts[seqs], kind="stable")]
        starts = plan.starts[seqs]
        ends = starts + plan.lengths[seqs]
        # Chunks holding planned tokens: each sequence covers those from its first to its last token's.
        first, last = starts // size, (ends - 1) // size
        cover = np.zeros(int(last.max(initial=-1)) + 2, dtype=np.int64)
        np.add.at(cover, first, 1)
        np.add.at(cover, last + 1, -1)
        wanted = np.flatnonzero(np.cumsum(cover) > 0)
        # Runs of neighbouring chunks, cut into reads.
        breaks = np.flatnonzero(np.diff(wanted) > 1) + 1
        for run in np.split(wanted, breaks):
            for k in range(0, len(run), chunks_per_read):
                lo, hi = int(run[k]) * size, (int(run[min(k + chunks_per_read, len(run)) - 1]) + 1) * size
                i, j = np.searchsorted(ends, lo, "right"), np.searchsorted(starts, hi, "left")
                piece_starts = np.maximum(starts[i:j], lo)
                piece_ends = np.minimum(ends[i:j], hi)
                yield _Read(
                    int(shard),
                    int(piece_starts[0]),
                    int(piece_ends[-1]),
                    seqs[i:j],
                    piece_starts,
                    piece_ends - piece_starts,
                )


def _indexer(kept: np.ndarray, size: int) -> slice | np.ndarray:
    """Indices kept of an axis of ``size``: a slice (a view, no copy) where they are a range."""
    if len(kept) and np.array_equal(kept, np.arange(kept[0], kept[0] + len(kept))):
        return slice(int(kept[0]), int(kept[0]) + len(kept))
    return kept


def _tokens_per_batch(plan: _Plan) -> int:
    """Tokens per Arrow batch at most: about ROWS_PER_BATCH rows, one token at least."""
    return max(1, ROWS_PER_BATCH // _width(plan))


def _width(plan: _Plan) -> int:
    """Rows per token: layers kept times the experts kept (token_logits) or the top-k (token_gates)."""
    return 1 if plan.layers is None else len(plan.layers) * _per_layer(plan)
