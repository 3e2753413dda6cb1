"""The lake: one folder holding the DuckDB warehouse and the Zarr store of token routing.

This module owns the commit protocol that keeps the two in step. Token arrays (and each sequence's gate sums)
are appended to Zarr first; the sequence rows that point at them (and, for a recording run, their
``seq_means`` rows) are then inserted in one DuckDB transaction. A crash in between leaves tokens that no row
points at, and :meth:`Lake.resume` cuts them off before the next append. So a sequence row exists if and only
if all of its tokens are in Zarr, and a re-run never duplicates anything.

A scaled-out run (:mod:`xici.recorder.ray_pool`) splits the protocol: each worker appends to its own shard of
the run's arrays and hands the offsets back, and this process, the only one that writes the
warehouse, commits the rows (:meth:`Lake.commit_rows`). A shard is committed in the order it was appended,
so the same rule holds per shard: committed tokens are a prefix of it, and :meth:`Lake.resume` cuts the rest.

The token arrays live in ``gates.zarr`` inside the lake folder unless the lake was pointed elsewhere (any
fsspec URL, :meth:`Lake.use_gates`), which ``lake.json`` remembers for every later command.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np

from xici.errors import XiciError
from xici.notebook import LakeReading
from xici.warehouse.db import WarehouseLocked, attach_read_only, connect, damaged, transaction
from xici.warehouse.gates import (
    Appended,
    GateStore,
    Shard,
    TokenArrays,
    check_location,
    is_url,
    local_folder,
)
from xici.warehouse.scan import TOKEN_RELATIONS, ScanStats, TokenScan, run_layouts

T = TypeVar("T")

WAREHOUSE_FILE = "warehouse.duckdb"
# How long a writer waits for another process's lock on the warehouse file before giving up.
LOCK_WAIT_S = 300.0
ZARR_DIR = "gates.zarr"
SETTINGS_FILE = "lake.json"

_SEQ_MEANS_VIEW = "xici_committed_means"
SEQUENCE_COLUMNS = (
    "unit",
    "question_id",
    "lang",
    "n_prompt_tokens",
    "n_generated",
    "prompt_text",
    "response_text",
    "finish_reason",
)


class Lake(LakeReading):
    """A lake folder: ``warehouse.duckdb`` (metadata, SQL) and ``gates.zarr`` (per-token routing).

    ``read_only`` lakes (what :func:`xici.open` gives by default) refuse every write with a clear error; the
    reading side (``sql``, ``routing``, tables and plots) is :class:`~xici.notebook.LakeReading`.

    The warehouse is opened one way: ``lake.read(lambda con: ...)`` on a short read-only connection,
    ``lake.write(lambda con: ...)`` in one short transaction (``lake.attached()`` for the sandboxed query
    connection of ``xici sql``). Each waits out another process's lock on the file
    (:class:`~xici.warehouse.db.WarehouseLocked`, raised where the connection is made).
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        self.root = Path(root)
        self._identity: str | None = None
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"Lake({str(self.root)!r}{', read_only=True' if self.read_only else ''})"

    @property
    def warehouse_path(self) -> Path:
        return self.root / WAREHOUSE_FILE

    @property
    def zarr_path(self) -> Path:
        return self.root / ZARR_DIR

    @property
    def gates_location(self) -> Path | str:
        """Where this lake's token arrays are: ``gates.zarr`` in the folder, or the URL set by use_gates."""
        settings = self.root / SETTINGS_FILE
        if not settings.exists():
            return self.zarr_path
        try:
            return json.loads(settings.read_text())["gates"]
        except (ValueError, TypeError, KeyError):
            raise XiciError(
                "the lake's settings are not readable: expected a JSON object with the key 'gates' (where "
                "the token arrays are)",
                where=str(settings),
                fix='restore it, e.g. {"gates": "<folder or URL of the gate store>"}; if the lake never used '
                "--gates-url, remove the file (its token arrays are then gates.zarr in the lake folder)",
            ) from None

    def check_output(self, path: Path, *, where: str = "--out", folder: bool = False) -> None:
        """Refuse an output that would land in the lake's own files: the warehouse (and DuckDB's files beside
        it), lake.json, the run locks, the gate store; a ``folder`` output (a report) may not be the lake
        folder itself either, since it writes and replaces files of fixed names in it."""
        target = path.expanduser().resolve()
        root = self.root.expanduser().resolve()
        gates = local_folder(self.gates_location)
        owned = [root / "locks", self.zarr_path.resolve()] + ([] if gates is None else [gates.resolve()])
        inside = next((str(o) for o in owned if target.is_relative_to(o)), None)
        if target.parent == root and target.name.startswith((WAREHOUSE_FILE, SETTINGS_FILE)):
            inside = str(target)
        elif folder and target == root:
            inside = str(root)
        if inside is not None:
            raise XiciError(
                f"{path} is inside the lake's own files ({inside}); writing there could damage the recording",
                where=where,
                fix="write to a file or folder outside the warehouse and the gate store (any other folder)",
            )

    def use_gates(self, location: str) -> bool:
        """Keep this lake's token arrays at ``location`` (an fsspec URL, e.g. ``s3://bucket/lake.zarr``, or a
        folder), so that workers on other machines can write them; set once, before the first run. Returns
        whether it wrote the setting (False: the lake already keeps them there)."""
        location = _absolute(location)
        if _absolute(self.gates_location) == location:
            return False
        if (self.root / SETTINGS_FILE).exists() or self.zarr_path.exists():
            raise XiciError(
                f"this lake keeps its token arrays at {self.gates_location}, not {location}",
                where="--gates-url",
                fix="leave --gates-url out to use them, or start a new lake with --lake",
            )
        check_location(location)
        self._check_owner(GateStore(location, read_only=True), writing=True)
        self._ensure_root()
        temporary = self.root / f"{SETTINGS_FILE}.tmp"
        temporary.write_text(json.dumps({"gates": location}) + "\n")
        temporary.replace(self.root / SETTINGS_FILE)
        return True

    @contextmanager
    def using_gates(self, location: str | None) -> Iterator[None]:
        """:meth:`use_gates` for the first run started in the block (nothing when ``location`` is None); when
        the block fails before that run's row exists (a refused dataset, model or store), the setting is
        taken back, so a refused command leaves lake.json as it was."""
        wrote = location is not None and self.use_gates(location)
        try:
            yield
        except BaseException:
            if wrote and not self.read(lambda con: con.execute("select count(*) from runs").fetchone()[0]):
                (self.root / SETTINGS_FILE).unlink(missing_ok=True)
            raise

    def _ensure_root(self) -> None:
        """Every write to the lake passes here: refuse a read-only lake, close the relations lake.sql handed
        out in this process (DuckDB cannot write a file this process reads), create the folder."""
        if self.read_only:
            raise XiciError(
                "this lake was opened read-only",
                where=str(self.root),
                fix="open it for writing: xici.open(path, read_only=False)",
            )
        self.close()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise XiciError(
                f"cannot create the lake folder ({exc.strerror})",
                where=str(self.root),
                fix="pass a writable --lake folder (or set XICI_LAKE)",
            ) from None

    def connect(self, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """A connection to the warehouse (created and migrated on first write)."""
        if not read_only:
            self._ensure_root()
        return connect(self.warehouse_path, read_only=read_only)

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived writing connection inside one transaction: all of it lands, or none of it."""
        con = self.connect()
        try:
            with transaction(con):
                yield con
        finally:
            con.close()

    @contextmanager
    def writing(self, run_id: int) -> Iterator[None]:
        """Hold a run for writing, so that a second process writing the same run stops with a clear error.

        Without it two writers would both compute the missing batches and the loser of each commit would fail
        on a duplicate. The lock is an OS file lock: a killed writer releases it with its process.
        """
        path = self._lock_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise XiciError(
                    f"run {run_id} is being written by another process",
                    where=str(path),
                    fix="wait for that process to finish (or stop it), then run the command again: the run "
                    "continues where it stands",
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _lock_path(self, run_id: int) -> Path:
        return self.root / "locks" / f"run-{run_id}.lock"

    def is_being_written(self, run_id: int) -> bool:
        """Whether a process holds the run for writing now (:meth:`writing`); creates no file."""
        try:
            handle = self._lock_path(run_id).open("r")
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def retrying(self, action: Callable[[int], T]) -> T:
        """Run ``action(attempt)`` on the warehouse, again while another process holds its file lock.

        DuckDB lets one process write a file, and none while another reads it. Long jobs (recording,
        ablation) open the warehouse only briefly per commit, so a reader (``xici sql``, a polling script)
        can look in between; when one holds the file at that moment, the job waits instead of stopping.
        """
        deadline = time.monotonic() + LOCK_WAIT_S
        attempt = 0
        while True:
            try:
                return action(attempt)
            except WarehouseLocked:
                if time.monotonic() > deadline:
                    raise
            attempt += 1
            time.sleep(0.2)

    def read(self, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``query(con)`` on a short read-only connection, waiting out other processes' locks."""

        def attempt(_: int) -> T:
            con = self.connect(read_only=True)
            try:
                return query(con)
            finally:
                con.close()

        return self.retrying(attempt)

    def attached(self, alias: str = "warehouse") -> duckdb.DuckDBPyConnection:
        """An in-memory connection of its own with the warehouse attached read-only as ``alias`` (see
        :func:`~xici.warehouse.db.attach_read_only`), waiting out other processes' locks like :meth:`read`."""
        return self.retrying(lambda _: attach_read_only(self.warehouse_path, alias))

    def write(self, change: Callable[[duckdb.DuckDBPyConnection], T], *, atomic: bool = True) -> T:
        """``change(con)`` in one short transaction, waiting out other processes' locks.

        ``atomic=False`` lets each statement commit on its own: for a long build that must not keep all of
        its inputs alive until one commit, and that records its completion itself (the run's means).
        """

        def attempt(_: int) -> T:
            if not atomic:
                con = self.connect()
                try:
                    return change(con)
                finally:
                    con.close()
            with self._transaction() as con:
                return change(con)

        return self.retrying(attempt)

    def identity(self, con: duckdb.DuckDBPyConnection | None = None) -> str:
        """This lake's id, drawn when its warehouse was created (read on ``con`` when given)."""
        if self._identity is None:

            def query(con: duckdb.DuckDBPyConnection) -> str:
                [(lake_id,)] = con.execute("select lake_id from lake").fetchall()
                return str(lake_id)

            if con is not None:
                self._identity = query(con)
            else:
                self._identity = self.read(query) if self.warehouse_path.exists() else self.write(query)
        return self._identity

    def damage(self, exc: BaseException) -> XiciError | None:
        """The error for DuckDB failing to read this lake's warehouse file in the middle of a command (a
        truncated file opens, and fails at the first block it lacks), else None."""
        text = str(exc)
        named = (str(self.warehouse_path), str(self.warehouse_path.absolute()))
        if isinstance(exc, duckdb.IOException) and any(n in text for n in named) and "lock" not in text:
            return damaged(self.warehouse_path, exc)
        return None

    def gates(self, *, read_only: bool = False, con: duckdb.DuckDBPyConnection | None = None) -> GateStore:
        """The gate store, checked to be this lake's (and claimed for it on the first write).

        Give ``con`` when a connection to the warehouse is open in this process: the check reads it.
        """
        if not read_only:
            self._ensure_root()
        store = GateStore(self.gates_location, read_only=read_only)
        self._check_owner(store, con, writing=not read_only)
        return store

    def _check_owner(
        self, store: GateStore, con: duckdb.DuckDBPyConnection | None = None, *, writing: bool
    ) -> None:
        """Refuse a gate store that belongs to another lake; before writing, claim one that belongs to none.

        A store without an owner is new, or was written before lakes had ids: it is claimed when every run it
        holds is a run of this warehouse (an older lake of its own), and refused otherwise (another lake's, or
        this folder's after its warehouse was lost). Reading such a store does not claim it.
        """
        lake_id, owner = self.identity(con), store.owner
        if owner == lake_id:
            return
        recover = (
            "point this lake at a gate store of its own (a new --lake folder, or another --gates-url); if "
            "this lake's warehouse was lost, restore it from a backup: xici lake check tells which runs the "
            "store holds"
        )
        if owner is not None:
            raise XiciError(
                f"the gate store belongs to another lake (id {owner}), not to this one (id {lake_id}); "
                "writing into it would overwrite that lake's runs",
                where=str(store.location),
                fix=recover,
            )
        if not writing:
            return
        known = {r for (r,) in self._runs(con)}
        strangers = [r for r in store.run_ids() if r not in known]
        if strangers:
            raise XiciError(
                f"the gate store holds runs {', '.join(map(str, strangers))} that this lake's warehouse does "
                "not know; writing into it would overwrite them",
                where=str(store.location),
                fix=recover,
            )
        if not store.read_only:
            store.claim(lake_id)

    def _runs(self, con: duckdb.DuckDBPyConnection | None) -> list[tuple[int]]:
        def query(con: duckdb.DuckDBPyConnection) -> list[tuple[int]]:
            return con.execute("select run_id from runs").fetchall()

        return query(con) if con is not None else self.read(query)

    # -- runs -------------------------------------------------------------------------------------------

    def get_or_create_run(
        self, con: duckdb.DuckDBPyConnection, run_key: str, **fields: Any
    ) -> tuple[int, bool]:
        """The run with this key, or a new one with these fields; returns (run_id, created)."""
        row = con.execute("select run_id from runs where run_key = ?", [run_key]).fetchone()
        if row:
            return row[0], False
        run_id = con.execute("select coalesce(max(run_id), 0) + 1 from runs").fetchone()[0]
        values = {"run_id": run_id, "run_key": run_key, "status": "running", **fields}
        for key in ("params", "versions"):
            values[key] = json.dumps(values[key], sort_keys=True)
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        con.execute(f"insert into runs ({names}) values ({marks})", list(values.values()))
        return run_id, True

    def committed(self, con: duckdb.DuckDBPyConnection, run_id: int, shard: Shard = None) -> tuple[int, int]:
        """Tokens of a run's arrays (or of one shard), and rows of its gate sums, that committed sequences
        cover."""
        return con.execute(
            "select coalesce(max(token_start + n_tokens), 0), coalesce(max(sums_start + n_sums), 0)"
            " from sequences where run_id = ? and shard is not distinct from ?",
            [run_id, shard],
        ).fetchone()

    def resume(self, run_id: int) -> set[int]:
        """Make the Zarr arrays of a run match its committed sequences; returns the units already done.

        Every shard is cut to its committed tokens, and a shard with none (a worker that died or was stopped
        before its first commit) is deleted. Call it only while no worker writes the run.
        """
        con = self.connect()
        try:
            units = con.execute("select unit from sequences where run_id = ?", [run_id]).fetchall()
            done = {unit for (unit,) in units}
            gates = self.gates(con=con)
            if gates.has_run(run_id):
                for shard in [None, *gates.shards(run_id)]:
                    tokens, sums = self.committed(con, run_id, shard)
                    if shard is not None and tokens == 0:
                        gates.drop_shard(run_id, shard)
                    else:
                        gates.truncate(run_id, tokens, shard, sums=sums)
        finally:
            con.close()
        return done

    def commit_sequences(
        self,
        run_id: int,
        rows: Sequence[dict[str, Any]],
        arrays: Sequence[TokenArrays],
        *,
        also: Callable[[duckdb.DuckDBPyConnection, list[int]], None] | None = None,
    ) -> list[int]:
        """Append the token arrays of some sequences, then commit their rows; returns their seq_ids.

        ``also(con, seq_ids)`` runs inside the same transaction (grades, for instance), so the rows and
        whatever belongs to them land together.
        """
        if len(rows) != len(arrays):
            raise ValueError("one TokenArrays per sequence row")
        if not rows:
            return []
        return self.commit_rows(run_id, rows, self.gates().append_sequences(run_id, arrays), also=also)

    def commit_rows(
        self,
        run_id: int,
        rows: Sequence[dict[str, Any]],
        appended: Appended,
        *,
        shard: Shard = None,
        also: Callable[[duckdb.DuckDBPyConnection, list[int]], None] | None = None,
    ) -> list[int]:
        """Commit the rows of sequences whose tokens (and gate sums) are already appended to the run's arrays
        or to ``shard`` (:meth:`GateStore.append_sequences`); returns their seq_ids (see commit_sequences).

        The tokens and sums must follow the committed ones directly: a shard is committed in the order it was
        written, so nothing uncommitted is ever left between committed sequences.
        """
        lengths = appended.lengths
        if len(rows) != len(lengths):
            raise ValueError("one length per sequence row")
        n_sums = appended.n_sums or [None] * len(rows)
        sums_at = np.cumsum([0, *(n or 0 for n in n_sums)]) + (appended.sums_start or 0)
        with self._transaction() as con:
            where = f"run {run_id}" if shard is None else f"run {run_id} shard {shard}"
            committed, committed_sums = self.committed(con, run_id, shard)
            if committed != appended.start:
                raise RuntimeError(
                    f"{where}: Zarr holds tokens from {appended.start} but the warehouse committed "
                    f"{committed}; was Lake.resume called before writing?"
                )
            if appended.sums_start is not None and committed_sums != appended.sums_start:
                raise RuntimeError(
                    f"{where}: Zarr holds gate sums from row {appended.sums_start} but the warehouse "
                    f"committed {committed_sums}; was Lake.resume called before writing?"
                )
            first_id = con.execute("select coalesce(max(seq_id), 0) + 1 from sequences").fetchone()[0]
            seq_ids = list(range(first_id, first_id + len(rows)))
            offsets = np.cumsum([0, *lengths])
            records = [
                [seq_id, run_id, shard, int(appended.start + offsets[i]), int(lengths[i])]
                + [None if n_sums[i] is None else int(sums_at[i]), n_sums[i]]
                + [row[c] for c in SEQUENCE_COLUMNS]
                for i, (seq_id, row) in enumerate(zip(seq_ids, rows, strict=True))
            ]
            con.executemany(
                "insert into sequences (seq_id, run_id, shard, token_start, n_tokens, sums_start, n_sums, "
                + ", ".join(SEQUENCE_COLUMNS)
                + ") values ("
                + ", ".join("?" for _ in range(7 + len(SEQUENCE_COLUMNS)))
                + ")",
                records,
            )
            if appended.sums_start is not None:
                self._commit_seq_means(con, run_id, shard, seq_ids, lengths, n_sums, sums_at)
            if also is not None:
                also(con, seq_ids)
        return seq_ids

    def _commit_seq_means(
        self,
        con: duckdb.DuckDBPyConnection,
        run_id: int,
        shard: Shard,
        seq_ids: list[int],
        lengths: Sequence[int],
        n_sums: Sequence[int | None],
        sums_at: np.ndarray,
    ) -> None:
        """Insert the seq_means rows of sequences of a recording run being committed, from their gate sums
        as stored (read back, verified): what sql/seq_means.sql gives for them, so that the means an analysis
        needs are in the warehouse once recorded (:func:`xici.analysis.means.ensure_means` then adds up only
        the language means). Sequences without gate sums get none (the build takes the run's from its
        gates)."""
        [(kind, n_experts)] = con.execute(
            "select kind, n_experts from runs where run_id = ?", [run_id]
        ).fetchall()
        keep = np.array([n is not None for n in n_sums])
        if kind != "record" or not keep.any():
            return
        from xici.warehouse.sums_kernel import seq_means  # numba: loaded once sums are written

        lo, hi = int(sums_at[0]), int(sums_at[-1])
        sums = self.gates(con=con).read_sums(run_id, lo, hi, shard)
        rows = seq_means(
            sums,
            sums_at[:-1][keep] - lo,
            np.array([n or 0 for n in n_sums])[keep],
            np.asarray(lengths, np.int64)[keep],
            np.asarray(seq_ids, np.int64)[keep],
            n_experts,
        )
        con.register(_SEQ_MEANS_VIEW, rows)
        try:
            con.execute(f"insert into seq_means select ?, * from {_SEQ_MEANS_VIEW}", [run_id])
        finally:
            con.unregister(_SEQ_MEANS_VIEW)

    # -- SQL over tokens ----------------------------------------------------------------------------------

    def token_scan(
        self,
        con: duckdb.DuckDBPyConnection,
        name: str,
        *,
        run_ids: Sequence[int] | None = None,
        only_seq_ids: np.ndarray | None = None,
        stats: ScanStats | None = None,
    ) -> TokenScan:
        """``tokens``, ``token_gates`` or ``token_logits`` of the given runs (all by default), as a scan that
        DuckDB can open any number of times, reading from Zarr only what each query asks for.

        Nothing is copied into DuckDB: register it on a connection (:meth:`register_token_relations`). Rows of
        ``token_gates`` are one per (token, layer, selected expert); experts not selected have weight 0 and no
        row. ``only_seq_ids`` leaves out every other sequence (see :mod:`xici.warehouse.pushdown`).
        """
        gates = self.gates(read_only=True, con=con)
        layouts = run_layouts(con, gates, name, run_ids)
        return TokenScan(gates, name, layouts, only_seq_ids=only_seq_ids, stats=stats)

    def register_token_relations(
        self,
        con: duckdb.DuckDBPyConnection,
        *,
        run_ids: Sequence[int] | None = None,
        names: Sequence[str] = (),
        only_seq_ids: dict[str, np.ndarray] | None = None,
        stats: ScanStats | None = None,
    ) -> None:
        """Make the token relations queryable on ``con``, each as many times as a query names it."""
        for name in names or TOKEN_RELATIONS:
            scan = self.token_scan(
                con, name, run_ids=run_ids, only_seq_ids=(only_seq_ids or {}).get(name), stats=stats
            )
            con._register_arrow_source(name, scan)


def _absolute(location: str | Path) -> str:
    """A gate store location that names the same place from any current folder (later commands, workers)."""
    folder = local_folder(location)
    if folder is None:
        return str(location)
    return f"file://{folder.absolute()}" if is_url(location) else str(folder.absolute())
