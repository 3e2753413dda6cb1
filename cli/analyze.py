"""``xici analyze``: find the experts of each question of a run (method.md, Stage 2); list, show analyses."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from xici.analysis.identify import AnalysisRecord
from xici.analysis.mwu import METHODS as MWU_METHODS
from xici.analysis.params import (
    BUDGETS,
    DEFAULT_TAU,
    METHODS,
    PRESETS,
    SWEEPABLE,
    Preset,
    default_window,
    method_label,
)
from xici.analysis.summary import LABELS, summaries, summary
from xici.cli.common import pass_lake
from xici.pipeline import Analyses
from xici.pipeline import analyze as run_analyses
from xici.warehouse import Lake


@click.group(invoke_without_command=True)
@click.option("--run", "run_id", type=int, help="The recording run to analyse.")
@click.option(
    "--preset",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "none", *PRESETS]),
    help="Model defaults for --tau and --layers; auto: the preset named in the run's model id.",
)
@click.option("--alpha", type=float, help="Significance of the one-tailed Mann-Whitney test [0.05].")
@click.option("--tau", type=float, help="Minimum median difference, correct minus wrong [preset, or 0.005].")
@click.option(
    "--layers",
    metavar="START:END",
    help="MoE layers kept, a half-open range from 0 [preset, or round(L/8) dropped at each end].",
)
@click.option("--max-experts", type=int, help="Cap on experts per question [25].")
@click.option("--blacklist-top", type=float, help="Share of a sequence's ranking that is its top [0.01].")
@click.option(
    "--blacklist-share", type=float, help="Blacklist experts in the top of more than this share [0.05]."
)
@click.option("--grader", default="match", show_default=True, help="Whose grades say correct or wrong.")
@click.option(
    "--mwu",
    type=click.Choice(MWU_METHODS),
    help="p of the Mann-Whitney test: exact (permutation distribution, ties included), asymptotic (normal "
    "approximation) or auto (exact only without ties and with a group of at most 8, like scipy) [auto].",
)
@click.option(
    "--min-group",
    type=int,
    help="Test a question only with at least this many correct and this many wrong languages [1].",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    help="Localizer: xici (the test), risk-diff (SteerMoE's routing-frequency contrast, no test) or "
    "median-diff (the deltas ranked by median difference above tau, no test) [xici].",
)
@click.option(
    "--lang-mean/--no-lang-mean",
    default=None,
    help="Subtract each language's mean before contrasting (Eq. 2); --no-lang-mean drops the step [on].",
)
@click.option(
    "--blacklist/--no-blacklist",
    default=None,
    help="Never choose generalist experts; --no-blacklist drops the step [on].",
)
@click.option(
    "--budget",
    type=click.Choice(BUDGETS),
    help="Experts per question of a rival localizer: matched (as many as XICI's set with the same "
    "parameters) or cap (up to --max-experts) [matched].",
)
@click.option(
    "--sweep",
    multiple=True,
    metavar="NAME=V1,V2,...",
    help=f"Run the grid of these values (repeatable); NAME is one of {', '.join(SWEEPABLE)}.",
)
@click.option(
    "--partial",
    is_flag=True,
    help="Analyse a run that is not finished (still recording, or stopped) as it stands now.",
)
@pass_lake
@click.pass_context
def analyze(ctx: click.Context, lake: Lake, run_id: int | None, **options: Any) -> None:
    """Find the experts behind each question of a run, from its cross-lingual inconsistency.

    \b
    Per question, its languages are split into correct and wrong; for every expert a one-tailed
    Mann-Whitney test asks whether its language-subtracted routing weight is higher when the answer is
    right. Experts that pass, beat the magnitude threshold and are neither in the excluded layers nor
    blacklisted form the question's set (at most --max-experts, best first). The same run, grades and
    parameters reuse the stored analysis.

    \b
    Examples:
      xici analyze --run 1
      xici analyze --run 1 --preset qwen3-30b-a3b --alpha 0.01
      xici analyze --run 1 --mwu exact --min-group 3
      xici analyze --run 1 --method risk-diff --no-lang-mean
      xici analyze --run 1 --sweep method=xici,risk-diff,median-diff
      xici analyze --run 1 --sweep tau=0.001,0.005,0.01 --sweep max-experts=5,25,45
      xici analyze list
      xici analyze show 3
    """
    if ctx.invoked_subcommand is not None:
        return
    if run_id is None:
        raise click.UsageError("give --run, or a subcommand (list, show)")
    print_analyses(run_analyses(lake, run_id, **options))


def preset_line(chosen: Preset | None, model: str, n_moe_layers: int) -> str:
    """The defaults behind --tau and --layers, so a model without a preset is never analysed silently."""
    if chosen is not None:
        return f"Preset {chosen.name}: tau {chosen.tau}, layers {chosen.layers[0]}:{chosen.layers[1]}."
    start, stop = default_window(n_moe_layers)
    return (
        f"No preset for {model}: defaults tau {DEFAULT_TAU} and layers {start}:{stop} (round(L/8) of the "
        f"{n_moe_layers} MoE layers dropped at each end) unless --tau or --layers says otherwise; "
        "see docs/method.md."
    )


def print_analyses(result: Analyses) -> None:
    """The defaults used and what to know, then the summary of the analysis (or one line per point of a
    sweep), then why nothing was found where that is the case. Shared by ``xici analyze`` and ``xici demo``.
    """
    console = Console()
    console.print(preset_line(result.preset, result.model, result.n_moe_layers), highlight=False)
    for note in result.notes:
        console.print(note, highlight=False)
    rows = result.summaries
    if len(result.records) == 1:
        record = result.records[0]
        state = "new" if record.created else "stored earlier with the same data and parameters"
        console.print(f"Analysis {record.analysis_id} of run {result.run_id} ({state}).", highlight=False)
        console.print(_summary_table(rows[record.analysis_id]))
    else:
        console.print(_sweep_table(result.records, rows, result.swept))
    for note in dict.fromkeys(why_nothing(rows[r.analysis_id]) for r in result.records):
        if note is not None:
            console.print(note, highlight=False)


def why_nothing(row: dict[str, Any]) -> str | None:
    """Why an analysis can identify no expert at all, when the reason is in its questions (none mixed)."""
    if row["mixed"]:
        return None
    return (
        f"No question is mixed ({row['all_correct']} all correct, {row['all_wrong']} all incorrect): experts "
        "are found only where a question is answered right in some languages and wrong in others, so this "
        "analysis finds none. Ask in more languages, or a dataset or model where the answers differ."
    )


@analyze.command("list")
@pass_lake
def list_(lake: Lake) -> None:
    """List the stored analyses."""
    rows = lake.read(summaries)
    if not rows:
        Console().print("No analyses yet: run `xici analyze --run R`.")
        return
    headers = {
        "analysis_id": "id",
        "run_id": "run",
        "grader": "grader",
        "alpha": "alpha",
        "tau": "tau",
        "layers": "layers",
        "max_experts": "cap",
        "mwu": "mwu",
        "min_group": "min group",
        "localizer": "localizer",
        "mixed": "mixed",
        "with_experts": "with experts",
        "avg_experts": "avg experts",
    }
    table = Table(*headers.values())
    for row in rows:
        row["layers"] = f"{row['layer_start']}:{row['layer_stop']}"
        row["localizer"] = method_label(row)
        table.add_row(*[_number(row[c]) for c in headers])
    Console().print(table)


@analyze.command("show")
@click.argument("analysis_id", type=int)
@pass_lake
def show(lake: Lake, analysis_id: int) -> None:
    """Summarise analysis ANALYSIS_ID like the paper's Tables 1 and 2."""
    row = lake.read(lambda con: summary(con, analysis_id))
    console = Console()
    console.print(
        f"Analysis {analysis_id} of run {row['run_id']}: alpha {row['alpha']:g}, tau {row['tau']:g}, "
        f"layers {row['layer_start']}:{row['layer_stop']}, at most {row['max_experts']} experts, blacklist "
        f"= top {row['blacklist_top']:g} in more than {row['blacklist_share']:g} of sequences, Mann-Whitney "
        f"p {row['mwu']}, groups of at least {row['min_group']}; localizer {method_label(row)}.",
        highlight=False,
    )
    console.print(_summary_table(row))


def _summary_table(row: dict[str, Any]) -> Table:
    table = Table("", "value", show_header=False)
    for column, label in LABELS.items():
        table.add_row(label, _number(row[column]))
    return table


def _sweep_table(records: list[AnalysisRecord], rows: dict[int, dict[str, Any]], swept: list[str]) -> Table:
    """One line per grid point: the swept values, the analysis id and its headline numbers."""
    table = Table(
        *[name.replace("_", "-") for name in swept], "analysis", "new", "with experts", "avg experts"
    )
    for record in records:
        params, row = record.params, rows[record.analysis_id]
        values = [
            f"{params.layer_start}:{params.layer_stop}"
            if name == "layers"
            else _number(getattr(params, name))
            for name in swept
        ]
        table.add_row(
            *values,
            str(record.analysis_id),
            "yes" if record.created else "no",
            str(row["with_experts"]),
            _number(row["avg_experts"]),
        )
    return table


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
