"""The lake from Python: SQL relations, dense routing arrays, the result tables, and two plots.

:class:`~xici.warehouse.Lake` inherits these methods, so a notebook (``xici.open``) and the ``xici`` command
work on one object through one code path: :meth:`LakeReading.sql` opens its connection with
:func:`~xici.warehouse.query.query_connection` like ``xici sql`` (same read-only guard, same token relations),
:meth:`LakeReading.experts` is the table ``xici export experts`` writes, :meth:`LakeReading.metrics` the rows
``xici ablate show`` prints.

Connections. A DuckDB relation is lazy: it reads when ``.df()``, ``.arrow()``, ``.pl()`` or ``.fetchall()``
is called, so the read-only connection behind it stays open until :meth:`LakeReading.close` (or the end of a
``with xici.open(...) as lake:`` block). DuckDB lets one process write a database file, and none while
another process reads it: while a notebook holds a relation, a recording or ablation in another process
waits at each commit for the file (up to five minutes, ``LOCK_WAIT_S`` in :mod:`xici.warehouse.lake`), then
stops with an error saying the warehouse is held. Nothing is lost: close the lake and run the same command
again, and it resumes where it stopped. The other methods (``routing``, ``experts``, ``metrics``, the plots)
open a connection only for the call. Any write from the same process (``xici.record(...)``, an import)
closes the lake's relations first, as DuckDB cannot open a file for writing in a process that reads it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from xici.errors import XiciError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xici.warehouse import Lake, TokenArrays


# Open connections behind relations, by warehouse file: a writer of this process must close them first.
_HELD: dict[Path, list[duckdb.DuckDBPyConnection]] = {}


class LakeReading:
    """The reading side of a :class:`~xici.warehouse.Lake`: queries, routing arrays, tables, plots."""

    # -- SQL --------------------------------------------------------------------------------------------

    def sql(
        self: Lake,
        query: str,
        *,
        runs: Sequence[int] = (),
        params: Sequence[Any] | dict[str, Any] | None = None,
        allow_read: Sequence[str | Path] = (),
    ) -> duckdb.DuckDBPyRelation:
        """Run a read-only SQL query on the warehouse and return it as a DuckDB relation.

        The warehouse tables (datasets, prompts, runs, sequences, grades, analyses, analysis_experts,
        ablations, ...) and the views and macros of ``sql/`` are there, and the token relations the query
        names stream from the gate store: ``tokens(seq_id, pos, token_id)``, ``token_gates(seq_id, pos,
        layer, expert, weight)`` (one row per selected expert) and ``token_logits`` (runs recorded with
        ``--store-logits``), any number of times in a query and each time the relation is read; ``runs``
        restricts them to those run ids. ``params`` fill ``?`` or ``$name``
        placeholders. Use the relation as any DuckDB relation (``.df()``, ``.arrow()``, ``.pl()``,
        ``.fetchall()``, or more SQL on it); its connection stays open until :meth:`close`.

        The guard is ``xici sql``'s: one statement that only reads, on DuckDB's sandbox. The query may read
        your own files (``read_parquet('mine.parquet')``) in the current folder and in ``allow_read`` (files
        or folders), nothing else.
        """
        from xici.warehouse.query import query_connection, query_error, statement

        text = statement(query)
        # The connection stays open for more SQL, so joins with sequences do not narrow the token scans.
        con = query_connection(self, text, runs, allow_read=[Path(p) for p in allow_read], runs_once=False)
        try:
            relation = con.sql(text, params=params)
        except duckdb.Error as exc:
            con.close()
            raise query_error(exc) from None
        _HELD.setdefault(self.warehouse_path.resolve(), []).append(con)
        return relation

    def close(self: Lake) -> None:
        """Close the connections behind the relations :meth:`sql` handed out for this lake folder (by any
        Lake object of this process); they cannot be read after."""
        held = _HELD.pop(self.warehouse_path.resolve(), [])
        while held:
            held.pop().close()

    def __enter__(self: Lake) -> Lake:
        return self

    def __exit__(self: Lake, *exc: object) -> None:
        self.close()

    def runs(self: Lake) -> duckdb.DuckDBPyRelation:
        """The runs: recordings and ablations, with their model, dataset, status and parameters."""
        return self.sql("select * from runs order by run_id")

    def analyses(self: Lake) -> duckdb.DuckDBPyRelation:
        """The stored analyses: parameters and the summary of the paper's Table 1 (``xici analyze list``)."""
        return self.sql(
            "select a.*, s.* exclude (analysis_id, run_id, grader) from analyses a "
            "left join analysis_summary s using (analysis_id) order by analysis_id"
            if self.read(_has_view("analysis_summary"))
            else "select * from analyses order by analysis_id"
        )

    def ablations(self: Lake) -> duckdb.DuckDBPyRelation:
        """The ablation runs: analysis, condition, seed, the deactivation check and their metrics."""
        return self.sql(
            "select b.*, r.status, m.* exclude (run_id) from ablations b join runs r using (run_id) "
            "left join ablation_metrics m using (run_id) order by b.analysis_id, b.run_id"
        )

    # -- results ------------------------------------------------------------------------------------------

    def experts(self: Lake, analysis_id: int) -> pa.Table:
        """The expert sets of an analysis, as ``xici export experts`` writes them: one row per (question,
        expert), ordered by question then rank; columns question_id, layer, expert, u, p, median_diff, rank.
        """
        from xici.analysis.export import analysis_description, expert_table

        def read(con: duckdb.DuckDBPyConnection) -> pa.Table:
            analysis_description(con, analysis_id)  # refuses an unknown id
            return expert_table(con, analysis_id)

        return self.read(read)

    def metrics(self: Lake, analysis_ids: Sequence[int] | None = None) -> pa.Table:
        """The paper's Table 2 for finished ablations (of these analyses, or all): one row per analysis,
        condition (random: and pool) and seed, with ASR, SGR, their difference and the counts behind them."""
        from xici.ablation.metrics import metrics_rows

        rows = self.read(lambda con: metrics_rows(con, analysis_ids))
        return pa.Table.from_pylist([_flat(row) for row in rows])

    # -- routing ------------------------------------------------------------------------------------------

    def routing(
        self: Lake,
        seq_id: int | None = None,
        *,
        run: int | None = None,
        question_id: str | None = None,
        lang: str | None = None,
    ) -> Any:
        """The gate weights of one sequence, dense: tokens x MoE layers x experts (0 where not selected).

        Name the sequence by ``seq_id``, or by ``question_id`` and ``lang`` (and ``run`` when the lake holds
        several runs of the question). The weights are those the model mixed the experts with, so for a
        model that renormalises its top-k gates each (token, layer) sums to 1. With the ``xici[notebook]``
        extra (xarray) the result is an ``xarray.DataArray`` with dims (pos, layer, expert) and coordinates
        token text, token_id, generated (the answer's tokens), block (model layer of each MoE layer);
        otherwise a numpy array. ``np.asarray`` works on either.
        """
        seq, arrays, dense = self._read_routing(seq_id, run, question_id, lang)
        try:
            import xarray
        except ImportError:
            return dense
        positions = np.arange(len(dense))
        coords: dict[str, Any] = {
            "pos": positions,
            "token_id": ("pos", arrays.token_ids),
            "generated": ("pos", positions >= seq["n_prompt_tokens"]),
            "layer": np.arange(dense.shape[1]),
            "expert": np.arange(dense.shape[2]),
        }
        if seq["moe_layers"] is not None:
            coords["block"] = ("layer", np.asarray(seq["moe_layers"]))
        texts = token_texts(seq["model"], arrays.token_ids)
        if texts is not None:
            coords["token"] = ("pos", texts)
        attrs = {k: seq[k] for k in ("seq_id", "run_id", "question_id", "lang", "model")}
        return xarray.DataArray(
            dense, dims=("pos", "layer", "expert"), coords=coords, name="weight", attrs=attrs
        )

    def plot_routing(
        self: Lake,
        seq_id: int | None = None,
        *,
        layer: int,
        run: int | None = None,
        question_id: str | None = None,
        lang: str | None = None,
    ) -> Figure:
        """Heatmap of one sequence's gate weights at one MoE layer: experts x tokens, the answer marked."""
        from xici.report.plots import routing_figure

        seq, arrays, dense = self._read_routing(seq_id, run, question_id, lang)
        if not 0 <= layer < dense.shape[1]:
            raise XiciError(
                f"MoE layer {layer} is not one of the run's {dense.shape[1]}",
                where="layer",
                fix=f"give 0 <= layer < {dense.shape[1]}",
            )
        texts = token_texts(seq["model"], arrays.token_ids)
        labels = [str(t) for t in (arrays.token_ids if texts is None else texts)]
        title = f"sequence {seq['seq_id']} ({seq['question_id']}, {seq['lang']}), MoE layer {layer}"
        return routing_figure(dense[:, layer, :], labels, seq["n_prompt_tokens"], title)

    def _read_routing(
        self: Lake, seq_id: int | None, run: int | None, question_id: str | None, lang: str | None
    ) -> tuple[dict[str, Any], TokenArrays, np.ndarray]:
        """The named sequence, its token arrays from the gate store and its dense gate weights."""
        seq = self.read(lambda con: _sequence(con, seq_id, run, question_id, lang))
        arrays = self.gates(read_only=True).read(
            seq["run_id"], seq["token_start"], seq["token_start"] + seq["n_tokens"], shard=seq["shard"]
        )
        return seq, arrays, dense_gates(arrays.topk_ids, arrays.topk_weights, seq["n_experts"])

    def plot_expert_map(self: Lake, analysis_id: int, question_id: str) -> Figure:
        """A question's experts across its languages: the language-subtracted mean weight (delta, Eq. 2) of
        each of its experts in each language, correct languages above wrong ones."""
        from xici.report.plots import expert_map_figure

        rows = self.read(lambda con: _expert_map(con, analysis_id, question_id))
        return expert_map_figure(rows, f"analysis {analysis_id}, question {question_id}")


