"""The instruments beyond Table 2 on a real tiny MoE checkpoint, a real warehouse and Zarr store: the boost
(raised logits, its routing check against the recorded answers), per-expert necessity (one run per rank,
each deactivation proven), a question limit, the views and the CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_ablation_support import ASKED, copy_lake, insert_analysis, record_toy, routing, rows, xici_sets
from test_recorder_support import stopping_checkpoint

from xici.ablation.runner import Instrument, run_ablation
from xici.cli.main import cli
from xici.errors import XiciError
from xici.report import instruments
from xici.report.source import reading
from xici.warehouse import Lake

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint, tmp_path_factory) -> tuple[Lake, int]:
    checkpoint = stopping_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path_factory.mktemp("stop") / "q", 8)
    lake = record_toy(checkpoint, tmp_path_factory.mktemp("recorded") / "lake")
    n_layers = rows(lake, "select n_moe_layers from runs where run_id = 1")[0][0]
    # sets of two experts per question (ranks 1 and 2: two layers of the question's own used experts)
    sets = {q: pairs[:2] for q, pairs in xici_sets(lake).items()}
    return lake, insert_analysis(lake, 1, sets, layers=(0, n_layers))


@pytest.fixture
def lake(recorded, tmp_path) -> Lake:
    return copy_lake(recorded[0], tmp_path / "lake")


def test_boost_raises_the_selection_of_its_experts(recorded, lake: Lake) -> None:
    boost = Instrument("boost", boost=8.0)
    result = run_ablation(
        lake, recorded[1], device="cpu", batch_size=4, baselines=("random",), instrument=boost
    )
    assert [(r.condition, r.finished) for r in result.runs] == [("xici", True), ("random", True)]
    assert result.metrics == []  # Table 2 is for deactivation only
    stored = rows(
        lake,
        "select condition, mode, boost, selected_before, selected_after from ablations order by run_id",
    )
    assert [r[:3] for r in stored] == [("xici", "boost", 8.0), ("random", "boost", 8.0)]
    for _, _, _, before, after in stored:
        assert after > before + 0.3  # +8 on the logits: mostly in the top-k
    # independent read: in the boosted answers, every set expert is selected on most tokens
    xici_run = result.runs[0].run_id
    sets = xici_sets(lake)
    for (question, _), ids in routing(lake, xici_run).items():
        for layer, expert in sets[question][:2]:
            assert (ids[:, layer] == expert).any(axis=-1).mean() > 0.6
    with reading(lake) as con:
        table = instruments.boost_table(con, 1)
    assert table is not None and table.column("condition") == ["XICI", "random set"]
    # the same call again is finished and asks nothing
    again = run_ablation(lake, recorded[1], device="cpu", baselines=("random",), instrument=boost)
    assert all(r.already_finished for r in again.runs)


def test_per_expert_runs_switch_off_one_expert_per_rank(recorded, lake: Lake) -> None:
    result = run_ablation(lake, recorded[1], device="cpu", batch_size=4, instrument=Instrument("single"))
    assert [(r.condition, r.label, r.n_units) for r in result.runs] == [
        ("xici", "XICI #1", 3 * len(ASKED)),
        ("xici", "XICI #2", 3 * len(ASKED)),
    ]
    sets = xici_sets(lake)
    for position, run in enumerate(result.runs, 1):
        assert run.check.violations == 0 and run.check.checked_tokens > 0
        off = rows(
            lake,
            "select question_id, layer, expert from ablation_experts where run_id = ? order by 1",
            [run.run_id],
        )
        assert off == [(q, *sets[q][position - 1]) for q in ASKED]
    leave = run_ablation(lake, recorded[1], device="cpu", batch_size=4, instrument=Instrument("all-but-one"))
    for position, run in enumerate(leave.runs, 1):
        off = rows(
            lake,
            "select question_id, layer, expert from ablation_experts where run_id = ? order by 1",
            [run.run_id],
        )
        assert off == [(q, *sets[q][2 - position]) for q in ASKED]  # the other one of the two
    with reading(lake) as con:
        necessity = con.execute(
            "select question_id, position, n_correct_before, n_now_wrong, n_wrong_all_but_it "
            "from expert_necessity order by 1, 2"
        ).fetchall()
        correct = dict(
            con.execute(
                "select s.question_id, count(*) filter (where g.correct) from sequences s "
                "join grades g using (seq_id) where s.run_id = 1 group by 1"
            ).fetchall()
        )
        table = instruments.necessity_table(con, 1)
    assert [(q, p) for q, p, *_ in necessity] == [(q, p) for q in ASKED for p in (1, 2)]
    assert all(n == correct[q] and 0 <= w <= n and o is not None for q, _, n, w, o in necessity)
    assert table is not None and table.column("experts switched off alone") == [6]


def test_question_limit_and_refusals(recorded, lake: Lake) -> None:
    result = run_ablation(lake, recorded[1], device="cpu", baselines=(), instrument=Instrument(questions=2))
    assert [r.n_units for r in result.runs] == [6]
    assert rows(lake, "select questions, mode from ablations") == [(2, "deactivate")]
    with pytest.raises(XiciError, match="finite non-zero"):
        Instrument("boost", boost=0.0)


def test_ablate_cli_per_expert_and_boost(recorded, lake: Lake) -> None:
    base = ["--lake", str(lake.root), "ablate", "--analysis", str(recorded[1]), "--device", "cpu"]
    result = CliRunner().invoke(cli, [*base, "--per-expert", "--leave-one-out", "--questions", "1"])
    assert result.exit_code == 0, result.output
    assert "Per-expert necessity" in result.output and "XICI #2" in result.output
    result = CliRunner().invoke(cli, [*base, "--boost", "4", "--baselines", "random", "--questions", "1"])
    assert result.exit_code == 0, result.output
    assert "Boost on run 1" in result.output and "boosted experts selected in" in result.output
    bad = CliRunner().invoke(cli, [*base, "--leave-one-out"])
    assert bad.exit_code != 0 and "--leave-one-out goes with --per-expert" in bad.output


def test_localizers_side_by_side_in_the_report(recorded, lake: Lake, tmp_path) -> None:
    """Two analyses of the run, one labelled a rival localizer: both ablated, the report compares them."""
    rival = insert_analysis(lake, 1, {q: p[2:3] for q, p in xici_sets(lake).items()}, layers=(0, 2))
    lake.write(
        lambda con: con.execute(
            "update analyses set method = 'risk-diff', lang_mean = false where analysis_id = ?", [rival]
        )
    )
    for analysis_id in (recorded[1], rival):
        run_ablation(lake, analysis_id, device="cpu", batch_size=9, baselines=("shuffle",))
    with reading(lake) as con:
        table = instruments.localizers_table(con, 1)
        figure = instruments.localizers_figure(con, 1)
        expected = con.execute(
            "select b.analysis_id, b.condition, m.rate_diff from ablations b join ablation_metrics m "
            "using (run_id) order by 1, b.run_id"
        ).fetchall()
    assert table.column("localizer") == ["xici"] * 2 + ["risk-diff, no language mean"] * 2
    assert table.column("rate difference") == pytest.approx([r[2] for r in expected])
    assert table.column("experts per question") == [2.0, 2.0, 1.0, 1.0]
    assert figure is not None and figure.png.startswith(b"\x89PNG")
    result = CliRunner().invoke(cli, ["--lake", str(lake.root), "report", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "Localizers of run 1" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "localizers.png").exists()
