"""``xici demo``: the whole method on the planted-knowledge testbed that ships with xici.

It runs the same steps a researcher runs on a real model (import, record, grade, analyse, ablate with both
baselines, report), each through the function behind its own subcommand, so the demo is also a living
example of the pipeline. Every step is resumable and idempotent: running the demo again reuses what the lake
already holds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click
from rich.panel import Panel

from xici.ablation.conditions import BASELINES, NONE, XICI
from xici.ablation.metrics import MetricsRow
from xici.cli.common import pass_lake
from xici.errors import XiciError
from xici.progress import console
from xici.warehouse import Lake

DATASET = "testbed"
# Testbed answers are one value word then the end of turn: a few tokens leave room for a wrong ramble.
MAX_NEW_TOKENS = 8


def import_once(lake: Lake, name: str, dataset: Path) -> None:
    """Import the testbed questions unless this exact file is already in the lake under ``name``."""
    from xici.corpora.store import import_dataset, list_datasets

    digest = hashlib.sha256(dataset.read_bytes()).hexdigest()
    known = {info.name: info for info in list_datasets(lake)} if lake.warehouse_path.exists() else {}
    if name in known:
        if known[name].source_sha256 != digest:
            raise XiciError(
                f"this lake already has a different dataset named {name!r}",
                where=str(lake.root),
                fix="run the demo with another --lake, or give --dataset-name",
            )
        click.echo(f"Dataset {name!r} is already imported.")
        return
    summary = import_dataset(lake, name, dataset, "jsonl")
    click.echo(
        f"Imported {name!r}: {summary.questions} questions in {summary.languages} languages "
        f"({summary.prompts} prompts)."
    )


def _verdict(rows: list[MetricsRow], seed: int) -> str:
    """One line comparing XICI's rate difference with each baseline's (drawn with ``seed``)."""
    pooled = [row for row in rows if row.seed in (None, seed) and row.metrics.rate_diff is not None]
    xici = next((row for row in pooled if row.condition == XICI), None)
    if xici is None:
        return "No question had experts to ablate."
    parts = [f"XICI rate difference {xici.metrics.rate_diff:.1%}"]
    for base in pooled:
        gap = base.metrics.rate_diff
        if base.condition == NONE:
            parts.append(f"noise floor (nothing off) ASR {base.metrics.asr:.1%}, SGR {base.metrics.sgr:.1%}")
        elif base.condition != XICI:
            times = f"{xici.metrics.rate_diff / gap:.1f}x" if gap > 0 else "no effect beyond chance"
            parts.append(f"{base.label} {gap:.1%} ({times})")
    return "; ".join(parts) + "."


@click.command()
@click.option(
    "--testbed",
    "folder",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A testbed folder written by `xici testbed build`.  [default: the one shipped with xici]",
)
@click.option("--dataset-name", default=DATASET, show_default=True, help="Name of the dataset in the lake.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts generated together.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the baselines' draws.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder.  [default: <lake>/report]",
)
@pass_lake
def demo(
    lake: Lake,
    folder: Path | None,
    dataset_name: str,
    batch_size: int,
    device: str,
    seed: int,
    out: Path | None,
) -> None:
    """Run XICI end to end on the planted-knowledge testbed: record, analyse, ablate, report.

    The testbed is a tiny Qwen3-MoE trained on synthetic facts in synthetic languages (tags x-...), some of
    which it recalls and some not: the cross-lingual inconsistency XICI needs. The demo imports its
    questions, records the model's answers and routing, finds each question's experts, switches them off
    (and, as baselines, random sets from the analysed layers, shuffled sets, and nothing at all: the noise
    floor) and writes the report. Takes a few minutes on a CPU; running it again reuses everything already
    in the lake.
    """
    import torch

    from xici import pipeline
    from xici.cli.ablate import print_ablation
    from xici.cli.analyze import print_analyses
    from xici.cli.record import print_recorded
    from xici.testbed.train import TestbedPaths, shipped_testbed

    # The testbed model is tiny: one CPU thread is as fast as two, and two were seen to stall
    # intermittently on small machines (denormals and thread contention), so the demo pins one.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    paths = TestbedPaths.in_folder(folder) if folder else shipped_testbed()
    if not paths.dataset.exists() or not (paths.checkpoint / "config.json").exists():
        raise XiciError(
            "the testbed folder has no trained checkpoint and dataset",
            where=str(paths.checkpoint),
            fix="build one with: xici testbed build --out DIR, then pass --testbed DIR",
        )
    console.rule("1/5  dataset")
    import_once(lake, dataset_name, paths.dataset)

    console.rule("2/5  record: answers, grades and routing of every token")
    recorded = pipeline.record(
        lake,
        model=str(paths.checkpoint),
        dataset=dataset_name,
        max_new_tokens=MAX_NEW_TOKENS,
        dtype="float32",
        device=device,
        batch_size=batch_size,
    )
    print_recorded(lake, recorded, "match")

    console.rule("3/5  analyse: experts per question")
    analyses = pipeline.analyze(lake, recorded.run_id)
    print_analyses(analyses)
    (analysis_id,) = analyses.analysis_ids

    console.rule("4/5  ablate: XICI experts, random sets, shuffled sets, nothing off")
    result = pipeline.ablate(
        lake, analysis_id, baselines=BASELINES, seed=seed, batch_size=batch_size, device=device
    )
    print_ablation(lake, result, {})

    console.rule("5/5  report")
    files = pipeline.report(lake, out, run=recorded.run_id, analysis=analysis_id)
    console.print(
        Panel(
            f"{_verdict(result.metrics, seed)}\nReport: {files.html}",
            title="xici demo",
            expand=False,
        )
    )
