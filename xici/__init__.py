"""xici: find which experts of a Mixture-of-Experts LLM hold a fact, from cross-lingual inconsistency.

From Python (docs/python-api.md walks through it)::

    import xici
    xici.datasets.import_records("xici-lake", "mine", rows)    # or import_file(...)
    run = xici.record("xici-lake", model="path/to/moe", dataset="mine").run_id
    analysis = xici.analyze("xici-lake", run).analysis_ids[0]
    xici.ablate("xici-lake", analysis)
    xici.report("xici-lake")
    with xici.open("xici-lake") as lake:           # read-only unless read_only=False
        lake.sql("select lang, count(*) from sequences group by lang").df()
        weights = lake.routing(seq_id=1)           # tokens x MoE layers x experts
        experts = lake.experts(analysis)           # the expert sets, an Arrow table

The subpackages are the rooms of the pipeline, and data flows one way through them:
``corpora`` (datasets, graders) -> ``recorder`` -> ``warehouse`` (the lake: Zarr + DuckDB) -> ``sql`` views
-> ``analysis`` (expert sets) -> ``ablation`` -> reports. ``moe`` is the model registry shared by the
recorder and the ablation runner; ``testbed`` builds the planted-knowledge world; ``cli`` is the ``xici``
command, a thin layer over the functions here.
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

from xici import datasets
from xici import report as _report_package  # noqa: F401  (loaded first: see below)
from xici.errors import XiciError
from xici.pipeline import Analyses, DeactivationFailed, ablate, analyze, record, report
from xici.warehouse import Lake

# ``xici.report`` is the function; the subpackage of the same name is loaded above, before the function is
# bound, because Python sets a package's attribute to a subpackage when it first loads it.

__all__ = [
    "Analyses",
    "DeactivationFailed",
    "Lake",
    "XiciError",
    "ablate",
    "analyze",
    "datasets",
    "open",
    "record",
    "report",
]


def open(path: str | Path | None = None, *, read_only: bool = True) -> Lake:
    """Open the lake folder at ``path`` (the ``xici --lake`` folder; default, as there: ``$XICI_LAKE``, else
    ``./xici-lake``) as a :class:`Lake`.

    Read-only by default: queries, routing, tables and plots work, and anything that would write (recording,
    analysing, importing) is refused. ``read_only=False`` allows writing and creates the folder on first
    write. Use it in a ``with`` block, or call ``lake.close()``, so the relations ``lake.sql`` hands out
    release the warehouse file (see :mod:`xici.notebook` for what a held file means to a recording).
    """
    lake = Lake(path if path is not None else os.environ.get("XICI_LAKE", "xici-lake"), read_only=read_only)
    if read_only and not lake.warehouse_path.exists():
        raise XiciError(
            "there is no lake here",
            where=str(lake.root),
            fix="give the folder xici wrote (xici --lake); xici.open(path, read_only=False) starts a new one",
        )
    return lake
