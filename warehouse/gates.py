"""The Zarr side of the lake: per-token routing arrays, one group per run.

Layout (Zarr v3), for run ``R`` with T tokens, L MoE layers, top-k routing over E experts::

    runs/R/token_ids      int32   [T]
    runs/R/topk_ids       uint8   [T, L, k]   (uint16 when E > 256)
    runs/R/topk_weights   float16 [T, L, k]   (float32 with gate_dtype="float32")
    runs/R/router_logits  float16 [T, L, E]   (only with store_logits)
    runs/R/gate_sums      int64   [S, 3]      per sequence: (layer * E + expert, weight sum, n_selected)
    runs/R/shards/S/...   the same arrays, once per shard S of a scaled-out run

``gate_sums`` (recording runs only: an ablation's runs need no means) holds what sql/gate_sums.sql gives for
each sequence (weight sums in whole units of 2^-32), the rows of a sequence together and sorted by the sum
(:mod:`xici.warehouse.sums_kernel`), written with its tokens (:meth:`GateStore.append_sequences`): the means
are computed from these rows, about 1/40 of the gates, instead of every token. The warehouse's
``sequences.sums_start`` and ``n_sums`` say where a sequence's rows are; NULL (a run recorded before sums were
kept, a sequence with a weight that is not a finite number, tokens appended without them) means the means are
taken from the gates themselves.

A run recorded by one process appends to its own arrays; the workers of a scaled-out run (:mod:`xici.recorder.
ray_pool`) each append to a shard of their own, so no two processes ever write one array. Arrays are chunked
along the token axis and compressed; every sequence is one contiguous token range of one shard (or of the
run's arrays). Writes only ever append; the warehouse records how far each shard is committed, and
:meth:`GateStore.truncate` drops anything past that after a crash. Zarr's local store writes each chunk to a
temporary file and renames it, so a chunk that also holds committed tokens is never left half-written.

Every read is verified, so damaged data is an error, never numbers (:class:`DamagedGates`): each chunk of the
token range read must exist (Zarr would hand a missing chunk back as zeros) and decode. Arrays carry Zarr's
``crc32c`` codec after the compressor, so a chunk whose bytes changed fails its checksum; chunks are written
even when they hold only zeros, so a committed chunk always has a file. Arrays written before the checksums
(no ``crc32c`` codec) are still read, with the existence check and a clear error when a chunk does not
decode; a chunk of theirs that holds only zeros was never written and reads as missing (no real routing array
is all zeros: top-k weights are positive).

The store is a local folder or any fsspec URL (``s3://bucket/lake/gates.zarr``), so that workers on other
machines can write it.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import google_crc32c
import numpy as np
import pyarrow as pa
import zarr
import zarr.abc.store
import zarr.core.buffer
from fsspec.implementations.local import LocalFileSystem
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from xici.errors import XiciError, storage_error

FIELDS = ("token_ids", "topk_ids", "topk_weights", "router_logits")
GATE_DTYPES = ("float16", "float32")
DEFAULT_CHUNK_TOKENS = 4096
SUMS = "gate_sums"
SUM_CHUNK_ROWS = 65536
UNITS = 4294967296.0  # 2^32: weight sums and means are whole multiples of 2^-32 (sql/gate_sums.sql)
# The columns of the warehouse table seq_means after run_id, as the gate sums give them (sums_kernel).
SEQ_MEANS = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("layer", pa.int16()),
        ("expert", pa.int16()),
        ("m", pa.float64()),
        ("seq_rank", pa.int32()),
        ("n_selected", pa.int32()),
    ]
)
# The checksum comes last, so it covers the compressed bytes as stored.
_COMPRESSORS = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())
# Write a chunk even when it holds only the fill value: a missing chunk is then always damage.
_WRITE_CONFIG = {"array.write_empty_chunks": True}


@dataclass
class TokenArrays:
    """Routing of a contiguous run of tokens, as numpy arrays (``router_logits`` may be None)."""

    token_ids: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    router_logits: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @staticmethod
    def concat(parts: list[TokenArrays]) -> TokenArrays:
        logits = [p.router_logits for p in parts]
        return TokenArrays(
            np.concatenate([p.token_ids for p in parts]),
            np.concatenate([p.topk_ids for p in parts]),
            np.concatenate([p.topk_weights for p in parts]),
            None if any(x is None for x in logits) else np.concatenate(logits),
        )


def sequence_positions(lengths: np.ndarray) -> np.ndarray:
    """Each token's position in its sequence, for sequences of these lengths laid one after the other."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)


