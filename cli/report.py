"""``xici report``: the paper's tables and figures for a lake, as Markdown and one self-contained HTML."""

from __future__ import annotations

from pathlib import Path

import click

from xici.cli.common import pass_lake
from xici.pipeline import report as build
from xici.warehouse import Lake


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for report.md, report.html and the figures.  [default: <lake>/report]",
)
@click.option("--run", "run_id", type=int, help="Record run the figures show.  [default: the newest]")
@click.option(
    "--analysis",
    "analysis_id",
    type=int,
    help="Analysis the figures show.  [default: the run's newest with default parameters]",
)
@pass_lake
def report(lake: Lake, out: Path | None, run_id: int | None, analysis_id: int | None) -> None:
    """Write the consistency, identification and ablation tables and their figures.

    \b
    Tables cover every record run of the lake (each with its default analysis; the paper's Tables 1-2);
    figures cover one run and analysis: accuracy per language, identified experts per layer, the share of
    experts ablated, parameter sweeps, and the ablation against its baselines. Parts the lake cannot fill
    yet say what to run. The HTML embeds its figures, so the one file can be shared as it is.
    """
    files = build(lake, out, run=run_id, analysis=analysis_id)
    click.echo(f"Report written to {files.folder}/")
    click.echo(f"  {files.html.name}  (self-contained: open it in a browser)")
    click.echo(f"  {files.markdown.name}")
    for path in files.figures:
        click.echo(f"  {path.name}")
