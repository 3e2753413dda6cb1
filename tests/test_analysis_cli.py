"""``xici analyze`` and ``xici export experts`` through the command line, and the parameter helpers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner, Result

from xici.analysis.means import weight_per_token
from xici.analysis.params import (
    PRESETS,
    AnalysisParams,
    default_window,
    expand,
    find_preset,
    parse_layers,
    parse_sweep,
    resolve,
)
from xici.cli.main import cli
from xici.errors import XiciError
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake

SPEC = SyntheticSpec(questions=((16, 10),), accuracy=(0.7, 0.3), difficulty=0.5)


def xici(lake: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--lake", str(lake), *args], env={"COLUMNS": "200"})


def table(output: str) -> dict[str, str]:
    """The two-column summary table as {label: value}."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if "│" in line]
    return {row[0]: row[1] for row in cells if len(row) == 2}


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "lake"
    write_synthetic_lake(Lake(root), SPEC)
    return root


def test_analyze_show_list(lake: Path) -> None:
    result = xici(lake, "analyze", "--run", "1", "--tau", "0.02")
    assert result.exit_code == 0, result.output
    assert "Analysis 1 of run 1 (new)" in result.output
    # The synthetic model has no preset: the defaults it falls back on are said, not applied silently.
    assert "No preset for" in result.output and "layers 1:7" in result.output
    summary = table(result.output)
    assert (summary["questions"], summary["languages"]) == ("16", "10")
    assert int(summary["mixed"]) + int(summary["all correct"]) + int(summary["all incorrect"]) == 16
    assert int(summary["questions with experts identified"]) > 0

    again = xici(lake, "analyze", "--run", "1", "--tau", "0.02", "--layers", "1:7", "--alpha", "0.05")
    assert "Analysis 1 of run 1 (stored earlier" in again.output  # the defaults, spelled out: same analysis

    shown = xici(lake, "analyze", "show", "1")
    assert shown.exit_code == 0 and table(shown.output) == summary
    listed = xici(lake, "analyze", "list")
    assert listed.exit_code == 0 and "1:7" in listed.output


def test_mwu_and_min_group_options(lake: Path) -> None:
    result = xici(lake, "analyze", "--run", "1", "--mwu", "exact", "--min-group", "2")
    assert result.exit_code == 0, result.output
    analysis_id = result.output.split("Analysis ")[1].split()[0]
    shown = xici(lake, "analyze", "show", analysis_id)
    assert "Mann-Whitney p exact, groups of at least 2" in shown.output
    wrong = xici(lake, "analyze", "--run", "1", "--min-group", "0")
    assert wrong.exit_code != 0 and "min-group must be at least 1" in wrong.output
    assert "Traceback" not in wrong.output
    swept = xici(lake, "analyze", "--run", "1", "--sweep", "mwu=auto,exact", "--sweep", "min-group=1,3")
    assert swept.exit_code == 0 and swept.output.count("exact") == 2, swept.output


def test_sweep_stores_every_point(lake: Path) -> None:
    result = xici(lake, "analyze", "--run", "1", "--sweep", "tau=0.001,0.05", "--sweep", "max-experts=2,5,9")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(rows) == 6
    with duckdb.connect(str(Lake(lake).warehouse_path), read_only=True) as con:
        points = con.execute("select tau, max_experts from analyses order by tau, max_experts").fetchall()
        caps = con.execute(
            "select a.max_experts, max(q.n_experts) from analyses a join analysis_questions q using "
            "(analysis_id) group by all"
        ).fetchall()
    assert {(0.001, 2), (0.001, 5), (0.001, 9), (0.05, 2), (0.05, 5), (0.05, 9)} <= set(points)
    assert all(largest <= cap for cap, largest in caps)


def test_export_is_byte_identical(lake: Path, tmp_path: Path) -> None:
    assert xici(lake, "analyze", "--run", "1", "--tau", "0.02").exit_code == 0
    for suffix in (".csv", ".parquet", ".json"):
        first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        for out in (first, second):
            result = xici(lake, "export", "experts", "--analysis", "1", "--out", str(out))
            assert result.exit_code == 0, result.output
        assert first.read_bytes() == second.read_bytes()
    header, *lines = (tmp_path / "a.csv").read_text().splitlines()
    assert header == "question_id,layer,expert,u,p,median_diff,rank"
    assert lines and all(float(line.split(",")[4]) < 0.05 for line in lines)


