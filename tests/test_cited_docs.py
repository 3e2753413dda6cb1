"""Every document the repository cites is in the repository: a reader who follows "see docs/method.md" or
a README link finds the file, and nothing points outside the checkout (a sibling folder of notes, say)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: File names the code writes rather than cites: ``xici report`` writes its report under this name.
OUTPUTS = {"report.md"}
#: A path to a Markdown file: folders (``..`` included) and a name ending in .md, not part of a longer word.
CITED = re.compile(r"(?<![\w./-])((?:\.\./|[\w-]+/)*[\w-]+\.md)\b")
SUFFIXES = {".py", ".sql", ".md", ".toml"}


def sources() -> list[Path]:
    """The repository's code, SQL, docs and settings (hidden folders, the venv and build output left out)."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [
            d for d in subfolders if not d.startswith(".") and d != "__pycache__" and "egg-info" not in d
        ]
        found += [Path(folder, f) for f in files if Path(f).suffix in SUFFIXES or f == "Makefile"]
    return sorted(p for p in found if p != Path(__file__).resolve())


def resolve(citing: Path, cited: str) -> Path | None:
    """The cited file: next to the citing file, from the repository root, or in docs/ (``method.md`` is
    cited by its name alone); None when it is nowhere or outside the repository."""
    for candidate in (citing.parent / cited, ROOT / cited, ROOT / "docs" / cited):
        if candidate.is_file() and candidate.resolve().is_relative_to(ROOT):
            return candidate
    return None


def test_every_cited_document_exists() -> None:
    citations = [
        (path, cited)
        for path in sources()
        for cited in CITED.findall(path.read_text(encoding="utf-8", errors="replace"))
        if Path(cited).name not in OUTPUTS
    ]
    assert len(citations) >= 40  # the citations are found at all (method.md alone is cited some 40 times)
    missing = [
        f"{path.relative_to(ROOT)} cites {cited}" for path, cited in citations if resolve(path, cited) is None
    ]
    assert not missing, "\n".join(missing)


def test_a_citation_outside_the_repository_is_caught() -> None:
    citing = ROOT / "tests" / "conftest.py"
    assert resolve(citing, "../shared/engine-facts.md") is None
    assert resolve(citing, "engine-facts.md") is None
    assert resolve(citing, "method.md") == ROOT / "docs" / "method.md"
    assert CITED.findall("see shared/engine-facts.md, docs/method.md and ../benchmarks/README.md.") == [
        "shared/engine-facts.md",
        "docs/method.md",
        "../benchmarks/README.md",
    ]
