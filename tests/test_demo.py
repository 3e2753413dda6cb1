"""`xici demo` end to end on a small planted-knowledge world trained in the test (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
import torch
from click.testing import CliRunner

from xici.cli.main import cli
from xici.testbed.train import ModelConfig, build_testbed
from xici.testbed.world import WorldConfig

# Eight languages: with fewer, a question's best split (4 correct vs 4 wrong) cannot reach p < 0.05.
SMALL_WORLD = WorldConfig(n_entities=24, n_languages=8, n_values=8, n_syllables=10)
SMALL_MODEL = ModelConfig(layers=3, hidden=64, heads=2, experts=8, expert_width=32, steps=200, batch_size=32)


@pytest.fixture(scope="module")
def small_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("testbed")
    build_testbed(out, seed=0, world_config=SMALL_WORLD, model_config=SMALL_MODEL)
    return out


def test_demo_runs_the_whole_pipeline_and_is_idempotent(small_testbed: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    args = ["--lake", str(lake), "demo", "--testbed", str(small_testbed), "--device", "cpu"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    for label in ("XICI", "random set", "shuffled", "nothing off"):
        assert label in first.output
    assert "XICI rate difference" in first.output

    con = duckdb.connect(str(lake / "warehouse.duckdb"), read_only=True)
    try:
        kinds = dict(con.execute("select kind, count(*) from runs group by kind").fetchall())
        assert kinds == {"record": 1, "ablation": 4}  # XICI and the three baselines (none: the noise floor)
        n_prompts = SMALL_WORLD.n_entities * SMALL_WORLD.n_relations * SMALL_WORLD.n_languages
        recorded = con.execute("select count(*) from sequences where run_id = 1").fetchone()[0]
        assert recorded == n_prompts
        with_experts = con.execute(
            "select count(*) from analysis_questions where analysis_id = 1 and n_experts > 0"
        ).fetchone()[0]
        assert with_experts > 0
        # Every ablation run covers each question with experts in every language, with no violation.
        ablated = con.execute(
            "select b.condition, count(s.seq_id), any_value(b.violations), any_value(b.checked_tokens) "
            "from ablations b join sequences s on s.run_id = b.run_id group by b.condition"
        ).fetchall()
        assert {row[0] for row in ablated} == {"xici", "random", "shuffle", "none"}
        for _, n_sequences, violations, checked in ablated:
            assert n_sequences == with_experts * SMALL_WORLD.n_languages
            assert violations == 0 and checked > 0
    finally:
        con.close()
    report = lake / "report"
    assert (report / "report.html").stat().st_size > 10_000
    assert (report / "ablation.png").exists()

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "already imported" in again.output
    assert "already finished" in again.output
    con = duckdb.connect(str(lake / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("select count(*) from runs").fetchone()[0] == 5
        assert con.execute("select count(*) from analyses").fetchone()[0] == 1
    finally:
        con.close()


def test_demo_refuses_a_folder_without_a_testbed(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--lake", str(tmp_path / "lake"), "demo", "--testbed", str(tmp_path)])
    assert result.exit_code == 1
    assert "no trained checkpoint" in result.output
    assert "xici testbed build" in result.output
    assert not (tmp_path / "lake").exists()
