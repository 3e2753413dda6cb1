"""Datasets into the warehouse: read, validate everything, then write in one transaction.

An import is all or nothing. Every record is checked (language tag, non-empty question and answers, no
(question, language) twice, question metadata that agrees) before the first write, and the three tables are
filled inside one :meth:`~xici.warehouse.Lake.write`, so a refused import leaves the warehouse exactly
as it was. Rows go in as Arrow tables, not one INSERT per row: BMLAMA-17 (115k prompts) takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from xici.corpora.langtags import EXAMPLES, canonical_tag
from xici.corpora.records import PromptRecord, Source
from xici.errors import XiciError
from xici.warehouse import Lake

# --format name -> reader module in xici.corpora; each has read(path, source, *, <options>) -> records
FORMATS: dict[str, str] = {
    "jsonl": "jsonl",
    "eclektic": "eclektic",
    "bmlama": "bmlama",
    "multiloko": "multiloko",
    "global-mmlu": "global_mmlu",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Reader = Callable[..., Iterator[PromptRecord]]


def reader(fmt: str) -> Reader:
    if fmt not in FORMATS:
        raise XiciError(f"unknown dataset format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")
    return importlib.import_module(f"xici.corpora.{FORMATS[fmt]}").read


def reader_options(fmt: str) -> dict[str, Any]:
    """The options a format's reader takes, with their defaults."""
    params = inspect.signature(reader(fmt)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def effective_options(fmt: str, options: dict[str, Any]) -> dict[str, Any]:
    """The given options over the reader's defaults; an option the format does not take is refused."""
    known = reader_options(fmt)
    for key in options:
        if key not in known:
            users = [f for f in FORMATS if key in reader_options(f)]
            raise XiciError(
                f"option --{key.replace('_', '-')} does not apply to --format {fmt}",
                fix=f"it applies to --format {' / '.join(users)}" if users else "drop it",
            )
    return {**known, **options}


def read_records(
    path: Path, fmt: str, options: dict[str, Any] | None = None, *, source: Source | None = None
) -> Iterator[PromptRecord]:
    """A dataset's records as its reader streams them, not yet validated (files hashed into ``source``)."""
    settings = effective_options(fmt, options or {})
    return reader(fmt)(path, source or Source(path), **settings)


@dataclass
class Dataset:
    """A validated dataset, ready to write: question metadata and one row per prompt."""

    questions: dict[str, dict[str, Any]]
    question_ids: list[str]
    langs: list[str]
    texts: list[str]
    answers: list[list[str]]

    @property
    def languages(self) -> list[str]:
        return sorted(set(self.langs))


def _refuse(what: str, record: PromptRecord, fix: str) -> XiciError:
    return XiciError(what, where=record.where, fix=fix)


def _text(value: object, what: str, record: PromptRecord) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _refuse(f"the {what} is a {type(value).__name__}, not text", record, "write it as a string")
    text = value.strip()
    if not text:
        raise _refuse(f"the {what} is empty", record, f"give every prompt a non-empty {what}, or drop it")
    return text


def _answers(value: object, record: PromptRecord) -> list[str]:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise _refuse("there are no accepted answers", record, "give every prompt at least one answer")
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _refuse(
            f"answers must be a list of strings, not {type(value).__name__} {value!r}",
            record,
            'write the accepted answers as a list, e.g. ["Paris"]',
        )
    return list(dict.fromkeys(_text(a, "answer", record) for a in value))


def collect(records: Iterable[PromptRecord]) -> Dataset:
    """Validate all records (the first problem found is raised as a XiciError) and gather them."""
    data = Dataset({}, [], [], [], [])
    seen: dict[tuple[str, str], PromptRecord] = {}
    for record in records:
        question_id = _text(record.question_id, "question id", record)
        try:
            if not isinstance(record.lang, str):
                raise ValueError(f"a language tag is text, not {type(record.lang).__name__}")
            lang = canonical_tag(record.lang)
        except ValueError as exc:
            raise _refuse(
                f"{record.lang!r} is not a valid language tag: {exc}",
                record,
                f"label languages with BCP-47 tags ({EXAMPLES})",
            ) from None
        key = (question_id, lang)
        if key in seen:
            raise _refuse(
                f"question {question_id!r} appears twice in language {lang!r} (first at {seen[key].where})",
                record,
                "keep one prompt per question and language (paraphrases get their own x-... tag)",
            )
        seen[key] = record
        question = _text(record.question, "question", record)
        answers = _answers(record.answers, record)
        meta = data.questions.setdefault(question_id, {})
        for name, value in record.meta.items():
            if meta.setdefault(name, value) != value:
                raise _refuse(
                    f"question {question_id!r} has {name}={meta[name]!r} in one language and {value!r} here",
                    record,
                    "question metadata must be the same in all languages of a question",
                )
        data.question_ids.append(question_id)
        data.langs.append(lang)
        data.texts.append(question)
        data.answers.append(answers)
    if not data.question_ids:
        raise XiciError("the dataset has no prompts", fix="check the path, --format and any filters given")
    return data


def _existing_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in con.execute("select name from datasets").fetchall()}


def _refuse_taken(name: str, taken: set[str], lake: Lake) -> None:
    if name in taken:
        free = next(f"{name}-{i}" for i in range(2, len(taken) + 3) if f"{name}-{i}" not in taken)
        raise XiciError(
            f"a dataset named {name!r} is already imported",
            where=str(lake.warehouse_path),
            fix=f"import under another name, e.g. {free!r} (`xici datasets list` shows the names taken)",
        )


@dataclass(frozen=True)
class ImportSummary:
    name: str
    format: str
    questions: int
    languages: int
    prompts: int
    sha256: str


