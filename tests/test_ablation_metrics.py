"""Ablation metrics on a hand-made lake: grades before and after written by hand, numbers computed by hand."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from xici.ablation.metrics import Metrics, compute_metrics, metrics_rows, overall, store_metrics
from xici.warehouse import Lake
from xici.warehouse.db import migrate, migrations

T, F, U = True, False, None  # U: the grader could not decide

# question -> lang -> (grade before, grade after); "qd" has no experts, so it is not in the ablation run.
GRADES = {
    "qa": {"en": (T, F), "fr": (T, T), "de": (F, F)},
    "qb": {"en": (T, F), "fr": (F, F), "de": (F, T)},
    "qc": {"en": (T, F), "fr": (U, F), "de": (T, U)},
    "qe": {"en": (T, F), "fr": (F, F), "de": (F, F)},
}
NOT_ASKED = {"qd": {"en": T, "fr": F}}
# By hand: 12 pairs, 2 undecided (qc fr, qc de). Correct before and decided after: qa en, qa fr, qb en,
# qc en, qe en = 5, of which now wrong: all but qa fr = 4. Wrong before: qa de, qb fr, qb de, qe fr, qe de
# = 5, of which now right: qb de = 1. Wrong in every language after: qe only (qc's de is undecided).
WANT = Metrics(
    n_questions=4,
    n_pairs=12,
    n_undecided=2,
    n_correct_before=5,
    n_now_wrong=4,
    n_wrong_before=5,
    n_now_right=1,
    n_all_wrong=1,
)


def add_run(con, run_id: int, kind: str, dataset: str) -> None:
    con.execute(
        "insert into runs (run_id, kind, run_key, dataset, model, model_config_hash, architecture, backend,"
        " n_moe_layers, n_experts, top_k, params, versions, status, n_units)"
        " values (?, ?, ?, ?, 'm', 'h', 'qwen3_moe', 'transformers', 2, 4, 1, '{}', '{}', 'finished', 0)",
        [run_id, kind, f"key-{run_id}", dataset],
    )


def add_sequence(con, run_id: int, question: str, lang: str, grades: dict[str, bool | None]) -> None:
    seq_id = con.execute("select coalesce(max(seq_id), 0) + 1 from sequences").fetchone()[0]
    unit = con.execute("select count(*) from sequences where run_id = ?", [run_id]).fetchone()[0]
    con.execute(
        "insert into sequences (seq_id, run_id, unit, question_id, lang, token_start, n_tokens,"
        " n_prompt_tokens, n_generated, prompt_text, response_text, finish_reason)"
        " values (?, ?, ?, ?, ?, ?, 1, 1, 1, 'p', 'r', 'stop')",
        [seq_id, run_id, unit, question, lang, unit],
    )
    for grader, correct in grades.items():
        con.execute(
            "insert into grades (seq_id, grader, grader_version, correct) values (?, ?, '1', ?)",
            [seq_id, grader, correct],
        )


def add_ablation(
    con, run_id: int, source: int, analysis_id: int, grades: dict, condition: str = "xici"
) -> None:
    """An ablation run of ``source`` graded by "judge"; another grader's verdicts must not count."""
    add_run(con, run_id, "ablation", "toy")
    seed = None if condition in ("xici", "none") else 0
    pool = "window" if condition == "random" else None
    con.execute(
        "insert into ablations (run_id, analysis_id, source_run_id, condition, seed, grader, checked_tokens,"
        " violations, random_pool) values (?, ?, ?, ?, ?, 'judge', ?, 0, ?)",
        [run_id, analysis_id, source, condition, seed, sum(map(len, grades.values())), pool],
    )
    for question, langs in grades.items():
        con.execute("insert into ablation_experts values (?, ?, ?, 0, 1)", [run_id, question, question])
        for lang, (_, after) in langs.items():
            add_sequence(con, run_id, question, lang, {"judge": after, "other": not after})


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    lake = Lake(tmp_path / "lake")

    def change(con: duckdb.DuckDBPyConnection) -> None:
        add_run(con, 1, "record", "toy")
        for question, langs in GRADES.items():
            for lang, (before, _) in langs.items():
                add_sequence(con, 1, question, lang, {"judge": before, "other": not before})
        for question, langs in NOT_ASKED.items():
            for lang, before in langs.items():
                add_sequence(con, 1, question, lang, {"judge": before})
        add_ablation(con, 2, 1, 1, GRADES)

    lake.write(change)
    return lake


def test_metrics_of_hand_made_grades(lake: Lake) -> None:
    con = lake.connect()
    try:
        got = compute_metrics(con, 2)
        assert got == WANT
        assert got.asr == pytest.approx(4 / 5) and got.sgr == pytest.approx(1 / 5)
        assert got.rate_diff == pytest.approx(4 / 5 - 1 / 5)
        store_metrics(con, 2)
        stored = con.execute(
            "select n_correct_before, n_now_wrong, n_all_wrong, asr, sgr, rate_diff from ablation_metrics"
        ).fetchall()
        assert stored == [(5, 4, 1, got.asr, got.sgr, got.rate_diff)]
        store_metrics(con, 2)  # recomputing replaces, never duplicates
        assert con.execute("select count(*) from ablation_metrics").fetchone()[0] == 1
    finally:
        con.close()


