"""Token relations as scans: filters narrow the Zarr reads, results stay those of a full scan, a relation
can be named any number of times, and the means built from them have the macro's bits."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from test_recorder_support import new_lake

from xici.analysis import means
from xici.analysis.means import ensure_means
from xici.errors import XiciError
from xici.recorder.run import RecordSpec, record
from xici.sql import apply_views
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake, scan
from xici.warehouse.gates import sequence_positions
from xici.warehouse.query import query_connection
from xici.warehouse.scan import ScanStats

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint, tmp_path_factory) -> Lake:
    """A tiny Qwen3-MoE's routing of the toy dataset, router logits stored."""
    lake = new_lake(tmp_path_factory.mktemp("scan") / "lake")
    spec = RecordSpec(
        model=str(tiny_checkpoint("qwen3_moe")), dataset="toy", max_new_tokens=4, store_logits=True
    )
    record(lake, spec, device="cpu", batch_size=8)
    return lake


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Lake:
    """About 42,000 tokens in 11 Zarr chunks, float32 gates (weights that are not whole units of 2^-32)."""
    lake = Lake(tmp_path_factory.mktemp("scan-synthetic") / "lake")
    write_synthetic_lake(lake, SyntheticSpec(gate_dtype="float32"))
    return lake


def run(lake: Lake, query: str) -> tuple[list[tuple], ScanStats]:
    """The rows of ``query`` on a query connection, and what its token scans read."""
    stats = ScanStats()
    con = query_connection(lake, query, stats=stats)
    try:
        return con.execute(query).fetchall(), stats
    finally:
        con.close()


def n_tokens(lake: Lake, where: str = "true") -> int:
    with lake.connect(read_only=True) as con:
        return con.execute(f"select coalesce(sum(n_tokens), 0) from sequences where {where}").fetchone()[0]


# (relation, filter, tokens the scan should read: an aggregate over sequences)
FILTERED = [
    ("token_gates", "seq_id < 4", "sum(n_tokens) filter (seq_id < 4)"),
    ("token_gates", "seq_id in (2, 5) and layer = 1", "sum(n_tokens) filter (seq_id in (2, 5))"),
    (
        "token_gates",
        "seq_id between 3 and 6 and pos >= 2",
        "sum(n_tokens - 2) filter (seq_id between 3 and 6)",
    ),
    (
        "token_gates",
        "(seq_id = 1 or seq_id = 7) and expert < 3 and weight > 0.2",
        "sum(n_tokens) filter (seq_id in (1, 7))",
    ),
    ("token_gates", "seq_id > 2 or layer = 0", "sum(n_tokens)"),
    ("token_gates", "seq_id <= 3 and layer in (0, 2)", "sum(n_tokens) filter (seq_id <= 3)"),
    ("tokens", "pos < 3 and seq_id != 2", "sum(least(n_tokens, 3)) filter (seq_id != 2)"),
    ("tokens", "pos in (0, 2)", "sum(least(n_tokens, 3))"),  # read: the span 0-2; pos 1 filtered out
    ("token_logits", "seq_id = 3 and expert in (0, 2) and logit > 0", "sum(n_tokens) filter (seq_id = 3)"),
]


@pytest.mark.parametrize(("relation", "condition", "tokens_read"), FILTERED)
def test_filters_narrow_the_reads_and_keep_the_rows(
    recorded: Lake, relation: str, condition: str, tokens_read: str
) -> None:
    """Same rows as filtering a full copy; only the tokens of sequences the filter can keep are read."""
    query = f"select * from {relation} where {condition} order by all"
    rows, stats = run(recorded, query)
    stats_all = ScanStats()
    everything = f"select * from {relation}"
    con = query_connection(recorded, everything, stats=stats_all)
    try:
        every_row = con.sql(everything).to_arrow_table()
    finally:
        con.close()
    assert stats_all.read == n_tokens(recorded)
    plain = duckdb.connect()
    plain.register("every_row", every_row)
    assert rows == plain.execute(f"select * from every_row where {condition} order by all").fetchall()
    assert rows
    with recorded.connect(read_only=True) as con:
        assert stats.read == con.execute(f"select {tokens_read} from sequences").fetchone()[0]


