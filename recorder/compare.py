"""Two runs side by side (``xici runs compare``): did they answer alike, grade alike, route alike?

Made to check that the two backends write the same lake, and useful for any pair of runs (batch sizes,
dtypes, models, an ablation against its recording). Sequences are matched by (question_id, lang):

- same tokens: every processed token id equal (prompt and answer, as stored in Zarr), the same answer
  length and the same answer text (the last generated token is stored only as text);
- same grades: per grader that graded both sequences, the same verdict (undecided counts as a verdict);
- routing, over the tokens both sequences share up to the first differing token (the routing of a token
  depends on everything before it): the share of (token, layer) rows whose top-k expert sets are identical,
  and the largest and mean absolute gate-weight difference on those rows, expert by expert. Routing is only
  compared between runs of the same MoE shape (layers, experts, top-k).

Token arrays are read with :meth:`GateStore.read` a block of sequences at a time, so any run size fits in
memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np

from xici.errors import XiciError
from xici.warehouse import GateStore, Lake, TokenArrays

#: Tokens read per block from each run's Zarr arrays.
_BLOCK_TOKENS = 1 << 16


@dataclass(frozen=True)
class GradeAgreement:
    """How often one grader gave both runs' answers the same verdict."""

    grader: str
    n: int  # matched sequences this grader graded in both runs
    same: int


@dataclass
class RunComparison:
    """What :func:`compare_runs` found; shares are None when there was nothing to compare."""

    run_a: int
    run_b: int
    n_matched: int
    only_a: int
    only_b: int
    same_tokens: int = 0
    grades: list[GradeAgreement] = field(default_factory=list)
    #: False when the runs' MoE shapes differ: the routing fields then stay empty.
    routing_compared: bool = True
    rows_compared: int = 0  # (token, layer) rows of common token prefixes
    same_sets: int = 0
    weight_max_diff: float | None = None
    weight_mean_diff: float | None = None

    @property
    def same_tokens_share(self) -> float:
        return self.same_tokens / self.n_matched

    @property
    def same_sets_share(self) -> float | None:
        return self.same_sets / self.rows_compared if self.rows_compared else None


@dataclass(frozen=True)
class _Pair:
    """One matched (question, language): its token range and answer in each run."""

    shard_a: int | None
    start_a: int
    n_a: int
    shard_b: int | None
    start_b: int
    n_b: int
    answer_a: tuple[int, str]  # (n_generated, response_text)
    answer_b: tuple[int, str]


def compare_runs(lake: Lake, run_a: int, run_b: int) -> RunComparison:
    """Compare two runs of the lake sequence by sequence (see the module notes)."""
    shapes, counts, pairs, grades = lake.read(lambda con: _read(con, run_a, run_b))
    if not pairs:
        raise XiciError(
            f"runs {run_a} and {run_b} have no (question, language) in common",
            where=f"xici runs compare {run_a} {run_b}",
            fix="compare runs over the same questions (xici runs list shows each run's dataset)",
        )
    result = RunComparison(run_a, run_b, len(pairs), counts[0] - len(pairs), counts[1] - len(pairs))
    result.grades = [GradeAgreement(*row) for row in grades]
    result.routing_compared = shapes[0] == shapes[1]
    gates = lake.gates(read_only=True)
    weight_sum, weight_n, weight_max = 0.0, 0, None
    for group in _groups(pairs):
        block_a = _block(gates, run_a, group[0].shard_a, [(p.start_a, p.n_a) for p in group])
        block_b = _block(gates, run_b, group[0].shard_b, [(p.start_b, p.n_b) for p in group])
        for pair, a, b in zip(group, block_a, block_b, strict=True):
            common = _common_prefix(a.token_ids, b.token_ids)
            if common == len(a) == len(b) and pair.answer_a == pair.answer_b:
                result.same_tokens += 1
            if not result.routing_compared or common == 0:
                continue
            sets_a, weights_a = _by_expert(a.topk_ids[:common], a.topk_weights[:common])
            sets_b, weights_b = _by_expert(b.topk_ids[:common], b.topk_weights[:common])
            same = (sets_a == sets_b).all(axis=-1)
            result.rows_compared += same.size
            result.same_sets += int(same.sum())
            diff = np.abs(weights_a[same] - weights_b[same])
            if diff.size:
                weight_sum += float(diff.sum())
                weight_n += diff.size
                weight_max = max(weight_max or 0.0, float(diff.max()))
    if weight_n:
        result.weight_max_diff, result.weight_mean_diff = weight_max, weight_sum / weight_n
    return result