def test_rates_without_a_denominator_are_none_and_pooling_sums_pairs(lake: Lake) -> None:
    all_wrong_before = {"qx": {"en": (F, F), "fr": (F, T)}}

    def change(con: duckdb.DuckDBPyConnection) -> None:
        add_run(con, 3, "record", "other")
        for question, langs in all_wrong_before.items():
            for lang, (before, _) in langs.items():
                add_sequence(con, 3, question, lang, {"judge": before})
        add_ablation(con, 4, 3, 2, all_wrong_before)
        add_ablation(con, 5, 1, 1, GRADES, condition="random")
        add_ablation(con, 6, 3, 3, {"qx": {"en": (F, U), "fr": (F, U)}})  # the grader decided nothing
        for run_id in (2, 4, 5, 6):
            store_metrics(con, run_id)

    lake.write(change)
    rows, only_first = lake.read(lambda con: (metrics_rows(con), metrics_rows(con, [1])))
    assert [(r.analysis_id, r.condition, r.seed, r.dataset) for r in rows] == [
        (1, "xici", None, "toy"),
        (1, "random", 0, "toy"),
        (2, "xici", None, "other"),
        (3, "xici", None, "other"),
    ]
    assert rows.pop().metrics == Metrics(1, 2, 2, 0, 0, 0, 0, 0)
    assert only_first == rows[:2]
    assert [(r.checked_tokens, r.violations) for r in rows] == [(12, 0), (12, 0), (2, 0)]
    second = rows[2].metrics
    assert (second.n_correct_before, second.n_wrong_before, second.n_now_right) == (0, 2, 1)
    assert second.asr is None and second.rate_diff is None and second.sgr == 0.5

    pooled = overall(rows)
    assert [(r.analysis_id, r.condition, r.dataset) for r in pooled] == [
        (None, "xici", "toy, other"),
        (None, "random", "toy"),
    ]
    xici = pooled[0].metrics
    assert xici.n_pairs == 14 and xici.n_correct_before == 5 and xici.n_wrong_before == 7
    assert xici.asr == pytest.approx(4 / 5) and xici.sgr == pytest.approx(2 / 7)  # over pairs, not runs
    assert pooled[1].metrics == WANT
    assert (pooled[0].checked_tokens, pooled[0].violations) == (14, 0)


def test_each_random_pool_and_the_noise_floor_are_rows_of_their_own(lake: Lake) -> None:
    def change(con: duckdb.DuckDBPyConnection) -> None:
        add_ablation(con, 3, 1, 1, GRADES, condition="random")
        con.execute("update ablations set random_pool = 'window-minus-blacklist' where run_id = 3")
        add_ablation(con, 4, 1, 1, GRADES, condition="random")
        add_ablation(con, 5, 1, 1, GRADES, condition="none")
        con.execute("delete from ablation_experts where run_id = 5")
        for run_id in (2, 3, 4, 5):
            store_metrics(con, run_id)

    lake.write(change)
    rows = lake.read(metrics_rows)
    labels = ["XICI", "random set (window)", "random set (window minus blacklist)", "nothing off"]
    assert [r.label for r in rows] == labels
    assert [r.label for r in overall(rows)] == labels  # pooled per pool, never across pools


def test_migration_keeps_ablations_and_names_the_old_random_pool(tmp_path: Path) -> None:
    """Random runs made before --random-pool drew from the window minus the blacklist; the migration says so
    and lets the table hold the condition 'none'."""
    known = migrations()
    version = next(m.version for m in known if m.name.endswith("ablation_conditions"))
    con = duckdb.connect(str(tmp_path / "old.duckdb"))
    con.execute(
        "create table schema_version (version integer primary key, name varchar not null,"
        " xici_version varchar not null, applied_at timestamp not null default current_timestamp)"
    )
    for migration in known[: version - 1]:
        con.execute(migration.sql)
        con.execute(
            "insert into schema_version values (?, ?, 'old', now())", [migration.version, migration.name]
        )
    con.execute(
        "insert into ablations values (2, 1, 1, 'xici', null, 'match', 10, 0), "
        "(3, 1, 1, 'random', 0, 'match', 10, 0)"
    )
    with pytest.raises(duckdb.ConstraintException):
        con.execute("insert into ablations values (4, 1, 1, 'none', null, 'match', 10, 0)")
    migrate(con)
    assert con.execute(
        "select run_id, condition, random_pool, checked_tokens from ablations order by 1"
    ).fetchall() == [
        (2, "xici", None, 10),
        (3, "random", "window-minus-blacklist", 10),
    ]
    named = (
        "insert into ablations (run_id, analysis_id, source_run_id, condition, seed, grader, checked_tokens,"
        " violations, random_pool) values "
    )
    con.execute(named + "(4, 1, 1, 'none', null, 'match', 10, 0, null)")
    with pytest.raises(duckdb.ConstraintException):  # a random run must name its pool
        con.execute(named + "(5, 1, 1, 'random', 0, 'match', 10, 0, null)")
    con.close()
