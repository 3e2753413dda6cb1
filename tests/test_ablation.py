"""The ablation runner on real tiny MoE checkpoints, a real DuckDB warehouse and a real Zarr store.

Each test starts from a toy lake recorded once per module (copied), with an analysis written straight into
the analysis tables: three questions with experts, each losing at every MoE layer an expert its recorded
tokens did select (a different one per question), so the deactivation check could fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import rows
from test_ablation_support import (
    ASKED,
    assert_same_full,
    copy_lake,
    full_snapshot,
    insert_analysis,
    record_toy,
    routing,
    xici_sets,
)
from test_recorder_support import stopping_checkpoint

from xici.ablation.runner import run_ablation
from xici.cli.main import cli
from xici.errors import XiciError
from xici.recorder.grading import regrade
from xici.warehouse import Lake, TokenArrays

torch.set_num_threads(1)
N_ASKED = 3 * len(ASKED)


@pytest.fixture(scope="module", params=["qwen3_moe", "glm4_moe"])
def recorded(request, tiny_checkpoint, tmp_path_factory) -> tuple[Lake, int]:
    """(lake with the recorded toy run and an analysis of it, analysis id), per architecture."""
    source = tiny_checkpoint(request.param)
    checkpoint = stopping_checkpoint(source, tmp_path_factory.mktemp("stop") / request.param, 8)
    lake = record_toy(checkpoint, tmp_path_factory.mktemp("recorded") / "lake")
    n_layers = rows(lake, "select n_moe_layers from runs where run_id = 1")[0][0]
    return lake, insert_analysis(lake, 1, xici_sets(lake), layers=(0, n_layers))


@pytest.fixture
def lake(recorded, tmp_path) -> Lake:
    return copy_lake(recorded[0], tmp_path / "lake")


def deactivated(lake: Lake, run_id: int) -> dict[str, list[tuple[int, int]]]:
    sets: dict[str, list[tuple[int, int]]] = {}
    for q, layer, expert in rows(
        lake,
        "select question_id, layer, expert from ablation_experts where run_id = ? order by all",
        [run_id],
    ):
        sets.setdefault(q, []).append((layer, expert))
    return sets


def test_deactivated_experts_are_never_selected(recorded, lake: Lake) -> None:
    result = run_ablation(lake, recorded[1], device="cpu", batch_size=4)
    assert [(r.condition, r.seed, r.asked, r.finished) for r in result.runs] == [
        ("xici", None, N_ASKED, True),
        ("random", 0, N_ASKED, True),
        ("shuffle", 0, N_ASKED, True),
    ]
    before = routing(lake, 1)
    for run in result.runs:
        stored = rows(lake, "select checked_tokens, violations from ablations where run_id = ?", [run.run_id])
        n_tokens = rows(lake, "select sum(n_tokens) from sequences where run_id = ?", [run.run_id])[0][0]
        assert stored == [(n_tokens, 0)] and (run.check.checked_tokens, run.check.violations) == stored[0]

        sets = deactivated(lake, run.run_id)
        assert sorted(sets) == list(ASKED)
        after = routing(lake, run.run_id)  # independent read of every token's top-k from Zarr
        assert sorted(after) == sorted((q, lang) for q in ASKED for lang in ("de", "en", "fr"))
        for (question, lang), ids in after.items():
            for layer, expert in sets[question]:
                assert not (ids[:, layer] == expert).any(), (
                    f"{question}/{lang}: expert {layer}.{expert} selected"
                )
    # XICI's run deactivated the analysis' sets, which were really in use before: the check could fail.
    xici = deactivated(lake, result.runs[0].run_id)
    assert xici == xici_sets(lake)
    for question, pairs in xici.items():
        used = np.concatenate([ids for (q, _), ids in before.items() if q == question])
        assert all((used[:, layer] == expert).any() for layer, expert in pairs)


def test_ablation_asks_exactly_the_recorded_prompts_and_stores_graded_answers(recorded, lake: Lake) -> None:
    run_id = run_ablation(lake, recorded[1], baselines=(), device="cpu", batch_size=4).runs[0].run_id
    recorded_rows = rows(
        lake,
        "select question_id, lang, n_prompt_tokens, prompt_text, token_start from sequences where run_id = 1"
        " and question_id in ('q01', 'q02', 'q03') order by question_id, lang",
    )
    ablated_rows = rows(
        lake,
        "select question_id, lang, n_prompt_tokens, prompt_text, token_start from sequences where run_id = ?"
        " order by unit",
        [run_id],
    )
    assert [r[:4] for r in ablated_rows] == [r[:4] for r in recorded_rows]
    gates = lake.gates(read_only=True)
    for old, new in zip(recorded_rows, ablated_rows, strict=True):
        n = old[2]
        assert np.array_equal(
            gates.read(1, old[4], old[4] + n).token_ids, gates.read(run_id, new[4], new[4] + n).token_ids
        )
    # Every answer is graded by the analysis' grader, and the run row says how it was asked.
    graded = rows(
        lake,
        "select g.grader, g.correct, s.response_text from sequences s join grades g using (seq_id)"
        " where s.run_id = ?",
        [run_id],
    )
    assert len(graded) == N_ASKED
    assert all(g == "length-parity" and c == (None if not r else len(r) % 2 == 0) for g, c, r in graded)
    kind, status, n_units, params = rows(
        lake, "select kind, status, n_units, params from runs where run_id = ?", [run_id]
    )[0]
    assert (kind, status, n_units) == ("ablation", "finished", N_ASKED)
    assert '"max_new_tokens": 8' in params and '"condition": "xici"' in params
    # gate sums and committed seq_means serve the means of recordings: an ablation run keeps neither
    assert lake.gates(read_only=True).keeps_sums(1) and not lake.gates(read_only=True).keeps_sums(run_id)
    assert rows(lake, "select count(n_sums) from sequences where run_id = ?", [run_id]) == [(0,)]
    assert rows(lake, "select count(*) from seq_means where run_id = ?", [run_id]) == [(0,)]


def test_per_request_masks_in_one_batch_equal_one_question_at_a_time(recorded, tmp_path: Path) -> None:
    together, alone = (copy_lake(recorded[0], tmp_path / name) for name in ("together", "alone"))
    run_ablation(together, recorded[1], device="cpu", batch_size=N_ASKED)
    run_ablation(alone, recorded[1], device="cpu", batch_size=1)
    a, b = full_snapshot(together), full_snapshot(alone)
    for run_id in (2, 3, 4):  # one batch held every question, each with its own mask
        assert len({tuple(p) for p in deactivated(together, run_id).values()}) > 1
    assert a["sequences"] == b["sequences"] and a["grades"] == b["grades"]
    assert a["ablation_experts"] == b["ablation_experts"] and a["ablation_metrics"] == b["ablation_metrics"]
    for run_id in (2, 3, 4):
        for name in ("token_ids", "topk_ids"):
            assert np.array_equal(a["arrays"][run_id][name], b["arrays"][run_id][name])
        np.testing.assert_allclose(
            a["arrays"][run_id]["topk_weights"], b["arrays"][run_id]["topk_weights"], atol=2e-3
        )


def test_metrics_match_the_stored_grades(recorded, lake: Lake) -> None:
    result = run_ablation(lake, recorded[1], device="cpu", batch_size=4)
    for run, row in zip(result.runs, result.metrics, strict=True):
        assert (row.condition, row.seed) == (run.condition, run.seed)
        pairs = rows(
            lake,
            "select a.question_id, gb.correct, ga.correct from sequences a"
            " join grades ga on ga.seq_id = a.seq_id"
            " join sequences b on b.run_id = 1 and b.question_id = a.question_id and b.lang = a.lang"
            " join grades gb on gb.seq_id = b.seq_id where a.run_id = ?",
            [run.run_id],
        )
        decided = [(q, x, y) for q, x, y in pairs if x is not None and y is not None]
        m = row.metrics
        assert m.n_pairs == N_ASKED and m.n_questions == len(ASKED)
        assert m.n_undecided == N_ASKED - len(decided)
        assert m.n_correct_before == sum(x for _, x, _ in decided)
        assert m.n_now_wrong == sum(x and not y for _, x, y in decided)
        assert m.n_wrong_before == sum(not x for _, x, _ in decided)
        assert m.n_now_right == sum(not x and y for _, x, y in decided)
        assert m.n_all_wrong == sum(all(y is False for q2, _, y in pairs if q2 == q) for q in ASKED)
        stored = rows(
            lake, "select asr, sgr, rate_diff from ablation_metrics where run_id = ?", [run.run_id]
        )[0]
        assert stored == (m.asr, m.sgr, m.rate_diff)


def test_baselines_are_reproducible_and_drawn_from_the_pool(recorded, tmp_path: Path) -> None:
    base = recorded[0]
    n_layers = rows(base, "select n_moe_layers from runs where run_id = 1")[0][0]
    window = (1, n_layers)
    sets = {q: [p for p in pairs if p[0] >= 1] for q, pairs in xici_sets(base).items()}
    lakes = [copy_lake(base, tmp_path / name) for name in ("a", "b", "c", "d")]
    ids = [insert_analysis(lake, 1, sets, layers=window, blacklist=(0.25, 0.5)) for lake in lakes]
    pools = ("window-minus-blacklist",) * 3 + ("window",)
    for lake, analysis_id, seed, pool in zip(lakes, ids, (7, 7, 8, 7), pools, strict=True):
        run_ablation(lake, analysis_id, seed=seed, random_pool=pool, device="cpu", batch_size=N_ASKED)
    drawn = [[deactivated(lake, run_id) for run_id in (3, 4)] for lake in lakes]
    assert drawn[0] == drawn[1], "the same seed draws the same baselines"
    assert drawn[0] != drawn[2], "another seed draws other baselines"
    assert drawn[0][0] != drawn[3][0] and drawn[0][1] == drawn[3][1], "the pool changes the random sets only"
    for lake, pool in zip(lakes, pools, strict=True):
        assert rows(lake, "select condition, random_pool from ablations order by run_id") == [
            ("xici", None),
            ("random", pool),
            ("shuffle", None),
        ]

    con = lakes[0].connect(read_only=True)
    try:
        black = set(con.execute("select layer, expert from blacklist(1, 0.25, 0.5)").fetchall())
        n_experts = con.execute("select n_experts from runs where run_id = 1").fetchone()[0]
        sources = con.execute(
            "select distinct run_id, question_id, source_question_id from ablation_experts order by all"
        ).fetchall()
    finally:
        con.close()
    assert black, "the test needs a non-empty blacklist"
    pool = {(layer, e) for layer in range(*window) for e in range(n_experts)} - black
    window_pool = {(layer, e) for layer in range(*window) for e in range(n_experts)}
    for lake_sets, name in zip(drawn, pools, strict=True):
        random_sets, shuffled = lake_sets
        for question in ASKED:
            assert len(random_sets[question]) == len(sets[question])
            assert set(random_sets[question]) <= (pool if name == "window-minus-blacklist" else window_pool)
        assert sorted(map(sorted, shuffled.values())) == sorted(map(sorted, sets.values()))
    shuffle_sources = [(q, s) for run_id, q, s in sources if run_id == 4]
    assert all(q != s for q, s in shuffle_sources) and sorted(s for _, s in shuffle_sources) == list(ASKED)
    assert all(q == s for run_id, q, s in sources if run_id != 4)


def test_resume_after_stopping_gives_the_uninterrupted_lake(recorded, tmp_path: Path) -> None:
    straight, stopped = (copy_lake(recorded[0], tmp_path / name) for name in ("straight", "stopped"))
    run_ablation(straight, recorded[1], device="cpu", batch_size=2)
    want = full_snapshot(straight)

    first = run_ablation(stopped, recorded[1], device="cpu", batch_size=2, stop_after_batches=3)
    assert [(r.condition, r.asked, r.finished) for r in first.runs] == [("xici", 6, False)]
    assert first.metrics == []
    assert rows(
        stopped, "select status, (select count(*) from sequences where run_id = 2) from runs where run_id = 2"
    ) == [("running", 6)]
    # A crash between the Zarr append and the warehouse commit leaves tokens no sequence points at.
    gates = stopped.gates()
    junk = gates.read(2, 0, 5)
    gates.append(2, TokenArrays(junk.token_ids, junk.topk_ids, junk.topk_weights))

    second = run_ablation(stopped, recorded[1], device="cpu", batch_size=2, stop_after_batches=4)
    assert [(r.condition, r.done_before, r.asked, r.finished) for r in second.runs] == [
        ("xici", 6, 3, True),
        ("random", 0, 4, False),
    ]
    third = run_ablation(stopped, recorded[1], device="cpu", batch_size=2)
    assert [(r.condition, r.created, r.already_finished) for r in third.runs] == [
        ("xici", False, True),
        ("random", False, False),
        ("shuffle", True, False),
    ]
    assert_same_full(full_snapshot(stopped), want)

    again = run_ablation(stopped, recorded[1], device="cpu", batch_size=5)
    assert all(r.already_finished and r.asked == 0 for r in again.runs)
    assert_same_full(full_snapshot(stopped), want)
    assert [m.metrics for m in again.metrics] == [m.metrics for m in third.metrics]


def test_refused_before_anything_is_written(recorded, lake: Lake) -> None:
    n_layers, n_experts, top_k = rows(
        lake, "select n_moe_layers, n_experts, top_k from runs where run_id = 1"
    )[0]
    empty = insert_analysis(lake, 1, {}, layers=(0, n_layers))
    crowded = insert_analysis(
        lake, 1, {"q01": [(0, e) for e in range(n_experts - top_k + 1)]}, layers=(0, n_layers)
    )
    outside = insert_analysis(lake, 1, {"q01": [(n_layers, 0)]}, layers=(0, n_layers))
    lonely = insert_analysis(lake, 1, {"q01": [(0, 1)]}, layers=(0, n_layers))
    ungraded = insert_analysis(lake, 1, xici_sets(lake), layers=(0, n_layers), grader="match")
    before = full_snapshot(lake)
    cases = {
        "no analysis 99": (99, {}),
        "found experts for no question": (empty, {}),
        "fewer than the": (crowded, {}),
        "outside the model": (outside, {}),
        "at least 2 questions": (lonely, {}),
        "batch-size must be at least 1": (recorded[1], {"batch_size": 0}),
        "seed must be": (recorded[1], {"seed": -1}),
        "cannot read the baselines": (recorded[1], {"baselines": ("random", "random")}),
        "by match version none, not": (ungraded, {}),
        "does not take these options": (recorded[1], {"grader_options": {"model": "m"}}),
    }
    for message, (analysis_id, options) in cases.items():
        with pytest.raises(XiciError, match=message):
            run_ablation(lake, analysis_id, device="cpu", **options)
    assert_same_full(full_snapshot(lake), before)

    # grades of another version than the grader's today
    lake.write(lambda con: con.execute("update grades set grader_version = '0'"))
    with pytest.raises(XiciError, match="by length-parity version '0', not by the version"):
        run_ablation(lake, recorded[1], device="cpu")
    lake.write(lambda con: con.execute("update runs set status = 'running'"))
    with pytest.raises(XiciError, match="run 1, which analysis 1 read, is not finished"):
        run_ablation(lake, recorded[1], device="cpu")
    assert rows(lake, "select count(*) from runs") == [(1,)]


def test_ablate_cli_prints_table_2_and_resumes(recorded, lake: Lake) -> None:
    args = [
        "--lake",
        str(lake.root),
        "ablate",
        "--analysis",
        str(recorded[1]),
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    for label, run_id in (("XICI", 2), ("random set", 3), ("shuffled", 4)):
        assert f"{label}: run {run_id}: ablated {N_ASKED} of {N_ASKED} units." in first.output
        assert f"{label}, run {run_id}: batch 3/3 committed ({N_ASKED}/{N_ASKED} units)" in first.output
        assert f"{label}: run {run_id}: routing of" in first.output
    assert first.output.count("0 selections of a deactivated expert") == 3
    table = first.output[first.output.index("analysis 1:") :]
    for label in ("XICI", "random set", "(window)", "shuffled", "ASR", "SGR", "diff", "correct", "wrong"):
        assert label in table
    metrics = rows(lake, "select asr from ablation_metrics order by run_id")
    for (asr,) in metrics:
        assert ("-" if asr is None else f"{asr:.1%}") in table

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and again.output.count("is already finished (9 units); nothing to do.") == 3
    shown = CliRunner().invoke(
        cli, ["--lake", str(lake.root), "ablate", "show", "--analysis", str(recorded[1])]
    )
    assert shown.exit_code == 0 and shown.output.strip() == table.strip()

    for bad, message in (
        (["ablate", "--analysis", "9"], "no analysis 9"),
        (["ablate", "--analysis", "1", "--baselines", "random,typo"], "cannot read the baselines"),
        (["ablate", "show", "--analysis", "9"], "no finished ablations of analysis 9"),
    ):
        out = CliRunner().invoke(cli, ["--lake", str(lake.root), *bad])
        assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output
    usage = CliRunner().invoke(cli, ["--lake", str(lake.root), "ablate"])
    assert usage.exit_code == 2 and "--analysis" in usage.output
    pool = CliRunner().invoke(
        cli, ["--lake", str(lake.root), "ablate", "--analysis", "1", "--random-pool", "bl"]
    )
    assert pool.exit_code == 2 and "'bl' is not one of 'window', 'window-minus-blacklist'" in pool.output


def test_answers_are_graded_by_the_analysis_judge(recorded, lake: Lake) -> None:
    model, n_layers = rows(lake, "select model, n_moe_layers from runs where run_id = 1")[0]
    regrade(lake, 1, "judge", model=model, device="cpu")  # the recorded model judges, as by default
    analysis_id = insert_analysis(lake, 1, xici_sets(lake), layers=(0, n_layers), grader="judge")
    args = ["--lake", str(lake.root), "ablate", "--analysis", str(analysis_id), "--baselines", ""]
    out = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "XICI: run 2: ablated 9 of 9 units." in out.output and "random set" not in out.output
    graders = "select distinct g.grader, g.grader_version from grades g join sequences s using (seq_id)"
    judged = rows(lake, f"{graders} where s.run_id = 1 and g.grader = 'judge'")
    assert rows(lake, f"{graders} where s.run_id = 2") == judged and judged[0][1].startswith("1:")

    template = lake.root.parent / "template.txt"
    template.write_text("Answers: {answers}. Response: {response}. YES or NO?", encoding="utf-8")
    other = CliRunner().invoke(cli, [*args, "--device", "cpu", "--judge-template", str(template)])
    assert other.exit_code == 1 and "not by the version" in other.output and "--judge-*" in other.output


def test_nothing_off_is_the_noise_floor(recorded, lake: Lake) -> None:
    """The none condition asks every question again through the ablation path with an empty mask: on a
    deterministic CPU run nothing changes, so its ASR and SGR are 0 (and Table 2 shows them)."""
    args = ["--lake", str(lake.root), "ablate", "--analysis", str(recorded[1]), "--device", "cpu"]
    out = CliRunner().invoke(
        cli,
        [*args, "--baselines", "none,random", "--random-pool", "window-minus-blacklist"],
        env={"COLUMNS": "200"},
    )
    assert out.exit_code == 0, out.output
    assert rows(
        lake, "select run_id, condition, seed, random_pool, violations from ablations order by 1"
    ) == [
        (2, "xici", None, None, 0),
        (3, "random", 0, "window-minus-blacklist", 0),
        (4, "none", None, None, 0),
    ]
    assert rows(lake, "select count(*) from ablation_experts where run_id = 4") == [(0,)]
    # every question with experts, in every language, answered exactly as when recorded
    again = rows(
        lake, "select question_id, lang, response_text from sequences where run_id = 4 order by 1, 2"
    )
    before = rows(
        lake,
        "select question_id, lang, response_text from sequences where run_id = 1 "
        "and question_id in (select question_id from ablation_experts where run_id = 2) order by 1, 2",
    )
    assert len(again) == N_ASKED and again == before
    assert rows(lake, "select asr, sgr, n_pairs from ablation_metrics where run_id = 4") == [
        (0.0, 0.0, N_ASKED)
    ]
    table = out.output[out.output.index("analysis 1:") :]
    assert "random set (window minus blacklist)" in table
    [noise] = [line for line in table.splitlines() if line.strip().startswith("nothing off")]
    assert noise.split()[2:5] == ["0.0%", "0.0%", "0.0%"]  # ASR, SGR, diff