def _read(
    con: duckdb.DuckDBPyConnection, run_a: int, run_b: int
) -> tuple[list[tuple[int, ...]], list[int], list[_Pair], list[tuple[str, int, int]]]:
    """Both runs' MoE shapes and sequence counts, the matched sequences (in run A's token order) and the
    grade agreement per grader."""
    shapes, counts = [], []
    for run_id in (run_a, run_b):
        row = con.execute(
            "select n_moe_layers, n_experts, top_k, (select count(*) from sequences where run_id = ?)"
            " from runs where run_id = ?",
            [run_id, run_id],
        ).fetchone()
        if row is None:
            raise XiciError(
                f"there is no run {run_id} in this lake", where="xici runs compare", fix="see xici runs list"
            )
        shapes.append(row[:3])
        counts.append(row[3])
    pairs = [
        _Pair(*row[:6], (row[6], row[7]), (row[8], row[9]))
        for row in con.execute(
            "select a.shard, a.token_start, a.n_tokens, b.shard, b.token_start, b.n_tokens, a.n_generated,"
            " a.response_text, b.n_generated, b.response_text"
            " from sequences a join sequences b using (question_id, lang)"
            " where a.run_id = ? and b.run_id = ? order by a.shard nulls first, a.token_start",
            [run_a, run_b],
        ).fetchall()
    ]
    grades = con.execute(
        "select ga.grader, count(*), count(*) filter (where ga.correct is not distinct from gb.correct)"
        " from sequences a join sequences b using (question_id, lang)"
        " join grades ga on ga.seq_id = a.seq_id"
        " join grades gb on gb.seq_id = b.seq_id and gb.grader = ga.grader"
        " where a.run_id = ? and b.run_id = ? group by ga.grader order by ga.grader",
        [run_a, run_b],
    ).fetchall()
    return shapes, counts, pairs, grades


def _groups(pairs: Sequence[_Pair]) -> Iterator[list[_Pair]]:
    """Consecutive pairs in one shard of each run whose token ranges span at most a block in both runs (a
    lone longer pair is a group of its own); runs asked in the same order give full blocks, any other order
    still works."""
    group: list[_Pair] = []
    low_a = high_a = low_b = high_b = 0
    for pair in pairs:
        end_a, end_b = pair.start_a + pair.n_a, pair.start_b + pair.n_b
        wide_a = max(high_a, end_a) - min(low_a, pair.start_a) > _BLOCK_TOKENS
        wide_b = max(high_b, end_b) - min(low_b, pair.start_b) > _BLOCK_TOKENS
        other_shard = group and (pair.shard_a, pair.shard_b) != (group[0].shard_a, group[0].shard_b)
        if group and (wide_a or wide_b or other_shard):
            yield group
            group = []
        if not group:
            low_a, high_a, low_b, high_b = pair.start_a, end_a, pair.start_b, end_b
        group.append(pair)
        low_a, high_a = min(low_a, pair.start_a), max(high_a, end_a)
        low_b, high_b = min(low_b, pair.start_b), max(high_b, end_b)
    if group:
        yield group


def _block(
    gates: GateStore, run_id: int, shard: int | None, ranges: list[tuple[int, int]]
) -> list[TokenArrays]:
    """Each (start, length) range of a run's shard, read in one go."""
    low = min(start for start, _ in ranges)
    high = max(start + n for start, n in ranges)
    block = gates.read(run_id, low, high, shard=shard)
    return [
        TokenArrays(
            block.token_ids[start - low : start - low + n],
            block.topk_ids[start - low : start - low + n],
            block.topk_weights[start - low : start - low + n],
        )
        for start, n in ranges
    ]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading token ids two sequences share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _by_expert(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k slots sorted by expert id, so that two routings compare slot by slot."""
    order = np.argsort(ids, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1).astype(np.float64)
