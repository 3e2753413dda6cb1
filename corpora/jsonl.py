"""``--format jsonl``: xici's own plain format, one JSON object per (question, language) line.

Fields: ``question_id`` (string or integer, shared by the languages of one question), ``lang`` (BCP-47 tag),
``question`` (text asked), ``answers`` (list of accepted answer strings), and optionally ``meta`` (an object
describing the question: source, topic, ...). Other fields are ignored. Example::

    {"question_id": "capital-fr", "lang": "en", "question": "Capital of France?", "answers": ["Paris"]}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from xici.corpora.records import PromptRecord, Source, json_id, json_lines, require_fields, wrong_format
from xici.errors import XiciError

EXPECTED = "a JSON Lines file with question_id, lang, question and answers on every line"
FIELDS = ("question_id", "lang", "question", "answers")


def read(path: Path, source: Source) -> Iterator[PromptRecord]:
    """Stream the records of a JSON Lines file."""
    if not path.is_file():
        raise wrong_format(
            "this is a folder, not a file", where=str(path), path=path, chosen="jsonl", expected=EXPECTED
        )
    for number, obj in json_lines(source, path, chosen="jsonl", expected=EXPECTED):
        yield record(obj, f"{path}, line {number}", file=str(path), line=number)


def record(obj: Mapping[str, Any], where: str, *, file: str = "", line: int = 0) -> PromptRecord:
    """The record of one object with the fields above (a line of a file, or a row given from Python)."""
    require_fields(obj, FIELDS, where=where, expected="question_id, lang, question and answers")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise XiciError("'meta' must be a JSON object", where=where, fix='write e.g. "meta": {"x": 1}')
    return PromptRecord(
        question_id=json_id(obj["question_id"], where),
        lang=obj["lang"],
        question=obj["question"],
        answers=obj["answers"],
        meta=meta,
        file=file,
        line=line,
    )
