"""The vectorised Mann-Whitney U test: scipy's asymptotic p bit for bit, exact p from exact counts (against
scipy's exact distribution without ties and brute-force enumeration with ties), and "p < alpha" on counts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu, rankdata

from xici.analysis.mwu import EXACT_MAX, below, mannwhitneyu_greater


def _scipy(x: np.ndarray, y: np.ndarray, method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """scipy, one expert (row) at a time."""
    results = [mannwhitneyu(a, b, alternative="greater", method=method) for a, b in zip(x, y, strict=True)]
    return np.array([r.statistic for r in results]), np.array([r.pvalue for r in results])


def _enumerated(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row: of all C(n, n1) ways to label n1 pooled values as x, how many give a rank sum >= x's."""
    counts = []
    for a, b in zip(x, y, strict=True):
        ranks = rankdata(np.concatenate([a, b]))
        observed = ranks[: len(a)].sum()
        sums = [ranks[list(pick)].sum() for pick in itertools.combinations(range(len(ranks)), len(a))]
        counts.append(sum(s >= observed for s in sums))
    return np.array(counts)


def _mixed_rows(rng: np.random.Generator, n: int, columns: int) -> np.ndarray:
    """Rows like deltas: most heavily tied (an unused expert repeats its few values), some continuous."""
    tied = rng.integers(0, 4, (columns, n)) * 0.125 - 0.25
    sparse = np.where(rng.random((columns, n)) < 0.7, -0.03125, rng.random((columns, n)))
    smooth = rng.normal(size=(columns, n))
    return np.concatenate([tied, sparse, smooth])


