"""Importing datasets into a real warehouse: what lands, and bad input refused whole."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from xici.corpora.store import describe_dataset, import_dataset, list_datasets
from xici.errors import XiciError
from xici.warehouse import Lake


def line(qid: Any, lang: Any, question: Any, answers: Any, **extra: Any) -> dict[str, Any]:
    return {"question_id": qid, "lang": lang, "question": question, "answers": answers, **extra}


GOOD = [
    line("capital", "en", "Capital of France?", ["Paris", " Paris ", "Paname"], meta={"t": "geo"}),
    line("capital", "FR", "Quelle est la capitale de la France ?", ["Paris"]),
    line("capital", "zh-hant-tw", "法國的首都是哪裡？", ["巴黎"], meta={"t": "geo", "level": 1}),
    line("river", "en", "  Which river flows through Paris?  ", ["Seine", "the Seine"]),
    line("river", "x-para1", "Name the river of Paris.", ["Seine"]),
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def snapshot(lake: Lake) -> dict[str, list[tuple[Any, ...]]] | None:
    """Every row of the dataset tables (None when there is no warehouse file at all)."""
    if not lake.warehouse_path.exists():
        return None
    con = lake.connect(read_only=True)
    try:
        tables = ("datasets", "questions", "prompts")
        return {t: sorted(map(str, con.execute(f"select * from {t}").fetchall())) for t in tables}
    finally:
        con.close()


@pytest.fixture(scope="module")
def base_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    lake = Lake(folder / "lake")
    import_dataset(lake, "base", write_jsonl(folder / "base.jsonl", GOOD), "jsonl")
    return lake.warehouse_path


@pytest.fixture
def lake(tmp_path: Path, base_warehouse: Path) -> Lake:
    """A lake of its own that already holds one dataset, 'base' (a copy: faster than importing again)."""
    lake = Lake(tmp_path / "lake")
    lake.root.mkdir()
    shutil.copy(base_warehouse, lake.warehouse_path)
    return lake


def test_import_fills_the_three_tables(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    path = write_jsonl(tmp_path / "good.jsonl", GOOD)
    summary = import_dataset(lake, "geo", path, "jsonl")
    assert (summary.questions, summary.languages, summary.prompts) == (2, 4, 5)
    assert summary.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    con = lake.connect(read_only=True)
    dataset = con.execute("select name, format, source, source_sha256, options from datasets").fetchall()
    assert dataset == [("geo", "jsonl", str(path), summary.sha256, "{}")]
    metas = dict(con.execute("select question_id, meta from questions where dataset = 'geo'").fetchall())
    assert {k: json.loads(v) for k, v in metas.items()} == {"capital": {"t": "geo", "level": 1}, "river": {}}
    prompts = {
        (q, lang): (text, answers)
        for q, lang, text, answers in con.execute(
            "select question_id, lang, question, answers from prompts"
        ).fetchall()
    }
    con.close()
    assert sorted(prompts) == [
        ("capital", "en"),
        ("capital", "fr"),
        ("capital", "zh-Hant-TW"),
        ("river", "en"),
        ("river", "x-para1"),
    ]
    assert prompts["capital", "en"][1] == ["Paris", "Paname"]  # stripped, duplicates dropped, order kept
    assert prompts["river", "en"] == ("Which river flows through Paris?", ["Seine", "the Seine"])


def test_reader_options_are_stored_with_their_defaults(tmp_path: Path) -> None:
    folder = tmp_path / "B"
    folder.mkdir()
    (folder / "en.tsv").write_text("Prompt\tAns\tCandidate Ans\tSubject\nA is in <mask>.\tX\tX\tA\n")
    lake = Lake(tmp_path / "lake")
    import_dataset(lake, "b1", folder, "bmlama")
    import_dataset(lake, "b2", folder, "bmlama", {"template": "Q: {cloze}"})
    options = {d.name: d.options for d in list_datasets(lake)}
    assert options == {"b1": {"template": "Fill in the blank: {cloze}"}, "b2": {"template": "Q: {cloze}"}}
    assert describe_dataset(lake, "b2").samples == [("bmlama-1", "en", "Q: A is in ___.", ["X"])]


def test_list_and_describe(lake: Lake, tmp_path: Path) -> None:
    import_dataset(lake, "second", write_jsonl(tmp_path / "s.jsonl", GOOD[:2]), "jsonl")
    assert [(d.name, d.questions, d.languages, d.prompts) for d in list_datasets(lake)] == [
        ("base", 2, 4, 5),
        ("second", 1, 2, 2),
    ]
    detail = describe_dataset(lake, "base", samples=2)
    assert detail.prompts_per_language == {"en": 2, "fr": 1, "x-para1": 1, "zh-Hant-TW": 1}
    assert detail.complete_questions == 0
    assert detail.samples == [
        ("capital", "en", "Capital of France?", ["Paris", "Paname"]),
        ("capital", "fr", "Quelle est la capitale de la France ?", ["Paris"]),
    ]
    with pytest.raises(XiciError, match=r"no dataset named 'nope'.*base, second"):
        describe_dataset(lake, "nope")


def test_an_empty_lake_lists_nothing(tmp_path: Path) -> None:
    assert list_datasets(Lake(tmp_path / "none")) == []


BAD_ROWS = {
    "duplicate": (
        [line("q1", "en", "A?", ["a"]), line("q2", "en", "B?", ["b"]), line("q1", "EN", "A again?", ["a"])],
        r"question 'q1' appears twice in language 'en' \(first at .*line 1\)",
        3,
    ),
    "empty question": (
        [line("q1", "en", "A?", ["a"]), line("q1", "fr", " ", ["a"])],
        "the question is empty",
        2,
    ),
    "missing answers": (
        [line("q1", "en", "A?", ["a"]), {"question_id": "q1", "lang": "de", "question": "A?"}],
        "missing field 'answers'",
        2,
    ),
    "no answers": ([line("q1", "en", "A?", [])], "there are no accepted answers", 1),
    "null answers": ([line("q1", "en", "A?", None)], "there are no accepted answers", 1),
    "empty answer": ([line("q1", "en", "A?", ["a", " "])], "the answer is empty", 1),
    "answers not a list": ([line("q1", "en", "A?", "a")], "answers must be a list of strings", 1),
    "answer not text": ([line("q1", "en", "A?", [3])], "the answer is a int, not text", 1),
    "unknown language": ([line("q1", "en", "A?", ["a"]), line("q1", "zz", "A?", ["a"])], "'zz' is not a", 2),
    "language name": ([line("q1", "english", "A?", ["a"])], "'english' is not a valid language tag", 1),
    "language not text": ([line("q1", 7, "A?", ["a"])], "7 is not a valid language tag", 1),
    "empty id": ([line("  ", "en", "A?", ["a"])], "question id must be a non-empty string", 1),
    "conflicting meta": (
        [line("q1", "en", "A?", ["a"], meta={"s": 1}), line("q1", "fr", "A?", ["a"], meta={"s": 2})],
        "question 'q1' has s=1 in one language and 2 here",
        2,
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_refuse_the_whole_import(lake: Lake, tmp_path: Path, case: str) -> None:
    rows, message, bad_line = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    before = snapshot(lake)
    with pytest.raises(XiciError, match=message) as err:
        import_dataset(lake, "new", path, "jsonl")
    assert err.value.where == f"{path}, line {bad_line}"
    assert err.value.fix
    assert snapshot(lake) == before


def test_a_bad_last_line_leaves_nothing_of_the_lines_before(lake: Lake, tmp_path: Path) -> None:
    rows = [line(f"q{i}", "en", f"Q{i}?", [f"a{i}"]) for i in range(500)] + [line("q0", "en", "again", ["a"])]
    before = snapshot(lake)
    with pytest.raises(XiciError, match="appears twice"):
        import_dataset(lake, "big", write_jsonl(tmp_path / "big.jsonl", rows), "jsonl")
    assert snapshot(lake) == before


@pytest.mark.parametrize(
    ("make", "fmt", "message"),
    [
        (lambda d: d / "data.csv", "jsonl", "not valid JSON.*it looks like --format eclektic"),
        (lambda d: d / "tsvs", "eclektic", "folder, not a file.*it looks like --format bmlama"),
        (lambda d: d / "broken.jsonl", "jsonl", r"not valid JSON"),
        (lambda d: d / "empty.jsonl", "jsonl", "the dataset has no prompts"),
        (lambda d: d / "missing.jsonl", "jsonl", "no such file or folder"),
    ],
)
def test_wrong_files_are_refused(lake: Lake, tmp_path: Path, make: Any, fmt: str, message: str) -> None:
    (tmp_path / "data.csv").write_text("q_id,language,question,answer\n1,en,Q,A\n", encoding="utf-8")
    (tmp_path / "tsvs").mkdir()
    (tmp_path / "tsvs" / "en.tsv").write_text("Prompt\tAns\tCandidate Ans\tSubject\n", encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text(json.dumps(line("q", "en", "Q", ["A"])) + '\n{"question_id": \n')
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    before = snapshot(lake)
    with pytest.raises(XiciError, match=message):
        import_dataset(lake, "new", make(tmp_path), fmt)
    assert snapshot(lake) == before


def test_a_taken_name_is_refused_with_a_free_one_suggested(lake: Lake, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "again.jsonl", GOOD)
    import_dataset(lake, "base-2", path, "jsonl")
    before = snapshot(lake)
    with pytest.raises(XiciError, match="'base' is already imported") as err:
        import_dataset(lake, "base", path, "jsonl")
    assert "'base-3'" in err.value.message
    assert snapshot(lake) == before


@pytest.mark.parametrize("name", ["has space", "-dash", "a/b", "x" * 65])
def test_unusable_names_are_refused(lake: Lake, tmp_path: Path, name: str) -> None:
    before = snapshot(lake)
    with pytest.raises(XiciError, match="not a usable dataset name"):
        import_dataset(lake, name, write_jsonl(tmp_path / "g.jsonl", GOOD), "jsonl")
    assert snapshot(lake) == before


def test_a_refused_first_import_creates_no_warehouse(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "fresh")
    with pytest.raises(XiciError, match="'zz' is not a valid language tag"):
        import_dataset(lake, "d", write_jsonl(tmp_path / "d.jsonl", [line("q", "zz", "Q", ["A"])]), "jsonl")
    assert snapshot(lake) is None
