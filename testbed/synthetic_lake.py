"""Synthetic lakes: a real lake (DuckDB warehouse + Zarr gates) filled with made-up routing, no model needed.

The analysis, its tests and its benchmark need lakes of known content at any scale, up to the paper's
(783 questions, 18,600 sequences, 48 layers x 128 experts). This module writes one through the lake's own
commit protocol (:meth:`~xici.warehouse.Lake.get_or_create_run`, :meth:`GateStore.create_run`,
:meth:`~xici.warehouse.Lake.commit_sequences` with the grades inserted in the same transaction), plus the
dataset rows, so what the analysis reads is exactly what a recording would have left.

World. Questions come in groups of (count, languages per question); every question is asked in ``en`` and
in synthetic languages ``x-s01``, ``x-s02``, ... Each (question, language) is correct with a probability set
by the language (accuracy falls linearly from English to the last language) and the question's difficulty,
so questions end up all correct, all wrong or mixed. A share of grades can be left NULL (undecided).

Routing. At every MoE layer a sequence draws a pool of ``pool`` distinct experts by Gumbel top-k sampling
on logits = popularity (``generalists`` experts per layer are very popular) + the language's preference +
noise, ordered best first. Each token selects ``top_k`` consecutive pool slots from an offset that is
usually near the front, with descending weights summing to 1; so front experts get most tokens and the
largest weights, and m grows with the logit.

Planted signal. Every question has ``planted`` (layer, expert) pairs inside the analysed layers; in a
sequence whose answer is truly correct each is pushed to the front of the pool with probability
``signal``. Their deltas are then shifted up for correct languages: the experts XICI should recover. With
``planted=0`` or ``signal=0`` the lake is null data.

Everything is drawn from seeded generators (the world from ``seed``, each batch of sequences from
``(seed, batch)``), so a spec always gives the same lake, and an interrupted write resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow as pa

from xici import __version__
from xici.analysis.params import default_window
from xici.errors import XiciError
from xici.keys import stable_key
from xici.warehouse import Lake, TokenArrays
from xici.warehouse.gates import expert_id_dtype

GRADER_VERSION = "synthetic-truth"
_WEIGHT_PROFILES = 64
_FRONT = 100.0  # logit boost that puts a planted expert at the front of the pool


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes, signal and seed of a synthetic lake; the defaults make a small lake for tests (~seconds)."""

    #: Groups of (questions, languages per question), English included.
    questions: tuple[tuple[int, int], ...] = ((24, 8), (16, 14))
    n_layers: int = 8
    n_experts: int = 32
    top_k: int = 4
    #: Distinct experts a sequence uses per layer.
    pool: int = 10
    #: Tokens per sequence, inclusive range.
    tokens: tuple[int, int] = (60, 140)
    #: Planted (layer, expert) pairs per question, and the probability a correct sequence uses each.
    planted: int = 4
    signal: float = 1.0
    #: Half-open MoE-layer range the planted experts are drawn from; None: the analysis' default window.
    planted_layers: tuple[int, int] | None = None
    #: Very popular experts per layer (the blacklist's prey).
    generalists: int = 1
    #: Accuracy of English and of the last language; the others in between.
    accuracy: tuple[float, float] = (0.75, 0.25)
    #: Spread of question difficulty on the logit scale (0: every question has the language's odds).
    difficulty: float = 1.5
    #: Share of grades left NULL.
    ungraded: float = 0.0
    seed: int = 0
    dataset: str = "synthetic"
    model: str = "synthetic/moe"
    grader: str = "match"
    gate_dtype: str = "float16"
    sequences_per_commit: int = 256

    def __post_init__(self) -> None:
        if not self.questions or any(q < 1 or n < 2 for q, n in self.questions):
            raise XiciError(
                "every question group needs at least 1 question and 2 languages", where="questions"
            )
        if not 1 <= self.top_k <= self.pool <= self.n_experts:
            raise XiciError("need 1 <= top_k <= pool <= n_experts", where="top_k / pool / n_experts")
        if not 1 <= self.tokens[0] <= self.tokens[1]:
            raise XiciError("tokens must be a range (low, high) with 1 <= low <= high", where="tokens")
        start, stop = self.window
        if not 0 <= start < stop <= self.n_layers:
            raise XiciError(
                f"planted layers {start}:{stop} are outside 0:{self.n_layers}", where="planted_layers"
            )
        if self.planted > (stop - start) * (self.n_experts - self.generalists):
            raise XiciError("more planted experts than the window holds", where="planted")
        for name in ("signal", "ungraded"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise XiciError(f"{name} is a probability and must be in [0, 1]", where=name)

    @property
    def window(self) -> tuple[int, int]:
        return self.planted_layers if self.planted_layers is not None else default_window(self.n_layers)

    @property
    def n_languages(self) -> int:
        return max(n for _, n in self.questions)

    def key(self) -> str:
        """The run key: a hash of the whole spec, so the same spec is the same run."""
        return stable_key(asdict(self))


@dataclass(frozen=True)
class SyntheticWorld:
    """What a spec plants: units in order, the true answer of each, the experts behind each question."""

    spec: SyntheticSpec
    question_ids: list[str]
    units: list[tuple[str, str]]  # (question_id, lang), the run's unit order
    unit_lang: np.ndarray  # language index of each unit (0 = en)
    truth: np.ndarray  # bool per unit: the answer is correct
    graded: np.ndarray  # bool per unit: the grade is known (else NULL)
    planted: dict[str, tuple[tuple[int, int], ...]]
    generalists: tuple[tuple[int, int], ...]
    popularity: np.ndarray  # [layers, experts] base logits
    preference: np.ndarray  # [languages, layers, experts] language logits


@dataclass(frozen=True)
class SyntheticLake:
    """The run written for a spec, and the world it was drawn from (the truth to check analyses against)."""

    run_id: int
    world: SyntheticWorld


def language_tags(n: int) -> list[str]:
    """``en`` then ``x-s01``, ``x-s02``, ...: n BCP-47 tags."""
    return ["en", *(f"x-s{i:02d}" for i in range(1, n))]


def synthetic_world(spec: SyntheticSpec) -> SyntheticWorld:
    """Draw the world of a spec: languages, grades and planted experts."""
    rng = np.random.default_rng([spec.seed, 0])
    n_lang, n_layers, n_experts = spec.n_languages, spec.n_layers, spec.n_experts
    lang_logit = _logit(np.linspace(spec.accuracy[0], spec.accuracy[1], n_lang))
    popularity = rng.normal(0.0, 0.5, (n_layers, n_experts))
    generalist_ids = np.argsort(rng.random((n_layers, n_experts)), axis=1)[:, : spec.generalists]
    np.put_along_axis(popularity, generalist_ids, 4.0, axis=1)
    preference = rng.normal(0.0, 0.7, (n_lang, n_layers, n_experts))
    start, stop = spec.window
    candidates = [
        (layer, expert)
        for layer in range(start, stop)
        for expert in range(n_experts)
        if expert not in generalist_ids[layer]
    ]
    question_ids, units, unit_lang, probability, planted = [], [], [], [], {}
    for count, n_q_langs in spec.questions:
        for _ in range(count):
            qid = f"q{len(question_ids):05d}"
            question_ids.append(qid)
            langs = [0, *sorted(rng.choice(np.arange(1, n_lang), n_q_langs - 1, replace=False).tolist())]
            shift = rng.normal(0.0, spec.difficulty)
            for lang in langs:
                units.append((qid, language_tags(n_lang)[lang]))
                unit_lang.append(lang)
                probability.append(_sigmoid(lang_logit[lang] + shift))
            picks = rng.choice(len(candidates), spec.planted, replace=False)
            planted[qid] = tuple(sorted(candidates[i] for i in picks))
    truth = rng.random(len(units)) < np.array(probability)
    graded = rng.random(len(units)) >= spec.ungraded
    generalists = tuple(sorted((layer, int(e)) for layer in range(n_layers) for e in generalist_ids[layer]))
    return SyntheticWorld(
        spec,
        question_ids,
        units,
        np.array(unit_lang),
        truth,
        graded,
        planted,
        generalists,
        popularity,
        preference,
    )


def write_synthetic_lake(lake: Lake, spec: SyntheticSpec) -> SyntheticLake:
    """Write (or finish writing) the lake of ``spec``; a finished run with the same spec is reused."""
    world = synthetic_world(spec)
    lake.gates()  # as a recording does: refuse another lake's gate store before anything is written

    def start(con: duckdb.DuckDBPyConnection) -> tuple[tuple[str] | None, int]:
        row = next(
            iter(con.execute("select status from runs where run_key = ?", [spec.key()]).fetchall()), None
        )
        if row is None:
            _insert_dataset(con, world)
        run_id, _ = lake.get_or_create_run(
            con,
            spec.key(),
            kind="record",
            dataset=spec.dataset,
            model=spec.model,
            model_config_hash=spec.key()[:16],
            architecture="synthetic",
            backend="synthetic",
            n_moe_layers=spec.n_layers,
            n_experts=spec.n_experts,
            top_k=spec.top_k,
            params=asdict(spec),
            versions={"xici": __version__, "numpy": np.__version__},
            n_units=len(world.units),
        )
        return row, run_id

    row, run_id = lake.write(start)
    if row is not None and row[0] == "finished":
        return SyntheticLake(run_id, world)
    lake.gates().create_run(
        run_id, n_layers=spec.n_layers, top_k=spec.top_k, n_experts=spec.n_experts, gate_dtype=spec.gate_dtype
    )
    done = lake.resume(run_id)
    step = spec.sequences_per_commit
    for batch, first in enumerate(range(0, len(world.units), step)):
        units = [u for u in range(first, min(first + step, len(world.units))) if u not in done]
        if units:
            arrays = _routing(world, batch, first, min(first + step, len(world.units)))
            _commit(lake, run_id, world, units, [arrays[u - first] for u in units])
    lake.write(
        lambda con: con.execute(
            "update runs set status = 'finished', finished_at = ? where run_id = ?",
            [datetime.now(timezone.utc).replace(tzinfo=None), run_id],
        )
    )
    return SyntheticLake(run_id, world)


def _insert_dataset(con: duckdb.DuckDBPyConnection, world: SyntheticWorld) -> None:
    spec = world.spec
    if con.execute("select count(*) from datasets where name = ?", [spec.dataset]).fetchall()[0][0]:
        raise XiciError(
            f"dataset {spec.dataset!r} already exists in this lake with other content",
            fix="give the synthetic spec another dataset name",
        )
    con.execute(
        "insert into datasets (name, format, source, source_sha256, options) values (?, ?, ?, ?, ?)",
        [spec.dataset, "synthetic", __name__, spec.key(), json.dumps(asdict(spec), sort_keys=True)],
    )
    questions = pa.table(
        {
            "dataset": [spec.dataset] * len(world.question_ids),
            "question_id": world.question_ids,
            "meta": [
                json.dumps({"planted": [list(p) for p in world.planted[q]]}) for q in world.question_ids
            ],
        }
    )
    prompts = pa.table(
        {
            "dataset": [spec.dataset] * len(world.units),
            "question_id": [q for q, _ in world.units],
            "lang": [lang for _, lang in world.units],
            "question": [f"synthetic question {q} in {lang}" for q, lang in world.units],
            "answers": [[f"answer-{q}"] for q, _ in world.units],
        }
    )
    con.register("xici_synthetic_questions", questions)
    con.register("xici_synthetic_prompts", prompts)
    con.execute("insert into questions select dataset, question_id, meta::JSON from xici_synthetic_questions")
    con.execute("insert into prompts select * from xici_synthetic_prompts")
    con.unregister("xici_synthetic_questions")
    con.unregister("xici_synthetic_prompts")


def _routing(world: SyntheticWorld, batch: int, first: int, stop: int) -> list[TokenArrays]:
    """Token routing of units [first, stop), drawn from the batch's own seeded generator."""
    spec = world.spec
    rng = np.random.default_rng([spec.seed, 1, batch])
    n_seq, n_layers, pool, k = stop - first, spec.n_layers, spec.pool, spec.top_k
    lengths = rng.integers(spec.tokens[0], spec.tokens[1] + 1, n_seq)
    logits = world.popularity[None] + world.preference[world.unit_lang[first:stop]]
    logits += rng.gumbel(size=logits.shape)
    for s in range(n_seq):
        if world.truth[first + s]:
            qid = world.units[first + s][0]
            for layer, expert in world.planted[qid]:
                if rng.random() < spec.signal:
                    logits[s, layer, expert] += _FRONT
    top = np.argpartition(-logits, pool - 1, axis=2)[:, :, :pool]
    order = np.argsort(-np.take_along_axis(logits, top, axis=2), axis=2, kind="stable")
    pools = np.take_along_axis(top, order, axis=2)  # [seq, layer, pool], best first

    # Token t at layer l selects k consecutive pool slots from an offset that is usually near the front.
    n_tokens = int(lengths.sum())
    pools = pools.astype(expert_id_dtype(spec.n_experts)).reshape(-1)
    pool_row = np.repeat(np.arange(n_seq, dtype=np.int32), lengths)[:, None] * n_layers + np.arange(
        n_layers, dtype=np.int32
    )
    offsets = np.minimum(rng.geometric(0.35, (n_tokens, n_layers)) - 1, pool - k).astype(np.int32)
    topk_ids = pools[(pool_row * pool + offsets)[:, :, None] + np.arange(k, dtype=np.int32)]
    profiles = (-np.sort(-rng.dirichlet(np.ones(k), _WEIGHT_PROFILES), axis=1)).astype(spec.gate_dtype)
    topk_weights = profiles[rng.integers(0, _WEIGHT_PROFILES, (n_tokens, n_layers))]
    token_ids = rng.integers(0, 1000, n_tokens, dtype=np.int32)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [
        TokenArrays(token_ids[a:b], topk_ids[a:b], topk_weights[a:b]) for a, b in itertools.pairwise(bounds)
    ]


def _commit(
    lake: Lake, run_id: int, world: SyntheticWorld, units: list[int], arrays: list[TokenArrays]
) -> None:
    spec = world.spec
    rows = []
    for unit, tokens in zip(units, arrays, strict=True):
        qid, lang = world.units[unit]
        n_generated = min(8, len(tokens))
        rows.append(
            {
                "unit": unit,
                "question_id": qid,
                "lang": lang,
                "n_prompt_tokens": len(tokens) - n_generated + 1,
                "n_generated": n_generated,
                "prompt_text": f"synthetic question {qid} in {lang}",
                "response_text": f"answer-{qid}" if world.truth[unit] else "something else",
                "finish_reason": "stop",
            }
        )

    def grade(con: duckdb.DuckDBPyConnection, seq_ids: list[int]) -> None:
        grades = pa.table(
            {
                "seq_id": pa.array(seq_ids, pa.int64()),
                "correct": pa.array(
                    [bool(world.truth[u]) if world.graded[u] else None for u in units], pa.bool_()
                ),
            }
        )
        con.register("xici_synthetic_grades", grades)
        con.execute(
            "insert into grades (seq_id, grader, grader_version, correct, detail) "
            "select seq_id, ?, ?, correct, null from xici_synthetic_grades",
            [spec.grader, GRADER_VERSION],
        )
        con.unregister("xici_synthetic_grades")

    lake.commit_sequences(run_id, rows, arrays, also=grade)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))