def _check_auto(x: np.ndarray, y: np.ndarray) -> None:
    """``auto`` against scipy's ``auto``: the same U; asymptotic p bit for bit; exact p the exact quotient."""
    result = mannwhitneyu_greater(x, y)
    expected_u, expected_p = _scipy(x, y)
    np.testing.assert_array_equal(result.u, expected_u)
    exact = result.extreme > 0
    np.testing.assert_array_equal(result.p[~exact], expected_p[~exact])
    np.testing.assert_allclose(result.p[exact], expected_p[exact], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(result.p[exact], result.extreme[exact] / result.total)


@pytest.mark.parametrize("n1", [1, 2, 3, 5, 8, 9, 12, 20])
def test_auto_agrees_with_scipy_on_ties_and_small_groups(n1: int) -> None:
    rng = np.random.default_rng(n1)
    for n2 in (1, 2, 4, 7, 8, 9, 15, 22):
        x, y = _mixed_rows(rng, n1, 12), _mixed_rows(rng, n2, 12)
        y[24:] += 0.4  # shift the continuous rows so p-values spread over (0, 1)
        _check_auto(x, y)


def test_auto_is_exact_for_every_small_size_without_ties() -> None:
    """Without ties and with a group of at most 8, auto (like scipy) uses the exact null distribution."""
    rng = np.random.default_rng(0)
    for n1 in range(1, EXACT_MAX + 1):
        for n2 in (*range(1, 13), 17, 23, 30):
            x, y = rng.normal(size=(6, n1)), rng.normal(size=(6, n2)) - 0.5
            assert (mannwhitneyu_greater(x, y).extreme > 0).all()
            _check_auto(x, y)
            _check_auto(y, x)  # the small group second


def test_exact_without_ties_matches_scipy_exact() -> None:
    rng = np.random.default_rng(1)
    for n1, n2 in [(3, 3), (3, 9), (6, 6), (10, 12), (12, 21), (20, 22)]:
        x, y = rng.normal(size=(20, n1)) + 0.3, rng.normal(size=(20, n2))
        result = mannwhitneyu_greater(x, y, method="exact")
        expected_u, expected_p = _scipy(x, y, method="exact")
        np.testing.assert_array_equal(result.u, expected_u)
        np.testing.assert_allclose(result.p, expected_p, rtol=1e-12, atol=0)
        assert result.total == math.comb(n1 + n2, n1)


@pytest.mark.parametrize(("n1", "n2"), [(1, 4), (3, 3), (2, 7), (4, 5), (6, 6), (3, 9)])
def test_exact_with_ties_matches_enumeration(n1: int, n2: int) -> None:
    rng = np.random.default_rng(10 * n1 + n2)
    x, y = _mixed_rows(rng, n1, 15), _mixed_rows(rng, n2, 15)
    x[:, 0] = y[:, 0]  # at least one tie across the groups in every row
    result = mannwhitneyu_greater(x, y, method="exact")
    np.testing.assert_array_equal(result.extreme, _enumerated(x, y))
    np.testing.assert_array_equal(result.p, result.extreme / math.comb(n1 + n2, n1))
    np.testing.assert_array_equal(result.u, _scipy(x, y)[0])


def test_exact_p_of_small_groups_has_a_floor() -> None:
    """With 3 correct and 3 wrong values the smallest exact p is 1/20, which is not below alpha 0.05;
    with 1 of 12 correct it is 1/12, even where the normal approximation says 0.04."""
    x, y = np.array([[3.0, 4.0, 5.0]]), np.array([[0.0, 1.0, 2.0]])
    result = mannwhitneyu_greater(x, y, method="exact")
    assert (result.extreme[0], result.total, result.p[0]) == (1, 20, 0.05)
    assert not below(result.p, result.extreme, result.total, 0.05)[0]
    assert below(result.p, result.extreme, result.total, 0.051)[0]

    x, y = np.array([[1.0]]), np.array([[0.0] * 10 + [0.5]])
    asymptotic = mannwhitneyu_greater(x, y, method="asymptotic")
    exact = mannwhitneyu_greater(x, y, method="exact")
    assert asymptotic.p[0] < 0.05 and asymptotic.extreme[0] == 0
    assert exact.p[0] == 1 / 12 and not below(exact.p, exact.extreme, exact.total, 0.05)[0]


def test_p_equal_to_alpha_is_not_below_it() -> None:
    """3 vs 9 values without ties: 11 of the 220 arrangements reach U = 23, p = 11/220 = 0.05 exactly.
    scipy's exact p comes out one ulp below 0.05; xici's is 0.05 and the decision is made on 11 and 220."""
    x, y = np.array([[5.0, 10.0, 11.0]]), np.array([[0.0, 1, 2, 3, 4, 6, 7, 8, 9]])
    result = mannwhitneyu_greater(x, y)
    assert (result.u[0], result.extreme[0], result.total) == (23.0, 11, 220)
    assert result.p[0] == 0.05
    assert _scipy(x, y)[1][0] < 0.05  # the rounding this decides differently
    assert not below(result.p, result.extreme, result.total, 0.05)[0]


def test_asymptotic_is_scipys_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    for n1, n2 in [(1, 1), (3, 3), (3, 9), (8, 5), (12, 20)]:
        x, y = _mixed_rows(rng, n1, 10), _mixed_rows(rng, n2, 10)
        result = mannwhitneyu_greater(x, y, method="asymptotic")
        assert (result.extreme == 0).all()
        expected_u, expected_p = _scipy(x, y, method="asymptotic")
        np.testing.assert_array_equal(result.u, expected_u)
        np.testing.assert_array_equal(result.p, expected_p)


def test_method_is_chosen_per_expert() -> None:
    """One tied expert must not switch its untied neighbours to the normal approximation."""
    x = np.array([[0.1, 0.2, 0.3], [0.0, 0.0, 0.3]])
    y = np.array([[-0.1, 0.05, -0.2, 0.15], [0.0, -0.1, 0.0, 0.0]])
    result = mannwhitneyu_greater(x, y)
    assert result.extreme[0] > 0 and result.extreme[1] == 0
    assert result.p[0] == pytest.approx(
        mannwhitneyu(x[0], y[0], alternative="greater", method="exact").pvalue
    )
    assert result.p[1] == mannwhitneyu(x[1], y[1], alternative="greater", method="asymptotic").pvalue


def test_edge_values_sort_like_numbers() -> None:
    """Negative zero equals zero; values beyond +-2 and tiny ones keep their order and their ties."""
    x = np.array([[-0.0, 1e-300, 5.0, -7.5, 3.0, 3.0], [250.0, -1e6, 0.0, 1e-9, 2.0, -2.0]])
    y = np.array([[0.0, -1e-300, 4.0, 3.0, -3.0], [1e6, -0.0, 2.0, 2.0, -1e-9]])
    _check_auto(x, y)
    np.testing.assert_array_equal(mannwhitneyu_greater(x, y, method="exact").extreme, _enumerated(x, y))


def test_all_equal_values_give_p_one() -> None:
    x, y = np.full((1, 5), -0.25), np.full((1, 7), -0.25)
    for method in ("auto", "exact", "asymptotic"):
        result = mannwhitneyu_greater(x, y, method=method)
        assert (result.u[0], result.p[0]) == (17.5, 1.0)
    assert tuple(mannwhitneyu(x[0], y[0], alternative="greater")) == (17.5, 1.0)


def test_null_data_rejects_about_alpha() -> None:
    """Continuous data with no difference: the share of p < 0.05 is close to 0.05, for every method."""
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(4000, 11)), rng.normal(size=(4000, 14))
    for method in ("auto", "exact", "asymptotic"):
        result = mannwhitneyu_greater(x, y, method=method)
        assert 0.04 < below(result.p, result.extreme, result.total, 0.05).mean() < 0.06


def test_refuses_empty_groups_nan_and_unknown_methods() -> None:
    with pytest.raises(ValueError, match="at least one"):
        mannwhitneyu_greater(np.zeros((3, 0)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="finite"):
        mannwhitneyu_greater(np.array([[np.nan, 1.0]]), np.array([[0.0]]))
    with pytest.raises(ValueError, match="method"):
        mannwhitneyu_greater(np.zeros((1, 2)), np.zeros((1, 2)), method="permutation")
    with pytest.raises(ValueError, match="66"):
        mannwhitneyu_greater(np.zeros((1, 40)), np.ones((1, 40)), method="exact")