JOINED = [
    # (query, tokens its scans read: an aggregate over sequences)
    (
        "select g.seq_id, layer, sum(weight) from token_gates g join sequences s using (seq_id) "
        "where s.question_id = '{q}' group by all",
        "sum(n_tokens) filter (question_id = '{q}')",
    ),
    (
        "select count(*), sum(weight) from token_gates g, sequences s "
        "where g.seq_id = s.seq_id and lang in ('de', 'fr') and n_generated >= 1 and layer = 0",
        "sum(n_tokens) filter (lang in ('de', 'fr') and n_generated >= 1)",
    ),
    (  # tokens is restricted; token_gates, joined to tokens only, is read in full
        "select t.seq_id, count(*) from tokens t join sequences s on s.seq_id = t.seq_id and s.lang = 'en' "
        "join token_gates g on g.seq_id = t.seq_id and g.pos = t.pos group by 1",
        "sum(n_tokens) filter (lang = 'en') + sum(n_tokens)",
    ),
    (  # a subquery in the condition is not followed
        "select g.seq_id, layer, sum(weight) from token_gates g join sequences s using (seq_id) "
        "where s.question_id = (select min(question_id) from sequences) group by all",
        "sum(n_tokens)",
    ),
    (  # the second mention reads every sequence, so both do
        "select count(*) from token_gates g join sequences s using (seq_id) where s.lang = 'en' "
        "union all select count(*) from token_gates where seq_id > 0",
        "2 * sum(n_tokens)",
    ),
    (  # an outer join keeps token rows without a sequence
        "select count(*) from token_gates g left join sequences s using (seq_id) "
        "where s.lang = 'en' or g.layer = 0",
        "sum(n_tokens)",
    ),
]


@pytest.mark.parametrize(("query", "tokens_read"), JOINED)
def test_filters_on_joined_sequences_narrow_the_reads(recorded: Lake, query: str, tokens_read: str) -> None:
    """Conditions on sequences inner-joined on seq_id restrict the token scans; results stay those of a
    plain DuckDB over full copies of the relations."""
    with recorded.connect(read_only=True) as con:
        [(question,)] = con.execute("select min(question_id) from sequences where lang = 'en'").fetchall()
        query = query.format(q=question)
        [(want_read,)] = con.execute(f"select {tokens_read.format(q=question)} from sequences").fetchall()
        sequences = con.sql("from sequences").to_arrow_table()
    rows, stats = run(recorded, query)
    assert stats.read == want_read
    plain = duckdb.connect()
    plain.register("sequences", sequences)
    for relation in ("tokens", "token_gates"):
        everything = f"select * from {relation}"
        con = query_connection(recorded, everything)
        try:
            plain.register(relation, con.sql(everything).to_arrow_table())
        finally:
            con.close()
    assert sorted(rows) == sorted(plain.execute(query).fetchall()) and rows


def test_a_connection_kept_for_more_sql_is_not_narrowed(recorded: Lake) -> None:
    """lake.sql keeps its connection for more SQL: there a join does not narrow the scans, so a later
    query naming the relation again still sees every row."""
    query = "select count(*) from token_gates g join sequences s using (seq_id) where s.lang = 'en'"
    stats = ScanStats()
    con = query_connection(recorded, query, stats=stats, runs_once=False)
    try:
        con.execute(query).fetchall()
        assert stats.read == n_tokens(recorded)
        [(rows,)] = con.execute("select count(*) from token_gates").fetchall()
    finally:
        con.close()
    [(layers, top_k)] = run(recorded, "select n_moe_layers, top_k from runs")[0]
    assert rows == n_tokens(recorded) * layers * top_k


def test_counting_reads_no_array(recorded: Lake) -> None:
    """count(*) over some sequences needs their lengths only, which the warehouse holds."""
    layers, top_k = run(recorded, "select n_moe_layers, top_k from runs")[0][0]
    [(count,)], stats = run(recorded, "select count(*) from token_gates where seq_id <= 3")
    assert count == n_tokens(recorded, "seq_id <= 3") * layers * top_k
    assert stats.read == n_tokens(recorded, "seq_id <= 3")


def plan_nodes(lake: Lake, query: str) -> list[dict]:
    """Every operator of ``query``'s plan on a query connection (EXPLAIN as JSON), depth first."""
    con = query_connection(lake, query)
    try:
        plan = json.loads(con.execute(f"explain (format json) {query}").fetchall()[0][1])
    finally:
        con.close()

    def walk(node: dict) -> list[dict]:
        return [node] + [n for child in node["children"] for n in walk(child)]

    return [n for node in plan for n in walk(node)]