def _flat(row: Any) -> dict[str, Any]:
    """A Table 2 row (MetricsRow) as one flat dict: its fields, the counts and the rates they give."""
    from xici.ablation.metrics import Metrics

    flat: dict[str, Any] = {}
    for name in (f.name for f in fields(row)):
        value = getattr(row, name)
        if isinstance(value, Metrics):
            flat.update(asr=value.asr, sgr=value.sgr, rate_diff=value.rate_diff, **asdict(value))
        else:
            flat[name] = value
    return flat


def dense_gates(topk_ids: np.ndarray, topk_weights: np.ndarray, n_experts: int) -> np.ndarray:
    """Top-k routing [tokens, layers, k] as dense weights [tokens, layers, experts], float32, 0 elsewhere."""
    dense = np.zeros((*topk_ids.shape[:2], n_experts), dtype=np.float32)
    np.put_along_axis(dense, topk_ids.astype(np.int64), topk_weights.astype(np.float32), axis=2)
    return dense


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str) -> Any:
    from xici.recorder.hf_backend import load_tokenizer

    return load_tokenizer(model)


def token_texts(model: str, token_ids: np.ndarray) -> list[str] | None:
    """The tokens' texts by the run's tokenizer, or None (with a warning) where it cannot be loaded."""
    try:
        tokenizer = _tokenizer(model)
    except XiciError as exc:
        warnings.warn(f"token texts left out: {exc.message}", stacklevel=3)
        return None
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in token_ids])]


