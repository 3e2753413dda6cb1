"""The rows of ``seq_means`` for the sequences of one read of a run, and their share of ``lang_means``,
compiled with numba: from the gate sums recorded with the sequences (:func:`seq_means_from_sums`, the usual
way), or from the gates themselves for runs recorded without them (:func:`seq_means_rows`).

sql/gate_sums.sql, sql/seq_means.sql and sql/lang_means.sql over every row of ``token_gates`` are the
definition; this is the same arithmetic in one pass over the arrays as Zarr returns them, without building
the rows (the gate sums of :mod:`xici.warehouse.sums_kernel` are its first half, done as a run is
recorded): per sequence, each weight's whole units of 2^-32 added into (layer, expert) bins as integers,
``m = round(sum / tokens)`` in those units (halves away from zero, as DuckDB's ``round``), then ``rank()``
of m within the sequence (from the gates: numpy's sort of the read's rows, numba's own sort was slower;
from the sums: in one pass, as they are sorted); per
language, the integers m and the frequencies ``n_selected / tokens`` added up. The integers are exact in
any order, so seq_means and the language means have the macros' bits (tests/test_token_scan.py checks);
the frequencies are sums of floats, added in a fixed order here (sequence after sequence within a read,
then read after read) and in whatever order DuckDB's threads take in the macro, so those two agree to the
last few bits.

Kept apart from :mod:`xici.analysis.means` so that importing numba and loading the compiled code (cached
beside this file, or in the user's cache where that is read-only) happens only when means are built.
"""

from __future__ import annotations

import numpy as np

from xici.warehouse.sums_kernel import add_tokens, column_bins, compiled, mean_units


@compiled
def seq_means_rows(
    ids: np.ndarray,
    weights: np.ndarray,
    half: bool,
    n_experts: int,
    top_k: int,
    lengths: np.ndarray,
    langs: np.ndarray,
    lang_units: np.ndarray,
    lang_frequency: np.ndarray,
    out_seq: np.ndarray,
    out_bin: np.ndarray,
    out_units: np.ndarray,
    out_selected: np.ndarray,
    seq_first_row: np.ndarray,
) -> int:
    """The seq_means rows of the sequences of a read (``lengths`` tokens each, one after the other in
    ``ids`` and ``weights``, shaped [tokens, layers * top_k]), their rank left out: per row the sequence
    (an index into ``lengths``), the bin (layer * n_experts + expert), m in whole units of 2^-32 and
    n_selected, sequence after sequence (``seq_first_row``: the first row of each); each row's m and
    frequency are also added into the bins of its language (``langs``, an index per sequence) in
    ``lang_units`` and ``lang_frequency`` ([languages * layers * experts]). Returns how many rows, or
    ``-1 - i`` when sequence i holds a weight that is not a finite number."""
    width = ids.shape[1]
    per_seq = (width // top_k) * n_experts
    column_bin = column_bins(width, top_k, n_experts)
    sums = np.zeros(per_seq, np.int64)
    selected = np.zeros(per_seq, np.int32)
    token, rows = 0, 0
    for s in range(len(lengths)):
        n = lengths[s]
        if not add_tokens(ids, weights, half, column_bin, token, n, sums, selected):
            return -1 - s
        token += n
        seq_first_row[s] = rows
        for b in range(per_seq):
            if selected[b]:
                whole = mean_units(sums[b], n)
                if whole > 0:  # m > 0 only (seq_means.sql)
                    out_seq[rows] = s
                    out_bin[rows] = b
                    out_units[rows] = np.int64(whole)
                    out_selected[rows] = selected[b]
                    lang_bin = langs[s] * per_seq + b
                    lang_units[lang_bin] += np.int64(whole)
                    lang_frequency[lang_bin] += selected[b] / n
                    rows += 1
                sums[b] = 0
                selected[b] = 0
    return rows


@compiled
def ranks(order: np.ndarray, seq: np.ndarray, units: np.ndarray, seq_first_row: np.ndarray) -> np.ndarray:
    """rank() of m descending within each sequence (ties share the rank of the first of them), given
    ``order``: the rows sorted by sequence, then m descending."""
    out = np.empty(len(order), np.int32)
    rank = 1
    for i in range(len(order)):
        row = order[i]
        first = seq_first_row[seq[row]]
        if i == first or units[row] != units[order[i - 1]]:
            rank = i - first + 1
        out[row] = rank
    return out

