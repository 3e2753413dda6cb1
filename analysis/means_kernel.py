"""The rows of ``seq_means`` for the sequences of one read of a run's gates, and their share of
``lang_means``, compiled with numba.

sql/gate_sums.sql, sql/seq_means.sql and sql/lang_means.sql over every row of ``token_gates`` are the
definition; this is the same arithmetic in one pass over the arrays as Zarr returns them, without building
the rows: per sequence, each weight's whole units of 2^-32 added into (layer, expert) bins as integers,
``m = round(sum / tokens)`` in those units (halves away from zero, as DuckDB's ``round``), then ``rank()``
of m within the sequence (from numpy's sort of the read's rows: numba's own sort was slower); per
language, the integers m and the frequencies ``n_selected / tokens`` added up. The integers are exact in
any order, so seq_means and the language means have the macros' bits (tests/test_token_scan.py checks);
the frequencies are sums of floats, added in a fixed order here (sequence after sequence within a read,
then read after read) and in whatever order DuckDB's threads take in the macro, so those two agree to the
last few bits.

Kept apart from :mod:`xici.analysis.means` so that importing numba and loading the compiled code (cached
beside this file, or in the user's cache where that is read-only) happens only when means are built.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from xici.analysis.means import UNITS


def _compiled(function: Callable) -> Callable:
    """``function`` compiled without the GIL, the machine code cached on disk; where no cache folder is
    writable (a read-only install and home), numba refuses to cache, and it is compiled in each process."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:
        return numba.njit(nogil=True)(function)


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


@_compiled
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
    column_bin = np.empty(width, np.int64)
    for c in range(width):
        column_bin[c] = (c // top_k) * n_experts
    sums = np.zeros(per_seq, np.int64)
    selected = np.zeros(per_seq, np.int32)
    token, rows = 0, 0
    for s in range(len(lengths)):
        n = lengths[s]
        exponents = 0  # the largest float16 exponent field: 31 is infinity or NaN
        finite = True
        for t in range(token, token + n):
            for c in range(width):
                if half:
                    exponents = max(exponents, int(weights[t, c]) & 0x7C00)
                else:
                    finite = finite and np.isfinite(weights[t, c])
                b = column_bin[c] + ids[t, c]
                sums[b] += _units(weights[t, c], half)
                selected[b] += 1
        if exponents == 0x7C00 or not finite:
            return -1 - s
        token += n
        seq_first_row[s] = rows
        for b in range(per_seq):
            if selected[b]:
                mean = sums[b] / n
                whole = np.floor(abs(mean))
                if abs(mean) - whole >= 0.5:
                    whole += 1.0
                if mean > 0 and whole > 0:  # m > 0 only (seq_means.sql)
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


@_compiled
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
