"""The SQL views and macros of xici.sql, on a hand-made lake whose every number is worked out below.

The lake: 2 MoE layers x 4 experts, top-2, two questions asked in en and de.

    seq  question lang  tokens: (layer 0 experts: weights) (layer 1 ...)          grade match / judge
    A    q1       en    t0 (0 .75, 1 .25) (3 .5, 1 .5)   t1 (0 .5, 2 .5) (3 .75, 2 .25)   True / False
    B    q1       de    t0 (1 .75, 0 .25) (2 .5, 3 .5)                              False / False
    C    q2       en    t0 (0 .5, 3 .5) (3 .75, 0 .25)   t1 (0 .75, 3 .25) (3 .5, 0 .5)  True / -
    D    q2       de    t0 (2 .75, 0 .25) (3 .75, 1 .25)                            NULL / -

Sequence means m (Eq. 1), as {(layer, expert): m}; every other pair has m = 0:
    A {(0,0) .625, (0,1) .125, (0,2) .25, (1,3) .625, (1,1) .25, (1,2) .125}
    B {(0,1) .75, (0,0) .25, (1,2) .5, (1,3) .5}
    C {(0,0) .625, (0,3) .375, (1,3) .625, (1,0) .375}
    D {(0,2) .75, (0,0) .25, (1,3) .75, (1,1) .25}
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest

from xici.analysis.means import ensure_means
from xici.sql import apply_order, apply_views, sources
from xici.warehouse import Lake, TokenArrays

M = {
    "A": {(0, 0): 0.625, (0, 1): 0.125, (0, 2): 0.25, (1, 3): 0.625, (1, 1): 0.25, (1, 2): 0.125},
    "B": {(0, 1): 0.75, (0, 0): 0.25, (1, 2): 0.5, (1, 3): 0.5},
    "C": {(0, 0): 0.625, (0, 3): 0.375, (1, 3): 0.625, (1, 0): 0.375},
    "D": {(0, 2): 0.75, (0, 0): 0.25, (1, 3): 0.75, (1, 1): 0.25},
}
SEQUENCES = {"A": ("q1", "en"), "B": ("q1", "de"), "C": ("q2", "en"), "D": ("q2", "de")}
# token -> layer -> ((expert, weight), (expert, weight))
TOKENS = {
    "A": [(((0, 0.75), (1, 0.25)), ((3, 0.5), (1, 0.5))), (((0, 0.5), (2, 0.5)), ((3, 0.75), (2, 0.25)))],
    "B": [(((1, 0.75), (0, 0.25)), ((2, 0.5), (3, 0.5)))],
    "C": [(((0, 0.5), (3, 0.5)), ((3, 0.75), (0, 0.25))), (((0, 0.75), (3, 0.25)), ((3, 0.5), (0, 0.5)))],
    "D": [(((2, 0.75), (0, 0.25)), ((3, 0.75), (1, 0.25)))],
}
GRADES = {"match": {"A": True, "B": False, "C": True, "D": None}, "judge": {"A": False, "B": False}}


def _arrays(name: str) -> TokenArrays:
    tokens = TOKENS[name]
    ids = np.array([[[e for e, _ in layer] for layer in token] for token in tokens], dtype=np.uint8)
    weights = np.array([[[w for _, w in layer] for layer in token] for token in tokens], dtype=np.float16)
    return TokenArrays(np.arange(len(tokens), dtype=np.int32), ids, weights)


def _commit(lake: Lake, run_id: int, names: list[str], first_unit: int) -> dict[str, int]:
    rows = [
        {
            "unit": first_unit + i,
            "question_id": SEQUENCES[n][0],
            "lang": SEQUENCES[n][1],
            "n_prompt_tokens": len(TOKENS[n]),
            "n_generated": 1,
            "prompt_text": n,
            "response_text": n,
            "finish_reason": "stop",
        }
        for i, n in enumerate(names)
    ]

    def grade(con: duckdb.DuckDBPyConnection, seq_ids: list[int]) -> None:
        for name, seq_id in zip(names, seq_ids, strict=True):
            for grader, verdicts in GRADES.items():
                if name in verdicts:
                    con.execute(
                        "insert into grades (seq_id, grader, grader_version, correct) values (?, ?, '1', ?)",
                        [seq_id, grader, verdicts[name]],
                    )

    seq_ids = lake.commit_sequences(run_id, rows, [_arrays(n) for n in names], also=grade)
    return dict(zip(names, seq_ids, strict=True))


@pytest.fixture
def hand_lake(tmp_path: Path) -> tuple[Lake, int, dict[str, int]]:
    lake = Lake(tmp_path / "lake")
    run_id, _ = lake.write(
        lambda con: lake.get_or_create_run(
            con, "hand", kind="record", dataset="hand", model="hand/moe", model_config_hash="-",
            architecture="hand", backend="hand", n_moe_layers=2, n_experts=4, top_k=2, params={}, versions={},
            n_units=4,
        )
    )  # fmt: skip
    lake.gates().create_run(run_id, n_layers=2, top_k=2, n_experts=4)
    seq_ids = _commit(lake, run_id, ["A", "B", "C", "D"], 0)
    assert ensure_means(lake, run_id)
    return lake, run_id, seq_ids


def _plain(lake: Lake) -> duckdb.DuckDBPyConnection:
    """The warehouse opened by plain DuckDB, as the duckdb CLI would: no xici code involved."""
    return duckdb.connect(str(lake.warehouse_path), read_only=True)


def test_sequence_means_are_eq1_over_all_tokens(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    lake, run_id, seq_ids = hand_lake
    with _plain(lake) as con:
        rows = con.execute(
            "select seq_id, layer, expert, m from seq_means where run_id = ?", [run_id]
        ).fetchall()
    found = {(seq, layer, expert): m for seq, layer, expert, m in rows}
    expected = {(seq_ids[n], *pair): m for n, means in M.items() for pair, m in means.items()}
    assert found == expected  # zeros are not stored; every stored m is exact


def test_sequence_ranks_share_ties(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    lake, _, seq_ids = hand_lake
    with _plain(lake) as con:
        ranks = dict(
            con.execute(
                "select layer * 10 + expert, seq_rank from seq_means where seq_id = ? ", [seq_ids["A"]]
            ).fetchall()
        )
    assert ranks == {0: 1, 13: 1, 2: 3, 11: 3, 1: 5, 12: 5}


def test_sequence_means_macro_on_any_gates_relation(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    """By hand: the gate sums of a relation shaped like token_gates, then their means; m is rounded to
    2^-32."""
    lake, _, seq_ids = hand_lake
    with _plain(lake) as con:
        con.execute(
            "create temp table my_gates as select * from (values "
            f"({seq_ids['B']}, 0, 0::SMALLINT, 1::SMALLINT, 0.1::FLOAT), "
            f"({seq_ids['B']}, 0, 0::SMALLINT, 2::SMALLINT, 0.9::FLOAT)) "
            "t(seq_id, pos, layer, expert, weight)"
        )
        rows = con.execute(
            "with sums as (from gate_sums('my_gates')) "
            "select expert, m, seq_rank from seq_means('sums') order by expert"
        ).fetchall()
    assert [(e, r) for e, _, r in rows] == [(1, 2), (2, 1)]
    for _, m, _ in rows:
        assert (m * 2**32).is_integer()
    # B has one token: m is the float32 weight itself, to 2^-32
    assert rows[0][1] == pytest.approx(float(np.float32(0.1)), abs=2**-33)


def test_language_means_count_zeros(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    lake, run_id, _ = hand_lake
    expected = {
        ("en", 0, 0): 0.625, ("en", 0, 1): 0.0625, ("en", 0, 2): 0.125, ("en", 0, 3): 0.1875,
        ("en", 1, 0): 0.1875, ("en", 1, 1): 0.125, ("en", 1, 2): 0.0625, ("en", 1, 3): 0.625,
        ("de", 0, 0): 0.25, ("de", 0, 1): 0.375, ("de", 0, 2): 0.375,
        ("de", 1, 1): 0.125, ("de", 1, 2): 0.25, ("de", 1, 3): 0.625,
    }  # fmt: skip
    with _plain(lake) as con:
        by_macro = con.execute("select lang, layer, expert, mean from lang_means(?)", [run_id]).fetchall()
        table = con.execute(
            "select lang, layer, expert, mean from lang_means where run_id = ?", [run_id]
        ).fetchall()
    assert {tuple(row[:3]): row[3] for row in by_macro} == expected
    assert sorted(table) == sorted(by_macro)  # the materialised table is the macro


def test_deltas_are_dense_and_subtract_the_language_mean(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    lake, run_id, seq_ids = hand_lake
    with _plain(lake) as con:
        rows = con.execute(
            "select seq_id, layer, expert, m, lang_mean, delta from deltas(?)", [run_id]
        ).fetchall()
    assert len(rows) == 4 * 2 * 4  # every sequence x layer x expert, zeros included
    delta = {tuple(row[:3]): row[5] for row in rows}
    assert delta[(seq_ids["A"], 0, 0)] == 0.625 - 0.625
    assert delta[(seq_ids["A"], 0, 3)] == -0.1875  # A never used (0, 3): its delta is minus the en mean
    assert delta[(seq_ids["B"], 0, 1)] == 0.75 - 0.375
    assert delta[(seq_ids["D"], 1, 2)] == -0.25
    assert delta[(seq_ids["B"], 0, 3)] == 0.0  # nobody in de used it: zero, but a row all the same


def test_blacklist_counts_tops_and_needs_more_than_the_share(
    hand_lake: tuple[Lake, int, dict[str, int]],
) -> None:
    """8 pairs: top 25% = ranks <= 2. Tops: A {(0,0),(1,3)}, B {(0,1),(1,2),(1,3)}, C {(0,0),(1,3)},
    D {(0,2),(1,3)}; (1,3) is in 4 of 4 tops, (0,0) in exactly 2 of 4."""
    lake, run_id, _ = hand_lake
    with _plain(lake) as con:

        def black(top: float, share: float) -> list[tuple[int, int, int]]:
            return con.execute("select * from blacklist(?, ?, ?)", [run_id, top, share]).fetchall()

        assert black(0.25, 0.5) == [(1, 3, 4)]  # (0,0): 2 of 4 is not more than 50%
        assert black(0.25, 0.25) == [(0, 0, 2), (1, 3, 4)]
        assert black(0.125, 0.5) == [(1, 3, 3)]  # rank 1 only; B's top is (0,1)
        assert black(0.25, 1.0) == []


def test_layer_window_is_half_open_and_clipped(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    lake, run_id, _ = hand_lake
    with _plain(lake) as con:

        def window(start: int, stop: int) -> list[int]:
            return [
                r[0]
                for r in con.execute("select * from layer_window(?, ?, ?)", [run_id, start, stop]).fetchall()
            ]

        assert window(0, 1) == [0]
        assert window(1, 2) == [1]
        assert window(-3, 99) == [0, 1]
        assert window(1, 1) == []


def test_grades_outcomes_and_accuracy(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    lake, run_id, seq_ids = hand_lake
    with _plain(lake) as con:
        grades = dict(
            con.execute("select seq_id, correct from sequence_grades(?, 'match')", [run_id]).fetchall()
        )
        assert grades == {seq_ids["A"]: True, seq_ids["B"]: False, seq_ids["C"]: True, seq_ids["D"]: None}
        outcomes = con.execute(
            "select * from question_outcomes(?, ?) order by question_id", [run_id, "match"]
        ).fetchall()
        assert outcomes == [("q1", 2, 1, 1, 0, "mixed"), ("q2", 2, 1, 0, 1, "all_correct")]
        outcomes = con.execute(
            "select * from question_outcomes(?, ?) order by question_id", [run_id, "judge"]
        ).fetchall()
        # C and D have no judge grade at all
        assert outcomes == [("q1", 2, 0, 2, 0, "all_wrong"), ("q2", 2, 0, 0, 2, "ungraded")]
        accuracy = con.execute(
            "select lang, n_sequences, n_graded, n_correct, accuracy from language_accuracy(?, 'match') "
            "order by lang",
            [run_id],
        ).fetchall()
        assert accuracy == [("de", 2, 1, 0, 0.0), ("en", 2, 2, 2, 1.0)]


def test_analysis_summary_reads_the_analysis_tables(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    from xici.analysis.identify import analyze
    from xici.analysis.params import resolve

    lake, run_id, _ = hand_lake
    [record] = analyze(lake, run_id, [resolve(None, 2)])
    with _plain(lake) as con:
        cursor = con.execute("select * from analysis_summary where analysis_id = ?", [record.analysis_id])
        row = dict(zip([d[0] for d in cursor.description], cursor.fetchall()[0], strict=True))
    assert (row["dataset"], row["model"], row["questions"], row["languages"]) == ("hand", "hand/moe", 2, 2)
    assert (row["english_accuracy"], row["average_accuracy"]) == (1.0, 0.5)
    assert (row["mixed"], row["all_correct"], row["all_wrong"], row["ungraded_languages"]) == (1, 1, 0, 1)
    # q1 is 1 correct vs 1 wrong: the exact test cannot go below p = 0.5, so no expert is found
    assert (row["with_experts"], row["experts"], row["avg_experts"]) == (0, 0, None)


def test_means_are_rebuilt_only_when_the_run_changes(hand_lake: tuple[Lake, int, dict[str, int]]) -> None:
    lake, run_id, _ = hand_lake
    assert not ensure_means(lake, run_id)
    new = _commit(lake, run_id, ["B"], 4)  # one more de sequence, routed like B
    assert ensure_means(lake, run_id)
    with _plain(lake) as con:
        rows = con.execute("select count(*) from seq_means where seq_id = ?", [new["B"]]).fetchall()
        mean = con.execute(
            "select mean from lang_means where run_id = ? and lang = 'de' and layer = 0 and expert = 1",
            [run_id],
        ).fetchall()
    assert rows == [(4,)]
    assert mean == [((0.75 + 0.75) / 3,)]  # B twice and D (zero) over three de sequences
    assert not ensure_means(lake, run_id)


def test_every_file_defines_its_object_after_its_dependencies(tmp_path: Path) -> None:
    order = apply_order()
    assert set(order) == set(sources())
    assert order.index("sequence_grades") < order.index("question_outcomes")
    assert order.index("sequence_grades") < order.index("language_accuracy")
    with Lake(tmp_path).connect() as con:  # an empty, migrated warehouse
        apply_views(con)
        kinds = "select function_name from duckdb_functions() where function_type = 'table_macro'"
        defined = {r[0] for r in con.execute(kinds).fetchall()}
        views = con.execute("select view_name from duckdb_views() where not internal").fetchall()
        defined |= {r[0] for r in views}
    assert set(order) <= defined


def test_an_analysis_without_mixed_questions_is_stored_empty(
    hand_lake: tuple[Lake, int, dict[str, int]],
) -> None:
    from xici.analysis.identify import analyze
    from xici.analysis.params import resolve

    lake, run_id, _ = hand_lake
    [record] = analyze(lake, run_id, [resolve(None, 2, grader="judge")])  # q1 all wrong, q2 never judged
    with _plain(lake) as con:
        row = con.execute(
            "select mixed, all_wrong, ungraded, with_experts, english_accuracy from analysis_summary "
            "where analysis_id = ?",
            [record.analysis_id],
        ).fetchall()
    assert row == [(0, 1, 1, 0, 0.0)]
