"""``xici testbed``: build the planted-knowledge testbed (a synthetic world and a tiny MoE trained on it)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from xici.progress import progress_bar
from xici.testbed.families import families
from xici.testbed.train import ModelConfig, build_testbed
from xici.testbed.world import WorldConfig

MODEL, WORLD = ModelConfig(), WorldConfig()


def _defaults(field: str) -> str:
    """A ModelConfig field's default per family, for the help text."""
    return ", ".join(f"{arch} {getattr(ModelConfig(arch=arch), field)}" for arch in families())


@click.group()
def testbed() -> None:
    """The planted-knowledge testbed: a synthetic multilingual world and a tiny MoE that knows it unevenly."""


@testbed.command("build")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default="./xici-testbed",
    show_default=True,
    help="Folder to write the checkpoint, dataset.jsonl and accuracies.json to.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes the world and the training.")
@click.option(
    "--arch",
    type=click.Choice(list(families())),
    default=MODEL.arch,
    show_default=True,
    help="Model family: Qwen3-MoE (softmax gates) or GLM4-MoE (sigmoid gates with a selection bias, "
    "a dense first layer, optional shared experts).",
)
@click.option("--experts", type=int, help=f"Routed experts per MoE layer.  [default: {MODEL.experts}]")
@click.option("--top-k", type=int, help=f"Experts routed per token.  [default: {MODEL.top_k}]")
@click.option(
    "--shared-experts",
    type=int,
    help="Always-on shared experts per MoE layer (glm4-moe only; 0 for none).  [default: 0]",
)
@click.option("--layers", type=int, help=f"Decoder layers.  [default: {_defaults('layers')}]")
@click.option("--steps", type=int, help=f"Training steps.  [default: {_defaults('steps')}]")
@click.option(
    "--entities", type=click.IntRange(min=1), default=WORLD.n_entities, show_default=True, help="Entities."
)
@click.option(
    "--languages", type=click.IntRange(min=2), default=WORLD.n_languages, show_default=True, help="Languages."
)
def build(
    out: Path, seed: int, arch: str, entities: int, languages: int, **model_options: int | None
) -> None:
    """Generate a world, train a tiny MoE on it (CPU, one thread) and measure it per language.

    \b
    The same seed and options give the same checkpoint bytes on the same kind of machine. The defaults
    are those of the checkpoint that ships with xici (xici/testbed/checkpoint, Qwen3-MoE routing 2 of 64
    experts, about 3 minutes); --arch glm4-moe has defaults of its own (testbed/README.md). Then:
      xici datasets import testbed OUT/dataset.jsonl --format jsonl
      xici record --model OUT --dataset testbed
    """
    world_config = WorldConfig(n_entities=entities, n_languages=languages)
    given = {name: value for name, value in model_options.items() if value is not None}
    model_config = ModelConfig(arch=arch, **given)
    with progress_bar() as bar:
        task = bar.add_task("Training", total=model_config.steps)
        paths = build_testbed(
            out,
            seed=seed,
            world_config=world_config,
            model_config=model_config,
            on_step=lambda step, loss: bar.update(
                task, completed=step + 1, description=f"Training (loss {loss:.3f})"
            ),
        )

    accuracies = json.loads(paths.accuracies.read_text())["per_language"]
    table = Table(title="Accuracy per language (greedy, match grader)")
    table.add_column("language")
    table.add_column("accuracy", justify="right")
    for lang, accuracy in accuracies.items():
        table.add_row(lang, f"{accuracy:.1%}")
    console = Console()
    console.print(table)
    console.print(f"Checkpoint: {paths.checkpoint}\nDataset: {paths.dataset}\nAccuracies: {paths.accuracies}")


@testbed.command("paraphrases")
@click.option(
    "--testbed",
    "folder",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A testbed folder written by `xici testbed build`.  [default: the one shipped with xici]",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default="./paraphrases.jsonl",
    show_default=True,
    help="JSONL file to write (the jsonl dataset format).",
)
def paraphrases(folder: Path | None, out: Path) -> None:
    """Write the same questions as same-language paraphrases: the pivot language in several templates.

    \b
    Each template is a variant tagged x-para0, x-para1, ... (x-para0 is the pivot's own wording); the
    question ids and answers are those of the testbed's cross-lingual dataset, so a lake that records both
    shows them side by side in `xici report` (the paper's Table 3: languages against paraphrases):
      xici testbed paraphrases --out para.jsonl
      xici datasets import testbed-para para.jsonl --format jsonl
      xici record --model TESTBED --dataset testbed-para
    """
    from xici.testbed.train import shipped_testbed
    from xici.testbed.world import PARAPHRASE_TEMPLATES, world_of

    rows = world_of(folder or shipped_testbed().checkpoint).paraphrase_rows()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    questions = len({row["question_id"] for row in rows})
    click.echo(f"{questions} questions x {len(PARAPHRASE_TEMPLATES)} paraphrase templates: {out}")
