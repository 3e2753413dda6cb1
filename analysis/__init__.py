"""Stage 2 of XICI: which experts hold each question's fact (method.md, "Stage 2: identification").

Modules, in the order data flows:

- :mod:`~xici.analysis.means`: sequence and language means materialised once per run (``ensure_means``);
- :mod:`~xici.analysis.mwu`: the one-tailed Mann-Whitney U test for all experts at once, equal to scipy;
- :mod:`~xici.analysis.params`: parameters, model presets, sweeps and the analysis key;
- :mod:`~xici.analysis.identify`: tests per question, selection, and ``analyze`` (store or reuse);
- :mod:`~xici.analysis.summary`: Table 1/2-like summaries; :mod:`~xici.analysis.export`: expert sets to files.

The SQL these build on (views and macros over the warehouse) is the package :mod:`xici.sql`.
"""