def expert_id_dtype(n_experts: int) -> np.dtype:
    """The smallest unsigned integer that holds every expert id."""
    return np.dtype(np.uint8 if n_experts <= 256 else np.uint16)


def _storage_error(exc: OSError, where: str) -> XiciError:
    return storage_error(exc, where) or XiciError(
        f"writing the lake failed ({exc.strerror or exc})",
        where=where,
        fix="check the gate store's folder or URL, then run the same command again: committed work is kept",
    )


def is_url(location: str | Path) -> bool:
    """Whether a gate store location is an fsspec URL (``s3://...``, ``file://...``) rather than a folder."""
    return "://" in str(location)


def local_folder(location: str | Path) -> Path | None:
    """The folder of a gate store on this machine's file system: a path, or a ``file://`` URL (None for
    any other URL)."""
    if not is_url(location):
        return Path(location)
    if fsspec.utils.get_protocol(str(location)) not in ("file", "local"):
        return None
    return Path(LocalFileSystem._strip_protocol(str(location)))


def check_location(location: str | Path) -> None:
    """Refuse a gate store URL whose scheme fsspec does not know, or whose package is not installed."""
    if not is_url(location):
        return
    try:
        fsspec.get_filesystem_class(fsspec.utils.get_protocol(str(location)))
    except (ImportError, ValueError) as exc:
        raise XiciError(
            f"cannot open the gate store at {location} ({exc})",
            where="--gates-url",
            fix="install the fsspec package of its scheme (s3fs for s3://, gcsfs for gs://) on every machine "
            "that runs xici, or fix the URL",
        ) from None


Shard = int | None  # a shard of a scaled-out run; None: the run's own arrays


class DamagedGates(XiciError):
    """A committed token range of a run (or range of its gate sums' rows: ``tokens`` holds them then) whose
    chunk is missing, or does not decode / fails its checksum."""

    FIX = (
        "xici lake check lists every damaged run; restore the gate store from a backup, or record the run "
        "again in a new lake (--lake)"
    )

    def __init__(
        self, run_id: int, shard: Shard, field: str, tokens: tuple[int, int], problem: str, where: str
    ) -> None:
        self.run_id, self.shard, self.field, self.tokens, self.problem = run_id, shard, field, tokens, problem
        super().__init__(self._what(""), where=where, fix=self.FIX)

    def _what(self, sequences: str) -> str:
        of = f"run {self.run_id}" if self.shard is None else f"shard {self.shard} of run {self.run_id}"
        first, last = self.tokens[0], self.tokens[1] - 1
        axis = "rows" if self.field == SUMS else "tokens"
        return (
            f"the token arrays of {of} are damaged: {self.field}, {axis} {first}-{last}{sequences}: "
            f"{self.problem}"
        )

    @classmethod
    def found_in(cls, text: str) -> XiciError | None:
        """The damage a message carries, as raised: DuckDB passes an error of a registered Arrow reader on
        as text (with the Python traceback after it), so a query over the token relations can still say only
        this."""
        found = re.search(r"(the token arrays of .*?)\. Where: (.*?)\. " + re.escape(cls.FIX), text, re.S)
        return None if found is None else XiciError(found.group(1), where=found.group(2), fix=cls.FIX)

    def naming(self, sequences: str) -> DamagedGates:
        """The same error naming the sequences whose tokens are in the damaged range."""
        self.what = self._what(f" ({sequences})")
        self.args = (self.message,)
        return self

    def hitting(self, starts: np.ndarray, lengths: np.ndarray, names: np.ndarray, label: str) -> DamagedGates:
        """The same error naming, among sequences at these token ranges, those in the damaged range."""
        hit = (starts < self.tokens[1]) & (starts + lengths > self.tokens[0])
        return self.naming(f"{label} {id_ranges(names[hit])}")


