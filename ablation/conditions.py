"""What each ablation condition deactivates: XICI's expert sets and the baselines (method.md, Stage 3).

Only questions with experts take part, in question_id order; each gets one set of (layer, expert) pairs.

- ``xici``: the question's own set, from ``analysis_experts``.
- ``random``: a set of the same size, drawn uniformly without replacement from a pool (``random_pool``):
  ``window`` (the default, the paper's "non-excluded layers"): every expert of the MoE layers in the
  analysis' window [layer_start, layer_stop); ``window-minus-blacklist``: the same without the analysis'
  blacklisted generalists, i.e. exactly the experts XICI could have chosen. Generalists break the answers
  of any question, so leaving them out lowers the random baseline.
- ``shuffle``: question i gets the set of question j = d[i] for a uniformly random derangement d (no
  question keeps its own set).
- ``none``: the noise floor. Every question is asked again with an empty set, through the same ablation
  path (same units and batches, per-request masks, prefix caching off); its ASR and SGR are what re-asking
  alone changes. Nothing is drawn.

A baseline's draw is a pure function of the analysis and ``seed`` (numpy's PCG64 seeded with
``[seed, condition]``). A set the model cannot route around (a layer left with fewer selectable experts
than its top-k, or its group limits) is refused for XICI and redrawn for ``random``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import numpy as np

from xici.errors import XiciError

if TYPE_CHECKING:
    from xici.moe.gating import LayerGate

XICI = "xici"
NONE = "none"
#: Every baseline ``--baselines`` knows; the default runs the paper's two.
BASELINES: tuple[str, ...] = ("random", "shuffle", NONE)
DEFAULT_BASELINES: tuple[str, ...] = ("random", "shuffle")
CONDITIONS: tuple[str, ...] = (XICI, *BASELINES)
#: Table 2's row names.
LABELS = {"xici": "XICI", "random": "random set", "shuffle": "shuffled", NONE: "nothing off"}
#: Where the random baseline draws from; the first is the default (the paper's reading).
RANDOM_POOLS: tuple[str, ...] = ("window", "window-minus-blacklist")
#: Draws of a random set before giving up on finding one the model can route around.
MAX_DRAWS = 1000

Pair = tuple[int, int]
#: ``problem(pairs, what)``: why the model cannot run with these experts off, or None.
Problem = Callable[[tuple[Pair, ...], str], XiciError | None]


@dataclass(frozen=True)
class Analysis:
    """The parts of a stored analysis the ablation reads."""

    analysis_id: int
    analysis_key: str
    run_id: int
    grader: str
    layer_start: int
    layer_stop: int
    blacklist_top: float
    blacklist_share: float
    blacklist: bool  # False: the analysis dropped the blacklist step, so the pool is the whole window


@dataclass(frozen=True)
class Assignment:
    """The experts deactivated while asking ``question_id``: ``source``'s XICI set, or a random one."""

    question_id: str
    source: str
    pairs: tuple[Pair, ...]


def label(condition: str, random_pool: str | None = None) -> str:
    """Table 2's name of a condition; a random set names its pool."""
    return LABELS[condition] + (f" ({random_pool.replace('-', ' ')})" if random_pool else "")


def check_random_pool(name: str) -> str:
    if name not in RANDOM_POOLS:
        raise XiciError(
            f"unknown random pool {name!r}",
            where="--random-pool",
            fix=f"use one of {', '.join(RANDOM_POOLS)}",
        )
    return name


def check_baselines(names: Sequence[str], given: str | None = None) -> tuple[str, ...]:
    """The baselines, each a known one and given once; XiciError quoting ``given`` (the option) otherwise."""
    if any(name not in BASELINES for name in names) or len(set(names)) != len(names):
        raise XiciError(
            f"cannot read the baselines {given if given is not None else ','.join(names)!r}",
            where="--baselines",
            fix=f"list some of {', '.join(BASELINES)} once each, separated by commas, or give '' for none",
        )
    return tuple(names)


def parse_baselines(text: str) -> tuple[str, ...]:
    """``"random,shuffle,none"`` -> ("random", "shuffle", "none"); ``""`` -> () (XICI alone)."""
    return check_baselines([name.strip() for name in text.split(",") if name.strip()], text)


def load_analysis(con: duckdb.DuckDBPyConnection, analysis_id: int) -> Analysis:
    row = con.execute(
        "select analysis_id, analysis_key, run_id, grader, layer_start, layer_stop, blacklist_top, "
        "blacklist_share, blacklist from analyses where analysis_id = ?",
        [analysis_id],
    ).fetchone()
    if row is None:
        raise XiciError(
            f"there is no analysis {analysis_id} in this lake",
            where="--analysis",
            fix="run xici analyze first, and pass the id it prints (or see the analyses table)",
        )
    return Analysis(*row)


def xici_sets(con: duckdb.DuckDBPyConnection, analysis: Analysis) -> list[Assignment]:
    """Each question with experts and its own set, in question_id order (pairs best first, by rank)."""
    rows = con.execute(
        "select question_id, list(struct_pack(layer := layer, expert := expert) order by rank) "
        "from analysis_experts where analysis_id = ? group by question_id order by question_id",
        [analysis.analysis_id],
    ).fetchall()
    return [Assignment(q, q, tuple((p["layer"], p["expert"]) for p in pairs)) for q, pairs in rows]


