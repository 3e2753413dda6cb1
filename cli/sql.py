"""``xici sql``: query the warehouse, with the per-token routing of the Zarr store as SQL relations."""

from __future__ import annotations

from pathlib import Path

import click
import duckdb
from rich.console import Console
from rich.table import Table

from xici.cli.common import pass_lake
from xici.progress import progress_bar
from xici.warehouse import Lake
from xici.warehouse.query import copy_to, query_connection, query_error, statement
from xici.warehouse.scan import ScanStats


@click.command()
@click.argument("query")
@click.option(
    "--run", "run_ids", type=int, multiple=True, help="Restrict the token relations to this run (repeatable)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result to a file instead: .csv, .parquet, .json (one array) or .jsonl.",
)
@click.option(
    "--allow-read",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    help="A file or folder of your own the query may read, besides the current folder (repeatable).",
)
@click.option("--max-rows", type=int, default=50, show_default=True, help="Rows shown in the table.")
@pass_lake
def sql(
    lake: Lake,
    query: str,
    run_ids: tuple[int, ...],
    out: Path | None,
    allow_read: tuple[Path, ...],
    max_rows: int,
) -> None:
    """Run a read-only SQL QUERY on the warehouse and show the result as a table.

    \b
    Tables: datasets, questions, prompts, runs, sequences, grades, ... (the warehouse is a plain DuckDB
    file: `duckdb xici-lake/warehouse.duckdb` opens it too, without the token relations).
    Token relations, read from the Zarr store when the query names them (any number of times):
      tokens(seq_id, pos, token_id)
      token_gates(seq_id, pos, layer, expert, weight)    one row per selected expert
      token_logits(seq_id, pos, layer, expert, logit)    runs recorded with --store-logits
    `layer` counts MoE layers from 0 (runs.params ->> 'moe_layers' maps them to blocks). Filters on
    seq_id and pos, also on sequences joined on seq_id (question_id, lang, run_id), read only those
    tokens; anything else reads them all.
    \b
    Only reading is possible: one SELECT (or EXPLAIN, DESCRIBE, SHOW, a describing PRAGMA); ATTACH,
    COPY, SET, INSTALL, LOAD and every statement that writes are refused. Files the query may read: the
    current folder and --allow-read paths (e.g. read_parquet('mine.parquet')); the one file it writes
    is --out, which may not be inside the lake's warehouse or gate store.
    \b
    Example:
      xici sql "select lang, count(*) from sequences group by lang"
    """
    text = statement(query)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("tokens read from Zarr", total=None)
        stats = ScanStats(on_change=lambda s: bar.update(task, total=s.planned, completed=s.read))
        con = query_connection(lake, text, run_ids, out=out, allow_read=allow_read, stats=stats)
        try:
            try:
                if out is not None:
                    written = copy_to(con, text, out)
                else:
                    cursor = con.execute(text)
                    columns = None if cursor.description is None else [d[0] for d in cursor.description]
                    rows = [] if columns is None else cursor.fetchmany(max_rows + 1)
            except duckdb.Error as exc:
                raise query_error(exc) from None
        finally:
            con.close()
    if out is not None:
        click.echo(f"Wrote {written} rows to {out}.")
        return
    if columns is None:
        click.echo("Done (the statement returns no rows).")
        return
    table = Table(*columns)
    for row in rows[:max_rows]:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    console = Console()
    console.print(table)
    if len(rows) > max_rows:
        console.print(f"Showing the first {max_rows} rows; there are more (--max-rows N, or --out FILE).")
