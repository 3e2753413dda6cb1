"""The one-tailed Mann-Whitney U test for every expert of a question at once.

:func:`mannwhitneyu_greater` takes, for F experts, the correct languages' values ``x`` [F, n1] and the
wrong languages' values ``y`` [F, n2] and returns per row the U of ``x`` and the p-value of "``x``
greater", vectorised over the rows (a scipy call per expert costs ~100 us, which is minutes over a
paper-sized analysis). Ranks are average ranks of the pooled sample, ties sharing the mean of their
positions (found by sorting, see :func:`_sorted_pool`); U1 = (sum of x's ranks) - n1 (n1 + 1) / 2.

Three ways to get p (``method``, ``xici analyze --mwu``):

- ``asymptotic``: z = ((U1 - n1 n2 / 2) - 0.5) / s with the tie-corrected
  s = sqrt(n1 n2 / 12 ((n + 1) - sum(t^3 - t) / (n (n - 1)))), and p = ndtr(-z); an expert whose values
  are all equal has s = 0 and p = 1. Bit for bit scipy's ``method="asymptotic"``.
- ``exact``: the permutation distribution of U given the expert's ties: of the C(n, n1) ways to pick which
  n1 of the pooled values are x's, the number whose rank sum is at least the observed one (``extreme``),
  p = extreme / C(n, n1). Counted by dynamic programming over the tie groups (a group of t values at
  average rank r adds j r to the rank sum in C(t, j) ways when j of them are x's), in exact integers, once
  per tie pattern (columns with the same pattern share the distribution, and patterns repeat across
  questions, so they are cached).
- ``auto`` (the default, scipy's ``method="auto"``): exact where one group has at most 8 values and the
  expert's values have no ties, asymptotic otherwise. Many tied values (an expert unused in several
  languages) therefore make the test asymptotic even for small groups.

Where p is exact, it is returned as the correctly rounded quotient of two exact integers (scipy's exact
path accumulates floats and can land one ulp away: 11/220 comes out as 0.049999999999999996), and the
counts are returned with it so that "p < alpha" can be decided on integers (:func:`below`). p is clipped to
[0, 1]. All sums involved are of half-integers or integers and are exact in float64, so the U and the
asymptotic p do not depend on summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import special

#: ``--mwu`` choices.
METHODS = ("auto", "exact", "asymptotic")
#: ``auto`` uses the exact distribution when one sample is at most this large (and there are no ties).
EXACT_MAX = 8
#: Exact counts are int64: the exact test needs C(n, min(n1, n / 2)) below this (n up to 66 pooled values).
_COUNT_LIMIT = 2**63


@dataclass(frozen=True)
class MWUResult:
    """Per row: U of x, p, and where p is exact the count behind it (0 where p is asymptotic)."""

    u: np.ndarray  # float64 [F]
    p: np.ndarray  # float64 [F]
    extreme: np.ndarray  # int64 [F]: arrangements with a rank sum >= the observed one; 0 = asymptotic p
    total: int  # C(n1 + n2, n1), the arrangements: p = extreme / total where extreme > 0


def mannwhitneyu_greater(x: np.ndarray, y: np.ndarray, method: str = "auto") -> MWUResult:
    """U of ``x`` and the one-tailed p-value (``x`` greater) per row of ``x`` [F, n1] and ``y`` [F, n2]."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n1, n2 = int(x.shape[1]), int(y.shape[1])
    if n1 < 1 or n2 < 1:
        raise ValueError("both groups need at least one value")
    n = n1 + n2
    keys, from_y = _sorted_pool(x, y)  # [n, F], each column sorted

    # Tie groups: for every sorted position, the first and last position holding the same value. A loop
    # over the (few) rows is much faster than numpy's accumulate along axis 0.
    position = np.arange(n, dtype=np.int32)[:, None]
    opens = np.ones(keys.shape, dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=opens[1:])
    first = np.where(opens, position, 0)
    for j in range(1, n):
        np.maximum(first[j], first[j - 1], out=first[j])
    closes = np.ones(keys.shape, dtype=bool)
    closes[:-1] = opens[1:]
    last = np.where(closes, position, n - 1)
    for j in range(n - 2, -1, -1):
        np.minimum(last[j], last[j + 1], out=last[j])

    # x's rank sum: the average rank of a position is (first + last) / 2 + 1 (ranks from 1). All
    # integers or halves, so exact in float64 and equal to scipy's sum of its rank array.
    twice_rank_sum = np.where(from_y, 0, first + last).sum(axis=0, dtype=np.int64)
    u1 = (twice_rank_sum / 2 + n1) - n1 * (n1 + 1) / 2
    # Sum over tie groups of t^3 - t, as a sum over positions: the k-th value of a group (k from 0) adds
    # (k+1)^3 - (k+1) - (k^3 - k) = 3k(k + 1).
    within = position - first
    within *= within + 1
    tie_term = 3.0 * within.sum(axis=0, dtype=np.int64)

    extreme = np.zeros(keys.shape[1], dtype=np.int64)
    total = math.comb(n, n1)
    if method == "exact":
        exact = np.ones(keys.shape[1], dtype=bool)
    elif method == "auto" and min(n1, n2) <= EXACT_MAX:
        exact = tie_term == 0
    else:
        exact = np.zeros(keys.shape[1], dtype=bool)
    p = np.ones(keys.shape[1])
    if not exact.all():
        mu = n1 * n2 / 2
        s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term[~exact] / (n * (n - 1))))
        numerator = u1[~exact] - mu
        numerator -= 0.5
        with np.errstate(divide="ignore", invalid="ignore"):
            z = numerator / s
        p[~exact] = special.ndtr(-z)
    if exact.any():
        if not exact_fits(n1, n2):
            raise ValueError(f"the exact test is limited to about 66 values in all, got {n}")
        # Doubled rank sums are integers: 2 R1 = twice_rank_sum + 2 n1.
        extreme[exact] = _tail_counts_of(opens[:, exact], n1, twice_rank_sum[exact] + 2 * n1)
        p[exact] = extreme[exact] / total
    return MWUResult(u1, np.clip(p, 0.0, 1.0), extreme, total)


