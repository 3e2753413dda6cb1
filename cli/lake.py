"""``xici lake check``: is the lake whole? A read-only consistency check, one line per check."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from xici.cli.common import pass_lake
from xici.progress import progress_bar
from xici.warehouse import Lake

if TYPE_CHECKING:
    from xici.warehouse.check import Finding


@click.group()
def lake() -> None:
    """The lake as a whole: check it."""


@lake.command()
@pass_lake
def check(lake: Lake) -> None:
    """Check the lake without changing anything (an fsck); exit status 0 only when every check holds.

    \b
    schema     the warehouse's schema version (an older one is migrated by the next command that writes)
    identity   the gate store is this lake's (and, when not, which runs it holds)
    tokens     every committed sequence's tokens are in the gate store, every chunk present and intact
    orphans    no arrays of unknown runs, no shard without a committed sequence, nothing past the
               committed tokens of a finished run
    running    no run left 'running' by a process that is gone
    analyses   no stored analysis whose run's sequences or grades changed since it was made

    Chunks with checksums are checked without decompressing them; older ones (written before checksums)
    are decoded.
    """
    from xici.analysis.identify import changed_analyses
    from xici.warehouse.check import Finding, check_lake, open_as_is, without_warehouse

    if not lake.warehouse_path.exists():
        _report(lake, without_warehouse(lake))
    con = open_as_is(lake)
    try:
        with progress_bar(transient=True) as bar:
            task = bar.add_task("checking token chunks", total=None)
            findings = check_lake(
                lake, con, on_tokens=lambda done, total: bar.update(task, completed=done, total=total)
            )
        if findings[0].ok:  # a schema this xici knows
            changed = changed_analyses(con)
            listed = ", ".join(f"analysis {a} (run {r})" for a, r in changed)
            detail = f"{listed}: analyse the run again" if changed else "none whose inputs changed"
            findings.append(Finding("analyses", not changed, detail))
    finally:
        con.close()
    _report(lake, findings)


def _report(lake: Lake, findings: list[Finding]) -> None:
    """Print the findings as a table; exit with status 1 unless every one holds."""
    table = Table(title=f"lake check: {lake.root}")
    for header in ("check", "", "found"):
        table.add_column(header, overflow="fold")
    for finding in findings:
        table.add_row(finding.check, "[green]ok[/]" if finding.ok else "[red]FAIL[/]", finding.detail)
    Console().print(table)
    failed = [f.check for f in findings if not f.ok]
    if failed:
        click.echo(f"The lake check failed: {', '.join(failed)}.", err=True)
        raise SystemExit(1)
