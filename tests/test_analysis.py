"""Stage 2 end to end on synthetic lakes: planted experts are found, null data gives alpha, results are
a pure function of the recorded data and the parameters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from xici.analysis.export import export_experts
from xici.analysis.identify import QuestionTests, analyze, compute_tests, select_experts
from xici.analysis.means import ensure_means, run_info
from xici.analysis.params import AnalysisParams, expand, parse_sweep, resolve
from xici.errors import XiciError
from xici.testbed.synthetic_lake import SyntheticLake, SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake

# 30 questions in 16 languages, accuracy 0.7 (en) to 0.3: nearly all mixed, groups large enough to test.
SPEC = SyntheticSpec(questions=((30, 16),), accuracy=(0.7, 0.3), difficulty=0.5)
WINDOW = (1, 7)  # the default window of 8 layers, where the experts are planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, SyntheticLake]:
    lake = Lake(tmp_path_factory.mktemp("planted"))
    return lake, write_synthetic_lake(lake, SPEC)


@pytest.fixture(scope="module")
def null(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, SyntheticLake]:
    lake = Lake(tmp_path_factory.mktemp("null"))
    return lake, write_synthetic_lake(lake, replace(SPEC, planted=0, dataset="null"))


def _sets(lake: Lake, analysis_id: int) -> dict[str, set[tuple[int, int]]]:
    with lake.connect(read_only=True) as con:
        rows = con.execute(
            "select question_id, layer, expert from analysis_experts where analysis_id = ?", [analysis_id]
        ).fetchall()
    found: dict[str, set[tuple[int, int]]] = {}
    for qid, layer, expert in rows:
        found.setdefault(qid, set()).add((layer, expert))
    return found


def _questions(lake: Lake, analysis_id: int) -> dict[str, tuple]:
    with lake.connect(read_only=True) as con:
        rows = con.execute(
            "select question_id, outcome, n_correct, n_wrong, n_ungraded, n_significant, n_passed, n_experts "
            "from analysis_questions where analysis_id = ?",
            [analysis_id],
        ).fetchall()
    return {r[0]: r[1:] for r in rows}


def test_planted_experts_are_recovered(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = planted
    [record] = analyze(lake, synthetic.run_id, [resolve(None, 8, tau=0.05)])
    found, questions = _sets(lake, record.analysis_id), _questions(lake, record.analysis_id)
    mixed = [q for q, row in questions.items() if row[0] == "mixed"]
    assert len(mixed) >= 25
    truth = {q: set(synthetic.world.planted[q]) for q in mixed}
    hits = sum(len(found.get(q, set()) & truth[q]) for q in mixed)
    assert hits / sum(len(t) for t in truth.values()) > 0.9  # recall
    assert hits / sum(len(found.get(q, set())) for q in mixed) > 0.75  # precision
    assert not set().union(*found.values()) & set(synthetic.world.generalists)  # blacklisted


def test_null_data_passes_the_test_at_about_alpha(null: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = null
    params = resolve(None, 8, tau=0.0)
    [record] = analyze(lake, synthetic.run_id, [params])
    questions = _questions(lake, record.analysis_id)
    with lake.connect(read_only=True) as con:
        [(blacklisted_in_window,)] = con.execute(
            "select count(*) from blacklist(?, ?, ?) where layer >= ? and layer < ?",
            [synthetic.run_id, params.blacklist_top, params.blacklist_share, *WINDOW],
        ).fetchall()
    tested = [row for row in questions.values() if row[0] == "mixed"]
    columns = (WINDOW[1] - WINDOW[0]) * SPEC.n_experts - blacklisted_in_window
    share = sum(row[4] for row in tested) / (len(tested) * columns)
    assert 0.03 < share < 0.065


def test_the_tested_layers_are_the_sql_layer_window(planted: tuple[Lake, SyntheticLake]) -> None:
    """The columns an analysis keeps for --layers START:END are exactly the layers of the SQL macro
    `layer_window` (the pipeline uses the numpy selection; the macro is its reference definition)."""
    lake, synthetic = planted
    ensure_means(lake, synthetic.run_id)

    def both(con: duckdb.DuckDBPyConnection) -> list[tuple[list[int], list[int]]]:
        info = run_info(con, synthetic.run_id)
        tests = compute_tests(con, info, "match", "auto", 0, info.n_moe_layers)
        found = []
        for start, stop in (
            WINDOW,
            (0, info.n_moe_layers),
            (2, 3),
            (info.n_moe_layers - 1, info.n_moe_layers),
        ):
            keep = tests.columns(start, stop, np.zeros((0, 2), dtype=np.int64))
            numpy_layers = sorted({int(c) // tests.n_experts for c in np.flatnonzero(keep)})
            sql = con.execute("select layer from layer_window(?, ?, ?)", [synthetic.run_id, start, stop])
            found.append((numpy_layers, [layer for (layer,) in sql.fetchall()]))
        return found

    for numpy_layers, sql_layers in lake.read(both):
        assert numpy_layers and numpy_layers == sql_layers


def test_python_deltas_are_the_sql_deltas_macro(planted: tuple[Lake, SyntheticLake]) -> None:
    """The dense matrices tested are exactly Eq. 2 as the SQL macro `deltas` defines it."""
    lake, synthetic = planted
    ensure_means(lake, synthetic.run_id)
    with lake.connect(read_only=True) as con:
        info = run_info(con, synthetic.run_id)
        tests = compute_tests(con, info, "match", "auto", *WINDOW)
        q = 3
        qid = tests.question_ids[q]
        rows = con.execute(
            "select g.correct, d.layer, d.expert, d.delta from deltas(?) d "
            "join sequence_grades(?, 'match') g using (seq_id) "
            "where d.question_id = ? and d.layer >= ? and d.layer < ? and g.correct is not null "
            "order by d.layer, d.expert, g.lang",
            [synthetic.run_id, synthetic.run_id, qid, *WINDOW],
        ).fetchall()
    for column in (0, 40, 77, 150):
        layer, expert = WINDOW[0] + column // SPEC.n_experts, column % SPEC.n_experts
        cell = [(c, d) for c, l_, e, d in rows if (l_, e) == (layer, expert)]
        x = np.array([d for c, d in cell if c])
        y = np.array([d for c, d in cell if not c])
        expected = mannwhitneyu(x, y, alternative="greater")
        assert tests.u[q, column] == expected.statistic
        assert tests.p[q, column] == pytest.approx(expected.pvalue, rel=1e-12, abs=0)
        assert tests.median_diff[q, column] == np.median(x) - np.median(y)


def test_selection_ranks_by_p_and_median_difference_and_caps() -> None:
    """Five experts pass; ranks: p (0.01, 0.01, 0.02, 0.03, 0.04) and diff (0.5, 0.2, 0.9, 0.1, 0.3)."""
    p = np.array([[0.01, 0.01, 0.02, 0.03, 0.04, 0.2, 0.001, 0.01]])
    diff = np.array([[0.5, 0.2, 0.9, 0.1, 0.3, 0.9, 0.0, 0.6]])
    none = np.zeros_like(p, dtype=np.int64)  # no exact counts: every p is compared as it is
    tests = QuestionTests(0, 1, 8, ["q"], np.zeros_like(p), p, diff, none, [0], np.array([3]), np.array([4]))
    allowed = np.array([True] * 7 + [False])  # the last one is blacklisted
    # p ranks 1.5, 1.5, 3, 4, 5; diff ranks 2, 4, 1, 5, 3 -> sums 3.5, 5.5, 4, 9, 8
    picked = select_experts(tests, 0, AnalysisParams(0, 1, tau=0.0, max_experts=25), allowed)
    assert picked.columns.tolist() == [0, 2, 1, 4, 3]
    assert (picked.n_significant, picked.n_passed) == (6, 5)  # column 6: p < alpha, but diff is not > tau
    capped = select_experts(tests, 0, AnalysisParams(0, 1, tau=0.0, max_experts=2), allowed)
    assert capped.columns.tolist() == [0, 2]
    strict = select_experts(tests, 0, AnalysisParams(0, 1, tau=0.3, alpha=0.03), allowed)
    assert strict.columns.tolist() == [0, 2]
    # median-diff: no test, ranked by the difference above tau (column 5 has p 0.2 but the largest diff)
    median = AnalysisParams(0, 1, tau=0.25, method="median-diff")
    assert select_experts(tests, 0, median, allowed).columns.tolist() == [2, 5, 0, 4]
    assert select_experts(tests, 0, median, allowed, budget=2).columns.tolist() == [2, 5]


def test_same_parameters_reuse_the_analysis(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = planted
    params = resolve(None, 8, alpha=0.04)
    [first] = analyze(lake, synthetic.run_id, [params])
    [again] = analyze(lake, synthetic.run_id, [params])
    [other] = analyze(lake, synthetic.run_id, [replace(params, max_experts=3)])
    assert first.created and not again.created and other.created
    assert again.analysis_id == first.analysis_id != other.analysis_id


def test_sweep_points_equal_single_analyses(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = planted
    base = resolve(None, 8)
    grid = expand(base, parse_sweep(["tau=0.001,0.05", "max-experts=2,4", "layers=1:7,2:6"]), 8)
    assert len(grid) == 8
    records = analyze(lake, synthetic.run_id, grid)
    assert len({r.analysis_id for r in records}) == 8
    narrow = replace(base, tau=0.05, max_experts=4, layer_start=2, layer_stop=6)
    lone = Lake(lake.root.parent / "lone")
    [single] = analyze(lone, write_synthetic_lake(lone, SPEC).run_id, [narrow])
    swept = next(r for r in records if r.params == narrow)
    assert _sets(lake, swept.analysis_id) == _sets(lone, single.analysis_id)
    assert all(layer in range(2, 6) for s in _sets(lake, swept.analysis_id).values() for layer, _ in s)
    assert all(len(s) <= 4 for s in _sets(lake, swept.analysis_id).values())


def test_skipped_questions_are_counted(tmp_path: Path) -> None:
    """Outcomes follow the grades: all correct / all wrong / mixed, NULL grades left out and counted."""
    lake = Lake(tmp_path)
    synthetic = write_synthetic_lake(lake, replace(SPEC, questions=((40, 4),), difficulty=3.0, ungraded=0.2))
    [record] = analyze(lake, synthetic.run_id, [resolve(None, 8)])
    questions = _questions(lake, record.analysis_id)
    world = synthetic.world
    for qid, (outcome, n_correct, n_wrong, n_ungraded, n_significant, _, n_experts) in questions.items():
        units = [i for i, (q, _) in enumerate(world.units) if q == qid]
        graded = [bool(world.truth[i]) for i in units if world.graded[i]]
        assert (n_correct, n_wrong, n_ungraded) == (sum(graded), len(graded) - sum(graded), 4 - len(graded))
        expected = (
            "ungraded"
            if not graded
            else "all_correct"
            if all(graded)
            else "all_wrong"
            if not any(graded)
            else "mixed"
        )
        assert outcome == expected
        assert (n_significant is None) == (outcome != "mixed")
        assert outcome == "mixed" or n_experts == 0
    outcomes = [row[0] for row in questions.values()]
    assert {"all_correct", "all_wrong", "mixed"} <= set(outcomes)


def test_grader_chooses_the_split(planted: tuple[Lake, SyntheticLake], tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    synthetic = write_synthetic_lake(lake, SPEC)

    # a second grader that disagrees with match on every third answer
    def change(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            "insert into grades (seq_id, grader, grader_version, correct) select seq_id, 'flip', '1', "
            "case when seq_id % 3 = 0 then not correct else correct end from grades where grader = 'match'"
        )

    lake.write(change)
    match, flip = analyze(lake, synthetic.run_id, [resolve(None, 8), resolve(None, 8, grader="flip")])
    assert _sets(lake, match.analysis_id) != _sets(lake, flip.analysis_id)
    with pytest.raises(XiciError, match=r"no grades from grader 'judge'.*match"):
        analyze(lake, synthetic.run_id, [resolve(None, 8, grader="judge")])


def test_expert_sets_are_a_pure_function_of_data_and_parameters(tmp_path: Path) -> None:
    """Two lakes written from the same spec, one with its means rebuilt: byte-identical exports."""
    params = [resolve(None, 8), resolve(None, 8, tau=0.02, max_experts=3)]
    exports = []
    for name in ("one", "two"):
        lake = Lake(tmp_path / name)
        synthetic = write_synthetic_lake(lake, SPEC)
        if name == "two":
            ensure_means(lake, synthetic.run_id)
            lake.write(
                lambda con: con.execute("update seq_means_builds set n_tokens = -1")
            )  # force a rebuild
        records = analyze(lake, synthetic.run_id, params)
        with lake.connect(read_only=True) as con:
            for record in records:
                for suffix in (".csv", ".parquet", ".json"):
                    out = tmp_path / f"{name}-{record.analysis_id}{suffix}"
                    export_experts(con, record.analysis_id, out)
                    exports.append(out.read_bytes())
    half = len(exports) // 2
    assert exports[:half] == exports[half:]
    assert len(set(exports)) == half  # and the two parameter points do differ


def test_unknown_run_and_bad_parameters_are_user_errors(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, _ = planted
    with pytest.raises(XiciError, match="no recording run 99"):
        analyze(lake, 99, [resolve(None, 8)])
    with pytest.raises(XiciError, match="not inside the run's 8 MoE layers"):
        resolve(None, 8, layers=(2, 9))
    with pytest.raises(XiciError, match="alpha"):
        resolve(None, 8, alpha=0.0)
    with pytest.raises(XiciError, match="Mann-Whitney method 'permutation'"):
        resolve(None, 8, mwu="permutation")
    with pytest.raises(XiciError, match="min-group"):
        resolve(None, 8, min_group=0)


def test_stored_rows_match_the_export_schema(planted: tuple[Lake, SyntheticLake], tmp_path: Path) -> None:
    lake, synthetic = planted
    [record] = analyze(lake, synthetic.run_id, [resolve(None, 8, tau=0.05)])
    out = tmp_path / "experts.parquet"
    with lake.connect(read_only=True) as con:
        n = export_experts(con, record.analysis_id, out)
    table = duckdb.sql(f"select * from '{out}'").fetchall()
    assert len(table) == n > 0
    keys = [(row[0], row[6]) for row in table]
    assert keys == sorted(keys)  # ordered by question, then rank
    assert all(row[4] < 0.05 and row[5] > 0.05 for row in table)


@pytest.fixture(scope="module")
def three_three(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, SyntheticLake]:
    """30 questions in 6 languages with a grader 'split' that says 3 correct and 3 wrong for every one."""
    lake = Lake(tmp_path_factory.mktemp("three"))
    synthetic = write_synthetic_lake(lake, replace(SPEC, questions=((30, 6),), dataset="three"))

    def change(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            "insert into grades (seq_id, grader, grader_version, correct) "
            "select seq_id, 'split', '1', lang in ('en', 'x-s01', 'x-s02') from sequences where run_id = ?",
            [synthetic.run_id],
        )

    lake.write(change)
    return lake, synthetic


def test_exact_test_keeps_no_expert_with_three_and_three(three_three: tuple[Lake, SyntheticLake]) -> None:
    """3 correct vs 3 wrong: the smallest exact p is 1/20, never below alpha 0.05; the normal approximation
    (p = 0.040 for a perfect split) lets the luckiest columns through."""
    lake, synthetic = three_three
    exact, approximate = analyze(
        lake,
        synthetic.run_id,
        [resolve(None, 8, tau=0.0, grader="split", mwu=m) for m in ("exact", "asymptotic")],
    )
    questions = _questions(lake, exact.analysis_id)
    assert len(questions) == 30 and all(row[:3] == ("mixed", 3, 3) for row in questions.values())
    assert sum(row[4] for row in questions.values()) == 0  # n_significant
    assert _sets(lake, exact.analysis_id) == {}
    assert sum(len(s) for s in _sets(lake, approximate.analysis_id).values()) > 30
    with lake.connect(read_only=True) as con:
        assert con.execute(
            "select mwu, min_group from analyses where analysis_id = ?", [exact.analysis_id]
        ).fetchall() == [("exact", 1)]
    # at alpha just above 1/20, the perfect splits pass, with their exact p stored
    [loose] = analyze(
        lake, synthetic.run_id, [resolve(None, 8, tau=0.0, grader="split", mwu="exact", alpha=0.051)]
    )
    with lake.connect(read_only=True) as con:
        stored = con.execute(
            "select distinct p, u from analysis_experts where analysis_id = ?", [loose.analysis_id]
        )
        assert stored.fetchall() == [(0.05, 9.0)]


def test_min_group_skips_small_questions(planted: tuple[Lake, SyntheticLake]) -> None:
    lake, synthetic = planted
    every, large = analyze(lake, synthetic.run_id, [resolve(None, 8, tau=0.05, min_group=k) for k in (1, 5)])
    all_rows, large_rows = _questions(lake, every.analysis_id), _questions(lake, large.analysis_id)
    small = {q for q, row in all_rows.items() if row[0] == "mixed" and min(row[1], row[2]) < 5}
    assert small and len(small) < len([r for r in all_rows.values() if r[0] == "mixed"])
    for qid, row in large_rows.items():
        if qid in small:
            assert row[0] == "mixed" and row[4] is None and row[6] == 0  # not tested
        else:
            assert row == all_rows[qid]
    sets = _sets(lake, every.analysis_id)
    assert _sets(lake, large.analysis_id) == {q: s for q, s in sets.items() if q not in small}
    with lake.connect(read_only=True) as con:
        tested = con.execute(
            "select mixed, tested from analysis_summary where analysis_id in (?, ?) order by analysis_id",
            [every.analysis_id, large.analysis_id],
        ).fetchall()
    mixed = tested[0][0]
    assert tested == [(mixed, mixed), (mixed, mixed - len(small))]


def test_exact_test_refuses_questions_too_large_to_count(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    synthetic = write_synthetic_lake(lake, replace(SPEC, questions=((4, 70),), dataset="wide"))
    with pytest.raises(XiciError, match="70 languages, too many for the exact test"):
        analyze(lake, synthetic.run_id, [resolve(None, 8, mwu="exact")])
    [record] = analyze(lake, synthetic.run_id, [resolve(None, 8, mwu="auto")])  # auto stays possible
    assert record.created
