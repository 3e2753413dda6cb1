"""A sequence's gate sums (what sql/gate_sums.sql gives for it), computed as its tokens are appended, with
numba.

Per sequence and (layer, expert) the tokens selected it in: the sum of their weights in whole units of 2^-32
(each weight rounded as gate_sums.sql does, then added as integers: exact in any order) and how many. The
rows of a sequence come sorted by the sum, largest first (then by layer and expert), which is the order of
its means, so that the means build ranks them in one pass (:mod:`xici.analysis.means_kernel`).

Loaded only when sums are written or means built: importing numba and loading the compiled code (cached
beside this file, or in the user's cache where that is read-only) costs about a second.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
import pyarrow as pa

from xici.warehouse.gates import SEQ_MEANS, UNITS


def compiled(function: Callable) -> Callable:
    """``function`` compiled without the GIL, the machine code cached on disk; where no cache folder is
    writable (a read-only install and home), numba refuses to cache, and it is compiled in each process."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:
        return numba.njit(nogil=True)(function)


@numba.njit(inline="always")
def units(value: int | float, half: bool) -> int:
    """A gate weight in whole units of 2^-32: rounded as SQL's round() for float32 values; exact from
    the bits for float16 (``value`` is then the float16's bits, a multiple of 2^-24 at most 65504)."""
    if half:
        bits = int(value)
        exponent, mantissa = (bits >> 10) & 31, bits & 1023
        whole = mantissa << 8 if exponent == 0 else (mantissa | 1024) << (exponent + 7)
        return -whole if bits & 0x8000 else whole
    scaled = float(value) * UNITS
    whole = np.floor(abs(scaled) + 0.5)
    return int(-whole if scaled < 0 else whole)


@numba.njit(inline="always")
def finite(value: int | float, half: bool) -> bool:
    """Whether a gate weight (a float16's bits when ``half``) is a finite number."""
    if half:
        return (int(value) & 0x7C00) != 0x7C00
    return np.isfinite(value)


@numba.njit(inline="always")
def add_tokens(
    ids: np.ndarray,
    weights: np.ndarray,
    half: bool,
    column_bin: np.ndarray,
    first: int,
    n: int,
    sums: np.ndarray,
    selected: np.ndarray,
) -> bool:
    """Add the weights of tokens ``[first, first + n)`` into their (layer, expert) bins as whole units
    (``column_bin``: the first bin of each column's layer), and count the tokens that selected each bin;
    returns whether every weight was a finite number."""
    ok = True
    for t in range(first, first + n):
        for c in range(ids.shape[1]):
            ok = ok and finite(weights[t, c], half)
            b = column_bin[c] + ids[t, c]
            sums[b] += units(weights[t, c], half)
            selected[b] += 1
    return ok