def _has_view(name: str) -> Any:
    def check(con: duckdb.DuckDBPyConnection) -> bool:
        return bool(
            con.execute("select count(*) from duckdb_views() where view_name = ?", [name]).fetchone()[0]
        )

    return check


_SEQUENCE_COLUMNS = (
    "seq_id",
    "run_id",
    "shard",
    "token_start",
    "n_tokens",
    "n_prompt_tokens",
    "question_id",
    "lang",
    "n_experts",
    "model",
    "moe_layers",
)


def _sequence(
    con: duckdb.DuckDBPyConnection,
    seq_id: int | None,
    run: int | None,
    question_id: str | None,
    lang: str | None,
) -> dict[str, Any]:
    """The sequence named by seq_id, or by (run,) question_id and lang, with what its routing needs."""
    if (seq_id is None) == (question_id is None and lang is None):
        raise XiciError(
            "name one sequence: seq_id, or question_id and lang (and run)",
            where="lake.routing",
            fix="e.g. lake.routing(seq_id=1) or lake.routing(question_id='q1', lang='en', run=1)",
        )
    if seq_id is None and (question_id is None or lang is None):
        raise XiciError("give both question_id and lang", where="lake.routing")
    rows = con.execute(
        "select s.seq_id, s.run_id, s.shard, s.token_start, s.n_tokens, s.n_prompt_tokens, s.question_id, "
        "s.lang, r.n_experts, r.model, json_extract(r.params, '$.moe_layers')::INTEGER[] "
        "from sequences s join runs r using (run_id) "
        "where ($seq is null or s.seq_id = $seq) and ($run is null or s.run_id = $run) "
        "and ($question is null or s.question_id = $question) and ($lang is null or s.lang = $lang) "
        "order by s.seq_id",
        {"seq": seq_id, "run": run, "question": question_id, "lang": lang},
    ).fetchall()
    named = f"seq_id {seq_id}" if seq_id is not None else f"question {question_id!r} in {lang!r}"
    if not rows:
        raise XiciError(
            f"there is no sequence {named}" + ("" if run is None else f" in run {run}"),
            where="lake.routing",
            fix="lake.sql('select seq_id, run_id, question_id, lang from sequences') lists them",
        )
    if len(rows) > 1:
        raise XiciError(
            f"{len(rows)} sequences are {named} (runs {', '.join(str(r[1]) for r in rows)})",
            where="lake.routing",
            fix="give run= as well",
        )
    return dict(zip(_SEQUENCE_COLUMNS, rows[0], strict=True))


