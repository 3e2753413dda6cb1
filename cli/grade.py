"""``xici grade``: grade a recorded run's answers again, with another grader or a newer version;
``xici grade compare``: how far the graders of a run agree.

The ``--judge-*`` options (:func:`judge_options`) are shared with ``xici record`` and any command that takes
``--grader``: they build the options of the LLM judge (:mod:`xici.recorder.judge`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from xici.cli.common import allow_changed_model, given_options, pass_lake, with_options
from xici.corpora.agreement import Comparison, Confusion, compare, graders_of_run, pairs_to_compare
from xici.errors import XiciError
from xici.progress import progress_bar
from xici.recorder import DTYPES
from xici.recorder.grading import LanguageAccuracy, RegradeProgress, regrade
from xici.recorder.judge import JudgeOptions
from xici.warehouse import Lake


def accuracy_table(scores: Sequence[LanguageAccuracy], *, title: str) -> Table:
    """Accuracy per language, then all languages together (undecided answers are left out of the share)."""
    table = Table(title=title)
    for name in ("lang", "answers", "correct", "undecided", "accuracy"):
        table.add_column(name, justify="left" if name == "lang" else "right")
    total = LanguageAccuracy(
        "all", sum(s.n for s in scores), sum(s.correct for s in scores), sum(s.undecided for s in scores)
    )
    for score in [*scores, total]:
        if score is total:
            table.add_section()
        share = "-" if score.n == score.undecided else f"{score.accuracy:.1%}"
        table.add_row(score.lang, str(score.n), str(score.correct), str(score.undecided), share)
    return table


# The --judge-* options: name -> (type, help), each a field of JudgeOptions after "judge_".
_JUDGE_OPTIONS: dict[str, tuple[click.ParamType, str]] = {
    "judge_model": (
        click.STRING,
        "Judge model for --grader judge: checkpoint or hub id [default: the run's].",
    ),
    "judge_template": (
        click.Path(exists=True, dir_okay=False, path_type=Path),
        "File with the judge's prompt, fields {question} {answers} {response} {lang} "
        "[default: xici.recorder.judge.DEFAULT_TEMPLATE].",
    ),
    "judge_batch_size": (click.INT, "Prompts the judge reads together [default: 8]."),
    "judge_max_new_tokens": (click.INT, "Judge answer length limit [default: 16]."),
    "judge_device": (click.STRING, "Judge model device [default: the command's --device, or auto]."),
    "judge_dtype": (click.Choice(DTYPES), "Judge weights dtype [default: the command's --dtype, or auto]."),
}


def judge_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the ``--judge-*`` options to a click command, which receives them as one ``judge`` argument."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = given_options(kwargs, _JUDGE_OPTIONS)
        judge = JudgeOptions(**{name.removeprefix("judge_"): value for name, value in given.items()})
        return command(*args, judge=judge, **kwargs)

    return with_options(wrapper, _JUDGE_OPTIONS)


def _run_model(lake: Lake, run_id: int, allow_changed_model: bool) -> str:
    """The model a run was recorded (or ablated) with, the judge's default: refused when its checkpoint
    files changed since (:mod:`xici.recorder.fingerprint`)."""
    from xici.recorder.fingerprint import check_model

    row = lake.read(
        lambda con: con.execute(
            "select model, params ->> 'model_fingerprint' from runs where run_id = ?", [run_id]
        ).fetchone()
    )
    if row is None:
        raise XiciError(f"there is no run {run_id} in this lake", where="--run")
    recorded = None if row[1] is None else json.loads(row[1])
    where = f"the model of run {run_id} (the judge's default)"
    check_model(
        row[0], recorded, run_id=run_id, allow_changed=allow_changed_model, where=where, moved="--judge-model"
    )
    return row[0]


@click.group(invoke_without_command=True)
@click.option("--run", "run_id", type=int, help="Run whose answers to grade.")
@click.option("--grader", help="Grader name: match, or judge (an LLM answering YES or NO).")
@click.option("--force", is_flag=True, help="Grade again answers already graded by this grader and version.")
@allow_changed_model
@judge_options
@pass_lake
def grade(
    lake: Lake,
    run_id: int | None,
    grader: str | None,
    force: bool,
    allow_changed_model: bool,
    judge: JudgeOptions,
) -> None:
    """Grade every answer of a run with GRADER, without re-recording; prints accuracy per language.

    Grades are kept per grader, so several graders' grades of a run sit side by side (compare them with
    xici grade compare). Answers already graded by the same grader and version are kept unless --force; a
    grade by another version (another judge model or template, say) is replaced. Answers are committed in
    chunks, so an interrupted run of the command continues where it stopped.

    --grader judge asks a chat model (by default the run's own model) with the question, the accepted
    answers and the response; it must answer YES or NO. Other answers are stored as undecided, with the
    judge's raw answer in grades.detail. The run's model judges only while its checkpoint files are those
    the run was recorded with (--allow-changed-model: any).
    """
    if click.get_current_context().invoked_subcommand is not None:
        if run_id is not None or grader is not None:
            raise click.UsageError("give the subcommand's options after it: xici grade compare --run R")
        return
    if run_id is None or grader is None:
        raise click.UsageError("xici grade needs --run and --grader (or a subcommand: compare)")
    options = judge.for_grader(grader, model=lambda: _run_model(lake, run_id, allow_changed_model))
    with progress_bar() as bar:
        task = bar.add_task(f"grading with {grader}", total=None)

        def on_progress(progress: RegradeProgress) -> None:
            bar.update(task, completed=progress.done, total=progress.total)
            if progress.done == 0 and progress.kept:
                click.echo(
                    f"{progress.kept} answers already graded by {grader} are kept (--force grades again).",
                    err=True,
                )

        scores = regrade(lake, run_id, grader, force=force, on_progress=on_progress, **options)
    Console().print(accuracy_table(scores, title=f"run {run_id}, grader {grader}"))
    undecided = sum(s.undecided for s in scores)
    if grader == "judge" and undecided:
        click.echo(
            f"{undecided} judge answers were neither YES nor NO: undecided (raw text in grades.detail)."
        )


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _kappa(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def agreement_table(comparison: Comparison) -> Table:
    """Confusion counts, agreement and Cohen's kappa of two graders, per language and over all languages."""
    a, b = comparison.a, comparison.b
    table = Table(
        title=f"run {comparison.run_id}: {a} (A) vs {b} (B)",
        caption="A/B verdicts; kappa and agree over the answers both decided; ? = undecided",
    )
    headers = ("lang", "answers", "YES/YES", "YES/NO", "NO/YES", "NO/NO", "A ?", "B ?", "agree", "kappa")
    for header in headers:
        table.add_column(header, justify="left" if header == "lang" else "right")
    overall = comparison.overall
    for row in [*comparison.languages, overall]:
        if row is overall:
            table.add_section()
        table.add_row(*_cells(row))
    return table


def _cells(c: Confusion) -> list[str]:
    agree = "-" if not c.decided else f"{c.observed:.1%}"
    counts = [c[True, True], c[True, False], c[False, True], c[False, False], c.undecided(0), c.undecided(1)]
    return [c.lang, str(c.n), *map(str, counts), agree, _kappa(c.kappa)]


@grade.command("compare")
@click.option("--run", "run_id", type=int, required=True, help="Run whose grades to compare.")
@click.option(
    "--graders", callback=_names, help="Comma-separated graders, compared pairwise [default: all the run's]."
)
@pass_lake
def compare_graders(lake: Lake, run_id: int, graders: tuple[str, ...] | None) -> None:
    """Agreement of the graders of a run: confusion counts and Cohen's kappa, per language and overall.

    Only answers graded by both graders of a pair are compared; undecided grades are counted in their own
    columns and left out of the agreement and kappa.
    """
    comparisons = lake.read(
        lambda con: [
            compare(con, run_id, a, b) for a, b in pairs_to_compare(graders_of_run(con, run_id), graders)
        ]
    )
    out = Console()
    for comparison in comparisons:
        out.print(agreement_table(comparison))
        for name, count in ((comparison.a, comparison.only_a), (comparison.b, comparison.only_b)):
            if count:
                out.print(f"{count} answers graded by {name} only are left out.")
