"""``xici export``: take results out of the lake in plain files."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from xici.analysis.export import FORMATS, export_experts
from xici.cli.common import pass_lake
from xici.warehouse import Lake


@click.group()
def export() -> None:
    """Write results to CSV, Parquet or JSON files."""


@export.command("experts")
@click.option("--analysis", "analysis_id", type=int, required=True, help="The analysis to export.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help=f"File to write; its extension picks the format ({', '.join(FORMATS)}).",
)
@pass_lake
def experts(lake: Lake, analysis_id: int, out: Path) -> None:
    """Export the expert sets of an analysis.

    \b
    One row per (question, expert), ordered by question then rank:
      question_id  the question
      layer        MoE-layer index from 0
      expert       routed expert index in the layer
      u            Mann-Whitney U of the correct languages
      p            one-tailed p-value (correct greater)
      median_diff  median delta of correct minus wrong languages
      rank         1 = strongest
    Parquet and JSON also carry the analysis (run, model, parameters). The same analysis always gives
    the same bytes, ready for `xici ablate` or a steering tool.
    """
    lake.check_output(out)
    rows = lake.read(lambda con: export_experts(con, analysis_id, out))
    Console().print(f"Wrote {rows:,} experts of analysis {analysis_id} to {out}.", highlight=False)