def _expert_map(con: duckdb.DuckDBPyConnection, analysis_id: int, question_id: str) -> list[dict[str, Any]]:
    """(lang, correct, layer, expert, rank, delta) of every language of a question and expert of its set."""
    from xici.analysis.export import analysis_description

    run_id = analysis_description(con, analysis_id)["run_id"]
    rows = con.execute(
        "with e as (select layer, expert, rank from analysis_experts "
        "           where analysis_id = $analysis and question_id = $question) "
        "select g.lang, g.correct, e.layer, e.expert, e.rank, coalesce(m.m, 0) - coalesce(lm.mean, 0) "
        "from sequence_grades($run, (select grader from analyses where analysis_id = $analysis)) g "
        "cross join e "
        "left join seq_means m on m.run_id = $run and m.seq_id = g.seq_id and m.layer = e.layer "
        "and m.expert = e.expert "
        "left join lang_means lm on lm.run_id = $run and lm.lang = g.lang and lm.layer = e.layer "
        "and lm.expert = e.expert "
        "where g.question_id = $question order by g.correct desc nulls last, g.lang, e.rank",
        {"analysis": analysis_id, "question": question_id, "run": run_id},
    ).fetchall()
    if not rows:
        raise XiciError(
            f"question {question_id!r} has no experts in analysis {analysis_id}",
            where="plot_expert_map",
            fix=f"pick one of lake.experts({analysis_id})['question_id']",
        )
    names = ("lang", "correct", "layer", "expert", "rank", "delta")
    return [dict(zip(names, row, strict=True)) for row in rows]
