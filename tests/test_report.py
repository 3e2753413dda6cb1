"""``xici report`` on real synthetic lakes: files, self-contained HTML, the tables' numbers, the figures.

The main lake holds two record runs of one model (datasets ``alpha`` and ``beta``). Alpha has a default
analysis, a τ sweep and a cap sweep, and ablations of its default analysis (XICI, the random baseline with
two seeds, shuffled); beta, the newest run, has a default analysis with a XICI ablation only. Ablation runs
are written the way the ablation runner writes them (runs row, ``ablations``, ``ablation_experts``,
sequences with routing that avoids the switched-off experts, grades), with answers drawn instead of asked,
and finished with the ablation package's own check and metrics.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from xici.ablation.check import check_deactivation
from xici.ablation.conditions import draw_random, load_analysis, random_pool, shuffled, xici_sets
from xici.ablation.metrics import store_metrics
from xici.analysis.identify import analyze
from xici.analysis.params import resolve
from xici.cli.main import cli
from xici.errors import XiciError
from xici.report.build import build_report
from xici.report.source import choose, reading, record_runs
from xici.report.tables import ablation_table, consistency_table, identification_table
from xici.testbed.synthetic_lake import SyntheticSpec, write_synthetic_lake
from xici.warehouse import Lake, TokenArrays

SMALL = SyntheticSpec(
    questions=((14, 5), (10, 8)), n_layers=8, n_experts=16, top_k=2, pool=6, tokens=(12, 30), model="toy/moe"
)
TAUS = (0.0, 0.01, 0.05)
CAPS = (2, 5)


def _ablate(
    lake: Lake, analysis_id: int, condition: str, seed: int | None, lose: float, gain: float = 0.2
) -> int:
    """A finished ablation run of ``condition``: an answer correct before turns wrong with probability
    ``lose``, a wrong one turns right with probability ``gain``."""

    def start(con: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
        analysis = load_analysis(con, analysis_id)
        sets = xici_sets(con, analysis)
        shape = con.execute(
            "select dataset, model, model_config_hash, architecture, n_moe_layers, n_experts, top_k "
            "from runs where run_id = ?",
            [analysis.run_id],
        ).fetchone()
        n_layers, n_experts, top_k = shape[4:]
        rng = np.random.default_rng([analysis_id, len(condition), seed or 0])
        if condition == "shuffle":
            sets = shuffled(sets, rng)
        elif condition == "random":
            sets = draw_random(sets, random_pool(con, analysis, n_experts), rng, lambda pairs, what: None)
        units = con.execute(
            "select s.question_id, s.lang, g.correct from sequences s "
            "left join grades g on g.seq_id = s.seq_id and g.grader = ? "
            "where s.run_id = ? and s.question_id in (select unnest(?)) order by s.unit",
            [analysis.grader, analysis.run_id, [a.question_id for a in sets]],
        ).fetchall()
        key = hashlib.sha256(f"{analysis_id}/{condition}/{seed}".encode()).hexdigest()
        run_id, _ = lake.get_or_create_run(
            con,
            key,
            kind="ablation",
            **dict(zip(("dataset", "model", "model_config_hash", "architecture"), shape[:4], strict=True)),
            backend="synthetic",
            n_moe_layers=n_layers,
            n_experts=n_experts,
            top_k=top_k,
            params={"condition": condition, "seed": seed},
            versions={},
            n_units=len(units),
        )
        con.execute(
            "insert into ablations (run_id, analysis_id, source_run_id, condition, seed, grader, "
            "random_pool) values (?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                analysis_id,
                analysis.run_id,
                condition,
                seed,
                analysis.grader,
                "window" if condition == "random" else None,
            ],
        )
        con.executemany(
            "insert into ablation_experts values (?, ?, ?, ?, ?)",
            [[run_id, a.question_id, a.source, *pair] for a in sets for pair in a.pairs],
        )
        return analysis, sets, units, run_id, rng, shape[4:]

    analysis, sets, units, run_id, rng, (n_layers, n_experts, top_k) = lake.write(start)
    off = {a.question_id: set(a.pairs) for a in sets}
    arrays = []
    for question_id, _, _ in units:
        allowed = [
            [e for e in range(n_experts) if (layer, e) not in off[question_id]] for layer in range(n_layers)
        ]
        ids = np.array(
            [[row[:top_k] for row in allowed]] * 3
        )  # 3 tokens that never select a switched-off one
        arrays.append(TokenArrays(np.arange(3, dtype=np.int32), ids, np.full(ids.shape, 1 / top_k)))
    flip = rng.random(len(units)) < [lose if before else gain for _, _, before in units]
    after = [
        None if before is None else before != bool(flipped)
        for (_, _, before), flipped in zip(units, flip, strict=True)
    ]
    rows = [
        {"unit": i, "question_id": q, "lang": lang, "n_prompt_tokens": 2, "n_generated": 2,
         "prompt_text": q, "response_text": "-", "finish_reason": "stop"}
        for i, (q, lang, _) in enumerate(units)
    ]  # fmt: skip

    def grade(con: duckdb.DuckDBPyConnection, seq_ids: list[int]) -> None:
        con.executemany(
            "insert into grades (seq_id, grader, grader_version, correct) values (?, ?, 'synthetic', ?)",
            [[s, analysis.grader, c] for s, c in zip(seq_ids, after, strict=True)],
        )

    lake.gates().create_run(run_id, n_layers=n_layers, top_k=top_k, n_experts=n_experts)
    lake.commit_sequences(run_id, rows, arrays, also=grade)
    check = check_deactivation(lake, run_id)

    def change(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            "update ablations set checked_tokens = ?, violations = ? where run_id = ?",
            [check.checked_tokens, check.violations, run_id],
        )
        store_metrics(con, run_id)
        con.execute("update runs set status = 'finished' where run_id = ?", [run_id])

    lake.write(change)
    return run_id


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    lake = Lake(tmp_path_factory.mktemp("report-lake"))
    first = write_synthetic_lake(lake, replace(SMALL, dataset="alpha")).run_id
    base = resolve(None, SMALL.n_layers)
    points = [
        base,
        *(replace(base, tau=t) for t in TAUS),
        *(replace(base, max_experts=c) for c in CAPS),
    ]
    analyses = analyze(lake, first, points)
    default = analyses[0].analysis_id
    _ablate(lake, analyses[-len(CAPS) - 1].analysis_id, "xici", None, lose=0.3)  # the largest τ
    _ablate(lake, default, "xici", None, lose=0.6)
    _ablate(lake, default, "random", 0, lose=0.1)
    _ablate(lake, default, "random", 1, lose=0.1)
    _ablate(lake, default, "shuffle", 0, lose=0.15)
    second = write_synthetic_lake(lake, replace(SMALL, dataset="beta", seed=1)).run_id
    _ablate(lake, analyze(lake, second, [base])[0].analysis_id, "xici", None, lose=0.5)
    return lake


def _sql(lake: Lake, query: str, params: list | None = None) -> list[tuple]:
    con = lake.connect(read_only=True)
    try:
        return con.execute(query, params or []).fetchall()
    finally:
        con.close()


def _run(lake: Lake, dataset: str) -> int:
    return _sql(lake, "select run_id from runs where kind = 'record' and dataset = ?", [dataset])[0][0]


def _default_analysis(lake: Lake, dataset: str) -> int:
    base = resolve(None, SMALL.n_layers)
    return _sql(
        lake,
        "select analysis_id from analyses where run_id = ? and tau = ? and max_experts = ?",
        [_run(lake, dataset), base.tau, base.max_experts],
    )[0][0]


@pytest.fixture(scope="module")
def report(lake: Lake, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of run 1's default analysis, through the command line."""
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(
        cli,
        [
            "--lake",
            str(lake.root),
            "report",
            "--out",
            str(out),
            "--analysis",
            str(_default_analysis(lake, "alpha")),
        ],
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "report.html" in result.output
    return out


def test_report_writes_markdown_html_and_every_figure(report: Path) -> None:
    names = {p.name for p in report.iterdir()}
    assert names == {
        "report.md",
        "report.html",
        "accuracy_by_language.png",
        "experts_per_layer.png",
        "ablated_experts.png",
        "ablation.png",
        "sweep_tau.png",
        "sweep_max_experts.png",
    }
    md = (report / "report.md").read_text()
    for name in names - {"report.md", "report.html"}:
        assert f"]({name})" in md


def test_html_is_self_contained(report: Path) -> None:
    page = (report / "report.html").read_text()
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {p.read_bytes() for p in report.glob("*.png")}


def test_figures_are_readable_pngs(report: Path) -> None:
    for path in report.glob("*.png"):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path.name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert 500 <= width <= 2000 and 300 <= height <= 1000, (path.name, width, height)
        assert 10_000 < len(data) < 500_000, path.name
        pixels = imread(path)
        assert pixels[..., :3].std() > 0.05, f"{path.name} is nearly blank"


def test_consistency_table_matches_direct_sql(lake: Lake, report: Path) -> None:
    with reading(lake) as con:
        table = consistency_table(con, record_runs(con))
    direct = _sql(
        lake,
        "with graded as (select s.run_id, s.question_id, s.lang, g.correct from sequences s "
        "  join grades g using (seq_id) join runs r using (run_id) where r.kind = 'record'), "
        "acc as (select run_id, lang, avg(correct::int) as a from graded group by all), "
        "q as (select run_id, question_id, bool_and(correct) as all_ok, bool_and(not correct) as all_bad "
        "  from graded group by all) "
        "select run_id, (select count(*) from q where q.run_id = r.run_id), "
        "  (select count(*) from acc where acc.run_id = r.run_id), "
        "  (select a from acc where acc.run_id = r.run_id and lang = 'en'), "
        "  (select avg(a) from acc where acc.run_id = r.run_id), "
        "  (select count_if(all_ok) from q where q.run_id = r.run_id), "
        "  (select count_if(all_bad) from q where q.run_id = r.run_id) "
        "from runs r where kind = 'record' order by run_id",
    )
    assert table.column("run") == [_run(lake, "alpha"), _run(lake, "beta")]
    for row, (run, questions, languages, english, average, all_ok, all_bad) in zip(
        table.rows, direct, strict=True
    ):
        assert row[2] == run
        assert row[4:7] == (questions, languages, pytest.approx(english))
        assert row[7] == pytest.approx(average)
        assert row[8:11] == (all_ok, all_bad, questions - all_ok - all_bad)
    # The analysis stored the same accuracies when it ran.
    english, average = _sql(
        lake,
        "select english_accuracy, average_accuracy from analyses where analysis_id = ?",
        [_default_analysis(lake, "alpha")],
    )[0]
    assert table.rows[0][6:8] == (pytest.approx(english), pytest.approx(average))
    md = (report / "report.md").read_text()
    assert f"| {100 * english:.1f}% | {100 * average:.1f}% |" in md


def test_identification_table_matches_direct_sql_and_pools_the_model(lake: Lake, report: Path) -> None:
    ids = [_default_analysis(lake, "alpha"), _default_analysis(lake, "beta")]
    with reading(lake) as con:
        table = identification_table(con, [choose(con, analysis_id=a) for a in ids])
    layers_x_experts = SMALL.n_layers * SMALL.n_experts
    counts = []
    for analysis_id, row in zip(ids, table.rows, strict=False):
        (mixed,) = _sql(
            lake,
            "select count(*) from analysis_questions where analysis_id = ? and outcome = 'mixed'",
            [analysis_id],
        )[0]
        questions, experts = _sql(
            lake,
            "select count(distinct question_id), count(*) from analysis_experts where analysis_id = ?",
            [analysis_id],
        )[0]
        (blacklisted,) = _sql(
            lake, "select n_blacklisted from analyses where analysis_id = ?", [analysis_id]
        )[0]
        assert row[2:5] == (analysis_id, mixed, questions)
        assert row[5] == pytest.approx(experts / questions)
        assert row[6] == blacklisted
        assert row[7] == pytest.approx(experts / questions / layers_x_experts)
        counts.append((mixed, questions, experts))
    pooled = table.rows[2]
    mixed, questions, experts = (sum(c) for c in zip(*counts, strict=True))
    assert pooled[0] == "all: alpha, beta" and pooled[2] is None
    assert pooled[3:6] == (mixed, questions, pytest.approx(experts / questions))
    assert len(table.rows) == 3
    md = (report / "report.md").read_text()
    assert f"| {experts / questions:.1f} | – | {100 * experts / questions / layers_x_experts:.2f}% |" in md


def test_ablation_table_matches_direct_sql(lake: Lake) -> None:
    ids = [_default_analysis(lake, "alpha"), _default_analysis(lake, "beta")]
    with reading(lake) as con:
        table = ablation_table(con, [choose(con, analysis_id=a) for a in ids])
    assert [(r[2], r[3], r[4]) for r in table.rows] == [
        (ids[0], "XICI", None),
        (ids[0], "random set (window)", 0),
        (ids[0], "random set (window)", 1),
        (ids[0], "shuffled", 0),
        (ids[1], "XICI", None),
        (None, "XICI", None),  # pooled; beta has no baselines, so they are not
    ]
    direct = _sql(
        lake,
        "select a.analysis_id, a.condition, a.seed, count_if(before.correct), "
        "count_if(before.correct and not after.correct), count_if(not before.correct and after.correct), "
        "count_if(not before.correct) "
        "from ablations a join sequences s on s.run_id = a.run_id join grades after using (seq_id) "
        "join sequences b on b.run_id = a.source_run_id "
        "and (b.question_id, b.lang) = (s.question_id, s.lang) "
        "join grades before on before.seq_id = b.seq_id "
        "where a.analysis_id in (select unnest(?)) group by all",
        [ids],
    )
    for analysis_id, condition, seed, correct, lost, gained, wrong in direct:
        label = {"xici": "XICI", "random": "random set (window)", "shuffle": "shuffled"}[condition]
        (row,) = [r for r in table.rows if r[2:5] == (analysis_id, label, seed)]
        assert row[5] == correct
        assert row[6] == pytest.approx(lost / correct)
        assert row[7] == pytest.approx(gained / wrong)
        assert row[8] == pytest.approx(lost / correct - gained / wrong)
        assert row[10] == 0  # the synthetic routing never selects a switched-off expert
    pooled_xici = table.rows[5]
    parts = [r for r in direct if r[1] == "xici"]
    assert pooled_xici[5] == sum(r[3] for r in parts)
    assert pooled_xici[6] == pytest.approx(sum(r[4] for r in parts) / sum(r[3] for r in parts))


def test_defaults_pick_the_newest_run_and_its_default_analysis(lake: Lake) -> None:
    with reading(lake) as con:
        newest = choose(con)
        first = choose(con, run_id=_run(lake, "alpha"))
        tau_point = _sql(lake, "select analysis_id from analyses where tau = 0.05")[0][0]
        picked = choose(con, analysis_id=tau_point)
        for bad, where in (({"run_id": 99}, "--run"), ({"analysis_id": 99}, "--analysis")):
            with pytest.raises(XiciError) as error:
                choose(con, **bad)
            assert error.value.where == where
        with pytest.raises(XiciError, match=f"not of run {_run(lake, 'beta')}"):
            choose(con, run_id=_run(lake, "beta"), analysis_id=tau_point)
    assert newest.run.dataset == "beta" and newest.analysis.analysis_id == _default_analysis(lake, "beta")
    # Run 1's sweeps are newer than its default analysis; the default still wins.
    assert first.analysis.analysis_id == _default_analysis(lake, "alpha") and first.grader == "match"
    assert picked.run.dataset == "alpha" and picked.analysis.params["tau"] == 0.05


def test_a_new_report_removes_figures_the_old_one_had(lake: Lake, tmp_path: Path) -> None:
    build_report(lake, tmp_path, analysis_id=_default_analysis(lake, "alpha"))
    assert (tmp_path / "sweep_tau.png").exists()
    files = build_report(lake, tmp_path)  # the newest run, beta: no sweeps
    assert {p.name for p in files.figures} == {
        "accuracy_by_language.png",
        "experts_per_layer.png",
        "ablated_experts.png",
        "ablation.png",
    }
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in files.figures)
    assert "No sweep around analysis" in files.markdown.read_text()


def test_a_lake_without_analysis_says_what_to_run(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    write_synthetic_lake(lake, replace(SMALL, questions=((6, 3),), tokens=(4, 8)))
    files = build_report(lake)
    assert files.folder == lake.root / "report"
    assert [p.name for p in files.figures] == ["accuracy_by_language.png"]
    md = files.markdown.read_text()
    assert "Run 1 has no analysis yet: `xici analyze --run 1`." in md
    assert "No ablation yet" in md and "Table 2a" not in md
    assert "<code>xici analyze --run 1</code>" in files.html.read_text()


def test_an_empty_lake_is_a_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--lake", str(tmp_path / "nothing"), "report"])
    assert result.exit_code == 1 and "there is no warehouse here yet" in result.output
    assert "Traceback" not in result.output
    Lake(tmp_path / "empty").connect().close()  # a warehouse, but nothing recorded
    result = runner.invoke(cli, ["--lake", str(tmp_path / "empty"), "report"])
    assert result.exit_code == 1
    assert "no recording yet" in result.output and "xici record" in result.output
    assert not (tmp_path / "empty" / "report").exists()
