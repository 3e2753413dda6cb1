"""Datasets from Python: import question sets into a lake, as ``xici datasets import`` does.

:func:`import_records` takes rows already in memory (a list of dicts, a pandas DataFrame or an Arrow table)
with the columns of xici's JSONL format: ``question_id``, ``lang`` (a BCP-47 tag), ``question``, ``answers``
(a list of accepted answers) and optionally ``meta`` (a dict describing the question). :func:`import_file`
reads a file or folder in any of the formats of the command. Both check everything before writing, with the
command's validation and messages: one bad row refuses the import and leaves the lake as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xici.corpora.store import ImportSummary, import_dataset, import_rows
from xici.errors import XiciError
from xici.pipeline import writable
from xici.warehouse import Lake

__all__ = ["ImportSummary", "import_file", "import_records"]


def import_records(lake: Lake | str | Path, name: str, rows: Any) -> ImportSummary:
    """Import ``rows`` as the dataset ``name``: a list of dicts, a pandas DataFrame or a pyarrow Table
    with the JSONL columns (question_id, lang, question, answers, and optionally meta)."""
    return import_rows(writable(lake), name, _dicts(rows), source=f"{type(rows).__name__} from Python")


def import_file(
    lake: Lake | str | Path, name: str, path: str | Path, format: str, **options: Any
) -> ImportSummary:
    """Import the dataset at ``path`` as ``name`` with the reader ``format`` (jsonl, eclektic, bmlama,
    multiloko, global-mmlu) and its options (template, split, translation, subject, ids)."""
    return import_dataset(writable(lake), name, Path(path), format, options)


def _dicts(rows: Any) -> list[Mapping[str, Any]]:
    """Rows as dicts of plain Python values; a missing (null) meta left out, as if the row had none."""
    if hasattr(rows, "to_pylist"):  # a pyarrow Table or RecordBatch
        rows = rows.to_pylist()
    elif hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame: through Arrow
        import pyarrow as pa

        rows = pa.Table.from_pandas(rows, preserve_index=False).to_pylist()
    found = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise XiciError(
                f"row {number} is a {type(row).__name__}, not a dict of columns",
                where="import_records",
                fix="give a list of dicts, a pandas DataFrame or a pyarrow Table",
            )
        found.append({key: value for key, value in row.items() if not (key == "meta" and value is None)})
    return found
