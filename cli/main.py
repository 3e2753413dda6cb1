"""Entry point of the ``xici`` command.

Subcommands live one per module in this package and are imported only when used, so ``xici --help`` stays
fast even though recording pulls in torch. A :class:`~xici.errors.XiciError` from any of them is printed as
one paragraph and exits with status 1, never as a traceback; so is a fault of the machine (disk full, out
of memory) or a damaged warehouse met anywhere below.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from xici import __version__
from xici.errors import XiciError, machine_fault
from xici.warehouse import Lake

# command name -> "module:attribute" inside xici.cli
COMMANDS: dict[str, str] = {
    "ablate": "ablate:ablate",
    "analyze": "analyze:analyze",
    "datasets": "datasets:datasets",
    "demo": "demo:demo",
    "export": "export:export",
    "grade": "grade:grade",
    "lake": "lake:lake",
    "record": "record:record",
    "report": "report:report",
    "runs": "runs:runs",
    "sql": "sql:sql",
    "testbed": "testbed:testbed",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use, and that turns XiciError into a message."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"xici.cli.{module}"), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except XiciError as exc:
            raise click.ClickException(exc.message) from None
        except Exception as exc:
            fault = machine_fault(exc) or ctx.ensure_object(Lake).damage(exc)
            if fault is None:
                raise
            raise click.ClickException(fault.message) from None


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.option(
    "--lake",
    envvar="XICI_LAKE",
    default="./xici-lake",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Lake folder: the DuckDB warehouse and the Zarr store of token routing (env: XICI_LAKE).",
)
@click.version_option(__version__, prog_name="xici")
@click.pass_context
def cli(ctx: click.Context, lake: Path) -> None:
    """Find which experts of a Mixture-of-Experts LLM hold a fact, from its cross-lingual inconsistency.

    \b
    Typical session:
      xici datasets import eclektic data.csv --format eclektic
      xici record --model Qwen/Qwen3-30B-A3B --dataset eclektic
      xici analyze --run 1
      xici ablate --analysis 1
      xici report
    """
    ctx.obj = Lake(lake)


def main() -> None:
    cli(prog_name="xici")
