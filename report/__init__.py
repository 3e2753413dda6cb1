"""``xici report``: the paper's tables and figures for any lake, as Markdown and self-contained HTML.

:func:`build_report` is the entry point; :mod:`~xici.report.source` picks the run and analysis and opens the
warehouse read-only, :mod:`~xici.report.tables` and :mod:`~xici.report.figures` hold the content, and
:mod:`~xici.report.render` writes it out. :mod:`~xici.report.plots` draws the notebook figures of
``lake.plot_routing`` and ``lake.plot_expert_map``.

The package imports nothing heavy itself (matplotlib loads with :mod:`~xici.report.build`): ``import xici``
loads it early, so that the function ``xici.report`` keeps its name when a submodule is imported later.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReportFiles", "build_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from xici.report import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
