"""Rival localizers (risk-diff, median-diff) and the ablations of XICI's own steps, on a synthetic lake with
planted experts: same tables, budget matched to XICI's sets, keys of XICI analyses unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from xici.analysis.identify import analyze
from xici.analysis.params import AnalysisParams, analysis_key, resolve
from xici.cli.main import cli
from xici.testbed.synthetic_lake import SyntheticLake, SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake

SPEC = SyntheticSpec(questions=((20, 14),), accuracy=(0.7, 0.3), difficulty=0.5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, SyntheticLake]:
    lake = Lake(tmp_path_factory.mktemp("localizers"))
    return lake, write_synthetic_lake(lake, SPEC)


def _sizes(lake: Lake, analysis_id: int) -> dict[str, int]:
    with lake.connect(read_only=True) as con:
        rows = con.execute(
            "select question_id, n_experts from analysis_questions where analysis_id = ?", [analysis_id]
        ).fetchall()
    return dict(rows)


def _sets(lake: Lake, analysis_id: int) -> dict[str, set[tuple[int, int]]]:
    with lake.connect(read_only=True) as con:
        rows = con.execute(
            "select question_id, layer, expert, score from analysis_experts where analysis_id = ?",
            [analysis_id],
        ).fetchall()
    found: dict[str, set[tuple[int, int]]] = {}
    for qid, layer, expert, _ in rows:
        found.setdefault(qid, set()).add((layer, expert))
    return found


def test_rivals_follow_xici_budget_and_find_planted_experts(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = planted
    base = resolve(None, 8, tau=0.05)
    points = [replace(base, method=m) for m in ("xici", "risk-diff", "median-diff")]
    records = analyze(lake, synthetic.run_id, points)
    xici_sizes = _sizes(lake, records[0].analysis_id)
    assert sum(xici_sizes.values()) > 0
    for record in records[1:]:
        sizes = _sizes(lake, record.analysis_id)
        # matched budget: never more than XICI's set, and a question without XICI experts gets none
        assert all(sizes[q] <= xici_sizes[q] for q in xici_sizes)
        assert sum(sizes.values()) >= 0.8 * sum(xici_sizes.values())
        found = _sets(lake, record.analysis_id)
        truth = {q: set(synthetic.world.planted[q]) for q in found}
        hits = sum(len(found[q] & truth[q]) for q in found)
        # chance is 4 planted of the window's 6 x 32 experts (2%): both rivals do far better
        assert hits / sum(len(s) for s in found.values()) > 0.3, record.params.method
        assert not set().union(*found.values()) & set(synthetic.world.generalists)
    with lake.connect(read_only=True) as con:
        scored = con.execute(
            "select a.method, count(e.score) > 0, count(*) filter (where e.score <= 0) "
            "from analysis_experts e join analyses a using (analysis_id) group by 1 order by 1"
        ).fetchall()
    assert scored == [("median-diff", True, 0), ("risk-diff", True, 0), ("xici", False, 0)]


def test_cap_budget_and_dropped_steps(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = planted
    base = resolve(None, 8, tau=0.05, max_experts=6)
    matched, capped, raw, open_ = analyze(
        lake,
        synthetic.run_id,
        [
            replace(base, method="risk-diff"),
            replace(base, method="risk-diff", budget="cap"),
            replace(base, method="risk-diff", lang_mean=False),
            replace(base, method="xici", blacklist=False),
        ],
    )
    assert sum(_sizes(lake, capped.analysis_id).values()) > sum(_sizes(lake, matched.analysis_id).values())
    assert max(_sizes(lake, capped.analysis_id).values()) == 6
    assert _sets(lake, raw.analysis_id) != _sets(lake, matched.analysis_id)
    # without the blacklist, the generalists (used by every sequence, more by the correct ones by chance)
    # become choosable: the stored analysis says the step was dropped and blacklisted nothing
    with lake.connect(read_only=True) as con:
        row = con.execute(
            "select blacklist, n_blacklisted from analyses where analysis_id = ?", [open_.analysis_id]
        ).fetchone()
    assert row == (False, 0)


def test_xici_keys_do_not_change_with_the_new_fields() -> None:
    params = AnalysisParams(1, 7)
    new = ("method", "lang_mean", "blacklist", "budget")
    old = {k: v for k, v in params.as_dict().items() if k not in new}
    assert analysis_key(1, {"n": 1}, params) == analysis_key(1, {"n": 1}, old)
    assert analysis_key(1, {"n": 1}, replace(params, budget="cap")) == analysis_key(1, {"n": 1}, params)
    assert analysis_key(1, {"n": 1}, replace(params, method="risk-diff")) != analysis_key(1, {"n": 1}, params)


def test_cli_method_flags(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = planted
    run = ["--lake", str(lake.root), "analyze", "--run", str(synthetic.run_id), "--tau", "0.05"]
    result = CliRunner().invoke(cli, [*run, "--method", "median-diff", "--no-blacklist"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, [*run, "--sweep", "method=xici,risk-diff"])
    assert result.exit_code == 0, result.output
    assert "risk-diff" in result.output
    listed = CliRunner().invoke(cli, ["--lake", str(lake.root), "analyze", "list"], env={"COLUMNS": "250"})
    assert "median-diff, no blacklist" in listed.output
    bad = CliRunner().invoke(cli, [*run, "--sweep", "method=steer"])
    assert bad.exit_code != 0 and "unknown method 'steer'" in bad.output