def test_user_mistakes_are_one_paragraph(lake: Path, tmp_path: Path) -> None:
    cases = [
        (["analyze"], "give --run"),
        (["analyze", "--run", "9"], "no recording run 9"),
        (["analyze", "--run", "1", "--layers", "7:2"], "not inside the run's 8 MoE layers"),
        (["analyze", "--run", "1", "--preset", "glm-4.5-air"], "45 MoE layers, but the run has 8"),
        (["analyze", "--run", "1", "--sweep", "beta=1"], "cannot read --sweep"),
        (["analyze", "--run", "1", "--grader", "judge"], "no grades from grader 'judge'"),
        (["analyze", "show", "77"], "no analysis 77"),
        (["export", "experts", "--analysis", "77", "--out", str(tmp_path / "x.csv")], "no analysis 77"),
        (["export", "experts", "--analysis", "1", "--out", str(tmp_path / "x.xlsx")], "export format"),
        (["export", "experts", "--analysis", "1", "--out", str(tmp_path / "no" / "x.csv")], "does not exist"),
    ]
    for args, message in cases:
        result = xici(lake, *args)
        assert result.exit_code != 0
        assert message in result.output
        assert "Traceback" not in result.output


def test_presets_and_defaults() -> None:
    assert default_window(48) == (6, 42) == PRESETS["qwen3-30b-a3b"].layers
    assert (default_window(4), default_window(3), default_window(1)) == ((1, 3), (0, 3), (0, 1))
    qwen = find_preset("auto", "Qwen/Qwen3-30B-A3B-Instruct-2507", 48)
    glm = find_preset("auto", "zai-org/GLM-4.5-Air", 45)
    assert (qwen.name, glm.name) == ("qwen3-30b-a3b", "glm-4.5-air")
    assert find_preset("auto", "some/other-moe", 48) is None
    assert resolve(glm, 45) == AnalysisParams(5, 40, tau=0.01)
    assert resolve(qwen, 48, tau=0.003, layers=(4, 40)) == AnalysisParams(4, 40, tau=0.003)
    with pytest.raises(XiciError, match="unknown preset"):
        find_preset("mixtral", "x", 32)


def test_sweep_grid_and_layer_parsing() -> None:
    base = AnalysisParams(6, 42)
    grid = expand(base, parse_sweep(["tau=0.001,0.01", "layers=6:42,4:44", "max-experts=5"]), 48)
    assert [(p.tau, p.layer_start, p.max_experts) for p in grid] == [
        (0.001, 6, 5), (0.001, 4, 5), (0.01, 6, 5), (0.01, 4, 5)
    ]  # fmt: skip
    assert parse_layers("0:3") == (0, 3)
    for bad in ("3", "a:b", "1:2:3"):
        with pytest.raises(XiciError, match="layer window"):
            parse_layers(bad)
    with pytest.raises(XiciError, match="given twice"):
        parse_sweep(["tau=1", "tau=2"])
    with pytest.raises(XiciError, match="max-experts"):
        expand(base, parse_sweep(["max-experts=0"]), 48)
    assert replace(base, tau=0.0) != base


def test_weights_that_do_not_sum_to_one_are_said(tmp_path: Path) -> None:
    """Synthetic weights sum to 1 per token: nothing to say. Scaled like DeepSeek-V3's (x2.5), analyze says
    that m and tau live on that scale."""
    root = tmp_path / "lake"
    write_synthetic_lake(Lake(root), SPEC)
    plain = xici(root, "analyze", "--run", "1")
    assert plain.exit_code == 0 and "gate weights sum" not in plain.output
    with duckdb.connect(str(Lake(root).warehouse_path)) as con:
        assert weight_per_token(con, 1) == pytest.approx(1.0, abs=1e-3)  # float16 weights
        con.execute("update seq_means set m = m * 2.5")  # the stored build record still matches: no rebuild
    scaled = xici(root, "analyze", "--run", "1", "--tau", "0.01")
    assert scaled.exit_code == 0, scaled.output
    assert "gate weights sum to 2.5 per token, not 1" in scaled.output