class GateStore:
    """Token routing arrays of every run in one Zarr v3 store (a local folder or an fsspec URL)."""

    def __init__(self, location: Path | str, *, read_only: bool = False) -> None:
        check_location(location)
        # A file:// URL is opened as the folder it names: Zarr's local store writes each chunk to a temporary
        # file and renames it (see the module notes), fsspec's local file system overwrites it in place.
        folder = local_folder(location)
        self.location = str(location) if folder is None else folder
        self.read_only = read_only
        self._arrays: dict[tuple[int, Shard, str], zarr.Array] = {}
        if read_only and isinstance(self.location, Path) and not self.location.exists():
            self._root = None
            return
        try:
            self._root = zarr.open_group(str(self.location), mode="r" if read_only else "a", zarr_format=3)
        except FileNotFoundError as exc:
            if not read_only:  # e.g. an object store bucket that does not exist
                raise _storage_error(exc, str(self.location)) from None
            self._root = None
        except OSError as exc:
            raise _storage_error(exc, str(self.location)) from None

    @property
    def owner(self) -> str | None:
        """The id of the lake this store belongs to (None: new, or written before lakes had ids)."""
        return None if self._root is None else self._root.attrs.get("lake_id")

    def claim(self, lake_id: str) -> None:
        """Record that this store belongs to the lake ``lake_id`` (see :meth:`xici.warehouse.Lake.gates`)."""
        try:
            self._root.attrs["lake_id"] = lake_id
        except OSError as exc:
            raise _storage_error(exc, str(self.location)) from None

    def run_ids(self) -> list[int]:
        """The runs that have arrays in this store."""
        if self._root is None or "runs" not in self._root:
            return []
        return sorted(int(name) for name in self._root["runs"].group_keys())

    @staticmethod
    def _key(run_id: int, shard: Shard = None) -> str:
        return f"runs/{run_id}" if shard is None else f"runs/{run_id}/shards/{shard}"

    def _group(self, run_id: int, shard: Shard = None) -> zarr.Group:
        key = self._key(run_id, shard)
        if self._root is None or key not in self._root:
            what = f"run {run_id}" if shard is None else f"shard {shard} of run {run_id}"
            raise XiciError(f"{what} has no token arrays", where=f"{self.location}/{key}")
        return self._root[key]

    def has_run(self, run_id: int, shard: Shard = None) -> bool:
        return self._root is not None and self._key(run_id, shard) in self._root

    def create_run(
        self,
        run_id: int,
        *,
        n_layers: int,
        top_k: int,
        n_experts: int,
        gate_dtype: str = "float16",
        store_logits: bool = False,
        gate_sums: bool = True,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        """Create the empty arrays of a run (a no-op when they already exist); ``gate_sums``: keep each
        sequence's gate sums too (what the means of a recording are built from)."""
        if gate_dtype not in GATE_DTYPES:
            raise XiciError(f"gate dtype {gate_dtype!r} is not supported", fix=f"use one of {GATE_DTYPES}")
        if self.has_run(run_id):
            return
        specs = {
            "token_ids": ((), np.dtype(np.int32)),
            "topk_ids": ((n_layers, top_k), expert_id_dtype(n_experts)),
            "topk_weights": ((n_layers, top_k), np.dtype(gate_dtype)),
        }
        if store_logits:
            specs["router_logits"] = ((n_layers, n_experts), np.dtype(gate_dtype))
        attrs = {"n_layers": n_layers, "top_k": top_k, "n_experts": n_experts}
        self._create_arrays(self._key(run_id), specs, attrs, chunk_tokens)
        if gate_sums:
            self._create_arrays(self._key(run_id), _SUM_SPEC, {}, SUM_CHUNK_ROWS)

    def _create_arrays(
        self, key: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]], attrs: dict, chunk_tokens: int
    ) -> None:
        try:
            group = self._root.require_group(key)
            for name, (tail, dtype) in specs.items():
                group.create_array(
                    name,
                    shape=(0, *tail),
                    chunks=(chunk_tokens, *tail),
                    dtype=dtype,
                    compressors=_COMPRESSORS,
                    fill_value=0,
                )
            group.attrs.update(attrs)
        except OSError as exc:
            raise _storage_error(exc, str(self.location)) from None

    def shards(self, run_id: int) -> list[int]:
        """The shards of a run, in order (none for a run written by one process)."""
        key = f"{self._key(run_id)}/shards"
        if self._root is None or key not in self._root:
            return []
        return sorted(int(name) for name in self._root[key].group_keys())

    def add_shard(self, run_id: int) -> int:
        """Create a new empty shard of a run (same arrays as the run's own) and return its number.

        Only the process that writes the warehouse adds shards, so numbers are never handed out twice.
        """
        run = self._group(run_id)
        shard = max(self.shards(run_id), default=-1) + 1
        specs = {name: (run[name].shape[1:], run[name].dtype) for name in self.fields(run_id)}
        chunk_tokens = run["token_ids"].chunks[0]
        self._create_arrays(self._key(run_id, shard), specs, dict(run.attrs), chunk_tokens)
        if SUMS in run:
            self._create_arrays(self._key(run_id, shard), _SUM_SPEC, {}, SUM_CHUNK_ROWS)
        return shard

    def drop_shard(self, run_id: int, shard: int) -> None:
        """Delete a shard that holds no committed token (a dead or interrupted worker's)."""
        try:
            del self._root[self._key(run_id, shard)]
        except OSError as exc:
            raise _storage_error(exc, str(self.location)) from None

    def fields(self, run_id: int, shard: Shard = None) -> list[str]:
        group = self._group(run_id, shard)
        return [name for name in FIELDS if name in group]

    def length(self, run_id: int, shard: Shard = None) -> int:
        return int(self._group(run_id, shard)["token_ids"].shape[0])

    def keeps_sums(self, run_id: int, shard: Shard = None) -> bool:
        """Whether the run (or shard) keeps its sequences' gate sums (runs created before it did do not)."""
        return SUMS in self._group(run_id, shard)

    def sums_length(self, run_id: int, shard: Shard = None) -> int:
        """Rows of the run's (or shard's) gate sums (0 where it keeps none)."""
        return int(self._group(run_id, shard)[SUMS].shape[0]) if self.keeps_sums(run_id, shard) else 0

    def truncate(self, run_id: int, length: int, shard: Shard = None, *, sums: int) -> None:
        """Drop tokens past ``length`` and gate sum rows past ``sums`` (left by a crash before their
        sequences were committed)."""
        group = self._group(run_id, shard)
        keep = {name: length for name in self.fields(run_id, shard)}
        if self.keeps_sums(run_id, shard):
            keep[SUMS] = sums
        try:
            for name, rows in keep.items():
                array = group[name]
                if array.shape[0] != rows:
                    array.resize((rows, *array.shape[1:]))
        except OSError as exc:
            raise _storage_error(exc, str(self.location)) from None
        if isinstance(self.location, Path):
            for partial in (self.location / self._key(run_id, shard)).rglob("*.partial"):
                partial.unlink(missing_ok=True)

    def append(self, run_id: int, arrays: TokenArrays, shard: Shard = None) -> int:
        """Append tokens to a run's (or shard's) arrays; returns the offset of the first one."""
        group = self._group(run_id, shard)
        start = self.length(run_id, shard)
        stop = start + len(arrays)
        values = {
            "token_ids": arrays.token_ids,
            "topk_ids": arrays.topk_ids,
            "topk_weights": arrays.topk_weights,
            "router_logits": arrays.router_logits,
        }
        try:
            with zarr.config.set(_WRITE_CONFIG):  # arrays take the setting when opened
                for name in self.fields(run_id, shard):
                    if values[name] is None:
                        raise ValueError(f"run {run_id} stores {name}, but none was given")
                    array = group[name]
                    array.resize((stop, *array.shape[1:]))
                    array[start:stop] = values[name].astype(array.dtype, copy=False)
        except OSError as exc:
            raise _storage_error(exc, str(self.location)) from None
        return start

    def append_sequences(self, run_id: int, arrays: Sequence[TokenArrays], shard: Shard = None) -> Appended:
        """Append the tokens of whole sequences to a run's (or shard's) arrays and, where it keeps them,
        their gate sums; nothing is committed yet (:meth:`xici.warehouse.Lake.commit_rows`)."""
        tokens = TokenArrays.concat(list(arrays))
        start = self.append(run_id, tokens, shard)
        lengths = [len(a) for a in arrays]
        if not self.keeps_sums(run_id, shard):
            return Appended(start, lengths)
        from xici.warehouse.sums_kernel import sequence_sums  # numba: loaded once sums are written

        group = self._group(run_id, shard)
        ids, weights = (group[name] for name in ("topk_ids", "topk_weights"))
        rows, counts = sequence_sums(  # from the values as stored
            tokens.topk_ids.astype(ids.dtype, copy=False),
            tokens.topk_weights.astype(weights.dtype, copy=False),
            int(group.attrs["n_experts"]),
            np.asarray(lengths, np.int64),
        )
        array = group[SUMS]
        sums_start = int(array.shape[0])
        try:
            with zarr.config.set(_WRITE_CONFIG):
                array.resize((sums_start + len(rows), 3))
                array[sums_start:] = rows
        except OSError as exc:
            raise _storage_error(exc, str(self.location)) from None
        return Appended(start, lengths, sums_start, [None if c < 0 else int(c) for c in counts])

    def read_sums(self, run_id: int, start: int, stop: int, shard: Shard = None) -> np.ndarray:
        """Rows ``[start, stop)`` of a run's (or shard's) gate sums, verified (:class:`DamagedGates`)."""
        if not self.keeps_sums(run_id, shard):
            problem = f"committed rows, but there is no {SUMS} array"
            raise DamagedGates(
                run_id, shard, SUMS, (start, stop), problem, f"{self.location}/{self._key(run_id, shard)}"
            )
        return self._verified(self.array(run_id, SUMS, shard), run_id, shard, SUMS, start, stop)

    def array(self, run_id: int, name: str, shard: Shard = None) -> zarr.Array:
        """One array of a run (or shard). A read-only store opens each array once and keeps it (opening
        reads the group's and the array's metadata: four store reads per read of two arrays otherwise),
        so its shape is the one it had then; stores are opened read-only for one command's reads."""
        key = (run_id, shard, name)
        array = self._arrays.get(key)
        if array is None:
            array = self._group(run_id, shard)[name]
            if self.read_only:
                self._arrays[key] = array
        return array

    def read_fields(
        self, run_id: int, start: int, stop: int, names: list[str], *, shard: Shard = None
    ) -> dict[str, np.ndarray]:
        """Tokens ``[start, stop)`` of some arrays of a run (or of one of its shards), reading only the
        chunks that hold them, verified (:class:`DamagedGates`)."""
        return {
            name: self._verified(self.array(run_id, name, shard), run_id, shard, name, start, stop)
            for name in names
        }

    def read(
        self, run_id: int, start: int, stop: int, *, logits: bool = False, shard: Shard = None
    ) -> TokenArrays:
        """Tokens ``[start, stop)`` of a run (or of one of its shards), verified (:class:`DamagedGates`)."""
        names = [n for n in self.fields(run_id, shard) if logits or n != "router_logits"]
        return TokenArrays(**self.read_fields(run_id, start, stop, names, shard=shard))

    def _verified(
        self, array: zarr.Array, run_id: int, shard: Shard, name: str, start: int, stop: int
    ) -> np.ndarray:
        """``array[start:stop]``, refusing a range past the array's end, a missing chunk or one that does not
        decode (a failed checksum among them)."""
        where = f"{self.location}/{self._key(run_id, shard)}/{name}"
        if stop <= start:
            return array[start:stop]
        length, size = array.shape[0], array.chunks[0]
        if stop > length:
            problem = _ends_early(name, length)
            raise DamagedGates(run_id, shard, name, (max(start, length), stop), problem, where)
        chunks = range(start // size, (stop - 1) // size + 1)
        if _decodes_directly(array):
            return _decoded(
                array,
                chunks,
                start,
                stop,
                lambda index, problem: DamagedGates(
                    run_id, shard, name, (index * size, min((index + 1) * size, length)), problem, where
                ),
            )
        for index, found in zip(chunks, self._chunks_exist(array, chunks), strict=True):
            if not found:
                tokens = (index * size, min((index + 1) * size, length))
                raise DamagedGates(run_id, shard, name, tokens, f"chunk {index} is missing", where)
        try:
            return array[start:stop]
        except (ValueError, RuntimeError, TypeError) as exc:
            for index in chunks:  # which chunk: read them one by one (only when something failed)
                tokens = (index * size, min((index + 1) * size, length))
                try:
                    array[tokens[0] : tokens[1]]
                except (ValueError, RuntimeError, TypeError) as bad:
                    problem = f"chunk {index} does not decode ({bad})"
                    raise DamagedGates(run_id, shard, name, tokens, problem, where) from None
            raise exc

    @staticmethod
    def _chunks_exist(array: zarr.Array, chunks: range) -> list[bool]:
        """Whether each chunk (an index on the token axis) of an array has been written to the store."""
        store = array.store_path.store

        async def exist() -> list[bool]:
            return list(await asyncio.gather(*(store.exists(key) for key in _chunk_keys(array, chunks))))

        return sync(exist())

    def has_checksums(self, run_id: int, shard: Shard = None) -> bool:
        """Whether every array of a run (or shard) carries chunk checksums (newer arrays all do)."""
        group = self._group(run_id, shard)
        return all(
            isinstance(group[name].metadata.codecs[-1], Crc32cCodec) for name in self.fields(run_id, shard)
        )

    def verify(
        self,
        run_id: int,
        stop: int,
        shard: Shard = None,
        *,
        sums: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[DamagedGates]:
        """Every damaged chunk among the first ``stop`` tokens of a run's (or shard's) arrays and the first
        ``sums`` rows of its gate sums.

        A chunk with a checksum is read as stored and its checksum computed, without decompressing it; one
        without (arrays written before checksums) is decoded. For ``xici lake check``: reads are verified
        anyway, this finds all damage at once. ``progress(tokens)`` is called as each array's tokens are
        checked.
        """
        group = self._group(run_id, shard)
        store = self._root.store
        ends = {name: stop for name in self.fields(run_id, shard)}
        if sums:
            ends[SUMS] = sums
        for name, stop in ends.items():
            if name not in group:
                problem = f"committed rows, but there is no {SUMS} array"
                yield DamagedGates(
                    run_id, shard, name, (0, sums), problem, f"{self.location}/{self._key(run_id, shard)}"
                )
                continue
            array = group[name]
            where = f"{self.location}/{self._key(run_id, shard)}/{name}"
            length, size = array.shape[0], array.chunks[0]
            if stop > length:
                yield DamagedGates(run_id, shard, name, (length, stop), _ends_early(name, length), where)
            checksum = isinstance(array.metadata.codecs[-1], Crc32cCodec)
            n_chunks = -(-min(stop, length) // size)
            for first in range(0, n_chunks, _CHUNKS_PER_CHECK):
                chunks = range(first, min(first + _CHUNKS_PER_CHECK, n_chunks))
                for index, blob in zip(chunks, _stored_bytes(store, _chunk_keys(array, chunks)), strict=True):
                    tokens = (index * size, min((index + 1) * size, length))
                    problem = _chunk_problem(array, blob, tokens, checksum)
                    if problem is not None:
                        yield DamagedGates(run_id, shard, name, tokens, f"chunk {index} {problem}", where)
                if progress is not None and name != SUMS:
                    progress(min(chunks.stop * size, stop) - chunks.start * size)

    def read_sequences(
        self,
        run_id: int,
        shards: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        *,
        tokens_per_read: int,
        logits: bool = False,
        seq_ids: np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, TokenArrays]]:
        """The tokens of whole sequences of a run, shard by shard, about ``tokens_per_read`` at a time.

        ``shards`` holds each sequence's shard, -1 for the run's own arrays (``coalesce(shard, -1)`` in SQL).
        Yields (indices of the given sequences, their tokens one after the other); each read covers the token
        range from the first sequence's start to the last one's end, so give a shard's sequences in
        ``starts`` order. A damaged range (:class:`DamagedGates`) names the sequences in it: their ``seq_ids``
        when given.
        """
        for shard in np.unique(shards):
            pick = np.flatnonzero(shards == shard)
            i = 0
            while i < len(pick):
                j, total = i, 0
                while j < len(pick) and (j == i or total + lengths[pick[j]] <= tokens_per_read):
                    total += int(lengths[pick[j]])
                    j += 1
                which = pick[i:j]
                lo, hi = int(starts[which[0]]), int(starts[which[-1]] + lengths[which[-1]])
                try:
                    block = self.read(run_id, lo, hi, logits=logits, shard=None if shard < 0 else int(shard))
                except DamagedGates as exc:
                    label = "sequences" if seq_ids is None else "seq_id"
                    names = which if seq_ids is None else seq_ids[which]
                    raise exc.hitting(starts[which], lengths[which], names, label) from None
                keep = np.repeat(starts[which] - lo, lengths[which]) + sequence_positions(lengths[which])
                yield (
                    which,
                    TokenArrays(
                        block.token_ids[keep],
                        block.topk_ids[keep],
                        block.topk_weights[keep],
                        None if block.router_logits is None else block.router_logits[keep],
                    ),
                )
                i = j

    def nbytes_stored(self, run_id: int) -> int:
        """Bytes the run's arrays (all shards) take on disk (compressed), for storage benchmarks."""
        if not isinstance(self.location, Path):
            raise ValueError("stored size is only measured for a local gate store")
        root = self.location / self._key(run_id)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Appended:
    """Sequences appended to a run's (or shard's) arrays, not committed yet: their tokens from ``start``,
    one after the other, and their gate sums' rows from ``sums_start`` (``n_sums`` per sequence; None: no
    sums kept, see the module notes). Small enough to send between processes."""

    start: int
    lengths: list[int]
    sums_start: int | None = None
    n_sums: list[int | None] | None = None


_SUM_SPEC = {SUMS: ((3,), np.dtype(np.int64))}


def _ends_early(name: str, length: int) -> str:
    if name == SUMS:
        return f"the array ends at row {length}, before the committed rows do"
    return f"the array ends at token {length}, before the committed tokens do"


# Chunks fetched together by GateStore.verify (concurrently, on an object store).
_CHUNKS_PER_CHECK = 64


def _chunk_keys(array: zarr.Array, chunks: range) -> list[str]:
    """Store keys of chunks of an array (indices on the token axis)."""
    tail = (0,) * (array.ndim - 1)
    return [f"{array.store_path.path}/{array.metadata.encode_chunk_key((i, *tail))}" for i in chunks]


def _stored_bytes(store: zarr.abc.store.Store, keys: list[str]) -> list[np.ndarray | None]:
    """The bytes stored under each key, as uint8 arrays over the buffers read (not copied; None where
    there is none)."""
    prototype = zarr.core.buffer.default_buffer_prototype()

    async def get() -> list[np.ndarray | None]:
        found = await asyncio.gather(*(store.get(key, prototype=prototype) for key in keys))
        return [None if buffer is None else buffer.as_numpy_array() for buffer in found]

    return sync(get())


def _decodes_directly(array: zarr.Array) -> bool:
    """Whether the chunks of ``array`` are what xici writes, decoded here without Zarr's machinery: whole
    rows of the token axis, native little-endian bytes, Blosc, and the checksum when there is one."""
    codecs = array.metadata.codecs
    if isinstance(codecs[-1], Crc32cCodec):
        codecs = codecs[:-1]
    return (
        len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
        and isinstance(codecs[1], BloscCodec)
        and array.dtype.isnative
        and tuple(array.chunks[1:]) == tuple(array.shape[1:])
    )


def _decoded(
    array: zarr.Array,
    chunks: range,
    start: int,
    stop: int,
    damage: Callable[[int, str], DamagedGates],
) -> np.ndarray:
    """Tokens ``[start, stop)`` of an array whose chunks :func:`_decodes_directly`: each chunk's bytes
    checked (existence, checksum, Blosc header) and decompressed straight into the result (a chunk read in
    part through a scratch chunk). About a third less CPU than Zarr's indexing, which decompresses into new
    buffers and copies them into the result; the same bytes."""
    size = array.chunks[0]
    out = np.empty((stop - start, *array.shape[1:]), dtype=array.dtype)
    flat = out.reshape(-1).view(np.uint8)
    row = flat.nbytes // (stop - start)
    checksum = isinstance(array.metadata.codecs[-1], Crc32cCodec)
    scratch = None
    for index, blob in zip(chunks, _chunk_bytes(array, chunks), strict=True):
        if blob is None:
            raise damage(index, f"chunk {index} is missing")
        if checksum:
            if not _checksum_holds(blob):
                raise damage(
                    index, f"chunk {index} does not decode (Stored and computed checksum do not match)"
                )
            blob = blob[:-4]
        first, last = max(start, index * size), min(stop, (index + 1) * size)
        if last - first == size:
            target = flat[(first - start) * row : (last - start) * row]
        else:
            scratch = np.empty(size * row, dtype=np.uint8) if scratch is None else scratch
            target = scratch
        expected, stored, _ = blosc._cbuffer_sizes(blob)
        try:
            if (expected, stored) != (size * row, len(blob)):
                raise ValueError(f"a Blosc header for {stored} bytes holding {expected}")
            blosc.decompress(blob, target)
        except (ValueError, RuntimeError) as exc:
            raise damage(index, f"chunk {index} does not decode ({exc})") from None
        if target is scratch:
            offset = index * size
            flat[(first - start) * row : (last - start) * row] = scratch[
                (first - offset) * row : (last - offset) * row
            ]
    return out


def _chunk_bytes(array: zarr.Array, chunks: range) -> Iterator[np.ndarray | None]:
    """The stored bytes of chunks of an array, in order (None: missing). From a local folder each file is
    read in the calling thread as its turn comes, not through Zarr's event loop: a scan's reading threads
    then wait on no other thread (on a loaded machine every hand-over waits for a core)."""
    store = array.store_path.store
    keys = _chunk_keys(array, chunks)
    if not isinstance(store, LocalStore):
        yield from _stored_bytes(store, keys)
        return
    for key in keys:
        try:
            yield np.frombuffer((store.root / key).read_bytes(), dtype=np.uint8)
        except FileNotFoundError:
            yield None


def _checksum_holds(blob: np.ndarray) -> bool:
    """Whether a stored chunk ends with the crc32c of the bytes before (Zarr's crc32c codec)."""
    return len(blob) >= 4 and google_crc32c.value(blob[:-4]) == int.from_bytes(blob[-4:], "little")


def _chunk_problem(
    array: zarr.Array, blob: np.ndarray | None, tokens: tuple[int, int], checksum: bool
) -> str | None:
    """What is wrong with a stored chunk (None: nothing): missing, a failed checksum, or no decoding."""
    if blob is None:
        return "is missing"
    if checksum:
        if not _checksum_holds(blob):
            return "fails its checksum"
        return None
    try:
        array[tokens[0] : tokens[1]]
    except (ValueError, RuntimeError, TypeError) as exc:
        return f"does not decode ({exc})"
    return None


def id_ranges(values: np.ndarray) -> str:
    """Integers as short ranges: ``3-7, 9``."""
    values = np.unique(np.asarray(values, dtype=np.int64))
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    parts = np.split(values, breaks)
    return ", ".join(f"{p[0]}" if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts if len(p))