def test_explain_shows_the_filter_in_the_scan(recorded: Lake) -> None:
    nodes = plan_nodes(recorded, "select sum(weight) from token_gates where seq_id = 2 and layer < 2")
    [scan] = [n for n in nodes if n["name"] in ("PYTHON_ARROW_SCAN", "TABLE_SCAN")]
    filters = " ".join(scan["extra_info"]["Filters"])
    assert '"seq_id" = 2' in filters and '"layer" < 2' in filters


@pytest.mark.parametrize("column", ["layer", "expert"])
def test_grouping_by_a_small_column_uses_a_perfect_hash_table(recorded: Lake, column: str) -> None:
    """A scan gives DuckDB no statistics; grouping by layer or expert still indexes an array, as on
    Parquet, instead of hashing (the connection's settings)."""
    nodes = plan_nodes(recorded, f"select {column}, count(*), sum(weight) from token_gates group by all")
    assert "PERFECT_HASH_GROUP_BY" in [n["name"] for n in nodes]


def test_a_relation_can_be_named_any_number_of_times(recorded: Lake) -> None:
    """Self-join, a CTE read twice, a subquery: each opens its own scan."""
    per_token, stats = run(
        recorded,
        "with g as (select seq_id, pos, layer, max(weight) as top from token_gates where seq_id <= 3 "
        "group by all) select a.seq_id, count(*) from g a join g b "
        "on a.seq_id = b.seq_id and a.pos = b.pos and a.layer = b.layer "
        "where a.top >= (select min(weight) from token_gates where seq_id <= 3) group by 1 order by 1",
    )
    layers = run(recorded, "select n_moe_layers from runs")[0][0][0]
    with recorded.connect(read_only=True) as con:
        want = con.execute("select seq_id, n_tokens from sequences where seq_id <= 3 order by 1").fetchall()
    assert per_token == [(s, n * layers) for s, n in want]
    [(same,)], stats = run(
        recorded,
        "select count(*) from token_gates a join token_gates b using (seq_id, pos, layer, expert) "
        "where a.weight <> b.weight",
    )
    assert same == 0 and stats.scans == 2


def test_macros_read_token_relations_twice(recorded: Lake, tmp_path: Path) -> None:
    """The sql/ macros take a token relation by name, also twice in one query."""
    recorded.write(apply_views)
    query = (
        "with a as (from gate_sums('token_gates')), b as (from gate_sums('token_gates')) "
        "select count(*), count(y.seq_id) from seq_means('a') x "
        "left join seq_means('b') y using (seq_id, layer, expert) where y.m = x.m"
    )
    [(n, matched)], stats = run(recorded, query)
    assert n == matched > 0 and stats.scans == 2


def test_sequences_far_apart_skip_the_chunks_between(synthetic: Lake) -> None:
    with synthetic.connect(read_only=True) as con:
        first, last = con.execute("select min(seq_id), max(seq_id) from sequences").fetchone()
    query = (
        f"select seq_id, count(*) from token_gates where seq_id in ({first}, {last}) group by 1 order by 1"
    )
    rows, stats = run(synthetic, query)
    assert [s for s, _ in rows] == [first, last]
    assert stats.read == n_tokens(synthetic, f"seq_id in ({first}, {last})") < 300