def exact_fits(n1: int, n2: int) -> bool:
    """Whether the exact counts of groups of n1 and n2 values fit the int64 they are counted in."""
    return math.comb(n1 + n2, min(n1, (n1 + n2) // 2)) < _COUNT_LIMIT


def below(result_p: np.ndarray, extreme: np.ndarray, total: int, alpha: float) -> np.ndarray:
    """p < alpha per column; where p is exact (``extreme`` > 0), decided on the integers.

    alpha is read as the decimal it is written as (0.05 is 1/20), so 11 of 220 arrangements is not below
    0.05, whatever the floating-point rounding of 11/220 or of 0.05.
    """
    result = result_p < alpha
    exact = extreme > 0
    # extreme / total < a  <=>  extreme <= ceil(a * total) - 1, with a exact
    limit = math.ceil(Fraction(repr(alpha)) * total) - 1
    result[exact] = extreme[exact] <= limit
    return result


def _sorted_pool(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pooled sample of each expert sorted, as order-preserving integer keys [n, F]; and which are y's.

    Sorting keys that carry the sample label in their lowest bit replaces an argsort (several times
    slower on short columns). Equal values get equal keys once the label is shifted out: -0.0 is first
    made +0.0, and the float64 bit pattern is mapped to a signed integer that orders like the value.
    The label needs one spare bit, which floats below 2 in magnitude have (their exponent's top bit is
    0); larger inputs are first scaled by a power of two, which changes no order and no equality.
    """
    values = np.concatenate([x, y], axis=1, dtype=np.float64)  # [F, n]
    values += 0.0  # -0.0 becomes +0.0
    if not np.isfinite(values).all():
        raise ValueError("values must be finite")
    peak = max(values.max(initial=0.0), -values.min(initial=0.0))
    if peak >= 2.0:
        values = np.ldexp(values, -int(np.frexp(peak)[1]))
    bits = values.view(np.int64)
    # Order-preserving signed key: a negative float's magnitude bits are flipped, so it sorts below every
    # positive one and the larger its magnitude, the lower. For |v| < 2 the key is below 2^62 in
    # magnitude, which leaves room to shift in the label.
    keys = bits >> 63
    keys &= 0x7FFF_FFFF_FFFF_FFFF
    keys ^= bits
    keys <<= 1
    keys[:, x.shape[1] :] |= 1
    keys.sort(axis=1)
    keys = np.ascontiguousarray(keys.T)
    from_y = (keys & 1).astype(bool)
    keys >>= 1
    return keys, from_y


def _tail_counts_of(opens: np.ndarray, n1: int, twice_r1: np.ndarray) -> np.ndarray:
    """For each column, the arrangements whose doubled rank sum of x is at least ``twice_r1``.

    ``opens`` [n, F] marks where a new tie group starts in each sorted column: the tie pattern. Columns
    with the same pattern share one distribution.
    """
    patterns, which = np.unique(opens, axis=1, return_inverse=True)
    counts = np.empty(len(which), dtype=np.int64)
    for k in range(patterns.shape[1]):
        starts = np.flatnonzero(patterns[:, k])
        sizes = tuple(np.diff(np.append(starts, opens.shape[0])).tolist())
        mine = which.reshape(-1) == k
        counts[mine] = _tail_counts(n1, sizes)[twice_r1[mine]]
    return counts


@lru_cache(maxsize=4096)
def _tail_counts(n1: int, sizes: tuple[int, ...]) -> np.ndarray:
    """tail[s]: of the C(n, n1) choices of x's positions, how many give x a doubled rank sum >= s.

    ``sizes`` are the tie groups' sizes in sorted order. A group covering positions a..b (from 0) has the
    doubled average rank a + b + 2; choosing j of its t values for x adds j times that, in C(t, j) ways.
    ways[k, s] counts the choices of k values with doubled rank sum s over the groups seen so far.
    """
    n = sum(sizes)
    top = n * (n + 1)  # doubled sum of all ranks
    ways = np.zeros((n1 + 1, top + 1), dtype=np.int64)
    ways[0, 0] = 1
    start = 0
    for t in sizes:
        rank2 = 2 * start + t + 1  # a + b + 2 with b = a + t - 1
        before = ways.copy()
        for j in range(1, min(t, n1) + 1):
            shift = j * rank2
            ways[j:, shift:] += math.comb(t, j) * before[: n1 + 1 - j, : top + 1 - shift]
        start += t
    tail = np.cumsum(ways[n1, ::-1])[::-1]
    tail = np.append(tail, 0)  # nothing is above the largest sum
    tail.flags.writeable = False
    return tail
