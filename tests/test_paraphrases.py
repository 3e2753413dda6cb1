"""Same-language paraphrases of the testbed's questions (``xici testbed paraphrases``) and the report's
Table 3, which sets a cross-lingual and a paraphrase recording of the same question ids side by side."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from click.testing import CliRunner

from xici.analysis.identify import analyze
from xici.analysis.params import resolve
from xici.cli.main import cli
from xici.errors import XiciError
from xici.report import instruments
from xici.report.source import reading
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.testbed.train import shipped_testbed
from xici.testbed.world import PARAPHRASE_TEMPLATES, world_of
from xici.warehouse import Lake


def test_paraphrases_share_ids_and_answers_with_the_cross_lingual_dataset(tmp_path: Path) -> None:
    out = tmp_path / "para.jsonl"
    result = CliRunner().invoke(cli, ["testbed", "paraphrases", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    crosslingual = [json.loads(line) for line in shipped_testbed().dataset.read_text().splitlines()]
    answers = {r["question_id"]: r["answers"] for r in crosslingual}
    pivot = {r["question_id"]: r["question"] for r in crosslingual if r["lang"] == "x-lang00"}
    assert {r["question_id"] for r in rows} == set(answers)
    assert len(rows) == len(answers) * len(PARAPHRASE_TEMPLATES)
    assert all(r["answers"] == answers[r["question_id"]] for r in rows)
    # x-para0 is the pivot's own wording; the others reorder the same words (or drop / double the particle)
    assert {r["question_id"]: r["question"] for r in rows if r["lang"] == "x-para0"} == pivot
    by_question: dict[str, set[str]] = {}
    for r in rows:
        by_question.setdefault(r["question_id"], set()).add(r["question"])
    assert all(len(texts) == len(PARAPHRASE_TEMPLATES) for texts in by_question.values())
    vocabulary = set(world_of(shipped_testbed().checkpoint).vocabulary())
    assert all(set(r["question"].split()) <= vocabulary for r in rows)


def test_an_edited_world_is_refused(tmp_path: Path) -> None:
    world = json.loads((shipped_testbed().checkpoint / "world.json").read_text())
    world["facts"][0][0] += 1
    (tmp_path / "world.json").write_text(json.dumps(world))
    result = CliRunner().invoke(cli, ["testbed", "paraphrases", "--testbed", str(tmp_path)])
    assert result.exit_code != 0 and "not the world its config generates" in result.output
    try:
        world_of(tmp_path / "missing")
    except XiciError as error:
        assert "cannot read the testbed's world" in str(error)
    else:
        raise AssertionError("a folder without world.json must be refused")


def test_table_3_sets_the_two_recordings_side_by_side(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    spec = SyntheticSpec(questions=((12, 6),), accuracy=(0.7, 0.3), difficulty=0.5)
    languages = write_synthetic_lake(lake, spec).run_id
    paraphrases = write_synthetic_lake(lake, replace(spec, dataset="para", seed=1)).run_id
    with reading(lake) as con:
        assert instruments.paraphrase_table(con) is None  # two cross-lingual recordings: no Table 3
    # the second recording's variants become paraphrase templates of one language
    lake.write(
        lambda con: con.execute(
            "update sequences s set lang = 'x-para' || t.k from (select lang, (row_number() over "
            "(order by lang) - 1)::varchar as k from (select distinct lang from sequences "
            "where run_id = ?)) t where s.run_id = ? and s.lang = t.lang",
            [paraphrases, paraphrases],
        )
    )
    for run_id in (languages, paraphrases):
        analyze(lake, run_id, [resolve(None, spec.n_layers, tau=0.05)])
    with reading(lake) as con:
        table = instruments.paraphrase_table(con)
        summary = con.execute(
            "select run_id, mixed, with_experts from analysis_summary order by run_id"
        ).fetchall()
    assert table is not None
    assert table.column("run") == [languages, paraphrases]
    assert table.column("variants of a question") == ["languages", "paraphrases"]
    assert table.column("variants") == [6, 6] and table.column("questions") == [12, 12]
    assert (
        list(
            zip(
                table.column("run"),
                table.column("mixed"),
                table.column("questions with experts"),
                strict=True,
            )
        )
        == summary
    )
    assert table.column("ASR") == [None, None]  # not ablated yet