@pytest.mark.parametrize("condition", ["true", "pos >= 3"])
def test_reads_of_whole_chunks_keep_every_row(
    synthetic: Lake, condition: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan reads whole chunks, one per read, so sequences are split between reads: every row is still
    the one the gate arrays hold, with its sequence and position. Batches are small, so that the memory of
    those DuckDB released is written again for later ones."""
    assert scan.CHUNKS_PER_READ == 1
    monkeypatch.setattr(scan, "ROWS_PER_BATCH", 5000)
    query = f"select seq_id, pos, layer, expert, weight from token_gates where {condition} order by all"
    stats = ScanStats()
    con = query_connection(synthetic, query, stats=stats)
    try:
        got = con.execute(query).fetchnumpy()
    finally:
        con.close()
    with synthetic.connect(read_only=True) as con:
        seqs = con.execute(
            "select seq_id, token_start, n_tokens from sequences order by token_start"
        ).fetchnumpy()
    gates = synthetic.gates(read_only=True)
    arrays = gates.read(1, 0, int(seqs["n_tokens"].sum()))
    _, layers, top_k = arrays.topk_ids.shape
    pos = sequence_positions(seqs["n_tokens"])
    keep = np.flatnonzero(pos >= (3 if "pos" in condition else 0))
    width = layers * top_k
    want = {
        "seq_id": np.repeat(np.repeat(seqs["seq_id"], seqs["n_tokens"])[keep], width),
        "pos": np.repeat(pos[keep], width),
        "layer": np.tile(np.repeat(np.arange(layers), top_k), len(keep)),
        "expert": arrays.topk_ids[keep].reshape(-1),
        "weight": arrays.topk_weights[keep].reshape(-1).astype(np.float32),
    }
    order = np.lexsort([want[c] for c in ("expert", "layer", "pos", "seq_id")])
    assert stats.read == len(keep) > 4 * 4096
    for column, values in want.items():
        assert np.array_equal(got[column], values[order]), column


@pytest.mark.parametrize("which", ["synthetic", "recorded"])
def test_means_have_the_macro_bits(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """seq_means and lang_means built by means_kernel as the gates are read are bit for bit the macros over
    every row of token_gates, for float32 weights (rounded to units of 2^-32) and float16 ones (whole
    units already), also when the run is read in many small parts."""
    monkeypatch.setattr(scan, "TOKENS_PER_READ", 1000)
    synthetic = request.getfixturevalue(which)
    with synthetic.connect(read_only=True) as con:
        run_id = con.execute("select run_id from runs").fetchone()[0]
    assert ensure_means(synthetic, run_id)
    built, _ = run(
        synthetic, "select seq_id, layer, expert, m, seq_rank, n_selected from seq_means order by all"
    )
    direct, _ = run(
        synthetic,
        "with sums as (from gate_sums('token_gates')) "
        "select seq_id, layer, expert, m, seq_rank, n_selected from seq_means('sums') order by all",
    )
    assert len(built) > 100
    assert built == direct  # m > 0 everywhere, so equal floats are equal bits
    # lang_means from the kernel's sums: the macro's bits for the mean (sums of multiples of 2^-32); the
    # frequency is a sum of floats, which the macro adds in whatever order DuckDB's threads take.
    columns = "lang, layer, expert, mean, frequency"
    built, _ = run(synthetic, f"select {columns} from lang_means order by all")
    direct, _ = run(synthetic, f"select {columns} from lang_means({run_id}) order by all")
    assert len(built) > 50
    assert [row[:4] for row in built] == [row[:4] for row in direct]
    assert [row[4] for row in built] == pytest.approx([row[4] for row in direct], rel=1e-12, abs=0)


@pytest.mark.parametrize("flush_denormals", [False, True])
def test_float16_widened_by_bits_equals_numpy(flush_denormals: bool) -> None:
    """Every float16 value (all bit patterns: subnormals, negatives, infinities, NaNs) widens to numpy's
    float32, bit for bit, also in a process that flushes denormals (the demo does)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    try:
        assert torch.set_flush_denormal(flush_denormals)
        for values in (every, every[every >= 0], every[:0x7C00], every[0x0400:0x7C00]):
            widened = scan.float32(values)
            assert widened.dtype == np.float32
            assert np.array_equal(widened.view(np.uint32), values.astype(np.float32).view(np.uint32))
    finally:
        torch.set_flush_denormal(False)


def test_kernel_takes_every_float16_weight_in_exact_units() -> None:
    """The gate sums kernel (and so the means) reads a float16 weight's value from its bits: every finite
    bit pattern (zeros, subnormals, negatives) gives the whole units of 2^-32 that gate_sums.sql rounds it
    to."""
    from xici.warehouse.sums_kernel import units

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = every[np.isfinite(every.view(np.float16))]
    expected = finite.view(np.float16).astype(np.float64) * 2.0**32  # whole numbers already
    got = np.array([units(int(bits), True) for bits in finite], dtype=np.int64)
    assert np.array_equal(got, expected.astype(np.int64))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("topk_weights", np.inf, "sequence {seq_id} of run {run_id} has a gate weight that is not a finite"),
        ("topk_weights", np.nan, "sequence {seq_id} of run {run_id} has a gate weight that is not a finite"),
        ("topk_ids", 200, "run {run_id} routes a token to expert 200, but its model has 32 experts"),
    ],
)
def test_means_refuse_gates_that_are_not_routing(
    tmp_path: Path, field: str, value: float, message: str
) -> None:
    """A weight that is infinite or NaN (float16 bits with exponent 31), or an expert id past the model's
    experts (which the kernel would add into another layer's bins), stops the build with a clear error and
    leaves no means behind (the build is one transaction)."""
    lake = Lake(tmp_path / "lake")
    run_id = write_synthetic_lake(lake, SyntheticSpec(questions=((4, 3),))).run_id
    lake.gates().array(run_id, field)[150, 2, 1] = value
    # as recorded before gate sums were kept, so the means are taken from the gates
    lake.write(
        lambda con: con.execute(
            "update sequences set sums_start = null, n_sums = null; delete from seq_means"
        )
    )
    with lake.connect(read_only=True) as con:
        [(seq_id,)] = con.execute(
            "select seq_id from sequences where token_start <= 150 and token_start + n_tokens > 150"
        ).fetchall()
    with pytest.raises(XiciError, match=message.format(seq_id=seq_id, run_id=run_id)):
        ensure_means(lake, run_id)
    assert run(lake, "select count(*) from seq_means")[0] == [(0,)]


