"""``xici sql`` on a recorded lake: warehouse tables, token relations streamed from Zarr, files out."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from test_recorder_support import direct, new_lake

from xici.cli.main import cli
from xici.recorder.run import RecordSpec, record
from xici.warehouse import Lake
from xici.warehouse.query import mentioned_relations

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lake(tiny_checkpoint, tmp_path_factory) -> Lake:
    """Run 1: the whole toy dataset without logits; run 2: two questions with logits."""
    lake = new_lake(tmp_path_factory.mktemp("sql") / "lake")
    model = str(tiny_checkpoint("qwen3_moe"))
    record(lake, RecordSpec(model=model, dataset="toy", max_new_tokens=4), device="cpu", batch_size=8)
    record(
        lake,
        RecordSpec(model=model, dataset="toy", max_new_tokens=3, limit=2, store_logits=True),
        device="cpu",
        batch_size=8,
    )
    return lake


def xici_sql(lake: Lake, *args: str):
    return CliRunner().invoke(cli, ["--lake", str(lake.root), "sql", *args])


def test_warehouse_tables_as_a_table(lake: Lake) -> None:
    out = xici_sql(
        lake, "select lang, count(*) as n from sequences where run_id = 1 group by lang order by lang;"
    )
    assert out.exit_code == 0, out.output
    lines = [
        line for line in out.output.splitlines() if any(f" {lang} " in line for lang in ("de", "en", "fr"))
    ]
    assert [line.split()[1::2] for line in lines] == [
        [lang, str(n)]
        for lang, n in direct(
            lake, "select lang, count(*) from sequences where run_id = 1 group by lang order by lang"
        )
    ]


def test_row_limit_note(lake: Lake) -> None:
    out = xici_sql(lake, "select seq_id from sequences order by seq_id", "--max-rows", "3")
    assert out.exit_code == 0
    assert "Showing the first 3 rows" in out.output
    assert " 3 " in out.output and " 4 " not in out.output
    full = xici_sql(lake, "select seq_id from sequences where seq_id <= 3", "--max-rows", "3")
    assert "Showing" not in full.output


def test_token_relations(lake: Lake, tmp_path: Path) -> None:
    layers, top_k, experts = direct(lake, "select n_moe_layers, top_k, n_experts from runs where run_id = 1")[
        0
    ]
    tokens = dict(direct(lake, "select run_id, sum(n_tokens) from sequences group by 1"))

    out = tmp_path / "gates.parquet"
    done = xici_sql(
        lake,
        "select seq_id, pos, layer, sum(weight) as w, count(*) as n from token_gates group by all",
        "--out",
        str(out),
    )
    assert done.exit_code == 0, done.output
    table = pq.read_table(out).to_pydict()
    assert len(table["w"]) == (tokens[1] + tokens[2]) * layers  # one group per (token, layer), both runs
    assert set(table["n"]) == {top_k}
    assert all(abs(w - 1) < 2e-3 for w in table["w"])  # Qwen3 renormalises its top-k (stored in float16)

    per_seq = tmp_path / "tokens.csv"
    xici_sql(
        lake,
        "select seq_id, count(*) as n, max(pos) as last from tokens group by 1 order by 1",
        "--out",
        str(per_seq),
        "--run",
        "2",
    )
    lines = per_seq.read_text().splitlines()
    assert lines[0] == "seq_id,n,last"
    want = direct(lake, "select seq_id, n_tokens, n_tokens - 1 from sequences where run_id = 2 order by 1")
    assert [tuple(int(x) for x in line.split(",")) for line in lines[1:]] == want

    logits = tmp_path / "logits.json"
    done = xici_sql(lake, "select count(*) as n from token_logits", "--run", "2", "--out", str(logits))
    assert done.exit_code == 0, done.output
    assert json.loads(logits.read_text()) == [{"n": tokens[2] * layers * experts}]


def test_token_logits_needs_a_run_that_stored_them(lake: Lake) -> None:
    out = xici_sql(lake, "select count(*) from token_logits", "--run", "1")
    assert (
        out.exit_code == 1
        and "no selected run stored router logits" in out.output
        and "--store-logits" in out.output
    )
    unknown = xici_sql(lake, "select count(*) from token_gates", "--run", "9")
    assert unknown.exit_code == 1 and "no run 9" in unknown.output


def test_only_named_relations_are_streamed() -> None:
    assert mentioned_relations("select n_tokens, tokens_x from sequences") == []
    assert mentioned_relations("SELECT * FROM Tokens t JOIN token_gates g USING (seq_id)") == [
        "tokens",
        "token_gates",
    ]


def test_sql_errors_and_writes_are_refused(lake: Lake, tmp_path: Path) -> None:
    bad = xici_sql(lake, "selec 1")
    assert bad.exit_code == 1 and "the query failed" in bad.output and "Parser Error" in bad.output
    assert "Traceback" not in bad.output
    before = direct(lake, "select count(*) from runs")
    write = xici_sql(lake, "delete from runs")
    assert write.exit_code == 1 and "read-only and refuses DELETE" in write.output
    assert direct(lake, "select count(*) from runs") == before
    suffix = xici_sql(lake, "select 1", "--out", str(tmp_path / "x.xlsx"))
    assert suffix.exit_code == 1 and ".parquet" in suffix.output


def test_jsonl_and_csv_match_the_query(lake: Lake, tmp_path: Path) -> None:
    query = "select seq_id, lang, response_text from sequences order by seq_id"
    lines = tmp_path / "s.jsonl"
    assert xici_sql(lake, query, "--out", str(lines)).exit_code == 0
    got = [tuple(json.loads(line).values()) for line in lines.read_text().splitlines()]
    assert got == direct(lake, query)
