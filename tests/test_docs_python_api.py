"""docs/python-api.md runs: its Python blocks, in order, in one namespace, in a fresh folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import xici

DOC = Path(__file__).parents[1] / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.slow
def test_the_walk_through_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
    # What the walk-through left behind is what it says it did.
    with xici.open("xici-lake") as lake:
        [(kinds,)] = lake.sql("select list(kind order by run_id) from runs").fetchall()
        assert kinds == ["record", "ablation", "ablation"]
        assert lake.experts(namespace["analysis"]).num_rows > 0
        shown = {(r["condition"], r["asr"], r["sgr"]) for r in lake.metrics().to_pylist()}
        stored = lake.sql("select condition, asr, sgr from ablations join ablation_metrics using (run_id)")
        assert shown == set(stored.fetchall())
    assert (tmp_path / "routing.png").stat().st_size > 0 and (tmp_path / "expert-map.png").stat().st_size > 0
    assert (tmp_path / "xici-lake" / "report" / "report.html").exists()