def test_means_from_gate_sums_are_the_means_from_gates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seq_means committed with the sequences, computed from their gate sums, are the means that reading
    the gates gives (the same bits; the language frequencies to the last bits); the build adds up the
    language means from the sums, read in many small parts, without reading the gates; seq_means rows
    missing are built again from the sums; a run without sums (recorded before they were kept) is built
    from its gates."""
    monkeypatch.setattr(means, "SUM_ROWS_PER_READ", 1000)
    lake = Lake(tmp_path / "lake")
    run_id = write_synthetic_lake(lake, SyntheticSpec(questions=((12, 5),))).run_id
    chunk = lake.zarr_path / f"runs/{run_id}/topk_weights/c/1/0/0"
    stored = chunk.read_bytes()
    chunk.unlink()  # building from the sums never reads it
    assert ensure_means(lake, run_id)
    query = "select seq_id, layer, expert, m, seq_rank, n_selected from seq_means order by all"
    from_sums, _ = run(lake, query)
    lang = "select lang, layer, expert, mean, frequency from lang_means order by all"
    lang_from_sums, _ = run(lake, lang)
    assert len(from_sums) > 3 * 1000
    with lake.connect(read_only=True) as con:  # committed with the sequences: the build added up languages
        assert con.execute("select count(*) from seq_means").fetchone()[0] == len(from_sums)

    def some_rows_lost(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("delete from seq_means where seq_id % 3 = 0")
        con.execute("delete from seq_means_builds")

    lake.write(some_rows_lost)  # seq_means incomplete: built again from the sums, every row
    assert ensure_means(lake, run_id)
    assert run(lake, query)[0] == from_sums and run(lake, lang)[0] == lang_from_sums

    def without_sums(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("update sequences set sums_start = null, n_sums = null")
        con.execute("delete from seq_means_builds")

    lake.write(without_sums)
    with pytest.raises(XiciError, match=r"topk_weights, tokens 4096-.*chunk 1 is missing"):
        ensure_means(lake, run_id)
    chunk.write_bytes(stored)
    assert ensure_means(lake, run_id)
    assert run(lake, query)[0] == from_sums
    lang_from_gates, _ = run(lake, lang)
    assert [row[:4] for row in lang_from_gates] == [row[:4] for row in lang_from_sums]
    assert [row[4] for row in lang_from_gates] == pytest.approx([row[4] for row in lang_from_sums], rel=1e-12)


def test_a_sequence_with_a_weight_that_is_not_a_number_keeps_no_sums(tmp_path: Path) -> None:
    """Recording a sequence whose gates hold an infinite weight keeps no gate sums for it (NULL), so its
    run's means are taken from the gates, which stops with the error naming it."""
    lake = Lake(tmp_path / "lake")
    run_id = write_synthetic_lake(lake, SyntheticSpec(questions=((4, 3),))).run_id
    store = lake.gates()
    bad = store.read(run_id, 0, 30)
    bad.topk_weights[7, 1, 0] = np.inf
    appended = store.append_sequences(run_id, [store.read(run_id, 30, 60), bad])
    assert appended.n_sums[0] > 0 and appended.n_sums[1] is None
    row = dict.fromkeys(("question_id", "lang", "prompt_text", "response_text", "finish_reason"), "x")
    rows = [{**row, "unit": 1000 + i, "n_prompt_tokens": 1, "n_generated": 1} for i in range(2)]
    good_id, bad_id = lake.commit_rows(run_id, rows, appended)
    with lake.connect(read_only=True) as con:
        assert con.execute(
            "select seq_id, sums_start is null, n_sums from sequences where seq_id >= ? order by 1", [good_id]
        ).fetchall() == [(good_id, False, appended.n_sums[0]), (bad_id, True, None)]
    with pytest.raises(XiciError, match=f"sequence {bad_id} of run {run_id} has a gate weight that is not a"):
        ensure_means(lake, run_id)