def import_dataset(
    lake: Lake, name: str, path: Path, fmt: str, options: dict[str, Any] | None = None
) -> ImportSummary:
    """Read, validate and store a dataset under ``name``; nothing is written unless all of it is valid."""
    check_name(lake, name)
    settings = effective_options(fmt, options or {})
    if not path.exists():
        raise XiciError("there is no such file or folder", where=str(path), fix="check the dataset path")
    source = Source(path)
    data = collect(read_records(path, fmt, settings, source=source))
    return _store(lake, name, fmt, str(path), source.sha256, settings, data)


def import_rows(lake: Lake, name: str, rows: Iterable[Mapping[str, Any]], source: str) -> ImportSummary:
    """Validate and store rows with the JSONL format's fields (question_id, lang, question, answers, meta)
    under ``name``, like a JSONL file of those rows; ``source`` says where they came from. The source hash
    is that of the rows as canonical JSON lines, so the same rows always hash alike."""
    from xici.corpora.jsonl import record

    check_name(lake, name)
    rows = list(rows)
    data = collect(record(row, f"{source}, row {i}") for i, row in enumerate(rows, 1))
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str).encode() + b"\n")
    return _store(lake, name, "jsonl", source, digest.hexdigest(), {}, data)


def check_name(lake: Lake, name: str) -> None:
    """Refuse a dataset name that is not usable or already taken (before anything is read)."""
    if not _NAME.match(name):
        raise XiciError(
            f"{name!r} is not a usable dataset name",
            fix="use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    if lake.warehouse_path.exists():
        lake.read(lambda con: _refuse_taken(name, _existing_names(con), lake))


def _store(
    lake: Lake, name: str, fmt: str, source: str, sha256: str, settings: dict[str, Any], data: Dataset
) -> ImportSummary:
    """Write a validated dataset in one transaction (refused whole if the name was taken meanwhile)."""
    metas = data.questions.values()
    questions = pa.table(
        {
            "dataset": pa.array([name] * len(data.questions), pa.string()),
            "question_id": pa.array(list(data.questions), pa.string()),
            "meta": pa.array([json.dumps(m, ensure_ascii=False, sort_keys=True) for m in metas]),
        }
    )
    prompts = pa.table(
        {
            "dataset": pa.array([name] * len(data.langs), pa.string()),
            "question_id": pa.array(data.question_ids, pa.string()),
            "lang": pa.array(data.langs, pa.string()),
            "question": pa.array(data.texts, pa.string()),
            "answers": pa.array(data.answers, pa.list_(pa.string())),
        }
    )

    def insert(con: duckdb.DuckDBPyConnection) -> None:
        _refuse_taken(name, _existing_names(con), lake)
        con.execute(
            "insert into datasets (name, format, source, source_sha256, options) values (?, ?, ?, ?, ?)",
            [name, fmt, source, sha256, json.dumps(settings, default=str, sort_keys=True)],
        )
        con.register("new_questions", questions)
        con.register("new_prompts", prompts)
        try:
            con.execute("insert into questions select dataset, question_id, meta::json from new_questions")
            con.execute("insert into prompts select * from new_prompts")
        finally:
            con.unregister("new_questions")
            con.unregister("new_prompts")

    lake.write(insert)
    return ImportSummary(name, fmt, len(data.questions), len(data.languages), len(data.langs), sha256)


# -- reading back ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    format: str
    source: str
    source_sha256: str
    options: dict[str, Any]
    imported_at: datetime
    questions: int
    languages: int
    prompts: int


@dataclass(frozen=True)
class DatasetDetail:
    info: DatasetInfo
    prompts_per_language: dict[str, int]
    complete_questions: int  # questions asked in every language of the dataset
    samples: list[tuple[str, str, str, list[str]]]  # (question_id, lang, question, answers)


_INFO_SQL = """
select d.name, d.format, d.source, d.source_sha256, d.options, d.imported_at,
       (select count(*) from questions q where q.dataset = d.name),
       (select count(distinct lang) from prompts p where p.dataset = d.name),
       (select count(*) from prompts p where p.dataset = d.name)
from datasets d
"""


def _info(row: tuple[Any, ...]) -> DatasetInfo:
    return DatasetInfo(*row[:4], json.loads(row[4]), *row[5:])


def list_datasets(lake: Lake) -> list[DatasetInfo]:
    """Every imported dataset, oldest first (none when the lake has no warehouse yet)."""
    if not lake.warehouse_path.exists():
        return []
    return lake.read(
        lambda con: [_info(r) for r in con.execute(_INFO_SQL + " order by d.imported_at, d.name").fetchall()]
    )


def describe_dataset(lake: Lake, name: str, *, samples: int = 5) -> DatasetDetail:
    """One dataset's counts per language and a few of its prompts (those of its first questions)."""
    known = list_datasets(lake)
    info = next((d for d in known if d.name == name), None)
    if info is None:
        names = ", ".join(d.name for d in known) or "none yet"
        raise XiciError(f"there is no dataset named {name!r}", fix=f"imported datasets: {names}")

    def read(con: duckdb.DuckDBPyConnection) -> DatasetDetail:
        per_lang = dict(
            con.execute(
                "select lang, count(*) from prompts where dataset = ? group by lang order by lang", [name]
            ).fetchall()
        )
        complete = con.execute(
            "select count(*) from (select question_id from prompts where dataset = ? group by question_id "
            "having count(*) = ?)",
            [name, len(per_lang)],
        ).fetchone()[0]
        rows = con.execute(
            "select question_id, lang, question, answers from prompts where dataset = ? "
            "order by question_id, lang limit ?",
            [name, samples],
        ).fetchall()
        return DatasetDetail(info, per_lang, complete, [(q, lang, t, list(a)) for q, lang, t, a in rows])

    return lake.read(read)
