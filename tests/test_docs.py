"""The code cites docs/method.md by section ("method.md, Stage 2, step 2", "Eq. 1", "Notation"): every
section, step and equation it cites must be in the document."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SOURCES = [
    path
    for folder in ("ablation", "analysis", "cli", "corpora", "moe", "recorder", "report", "sql", "warehouse")
    for path in sorted((ROOT / folder).rglob("*"))
    if path.suffix in {".py", ".sql"}
]


def citations() -> list[tuple[Path, str]]:
    """(file, text after 'method.md') for every citation: the rest of its parenthesis or line."""
    found = []
    for path in SOURCES:
        for match in re.finditer(r"method\.md[,']?s?\s*([^)\n]*)", path.read_text()):
            found.append((path, match.group(1)))
    return found


def test_cited_sections_exist() -> None:
    text = METHOD.read_text()
    headings = set(re.findall(r"^## (.+)$", text, flags=re.M))
    stage_headings = {h.split(":")[0] for h in headings}
    cited = citations()
    assert len(cited) >= 20  # the citations are found at all
    for path, rest in cited:
        where = f"{path.relative_to(ROOT)}: method.md {rest!r}"
        for quoted in re.findall(r'"([^"]+)"', rest):
            assert quoted in headings, where
        for stage in re.findall(r"Stage \d", rest):
            assert stage in stage_headings, where
        for equation in re.findall(r"Eq\. \d", rest):
            assert f"**{equation}**" in text, where
        for step in re.findall(r"step (\d)", rest):
            assert re.search(rf"^{step}\. \*\*", text, flags=re.M), where