def random_pool(
    con: duckdb.DuckDBPyConnection, analysis: Analysis, n_experts: int, pool: str = RANDOM_POOLS[0]
) -> list[Pair]:
    """The analysis' window, or its window minus its blacklist (which needs the run's means and the
    views: see analysis.means)."""
    black = set()
    if check_random_pool(pool) == "window-minus-blacklist" and analysis.blacklist:
        black = set(
            con.execute(
                "select layer, expert from blacklist(?, ?, ?)",
                [analysis.run_id, analysis.blacklist_top, analysis.blacklist_share],
            ).fetchall()
        )
    return [
        (layer, expert)
        for layer in range(analysis.layer_start, analysis.layer_stop)
        for expert in range(n_experts)
        if (layer, expert) not in black
    ]


class Deactivation:
    """Per-question expert masks of one model, and whether its gates can route around them."""

    def __init__(self, gate: LayerGate, n_layers: int, n_experts: int) -> None:
        self.gate = gate
        self.n_layers = n_layers
        self.n_experts = n_experts

    def mask(self, pairs: tuple[Pair, ...]) -> np.ndarray:
        """bool [n_layers, n_experts], True = deactivated."""
        mask = np.zeros((self.n_layers, self.n_experts), dtype=bool)
        if pairs:
            layers, experts = np.asarray(pairs).T
            mask[layers, experts] = True
        return mask

    def problem(self, pairs: tuple[Pair, ...], what: str) -> XiciError | None:
        """Why the model cannot run with these experts off (None when it can)."""
        if any(not (0 <= layer < self.n_layers and 0 <= e < self.n_experts) for layer, e in pairs):
            return XiciError(
                f"{what} names an expert outside the model's {self.n_layers} x {self.n_experts}",
                where="analysis_experts",
            )
        import torch

        mask = self.mask(pairs)
        for layer in sorted({layer for layer, _ in pairs}):
            try:
                self.gate.check_mask(torch.from_numpy(mask[layer][None]), where=f"{what}, MoE layer {layer}")
            except XiciError as error:
                return error
        return None


def per_expert_sets(sets: list[Assignment], mode: str, position: int) -> list[Assignment]:
    """For the expert ranked ``position`` (from 1) of each set that has one: ``single``, that expert alone;
    ``all-but-one``, the set without it (sets of at least 2 only: otherwise nothing would be off)."""
    found = []
    for a in sets:
        if len(a.pairs) < max(position, 2 if mode == "all-but-one" else 1):
            continue
        kept = a.pairs[position - 1]
        pairs = (kept,) if mode == "single" else tuple(sorted(p for p in a.pairs if p != kept))
        found.append(Assignment(a.question_id, a.question_id, pairs))
    return found


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) without fixed points (rejection: about e tries)."""
    if n < 2:
        raise XiciError(
            f"question shuffling needs at least 2 questions with experts, the analysis has {n}",
            where="--baselines shuffle",
            fix="leave the shuffle baseline out (--baselines random)",
        )
    identity = np.arange(n)
    while True:
        order = rng.permutation(n)
        if not (order == identity).any():
            return order


def draw_random(
    sets: list[Assignment], pool: list[Pair], rng: np.random.Generator, problem: Problem
) -> list[Assignment]:
    """Per question a set of the same size from ``pool``, redrawn while ``problem(pairs, what)`` objects."""
    largest = max((len(a.pairs) for a in sets), default=0)
    if largest > len(pool):
        raise XiciError(
            f"the random baseline needs sets of {largest} experts but the pool holds {len(pool)}",
            where="--baselines random",
            fix="leave the random baseline out, or analyse with a wider layer window",
        )
    drawn = []
    for assignment in sets:
        for _ in range(MAX_DRAWS):
            picks = rng.choice(len(pool), size=len(assignment.pairs), replace=False)
            pairs = tuple(sorted(pool[i] for i in picks))
            if problem(pairs, "a random set") is None:
                break
        else:
            raise XiciError(
                f"no random set of {len(pairs)} experts that the model can route around was found for "
                f"question {assignment.question_id} in {MAX_DRAWS} draws",
                where="--baselines random",
                fix="leave the random baseline out for this model",
            )
        drawn.append(Assignment(assignment.question_id, assignment.question_id, pairs))
    return drawn


def shuffled(sets: list[Assignment], rng: np.random.Generator) -> list[Assignment]:
    """Question i with the set of question d[i], d a random derangement."""
    order = derangement(len(sets), rng)
    return [
        Assignment(a.question_id, sets[j].source, sets[j].pairs) for a, j in zip(sets, order, strict=True)
    ]


def nothing_off(sets: list[Assignment]) -> list[Assignment]:
    """Every question of ``sets`` with an empty set: the ``none`` condition."""
    return [Assignment(a.question_id, a.question_id, ()) for a in sets]


def baseline_rng(condition: str, seed: int) -> np.random.Generator:
    """The generator of one baseline's draw: independent streams per condition, fixed by the seed."""
    return np.random.default_rng([seed, CONDITIONS.index(condition)])


def condition_sets(
    sets: list[Assignment],
    condition: str,
    seed: int | None,
    deactivation: Deactivation,
    pool: Callable[[], list[Pair]],
) -> list[Assignment]:
    """The assignments of ``condition`` given XICI's ``sets`` (already checked); ``pool`` is read lazily."""
    if condition == XICI:
        return sets
    if condition == NONE:
        return nothing_off(sets)
    if seed is None:
        raise ValueError("a baseline needs a seed")
    rng = baseline_rng(condition, seed)
    if condition == "random":
        return draw_random(sets, pool(), rng, deactivation.problem)
    return shuffled(sets, rng)