@numba.njit(inline="always")
def column_bins(width: int, top_k: int, n_experts: int) -> np.ndarray:
    """The first bin of each column's layer, for arrays shaped [tokens, layers * top_k]."""
    out = np.empty(width, np.int64)
    for c in range(width):
        out[c] = (c // top_k) * n_experts
    return out


@numba.njit(inline="always")
def mean_units(total: int, n: int) -> float:
    """m in whole units of 2^-32: ``total / n`` rounded halves away from zero, as seq_means.sql's
    ``round()``; positive only where m > 0 (the rows seq_means keeps)."""
    mean = total / n
    whole = np.floor(abs(mean))
    if abs(mean) - whole >= 0.5:
        whole += 1.0
    return whole if mean > 0 else -whole


@compiled
def _sequence_sums(
    ids: np.ndarray,
    weights: np.ndarray,
    half: bool,
    n_experts: int,
    top_k: int,
    lengths: np.ndarray,
    out: np.ndarray,
    counts: np.ndarray,
) -> int:
    """The gate sums of sequences laid one after the other (``lengths`` tokens each) in ``ids`` and
    ``weights`` ([tokens, layers * top_k]) into ``out`` ([rows, 3]: bin = layer * n_experts + expert,
    weight sum in units, n_selected), each sequence's rows sorted by the sum descending, then bin; its row
    count into ``counts``, -1 for a sequence holding a weight that is not a finite number (no rows).
    Returns the rows written."""
    width = ids.shape[1]
    per_seq = (width // top_k) * n_experts
    column_bin = column_bins(width, top_k, n_experts)
    sums = np.zeros(per_seq, np.int64)
    selected = np.zeros(per_seq, np.int64)
    used = np.empty(per_seq, np.int64)
    token, rows = 0, 0
    for s in range(len(lengths)):
        n = lengths[s]
        ok = add_tokens(ids, weights, half, column_bin, token, n, sums, selected)
        token += n
        k = 0
        for b in range(per_seq):  # ascending bins: the stable sort below keeps them so among equal sums
            if selected[b]:
                used[k] = b
                k += 1
        order = np.argsort(-sums[used[:k]], kind="mergesort")
        for i in range(k):
            b = used[order[i]]
            if ok:
                out[rows + i, 0] = b
                out[rows + i, 1] = sums[b]
                out[rows + i, 2] = selected[b]
            sums[b] = 0
            selected[b] = 0
        if ok:
            counts[s] = k
            rows += k
        else:
            counts[s] = -1
    return rows


def sequence_sums(
    ids: np.ndarray, weights: np.ndarray, n_experts: int, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The gate sums of sequences (``lengths`` tokens each, one after the other) from their top-k expert ids
    and weights ([tokens, layers, top_k]) as stored: the rows ([rows, 3] int64, see the module notes) and
    each sequence's row count (-1: a weight that is not a finite number, no rows)."""
    tokens, n_layers, top_k = ids.shape
    if tokens and int(ids.max()) >= n_experts:
        raise ValueError(f"a token is routed to expert {int(ids.max())}, but the run's model has {n_experts}")
    half = weights.dtype == np.float16
    out = np.empty((min(ids.size, len(lengths) * n_layers * n_experts), 3), np.int64)
    counts = np.empty(len(lengths), np.int64)
    rows = _sequence_sums(
        ids.reshape(tokens, -1),
        (weights.view(np.uint16) if half else weights).reshape(tokens, -1),
        half,
        n_experts,
        top_k,
        np.asarray(lengths, np.int64),
        out,
        counts,
    )
    return out[:rows], counts


@compiled
def seq_means_from_sums(
    sums: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    lengths: np.ndarray,
    seq_ids: np.ndarray,
    langs: np.ndarray,
    n_experts: int,
    per_lang: int,
    emit: bool,
    lang_units: np.ndarray,
    lang_frequency: np.ndarray,
    out_seq: np.ndarray,
    out_layer: np.ndarray,
    out_expert: np.ndarray,
    out_m: np.ndarray,
    out_rank: np.ndarray,
    out_selected: np.ndarray,
) -> int:
    """The seq_means rows of sequences from their gate sums as recorded (:mod:`xici.warehouse.sums_kernel`:
    rows ``[starts[s], starts[s] + counts[s])`` of ``sums`` for sequence s of ``lengths`` tokens), rank
    included: the rows come sorted by the sum, largest first, so m (rounded from it, which keeps the order)
    is ranked in one pass; the rows written only when ``emit``; with ``per_lang`` (bins per language), each
    row's m and frequency also added into the bins of its language (``langs``, an index per sequence). The
    same m, ranks and language means as the means kernel over the gates
    (:func:`xici.analysis.means_kernel.seq_means_rows`; the frequencies, sums of floats added in another
    order, to the last bits). Returns how many rows."""
    rows = 0
    for s in range(len(counts)):
        n, kept, rank, previous = lengths[s], 0, 0, np.int64(-1)
        for i in range(starts[s], starts[s] + counts[s]):
            b, selected = sums[i, 0], sums[i, 2]
            whole = mean_units(sums[i, 1], n)
            if whole > 0:  # m > 0 only (seq_means.sql)
                m = np.int64(whole)
                kept += 1
                if m != previous:
                    rank, previous = kept, m
                if emit:
                    out_seq[rows] = seq_ids[s]
                    out_layer[rows] = b // n_experts
                    out_expert[rows] = b % n_experts
                    out_m[rows] = m / UNITS
                    out_rank[rows] = rank
                    out_selected[rows] = selected
                if per_lang:
                    lang_bin = langs[s] * per_lang + b
                    lang_units[lang_bin] += m
                    lang_frequency[lang_bin] += selected / n
                rows += 1
    return rows


def seq_means(
    sums: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    lengths: np.ndarray,
    seq_ids: np.ndarray,
    n_experts: int,
    *,
    langs: np.ndarray | None = None,
    per_lang: int = 0,
    lang_units: np.ndarray | None = None,
    lang_frequency: np.ndarray | None = None,
    emit: bool = True,
) -> pa.RecordBatch:
    """The seq_means rows (less run_id) of sequences from their gate sums (rows ``starts`` to ``starts +
    counts`` of ``sums``; ``lengths`` tokens each); with ``per_lang`` bins per language, their language
    sums added into ``lang_units`` and ``lang_frequency`` too, each sequence's language in ``langs``.
    ``emit=False`` only adds those sums up (no rows)."""
    bound = int(counts.sum()) if emit else 0
    out = [np.empty(bound, t.to_pandas_dtype()) for t in SEQ_MEANS.types]
    scratch = np.zeros(0, np.int64)
    rows = seq_means_from_sums(
        sums,
        starts,
        counts,
        lengths,
        seq_ids,
        np.zeros(len(counts), np.int64) if langs is None else langs,
        n_experts,
        per_lang,
        emit,
        scratch if lang_units is None else lang_units,
        scratch.astype(np.float64) if lang_frequency is None else lang_frequency,
        *out,
    )
    return pa.RecordBatch.from_arrays([pa.array(c[: rows if emit else 0]) for c in out], schema=SEQ_MEANS)
