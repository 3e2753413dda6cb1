"""The Python API on a recorded lake of the shipped testbed: xici.open, sql, routing, tables, plots."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TESTBED_QUESTIONS as QUESTIONS

import xici
from xici.testbed.train import shipped_testbed
from xici.warehouse import Lake

torch.set_num_threads(1)


def plain(root: Path, query: str, params: list | None = None) -> list[tuple]:
    """The same query with the plain duckdb module: the warehouse is an ordinary DuckDB file."""
    con = duckdb.connect(str(root / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute(query, params or []).fetchall()
    finally:
        con.close()


def test_open_refuses_a_folder_without_a_lake(tmp_path: Path) -> None:
    with pytest.raises(xici.XiciError, match="there is no lake here"):
        xici.open(tmp_path / "nothing")


def test_sql_returns_relations_that_read_like_duckdb(testbed_lake: tuple[Path, int, int]) -> None:
    root, _, _ = testbed_lake
    query = "select lang, count(*) as n from sequences group by lang order by lang"
    with xici.open(root) as lake:
        relation = lake.sql(query + ";")
        assert isinstance(relation, duckdb.DuckDBPyRelation)
        assert relation.fetchall() == plain(root, query)
        frame = lake.sql(query).df()
        assert list(frame.columns) == ["lang", "n"] and frame["n"].sum() == 2 * 12 * QUESTIONS
        table = lake.sql(
            "select * from sequences where lang = ? and run_id = ?", params=["x-lang03", 1]
        ).arrow()
        assert table.read_all().num_rows == QUESTIONS


def test_sql_streams_the_token_relations(testbed_lake: tuple[Path, int, int]) -> None:
    root, run_id, _ = testbed_lake
    [(tokens, layers, top_k)] = plain(
        root,
        "select sum(n_tokens), any_value(n_moe_layers), any_value(top_k) "
        "from sequences join runs using (run_id) where run_id = ?",
        [run_id],
    )
    with xici.open(root) as lake:
        [(rows,)] = lake.sql("select count(*) from token_gates", runs=[run_id]).fetchall()
        assert rows == tokens * layers * top_k


def test_relations_read_again_and_join_a_token_relation_with_itself(
    testbed_lake: tuple[Path, int, int],
) -> None:
    root, run_id, _ = testbed_lake
    with xici.open(root) as lake:
        relation = lake.sql("select count(*) from token_gates", runs=[run_id])
        first = relation.fetchall()
        assert relation.fetchall() == first and relation.df().iloc[0, 0] == first[0][0]
        pairs = lake.sql(
            "select count(*) from token_gates a join token_gates b using (seq_id, pos, layer, expert)",
            runs=[run_id],
        )
        assert pairs.fetchall() == first


def test_sql_cannot_write_the_lake(testbed_lake: tuple[Path, int, int]) -> None:
    root, _, _ = testbed_lake
    before = plain(root, "select count(*) from runs")
    with xici.open(root) as lake:
        with pytest.raises(xici.XiciError, match="refuses DELETE"):
            lake.sql("delete from runs")
        with pytest.raises(xici.XiciError, match="refuses ATTACH"):
            lake.sql(f"attach '{root / 'warehouse.duckdb'}' as w2")
    assert plain(root, "select count(*) from runs") == before


def test_sql_reads_the_users_own_files_where_allowed(
    testbed_lake: tuple[Path, int, int], tmp_path: Path
) -> None:
    root, _, _ = testbed_lake
    mine = tmp_path / "langs.parquet"
    pq.write_table(pa.table({"lang": ["x-lang00", "x-lang01"], "family": ["a", "b"]}), mine)
    query = "select family, count(*) from sequences join read_parquet(?) using (lang) group by 1 order by 1"
    with xici.open(root) as lake:
        assert lake.sql(query, params=[str(mine)], allow_read=[tmp_path]).fetchall() == [
            ("a", 2 * QUESTIONS),
            ("b", 2 * QUESTIONS),
        ]
        with pytest.raises(xici.XiciError, match="sandbox"):
            lake.sql(query, params=[str(mine)])


def test_relations_live_until_the_lake_is_closed(testbed_lake: tuple[Path, int, int]) -> None:
    root, _, _ = testbed_lake
    lake = xici.open(root)
    relation = lake.sql("select count(*) from runs")
    assert relation.fetchall() == [(2,)]
    lake.close()
    with pytest.raises(duckdb.ConnectionException):
        relation.fetchall()
    # A writer of this process closes the relations first: DuckDB refuses to write a file this process reads.
    held = lake.sql("select count(*) from runs")
    Lake(root).write(lambda con: con.execute("select 1").fetchall())
    with pytest.raises(duckdb.ConnectionException):
        held.fetchall()


def test_a_read_only_lake_refuses_writes(testbed_lake: tuple[Path, int, int]) -> None:
    root, _, _ = testbed_lake
    lake = xici.open(root)
    with pytest.raises(xici.XiciError, match="opened read-only"):
        lake.write(lambda con: con.execute("delete from grades"))
    with pytest.raises(xici.XiciError, match="opened read-only"):
        lake.gates()
    assert plain(root, "select count(*) from grades")[0][0] > 0


def test_tables_of_runs_analyses_and_experts(testbed_lake: tuple[Path, int, int]) -> None:
    root, run_id, analysis_id = testbed_lake
    with xici.open(root) as lake:
        assert [r[0] for r in lake.runs().fetchall()] == [1, run_id]
        analyses = lake.analyses().df()
        assert analyses["analysis_id"].tolist() == [analysis_id]
        assert (
            analyses["mixed"].iloc[0]
            == plain(root, "select count(*) from analysis_questions where outcome = 'mixed'")[0][0]
        )
        experts = lake.experts(analysis_id)
        assert experts.column_names == ["question_id", "layer", "expert", "u", "p", "median_diff", "rank"]
        stored = plain(
            root,
            "select question_id, layer, expert, rank from analysis_experts where analysis_id = ? "
            "order by question_id, rank",
            [analysis_id],
        )
        assert stored, "the testbed's questions should have experts"
        assert [(r["question_id"], r["layer"], r["expert"], r["rank"]) for r in experts.to_pylist()] == stored
        with pytest.raises(xici.XiciError, match="no analysis 99"):
            lake.experts(99)
        assert lake.metrics().num_rows == 0
        assert lake.ablations().fetchall() == []


def _sql_dense(root: Path, seq_id: int) -> np.ndarray:
    """The sequence's dense routing rebuilt from the token_gates relation of xici sql's connection."""
    layers, experts, tokens = plain(
        root,
        "select n_moe_layers, n_experts, n_tokens from sequences join runs using (run_id) where seq_id = ?",
        [seq_id],
    )[0]
    with xici.open(root) as lake:
        rows = lake.sql(
            "select pos, layer, expert, weight from token_gates where seq_id = ?", params=[seq_id]
        )
        columns = rows.fetchnumpy()
    dense = np.zeros((tokens, layers, experts), dtype=np.float32)
    dense[columns["pos"], columns["layer"], columns["expert"]] = columns["weight"]
    return dense


def test_routing_is_dense_and_renormalised(testbed_lake: tuple[Path, int, int]) -> None:
    root, _, _ = testbed_lake
    with xici.open(root) as lake:
        routing = lake.routing(seq_id=1)
    weights = np.asarray(routing)
    [(n_tokens, n_prompt, layers, experts, top_k)] = plain(
        root,
        "select n_tokens, n_prompt_tokens, n_moe_layers, n_experts, top_k from sequences "
        "join runs using (run_id) where seq_id = 1",
    )
    assert weights.shape == (n_tokens, layers, experts)
    assert ((weights > 0).sum(axis=2) == top_k).all()
    # The testbed is a Qwen3-MoE with norm_topk_prob: each token's gates at each layer sum to 1 (float16).
    np.testing.assert_allclose(weights.sum(axis=2), 1.0, atol=2e-3)
    np.testing.assert_array_equal(weights, _sql_dense(root, 1))
    assert routing.dims == ("pos", "layer", "expert")
    assert int(routing["generated"].sum()) == n_tokens - n_prompt
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shipped_testbed().checkpoint))
    assert routing["token"].values.tolist() == tokenizer.convert_ids_to_tokens(
        routing["token_id"].values.tolist()
    )
    assert (
        routing.attrs["question_id"]
        == plain(root, "select question_id from sequences where seq_id = 1")[0][0]
    )


def test_routing_by_question_and_language(testbed_lake: tuple[Path, int, int]) -> None:
    root, run_id, _ = testbed_lake
    [(seq_id, question_id)] = plain(
        root,
        "select seq_id, question_id from sequences where run_id = ? and lang = 'x-lang05' limit 1",
        [run_id],
    )
    with xici.open(root) as lake:
        named = lake.routing(run=run_id, question_id=question_id, lang="x-lang05")
        np.testing.assert_array_equal(np.asarray(named), np.asarray(lake.routing(seq_id)))
        with pytest.raises(xici.XiciError, match="give run= as well"):
            lake.routing(question_id=question_id, lang="x-lang05")
        with pytest.raises(xici.XiciError, match="no sequence seq_id 100000"):
            lake.routing(seq_id=100000)
        with pytest.raises(xici.XiciError, match="name one sequence"):
            lake.routing()


def test_plots(testbed_lake: tuple[Path, int, int]) -> None:
    root, _, analysis_id = testbed_lake
    with xici.open(root) as lake:
        figure = lake.plot_routing(seq_id=1, layer=2)
        [image] = figure.axes[0].get_images()
        np.testing.assert_array_equal(image.get_array(), np.asarray(lake.routing(seq_id=1))[:, 2, :].T)
        with pytest.raises(xici.XiciError, match="MoE layer 9"):
            lake.plot_routing(seq_id=1, layer=9)
        experts = lake.experts(analysis_id).to_pylist()
        question = experts[0]["question_id"]
        figure = lake.plot_expert_map(analysis_id, question)
        [image] = figure.axes[0].get_images()
        shown = np.asarray(image.get_array())
        # Independently: delta = mean weight over the sequence's tokens minus its language's mean (Eq. 1-2).
        langs = plain(
            root, "select seq_id, lang, question_id from sequences where run_id = 1 order by seq_id"
        )
        means = {seq: np.asarray(lake.routing(seq_id=seq)).mean(axis=0) for seq, _, _ in langs}
        mine = [(r["layer"], r["expert"]) for r in experts if r["question_id"] == question]
        grades = dict(
            plain(root, "select seq_id, correct from grades join sequences using (seq_id) where run_id = 1")
        )
        rows = sorted(
            ((not grades[seq], lang, seq) for seq, lang, q in langs if q == question), key=lambda r: r[:2]
        )
        want = np.array(
            [
                [
                    means[seq][layer, expert]
                    - np.mean([means[s][layer, expert] for s, other, _ in langs if other == lang])
                    for layer, expert in mine
                ]
                for _, lang, seq in rows
            ]
        )
        np.testing.assert_allclose(shown, want, atol=1e-6)
        with pytest.raises(xici.XiciError, match="has no experts"):
            lake.plot_expert_map(analysis_id, "no-such-question")


def test_routing_without_xarray_is_a_numpy_array(
    testbed_lake: tuple[Path, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _, _ = testbed_lake
    with xici.open(root) as lake:
        labelled = np.asarray(lake.routing(seq_id=2))
        monkeypatch.setitem(sys.modules, "xarray", None)  # what a lake without the notebook extra sees
        plain_array = lake.routing(seq_id=2)
    assert type(plain_array) is np.ndarray
    np.testing.assert_array_equal(plain_array, labelled)


# -- the pipeline and datasets from Python ------------------------------------------------------------------

# The row with meta first: pa.Table.from_pylist takes its columns from the first row.
ROWS = [
    {
        "question_id": "q2",
        "lang": "de",
        "question": "Hauptstadt?",
        "answers": ["Berlin"],
        "meta": {"topic": "x"},
    },
    {"question_id": "q1", "lang": "en", "question": "Capital of France?", "answers": ["Paris"]},
    {"question_id": "q1", "lang": "fr", "question": "Capitale de la France ?", "answers": ["Paris"]},
]


def test_import_records_from_dicts_pandas_and_arrow(tmp_path: Path) -> None:
    import pandas as pd

    lake = xici.open(tmp_path / "lake", read_only=False)
    given = {"dicts": ROWS, "frame": pd.DataFrame(ROWS), "arrow": pa.Table.from_pylist(ROWS)}
    for name, rows in given.items():
        summary = xici.datasets.import_records(lake, name, rows)
        assert (summary.questions, summary.languages, summary.prompts) == (2, 3, 3)
    with xici.open(lake.root) as reading:
        stored = reading.sql(
            "select dataset, question_id, lang, question, answers from prompts order by all"
        ).fetchall()
        metas = reading.sql("select dataset, question_id, meta from questions order by all").fetchall()
        hashes = reading.sql("select source_sha256 from datasets").fetchall()
    by_name = {name: sorted(row[1:] for row in stored if row[0] == name) for name in given}
    assert by_name["dicts"] == by_name["frame"] == by_name["arrow"]
    assert ("q2", "de", "Hauptstadt?", ["Berlin"]) in by_name["dicts"]
    assert {m[1:] for m in metas if m[0] == "frame"} == {m[1:] for m in metas if m[0] == "dicts"}
    assert len(set(hashes)) == 1  # the same rows hash alike, whatever they came in


def test_import_records_refuses_bad_rows_and_writes_nothing(tmp_path: Path) -> None:
    lake = xici.open(tmp_path / "lake", read_only=False)
    xici.datasets.import_records(lake, "good", ROWS)
    bad = {
        "not a valid language tag": [*ROWS, {**ROWS[1], "question_id": "q3", "lang": "english!"}],
        "appears twice": [*ROWS, ROWS[0]],
        "missing field 'answers'": [{k: v for k, v in ROWS[1].items() if k != "answers"}],
        "no accepted answers": [{**ROWS[0], "answers": []}],
        "not a dict": ["q1,en,?"],
        "already imported": ROWS,
    }
    for message, rows in bad.items():
        with pytest.raises(xici.XiciError, match=message):
            xici.datasets.import_records(lake, "good" if message == "already imported" else "bad", rows)
    with xici.open(lake.root) as reading:
        assert reading.sql("select name from datasets").fetchall() == [("good",)]
    with pytest.raises(xici.XiciError, match="opened read-only"):
        xici.datasets.import_records(xici.open(lake.root), "other", ROWS)


def test_the_pipeline_checks_parameters_like_the_commands(
    testbed_lake: tuple[Path, int, int], tmp_path: Path
) -> None:
    root, _, analysis_id = testbed_lake
    with pytest.raises(xici.XiciError, match="opened read-only"):
        xici.analyze(xici.open(root), 1)
    with pytest.raises(xici.XiciError, match="opened read-only"):
        xici.ablate(xici.open(root), analysis_id)
    with pytest.raises(xici.XiciError, match="no parameter taus"):
        xici.analyze(root, 1, taus=0.1)
    with pytest.raises(xici.XiciError, match="max-new-tokens must be at least 1"):
        xici.record(root, model="m", dataset="testbed", max_new_tokens=0)
    with pytest.raises(xici.XiciError, match="cannot read the baselines"):
        xici.ablate(root, analysis_id, baselines="random,typo")
    with pytest.raises(xici.XiciError, match="--sweep"):
        xici.analyze(root, 1, sweep={"nothing": [1]})


SWEEP = ["--sweep", "tau=0.001,0.01", "--sweep", "max-experts=3"]


def test_analyze_from_python_is_the_command(testbed_lake: tuple[Path, int, int], tmp_path: Path) -> None:
    """A sweep given as a dict stores the same analyses as the command's --sweep strings."""
    from click.testing import CliRunner

    from xici.cli.main import cli

    root = tmp_path / "lake"
    shutil.copytree(testbed_lake[0], root)
    result = xici.analyze(root, 1, layers=(0, 4), sweep={"tau": [0.001, 0.01], "max_experts": [3]})
    assert [(r.params.tau, r.params.max_experts, r.params.layer_start) for r in result.records] == [
        (0.001, 3, 0),
        (0.01, 3, 0),
    ]
    assert all(r.created for r in result.records) and result.swept == ["tau", "max_experts"]
    out = CliRunner().invoke(
        cli,
        ["--lake", str(root), "analyze", "--run", "1", "--layers", "0:4", *SWEEP],
    )
    assert out.exit_code == 0, out.output
    with xici.open(root) as lake:
        assert lake.sql("select count(*) from analyses").fetchall() == [(3,)]  # the fixture's + these two
    again = xici.analyze(root, 1, layers="0:4", tau=0.01, max_experts=3)
    assert again.analysis_ids == [result.analysis_ids[1]] and not again.records[0].created


