"""``xici record``: ask a dataset with a model and record the routing of every token into the lake."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from xici.cli.common import allow_changed_model, engine_options, pass_lake, ray_options
from xici.cli.grade import accuracy_table, judge_options
from xici.progress import console
from xici.recorder import BACKENDS, DTYPES
from xici.recorder.prompting import DEFAULT_SYSTEM
from xici.warehouse import Lake
from xici.warehouse.gates import GATE_DTYPES

if TYPE_CHECKING:
    from xici.recorder.run import RecordResult


def _languages(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(tag.strip() for tag in value.split(",") if tag.strip())


@click.command()
@click.option("--model", required=True, help="Checkpoint directory or hub id of a supported MoE model.")
@click.option("--dataset", required=True, help="Name of an imported dataset (xici datasets import).")
@click.option(
    "--languages", callback=_languages, help="Comma-separated language tags to ask in [default: all of them]."
)
@click.option("--limit", type=int, help="Only the first N questions (by question_id), in all languages.")
@click.option("--system", default=DEFAULT_SYSTEM, show_default=True, help="System turn; '' sends none.")
@click.option(
    "--prompt-template",
    help="Raw prompt with a {question} field instead of the chat template (for models without one).",
)
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Answer length limit.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts generated together.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="transformers",
    show_default=True,
    help="Engine that generates: transformers, or vLLM (pip install 'xici[vllm]'). Same lake either way.",
)
@engine_options
@ray_options
@click.option(
    "--gates-url",
    help="Keep this lake's token arrays at this fsspec URL (s3://bucket/lake/gates.zarr), reachable by every "
    "Ray worker; set once per lake [default: gates.zarr in the lake folder].",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="Model weights dtype; auto = bfloat16 on a GPU, float32 on the CPU.",
)
@click.option(
    "--gate-dtype",
    type=click.Choice(GATE_DTYPES),
    default="float16",
    show_default=True,
    help="Stored precision of gate weights (and logits).",
)
@click.option("--store-logits", is_flag=True, help="Also store the raw router logits of every expert.")
@click.option(
    "--grader", default="match", show_default=True, help="Grader: match, or judge (see xici grade)."
)
@allow_changed_model
@judge_options
@pass_lake
def record(lake: Lake, **options: Any) -> None:
    """Ask every question of a dataset in every language and record its routing, token by token.

    Greedy decoding with the model's chat template (thinking off) and the system instruction; each answer
    is graded (a thinking part the model writes anyway is cut off first and kept in the thinking table).
    For every token the model processes (the templated prompt, then the answer but its last token, which is
    never fed back) and every MoE layer, the top-k experts and their gate weights land in the lake. Running
    the same command again resumes the run where it stopped (a finished run is left as it is); --batch-size,
    --device and the vLLM engine options do not change which run it is, --backend does.

    With --backend vllm the routing is captured inside the vLLM engine (prefix caching off, so every token
    is computed and recorded); the lake is the same as with transformers (xici runs compare tells how close).

    With --ray the batches are asked by --workers engines on Ray (a local instance, or the cluster at
    --ray-address), each writing the token arrays of its batches to its own shard of the gate store, while
    this process alone writes the warehouse; the run is the same as without Ray (see docs/scale-out.md).

    The checkpoint's files are fingerprinted (names, sizes, hashes; weights from their headers and sampled
    blocks) and stored with the run: a run is resumed only with the same checkpoint files, unless
    --allow-changed-model.

    Progress is a bar on a terminal and one line per committed batch otherwise.
    """
    from xici.pipeline import record as run_record

    print_recorded(lake, run_record(lake, **options), options["grader"])


def print_recorded(lake: Lake, result: RecordResult, grader: str) -> None:
    """Say what a recording did, then its accuracy per language (``xici record`` and ``xici demo``)."""
    from xici.recorder.grading import accuracy

    if result.already_finished:
        click.echo(f"Run {result.run_id} is already finished ({result.n_units} units); nothing to do.")
    else:
        resumed = "" if result.created else f", resumed after {result.done_before} done"
        click.echo(f"Run {result.run_id}: recorded {result.recorded} of {result.n_units} units{resumed}.")
    scores = lake.read(lambda con: accuracy(con, result.run_id, grader))
    console.print(accuracy_table(scores, title=f"run {result.run_id}, grader {grader}"))
