"""Agreement between graders: Cohen's kappa against hand-computed values, confusion counts from a real lake
(synthetic routing, real DuckDB), and ``xici grade compare``."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from xici.cli.main import cli
from xici.corpora.agreement import Confusion, compare
from xici.errors import XiciError
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake

T, F, U = True, False, None


def confusion(**counts: int) -> Confusion:
    """Counts by name: tt = both right, tf = A right and B wrong, ..., tu = A right and B undecided."""
    letters = {"t": T, "f": F, "u": U}
    return Confusion.of("x", [(letters[k[0]], letters[k[1]]) for k, n in counts.items() for _ in range(n)])


def test_kappa_of_the_textbook_examples() -> None:
    # Wikipedia, "Cohen's kappa", examples: 50 proposals read by two readers -> 0.4;
    # 100 items with marginals 60/70 -> p_o = 0.60, p_e = 0.6 * 0.7 + 0.4 * 0.3 = 0.54, kappa = 0.06 / 0.46.
    first = confusion(tt=20, tf=5, ft=10, ff=15)
    assert first.kappa == pytest.approx(0.4)
    assert (first.n, first.decided, first.agreed, first.observed) == (50, 50, 35, 0.7)
    assert confusion(tt=45, tf=15, ft=25, ff=15).kappa == pytest.approx(0.06 / 0.46)


def test_undecided_grades_are_counted_apart_and_left_out_of_kappa() -> None:
    with_undecided = confusion(tt=20, tf=5, ft=10, ff=15, ut=2, tu=1, uu=1, fu=3)
    assert with_undecided.kappa == pytest.approx(0.4)  # the same decided answers as above
    assert (with_undecided.n, with_undecided.decided) == (57, 50)
    assert (with_undecided.undecided(0), with_undecided.undecided(1)) == (3, 5)
    assert with_undecided[U, T] == 2 and with_undecided[F, U] == 3


def test_kappa_at_the_edges() -> None:
    assert confusion(tt=3, ff=4).kappa == pytest.approx(1.0)
    assert confusion(tf=5, ft=5).kappa == pytest.approx(-1.0)  # p_o = 0, p_e = 0.5
    assert confusion(tt=3, tf=1, ft=1, ff=3).kappa == pytest.approx(0.5)  # p_o = .75, p_e = .5
    assert math.isnan(confusion(tt=6).kappa)  # both always say right: chance agreement is 1
    assert math.isnan(confusion(uu=2, tu=1).kappa) and math.isnan(confusion().observed)
    total = confusion(tt=1, fu=2) + confusion(tt=4, ft=1)
    assert (total.lang, total[T, T], total[F, U], total[F, T], total.n) == ("all", 5, 2, 1, 8)


def other_verdict(seq_id: int) -> bool | None:
    """A second grader made up by hand: undecided on every 5th answer, contradicting match on every 3rd."""
    return None if seq_id % 5 == 0 else seq_id % 3 != 0


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    """A synthetic run graded by match (with undecided grades), plus a hand-made grader 'other' that left
    one answer ungraded."""
    lake = Lake(tmp_path / "lake")
    spec = SyntheticSpec(
        questions=((6, 3), (4, 4)), n_layers=8, n_experts=16, top_k=2, pool=6, tokens=(4, 8), ungraded=0.2
    )
    write_synthetic_lake(lake, spec)

    def change(con: duckdb.DuckDBPyConnection) -> None:
        seq_ids = [r[0] for r in con.execute("select seq_id from sequences order by seq_id").fetchall()]
        con.executemany(
            "insert into grades (seq_id, grader, grader_version, correct, detail)"
            " values (?, 'other', '1', ?, '')",
            [[s, other_verdict(s)] for s in seq_ids[1:]],
        )

    lake.write(change)
    return lake


def test_compare_counts_per_language_from_the_lake(lake: Lake) -> None:
    con = lake.connect(read_only=True)
    try:
        graded = con.execute(
            "select s.seq_id, s.lang, g.correct from sequences s join grades g using (seq_id)"
            " where g.grader = 'match' order by s.seq_id"
        ).fetchall()
        result = compare(con, 1, "match", "other")
    finally:
        con.close()
    first = graded[0][0]
    want = Counter((lang, correct, other_verdict(s)) for s, lang, correct in graded if s != first)
    assert any(a is None for _, a, _ in want) and any(b is None for _, _, b in want)  # both have undecided
    assert [c.lang for c in result.languages] == sorted({lang for _, lang, _ in graded})
    for c in result.languages:
        assert c.counts == {(a, b): want[(c.lang, a, b)] for a, b in c.counts}
    assert (result.only_a, result.only_b) == (1, 0)
    overall = result.overall
    pairs = Counter({(a, b): 0 for a in (T, F) for b in (T, F)})
    pairs.update((a, b) for _, a, b in want.elements() if a is not None and b is not None)
    tt, tf, ft, ff = pairs[T, T], pairs[T, F], pairs[F, T], pairs[F, F]
    n = tt + tf + ft + ff
    chance = (tt + tf) / n * (tt + ft) / n + (ft + ff) / n * (tf + ff) / n
    assert overall.kappa == pytest.approx(((tt + ff) / n - chance) / (1 - chance))
    assert overall.n == len(graded) - 1


def table_rows(output: str) -> list[list[str]]:
    """The cells of each row of the rich tables in a command's output."""
    return [
        [c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")
    ]


def test_grade_compare_prints_the_agreement(lake: Lake) -> None:
    con = lake.connect(read_only=True)
    try:
        overall = compare(con, 1, "match", "other").overall
    finally:
        con.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["--lake", str(lake.root), "grade", "compare", "--run", "1"])
    assert out.exit_code == 0, out.output
    assert "match (A) vs other (B)" in out.output
    cells = next(row for row in table_rows(out.output) if row[0] == "all")
    want = [str(overall.n), *(str(overall[p]) for p in [(T, T), (T, F), (F, T), (F, F)])]
    assert cells[1:6] == want
    assert cells[-1] == f"{overall.kappa:.3f}" and cells[-2] == f"{overall.observed:.1%}"
    assert "1 answers graded by match only are left out." in out.output

    args = ["--lake", str(lake.root), "grade", "compare", "--run", "1", "--graders", "other,match"]
    swapped = runner.invoke(cli, args)
    assert swapped.exit_code == 0 and "other (A) vs match (B)" in swapped.output
    assert f"{overall.kappa:.3f}" in swapped.output  # kappa is symmetric


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--graders", "match"], "agreement needs two graders; given: match"),
        (["--graders", "match,nobody"], "run 1 has no grades by 'nobody'"),
        (["--graders", "match,match"], "agreement needs two graders"),
    ],
)
def test_grade_compare_refuses_what_it_cannot_compare(lake: Lake, args: list[str], message: str) -> None:
    out = CliRunner().invoke(cli, ["--lake", str(lake.root), "grade", "compare", "--run", "1", *args])
    assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output


def test_a_run_with_one_grader_says_how_to_get_a_second(lake: Lake) -> None:
    lake.write(lambda con: con.execute("delete from grades where grader = 'other'"))
    out = CliRunner().invoke(cli, ["--lake", str(lake.root), "grade", "compare", "--run", "1"])
    assert out.exit_code == 1 and "this run has: match" in out.output and "--grader judge" in out.output
    missing = CliRunner().invoke(cli, ["--lake", str(lake.root), "grade", "compare", "--run", "9"])
    assert missing.exit_code == 1 and "no run 9" in missing.output
    con = lake.connect(read_only=True)
    try:
        with pytest.raises(XiciError, match="with itself"):
            compare(con, 1, "match", "match")
    finally:
        con.close()
