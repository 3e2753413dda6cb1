"""The lake opens in the DuckDB CLI people have: the ``duckdb`` binary of the ``duckdb-cli`` package (1.x).

xici writes the warehouse with DuckDB 2.0 in the storage format of DuckDB 1.4 (warehouse/db.py,
STORAGE_VERSION), which the 1.x CLIs read; a warehouse in DuckDB 2.0's own format is refused by them, and the
README's one-time conversion makes it readable.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import xici


def duckdb_cli() -> Path:
    """The duckdb-cli package's binary in this environment (a dev dependency of xici)."""
    binary = Path(sys.executable).parent / "duckdb"
    if not binary.exists():
        pytest.fail("the duckdb-cli package is not installed: pip install -e '.[dev]'")
    return binary


def run_cli(warehouse: Path, query: str) -> subprocess.CompletedProcess[str]:
    """The README's command line: ``duckdb <lake>/warehouse.duckdb "<query>"``, as CSV."""
    return subprocess.run(
        [str(duckdb_cli()), "-csv", str(warehouse), query], capture_output=True, text=True, timeout=120
    )


def rows(output: str) -> list[list[str]]:
    return [line.split(",") for line in output.strip().splitlines()[1:]]


def test_the_cli_is_a_1x_release() -> None:
    version = subprocess.run([str(duckdb_cli()), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("v1."), version.stdout


def test_the_readme_query_runs_in_the_plain_cli(testbed_lake: tuple[Path, int, int], tmp_path: Path) -> None:
    root, _, _ = testbed_lake
    copy = tmp_path / "warehouse.duckdb"  # the CLI opens the file for writing: leave the shared lake alone
    shutil.copy(root / "warehouse.duckdb", copy)
    query = "select * from blacklist(1, 0.01, 0.05) order by all"
    out = run_cli(copy, query)
    assert out.returncode == 0, out.stderr
    with xici.open(root) as lake:
        want = lake.sql(query).fetchall()
    assert want, "the testbed run has generalist experts to blacklist"
    assert rows(out.stdout) == [[str(v) for v in row] for row in want]
    counts = run_cli(
        copy, "select lang, count(*) from sequences join grades using (seq_id) group by 1 order by 1"
    )
    assert counts.returncode == 0, counts.stderr
    assert len(rows(counts.stdout)) == 12


def test_a_warehouse_in_duckdb_2_format_converts_once(
    testbed_lake: tuple[Path, int, int], tmp_path: Path
) -> None:
    """A lake written before xici chose the 1.4 format: the 1.x CLI refuses it until it is converted."""
    root, _, _ = testbed_lake
    old = tmp_path / "lake" / "warehouse.duckdb"
    old.parent.mkdir()
    con = duckdb.connect()
    con.execute(f"attach '{root / 'warehouse.duckdb'}' as source (read_only)")
    con.execute(f"attach '{old}' as old (storage_version 'latest')")
    con.execute("copy from database source to old")
    con.close()
    refused = run_cli(old, "select count(*) from runs")
    assert refused.returncode != 0 and "version number" in refused.stderr

    # The README's conversion, as written there.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "copy from database" in line)
    script = command.replace("xici-lake", str(old.parent)).strip()
    subprocess.run(
        ["bash", "-c", f"cd {tmp_path} && {script.replace('python ', sys.executable + ' ')}"], check=True
    )
    out = run_cli(old, "select count(*) from sequences")
    assert out.returncode == 0, out.stderr
    assert rows(out.stdout) == [[str(xici.open(root).sql("select count(*) from sequences").fetchall()[0][0])]]
