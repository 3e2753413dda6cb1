"""Assemble a report: choose what it is about, gather tables and figures, write the files.

Tables cover every record run of the lake (each with the analysis :func:`~xici.report.source.choose` picks
for it, the paper's one column per dataset and model); figures cover the chosen run and analysis. A part
the lake cannot fill yet (no grades, analysis, ablation or sweep) is replaced by one line saying what to
run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from xici import __version__
from xici.errors import XiciError
from xici.report import instruments
from xici.report.figures import (
    FIGURE_NAMES,
    Figure,
    ablated_experts_figure,
    ablation_figure,
    accuracy_figure,
    experts_per_layer_figure,
    sweep_figures,
)
from xici.report.render import Block, Heading, Text, markdown, page
from xici.report.source import Analysis, Choice, analyses_of, choose, is_default, reading, record_runs
from xici.report.tables import (
    ablation_table,
    analyses_table,
    consistency_table,
    describe,
    identification_table,
)
from xici.warehouse import Lake

REPORT_DIR = "report"


@dataclass(frozen=True)
class ReportFiles:
    """What a report wrote."""

    folder: Path
    markdown: Path
    html: Path
    figures: tuple[Path, ...]


def build_report(
    lake: Lake, out: Path | None = None, *, run_id: int | None = None, analysis_id: int | None = None
) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and the figures into ``out`` (default ``<lake>/report``)."""
    out = out if out is not None else lake.root / REPORT_DIR
    lake.check_output(out, folder=True)
    _check_own_folder(out)
    with reading(lake) as con:
        choice = choose(con, run_id, analysis_id)
        blocks = document(con, lake, choice)
    return write(blocks, out)


def _check_own_folder(out: Path) -> None:
    """A report writes, and replaces, files of fixed names in its folder (figures an older report left are
    removed): only a new or empty folder, or one an earlier report wrote, never someone's files."""
    if out.is_dir() and any(out.iterdir()) and not (out / "report.md").is_file():
        raise XiciError(
            f"the folder {out} holds other files and no earlier report",
            where="--out",
            fix="give a new or empty folder: the report writes report.md, report.html and its figures there, "
            "replacing those of an earlier report",
        )


def document(con: duckdb.DuckDBPyConnection, lake: Lake, choice: Choice) -> list[Block]:
    """The report's blocks, in reading order."""
    run, analysis = choice.run, choice.analysis
    choices = [choice if r.run_id == run.run_id else choose(con, r.run_id) for r in record_runs(con)]
    blocks: list[Block] = [Heading(1, "xici report"), *_header(lake, choice)]

    blocks += [Heading(2, "Consistency across languages"), consistency_table(con, [c.run for c in choices])]
    blocks.append(
        accuracy_figure(con, choice)
        or Text(
            f"Run {run.run_id} has no decided grades yet: `xici grade --run {run.run_id} --grader match`."
        )
    )

    blocks.append(Heading(2, "Identification"))
    identification = identification_table(con, choices)
    if identification.rows:
        blocks.append(identification)
    if analysis is None:
        blocks.append(Text(f"Run {run.run_id} has no analysis yet: `xici analyze --run {run.run_id}`."))
    else:
        blocks += _identification_figures(con, choice, analysis)

    blocks.append(Heading(2, "Ablation"))
    ablation = ablation_table(con, choices)
    if ablation.rows:
        blocks.append(ablation)
    if analysis is not None:
        blocks.append(
            ablation_figure(con, choice)
            or Text(
                f"Analysis {analysis.analysis_id} has no ablation yet: "
                f"`xici ablate --analysis {analysis.analysis_id}`."
            )
        )
    elif not ablation.rows:
        blocks.append(Text("No ablation yet: it needs an analysis first."))
    blocks += _instruments(con, run.run_id)
    return blocks


def _instruments(con: duckdb.DuckDBPyConnection, run_id: int) -> list[Block]:
    """Rival localizers, boost, per-expert necessity, paraphrases: where the lake has them."""
    parts = [
        instruments.localizers_table(con, run_id),
        instruments.localizers_figure(con, run_id),
        instruments.boost_table(con, run_id),
        instruments.necessity_table(con, run_id),
        instruments.set_size_table(con, run_id),
        instruments.paraphrase_table(con),
    ]
    found = [part for part in parts if part is not None]
    return [Heading(2, "Instruments"), *found] if found else []


def _header(lake: Lake, choice: Choice) -> list[Block]:
    run, analysis = choice.run, choice.analysis
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown = (
        f"Figures show {run.label}: architecture {run.architecture}, {run.n_moe_layers} MoE layers × "
        f"{run.n_experts} experts, top-{run.top_k}{' (still recording)' if run.status == 'running' else ''}"
    )
    if choice.grader is not None:
        shown += f"; grader `{choice.grader}`"
    if analysis is not None:
        default = "the model's default parameters" if is_default(run, analysis) else "non-default parameters"
        shown += f"; analysis {analysis.analysis_id} ({default}: {describe(analysis)})"
    return [
        Text(f"Lake `{lake.root.resolve()}`, made {made} by xici {__version__}."),
        Text(shown + ". Show others with `xici report --run N` or `xici report --analysis N`."),
    ]


def _identification_figures(
    con: duckdb.DuckDBPyConnection, choice: Choice, analysis: Analysis
) -> list[Block]:
    blocks: list[Block] = [
        figure
        for figure in (experts_per_layer_figure(con, choice), ablated_experts_figure(con, choice))
        if figure is not None
    ]
    if len(analyses_of(con, choice.run.run_id)) > 1:
        blocks.append(analyses_table(con, choice))
    blocks.append(Heading(3, "Parameter sweeps"))
    sweeps = sweep_figures(con, choice)
    blocks += sweeps or [
        Text(
            f"No sweep around analysis {analysis.analysis_id} yet, e.g. "
            f"`xici analyze --run {choice.run.run_id} --sweep tau=0.001,0.005,0.01`."
        )
    ]
    return blocks


def write(blocks: list[Block], out: Path) -> ReportFiles:
    """Write the files; figures an older report left in ``out`` that this one lacks are removed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in FIGURE_NAMES:
            (out / f"{name}.png").unlink(missing_ok=True)
        figures = []
        for block in blocks:
            if isinstance(block, Figure):
                path = out / f"{block.name}.png"
                path.write_bytes(block.png)
                figures.append(path)
        md_path, html_path = out / "report.md", out / "report.html"
        md_path.write_text(markdown(blocks), encoding="utf-8")
        html_path.write_text(page(blocks, "xici report"), encoding="utf-8")
    except OSError as exc:
        raise XiciError(
            f"cannot write the report ({exc.strerror})", where=str(out), fix="pass a writable --out folder"
        ) from None
    return ReportFiles(out, md_path, html_path, tuple(figures))
