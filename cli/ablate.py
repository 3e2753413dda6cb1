"""``xici ablate``: switch each question's experts off, ask again, and report the paper's Table 2."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from xici.ablation.conditions import BASELINES, DEFAULT_BASELINES, RANDOM_POOLS, label
from xici.ablation.metrics import MetricsRow, metrics_rows, overall
from xici.cli.common import allow_changed_model, engine_options, pass_lake, ray_options
from xici.cli.grade import judge_options
from xici.errors import XiciError
from xici.pipeline import DeactivationFailed
from xici.recorder import BACKENDS
from xici.warehouse import Lake

if TYPE_CHECKING:
    from xici.ablation.runner import AblationResult


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def metrics_table(rows: Sequence[MetricsRow], *, title: str) -> Table:
    """Table 2's layout: one row per condition (XICI, random set, shuffled), the metrics as columns.

    diff = ASR - SGR; all wrong: questions wrong in every language after ablation; check: selections of a
    deactivated expert / tokens whose routing was checked.
    """
    caption = (
        "diff = ASR - SGR; check = deactivated-expert selections / tokens checked; nothing off: asked again "
        "with no expert off, the noise floor (0.0% = the re-asked answers did not change)"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, caption=caption, pad_edge=False)
    headers = ("", "ASR", "SGR", "diff", "correct\nbefore", "all\nwrong", "questions", "check")
    for header in headers:
        # the row names wrap on a narrow terminal, so that the figures never get cut
        table.add_column(header, justify="right" if header else "left", no_wrap=bool(header))
    seeds = {row.seed for row in rows if row.seed is not None}
    for row in rows:
        m = row.metrics
        name = row.label + (f" (seed {row.seed})" if len(seeds) > 1 and row.seed is not None else "")
        table.add_row(
            name,
            _rate(m.asr),
            _rate(m.sgr),
            _rate(m.rate_diff),
            str(m.n_correct_before),
            str(m.n_all_wrong),
            str(m.n_questions),
            f"{row.violations}/{row.checked_tokens}",
        )
    return table


def print_metrics(rows: Sequence[MetricsRow]) -> None:
    """One table per analysis (dataset), then all of them pooled when there are several (on stdout)."""
    out = Console()
    analyses = list(dict.fromkeys(row.analysis_id for row in rows))
    for analysis_id in analyses:
        mine = [row for row in rows if row.analysis_id == analysis_id]
        seeds = sorted({row.seed for row in mine if row.seed is not None})
        baselines = f", baseline seed {', '.join(map(str, seeds))}" if seeds else ""
        title = f"analysis {analysis_id}: {mine[0].dataset}, {mine[0].model}{baselines}"
        out.print(metrics_table(mine, title=title))
    if len(analyses) > 1:
        out.print(metrics_table(overall(rows), title=f"overall: analyses {', '.join(map(str, analyses))}"))


@click.group(invoke_without_command=True)
@click.option(
    "--analysis", "analysis_id", type=int, help="Analysis whose expert sets to ablate (xici analyze)."
)
@click.option(
    "--baselines",
    default=",".join(DEFAULT_BASELINES),
    show_default=True,
    help=f"Baselines to run besides XICI, comma-separated, of {', '.join(BASELINES)} (none: every question "
    "asked again with nothing off, the noise floor); '' for XICI alone.",
)
@click.option(
    "--random-pool",
    type=click.Choice(RANDOM_POOLS),
    default=RANDOM_POOLS[0],
    show_default=True,
    help="Where random sets are drawn from: every expert of the analysed layers (the paper's reading), or "
    "those minus the analysis' blacklisted generalists.",
)
@click.option(
    "--boost",
    type=float,
    metavar="DELTA",
    help="Instead of switching the experts off, add DELTA to their router logits (per request, either "
    "backend); baselines as given (random: sets of the same size boosted the same way).",
)
@click.option(
    "--per-expert",
    is_flag=True,
    help="Switch off each expert of a set alone, one run per rank in the sets (no baselines).",
)
@click.option(
    "--leave-one-out",
    is_flag=True,
    help="With --per-expert, also switch off all the set but one expert, per rank.",
)
@click.option(
    "--questions",
    type=int,
    metavar="N",
    help="Only the first N questions with experts (question_id order): a smaller, separate set of runs.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the baselines' draws.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts generated together.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    help="Engine that generates: transformers or vllm [default: the recorded run's].",
)
@click.option(
    "--model",
    help="Where the recorded run's checkpoint is now, when it moved (accepted when its files are the same) "
    "[default: where it was recorded].",
)
@allow_changed_model
@engine_options
@ray_options
@judge_options
@click.pass_context
def ablate(ctx: click.Context, analysis_id: int | None, **options: Any) -> None:
    """Deactivate each question's experts together and ask it again in every language of its run.

    Every question with experts in the analysis is asked with the recorded prompt, greedy decoding and
    grader, its experts deactivated (their router logits set to the token's minimum, so they are never
    selected); the questions of one batch each carry their own expert mask. Baselines: a random expert set
    of the same size per question (from the analysis' layer window, or --random-pool
    window-minus-blacklist), question shuffling (each question asked with another question's set), and
    none (each question asked again the same way with nothing off: what re-asking alone changes). The
    routing of every ablated token is recorded and checked: no deactivated expert may be selected.

    Each condition is one run in the lake; running the same command again resumes them where they stopped
    (a finished run is left as it is). --batch-size, --device and the vLLM engine options do not change which
    run it is; --backend (by default the recorded run's) does. vLLM runs with prefix caching off, so a masked
    question never reuses keys and values computed with other experts. Answers are
    graded by the analysis' grader; for the judge, give the --judge-* options its grades were made with
    (by default the recorded model judges, as in xici grade). With --ray, Ray workers ask the batches of
    every condition (as in xici record --ray); the runs are the same as without.

    The checkpoint must have the files the run was recorded with (names, sizes, hashes): a changed one is
    refused, naming what changed, unless --allow-changed-model (stored with the ablation runs); a moved one
    is named with --model.

    Prints the paper's Table 2: ablation success rate (ASR: correct answers now wrong), spurious gain rate
    (SGR: wrong answers now right), their difference, and questions now wrong in every language.

    \b
    Instruments (docs/method.md, "Instruments"), each its own runs, resumable the same way:
      --boost DELTA     the sets' router logits raised by DELTA: gain rate on the pairs wrong before, loss
                        rate on those right before, against random sets boosted the same way, and how much
                        more often the boosted experts were selected;
      --per-expert      each expert alone switched off (--leave-one-out: all but it): the share of
                        experts individually necessary for at least one language, ASR by set size.
    """
    if ctx.invoked_subcommand is not None:
        return
    if analysis_id is None:
        raise click.UsageError("give --analysis ID (or use: xici ablate show)")
    from xici.pipeline import ablate as run_ablation

    lake = ctx.find_object(Lake)
    try:
        result = run_ablation(lake, analysis_id, **options)
    except DeactivationFailed as failed:
        print_ablation(lake, failed.result, options)
        raise
    print_ablation(lake, result, options)


def print_ablation(lake: Lake, result: AblationResult, options: dict[str, Any]) -> None:
    """What each condition's run did, then Table 2 (or the instruments' tables, for --boost and
    --per-expert). Shared by ``xici ablate`` and ``xici demo``."""
    boost = options.get("boost")
    for run in result.runs:
        name = f"{run.label or label(run.condition)}: run {run.run_id}"
        if run.already_finished:
            click.echo(f"{name} is already finished ({run.n_units} units); nothing to do.")
            continue
        resumed = "" if run.created else f", resumed after {run.done_before} done"
        click.echo(f"{name}: ablated {run.asked} of {run.n_units} units{resumed}.")
        if boost is None:
            click.echo(
                f"{name}: routing of {run.check.checked_tokens:,} tokens checked, "
                f"{run.check.violations} selections of a deactivated expert."
            )
        else:
            click.echo(
                f"{name}: routing of {run.check.checked_tokens:,} tokens checked, boosted experts selected "
                f"in {run.check.selected_share:.1%} of (token, expert) pairs."
            )
    if options.get("per_expert"):
        print_instruments(lake, result.analysis_id, "single")
    elif boost is not None:
        print_instruments(lake, result.analysis_id, "boost")
    else:
        print_metrics(result.metrics)


def print_instruments(lake: Lake, analysis_id: int, mode: str) -> None:
    """The boost's or the per-expert runs' summary tables for the analysis' run (on stdout)."""
    from xici.report import instruments
    from xici.report.source import reading

    with reading(lake) as con:
        [(run_id,)] = con.execute(
            "select run_id from analyses where analysis_id = ?", [analysis_id]
        ).fetchall()
        builders = (
            [instruments.boost_table]
            if mode == "boost"
            else [instruments.necessity_table, instruments.set_size_table]
        )
        tables = [table for build in builders if (table := build(con, run_id)) is not None]
    out = Console()
    for found in tables:
        table = Table(title=found.title, box=box.SIMPLE_HEAD, caption=found.caption, pad_edge=False)
        for column in found.columns:
            table.add_column(column.name, justify="left" if column.kind == "text" else "right")
        for row in found.formatted():
            table.add_row(*row)
        out.print(table)


@ablate.command()
@click.option(
    "--analysis",
    "analysis_ids",
    type=int,
    multiple=True,
    help="Only this analysis (repeatable) [default: all].",
)
@pass_lake
def show(lake: Lake, analysis_ids: tuple[int, ...]) -> None:
    """Print the stored ablation metrics: Table 2 per analysis, then pooled over them."""
    rows = lake.read(lambda con: metrics_rows(con, list(analysis_ids) or None))
    if not rows:
        which = f" of analysis {', '.join(map(str, analysis_ids))}" if analysis_ids else ""
        raise XiciError(
            f"there are no finished ablations{which}",
            where=str(lake.root),
            fix="run xici ablate --analysis ID first",
        )
    print_metrics(rows)
