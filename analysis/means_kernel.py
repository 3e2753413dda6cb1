"""The rows of ``seq_means`` for the sequences of one read of a run's gates, and their share of
``lang_means``, compiled with numba.

sql/gate_sums.sql, sql/seq_means.sql and sql/lang_means.sql over every row of ``token_gates`` are the
definition; this is the same arithmetic in one pass over the arrays as Zarr returns them, without building
the rows: per sequence, each weight's whole units of 2^-32 added into (layer, expert) bins as integers,
``m = round(sum / tokens)`` in those units (halves away from zero, as DuckDB's ``round``), ``rank()`` of m
within the sequence; per language, the integers m and the frequencies ``n_selected / tokens`` added up.
The integers are exact in any order, so seq_means and the language means have the macros' bits
(tests/test_token_scan.py checks); the frequencies are sums of floats, added in a fixed order here (sequence
after sequence within a read, then read after read) and in whatever order DuckDB's threads take in the
macro, so those two agree to the last few bits.

Kept apart from :mod:`xici.analysis.means` so that importing numba and loading the compiled code (cached
beside this file, or in the user's cache where that is read-only) happens only when means are built.
"""

from __future__ import annotations

import numba
import numpy as np

from xici.analysis.means import UNITS


@numba.njit(inline="always")
def _units(value: int | float, half: bool) -> int:
    """A gate weight in whole units of 2^-32: rounded as SQL's round() for float32 values; exact from
    the bits for float16 (``value`` is then the float16's bits, a multiple of 2^-24 at most 65504)."""
    if half:
        bits = int(value)
        exponent, mantissa = (bits >> 10) & 31, bits & 1023
        units = mantissa << 8 if exponent == 0 else (mantissa | 1024) << (exponent + 7)
        return -units if bits & 0x8000 else units
    scaled = float(value) * UNITS
    whole = np.floor(abs(scaled) + 0.5)
    return int(-whole if scaled < 0 else whole)


@numba.njit(nogil=True, cache=True)
def seq_means_rows(
    ids: np.ndarray,
    weights: np.ndarray,
    half: bool,
    n_experts: int,
    top_k: int,
    seq_ids: np.ndarray,
    lengths: np.ndarray,
    langs: np.ndarray,
    lang_units: np.ndarray,
    lang_frequency: np.ndarray,
    out_seq: np.ndarray,
    out_layer: np.ndarray,
    out_expert: np.ndarray,
    out_m: np.ndarray,
    out_rank: np.ndarray,
    out_selected: np.ndarray,
) -> int:
    """Fill the ``out_*`` arrays with the seq_means rows of the sequences ``seq_ids`` (``lengths`` tokens
    each, one after the other in ``ids`` and ``weights``, shaped [tokens, layers * top_k]) and add each
    row's m (whole units of 2^-32) and frequency into the bins of its language (``langs``, an index per
    sequence) in ``lang_units`` and ``lang_frequency`` ([languages * layers * experts]); returns how many
    rows, or ``-1 - i`` when sequence i holds a weight that is not a finite number."""
    width = ids.shape[1]
    per_seq = (width // top_k) * n_experts
    column_bin = np.empty(width, np.int64)
    for c in range(width):
        column_bin[c] = (c // top_k) * n_experts
    sums = np.zeros(per_seq, np.int64)
    selected = np.zeros(per_seq, np.int32)
    rounded = np.empty(per_seq, np.int64)
    kept_bins = np.empty(per_seq, np.int64)
    token, rows = 0, 0
    for s in range(len(lengths)):
        n = lengths[s]
        for t in range(token, token + n):
            for c in range(width):
                if half and (int(weights[t, c]) & 0x7C00) == 0x7C00:
                    return -1 - s
                if not half and not np.isfinite(weights[t, c]):
                    return -1 - s
                b = column_bin[c] + ids[t, c]
                sums[b] += _units(weights[t, c], half)
                selected[b] += 1
        token += n
        kept = 0
        for b in range(per_seq):
            if selected[b]:
                mean = sums[b] / n
                whole = np.floor(abs(mean))
                if abs(mean) - whole >= 0.5:
                    whole += 1.0
                if mean > 0 and whole > 0:  # m > 0 only (seq_means.sql)
                    rounded[kept] = np.int64(whole)
                    kept_bins[kept] = b
                    kept += 1
        # rank() over m descending: ties share the rank of the first of them.
        order = np.argsort(-rounded[:kept], kind="mergesort")
        rank = 1
        for i in range(kept):
            o = order[i]
            if i > 0 and rounded[o] != rounded[order[i - 1]]:
                rank = i + 1
            b, row = kept_bins[o], rows + o
            out_seq[row] = seq_ids[s]
            out_layer[row] = b // n_experts
            out_expert[row] = b % n_experts
            out_m[row] = rounded[o] / UNITS
            out_rank[row] = rank
            out_selected[row] = selected[b]
            lang_bin = langs[s] * per_seq + b
            lang_units[lang_bin] += rounded[o]
            lang_frequency[lang_bin] += selected[b] / n
        rows += kept
        sums[:] = 0
        selected[:] = 0
    return rows