def test_the_public_names_are_documented_functions() -> None:
    import pydoc

    import xici.report.build  # loading the subpackage of the same name must not replace xici.report
    import xici.report.plots

    assert xici.report is xici.pipeline.report
    text = pydoc.render_doc(xici, renderer=pydoc.plaintext)
    for name in ("open", "record", "analyze", "ablate", "report"):
        assert getattr(xici, name).__doc__, name
        assert f"\n    {name}(" in text, name
    assert xici.datasets.import_records.__doc__ and xici.Lake.routing.__doc__ and xici.Lake.sql.__doc__


def test_a_held_relation_makes_another_process_wait_then_stop(
    testbed_lake: tuple[Path, int, int], tmp_path: Path
) -> None:
    """What the docs promise: a writer elsewhere waits for the warehouse (here 2 s instead of 5 minutes),
    then stops with the lock error; once the notebook closes the lake, the same write goes through."""
    root = tmp_path / "lake"
    shutil.copytree(testbed_lake[0], root)
    writer = (
        "import sys, xici.warehouse.lake as lake_module\n"
        "lake_module.LOCK_WAIT_S = 2\n"
        "from xici.errors import XiciError\n"
        f"lake = lake_module.Lake({str(root)!r})\n"
        "try:\n"
        '    lake.write(lambda con: con.execute("update runs set status = status"))\n'
        "except XiciError as exc:\n"
        "    print(exc.message)\n"
        "    sys.exit(3)\n"
    )
    lake = xici.open(root)
    relation = lake.sql("select count(*) from runs")
    blocked = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 3, blocked.stderr
    assert "lock" in blocked.stdout.lower()
    assert relation.fetchall() == [(2,)]
    lake.close()
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_open_finds_the_lake_like_the_command(
    testbed_lake: tuple[Path, int, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XICI_LAKE", str(testbed_lake[0]))
    assert xici.open().root == testbed_lake[0]
    monkeypatch.delenv("XICI_LAKE")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(xici.XiciError, match="there is no lake here"):
        xici.open()
    assert xici.open(read_only=False).root == Path("xici-lake")
