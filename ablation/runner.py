"""The ablation runner: re-ask every question that has experts with them deactivated (method.md, Stage 3).

Per analysis and condition (``xici`` and the baselines of :mod:`xici.ablation.conditions`; seeded baselines
once per seed) there is one run of kind ``'ablation'``, keyed by a hash of the analysis, the recorded run,
the condition and the seed. Its units are the recorded run's (question, language) pairs of the questions
with experts, in the recorded order; batches are a fixed partition of them, and each batch is asked
together with one expert mask per row (per-request deactivation through the recorder's :class:`Asker`:
the recorded prompt, greedy decoding and max_new_tokens) and committed in one go with its routing and
grades (the recorder's commit: :meth:`Lake.commit_sequences`, grades in the same transaction), through the
lifecycle recording uses too (:func:`xici.recorder.batches.run_batches`). Killing the
process and running the same call again continues with the batches not yet committed; a finished run is
left as it is.

The model runs on the recorded run's backend unless another is asked for; the backend is part of the run
key (it changes the numerics), the vLLM engine's settings are stored in the run's params. The batches are
asked by the recorder's pools (:mod:`xici.recorder.pool`): in this process, or by workers on Ray that append
to shards of the run's arrays, one pool for every condition of the call. vLLM runs with
prefix caching off, so no masked request ever reuses KV computed with other experts.

Answers are graded by the analysis' grader, built so that its version is the one of the grades the
analysis read (the grades "before"): the metrics compare like with like.

When the last batch is in, the stored routing is checked (:mod:`xici.ablation.check`) and the metrics are
computed from the stored grades (:mod:`xici.ablation.metrics`); both are written with the run's
``finished`` status in one transaction. Every set a run deactivates is stored with the run when it is
created (``ablation_experts``) and read back from there, so a resumed run, the check and any later query
all see the same sets. Warehouse accesses wait for another process's lock like the recorder's do.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import duckdb
import numpy as np
import torch

from xici.ablation.check import DeactivationCheck, check_deactivation
from xici.ablation.conditions import (
    CONDITIONS,
    DEFAULT_BASELINES,
    LABELS,
    NONE,
    RANDOM_POOLS,
    XICI,
    Analysis,
    Assignment,
    Deactivation,
    Pair,
    check_baselines,
    check_random_pool,
    condition_sets,
    load_analysis,
    nothing_off,
    per_expert_sets,
    random_pool,
    xici_sets,
)
from xici.ablation.metrics import MetricsRow, metrics_rows, store_metrics
from xici.analysis.means import ensure_means
from xici.corpora.graders import get_grader
from xici.errors import XiciError
from xici.keys import stable_key
from xici.moe import load_config, resolve
from xici.recorder.asking import AskerSpec, Unit
from xici.recorder.batches import BatchDone, run_batches
from xici.recorder.fingerprint import ModelCheck, check_model, note_changes
from xici.recorder.pool import Pool, RayOptions, open_pool, placement, release
from xici.recorder.run import RecordSpec, config_sha256, library_versions, load_units
from xici.warehouse import Lake

#: Bump when a change alters what an ablation run asks or stores, so old runs are not resumed as new ones.
ABLATION_VERSION = 1

#: What a call does with each question's experts (docs/method.md, "Instruments"): switch the set off
#: together; add a constant to their router logits; switch off one expert alone, per rank in the set; switch
#: off all but one.
MODES: tuple[str, ...] = ("deactivate", "boost", "single", "all-but-one")


@dataclass(frozen=True)
class Instrument:
    """How an ablation call treats each question's experts, and which questions it asks.

    ``mode`` is one of MODES; ``boost`` the constant added to the router logits (mode ``boost`` only);
    ``questions`` asks only the first N questions with experts (question_id order), e.g. to keep the
    per-expert runs small. The default is the paper's ablation.
    """

    mode: str = "deactivate"
    boost: float | None = None
    questions: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise XiciError(f"unknown ablation mode {self.mode!r}", fix=f"use one of {', '.join(MODES)}")
        if (self.mode == "boost") != (self.boost is not None):
            raise XiciError("a boost needs its DELTA, and only a boost takes one", where="--boost")
        if self.boost is not None and not (np.isfinite(self.boost) and self.boost != 0):
            raise XiciError(f"--boost must be a finite non-zero number, got {self.boost}", where="--boost")
        if self.questions is not None and self.questions < 1:
            raise XiciError("--questions must be at least 1", where=f"--questions {self.questions}")

    @property
    def per_expert(self) -> bool:
        return self.mode in ("single", "all-but-one")

    def key(self) -> dict[str, Any]:
        """What it adds to a run's key: nothing for the default, so runs made before keep their keys."""
        given = {"mode": self.mode, "boost": self.boost, "questions": self.questions}
        return {k: v for k, v in given.items() if v is not None and v != "deactivate"}


@dataclass
class ConditionResult:
    """What one condition's run did in this call."""

    condition: str
    seed: int | None
    run_id: int
    created: bool
    n_units: int
    done_before: int
    asked: int = 0
    batches: int = 0
    already_finished: bool = False
    check: DeactivationCheck | None = None
    label: str = ""  # the condition's label, with the rank of a per-expert run

    @property
    def finished(self) -> bool:
        return self.already_finished or self.check is not None


@dataclass
class AblationResult:
    """Every condition's run, and Table 2 of the analysis (finished runs only)."""

    analysis_id: int
    runs: list[ConditionResult] = field(default_factory=list)
    metrics: list[MetricsRow] = field(default_factory=list)


@dataclass(frozen=True)
class _Source:
    """An analysis with everything about its recorded run that the ablation needs, checked."""

    analysis: Analysis
    spec: RecordSpec
    run_key: str
    grader_options: dict[str, Any]
    grader_version: str
    units: list[Unit]
    sets: list[Assignment]
    deactivation: Deactivation
    model: ModelCheck


@dataclass(frozen=True)
class _Plan:
    """One condition's run: its key, whether it exists, and the sets to store when it is created."""

    condition: str
    seed: int | None
    random_pool: str | None  # the random baseline's pool; None for the other conditions
    run_key: str
    run_id: int | None
    status: str | None
    assignments: list[Assignment] | None
    position: int | None = None  # the rank in each set a per-expert run treats
    asked: frozenset[str] | None = None  # the questions it asks; None: every question with experts

    @property
    def label(self) -> str:
        return LABELS[self.condition] + (f" #{self.position}" if self.position is not None else "")


def run_ablation(
    lake: Lake,
    analysis_id: int,
    *,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    random_pool: str = RANDOM_POOLS[0],
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    grader_options: Mapping[str, Any] | None = None,
    backend: str | None = None,
    engine_options: Mapping[str, Any] | None = None,
    ray: RayOptions | None = None,
    on_batch: Callable[[str, BatchDone], None] | None = None,
    stop_after_batches: int | None = None,
    model: str | None = None,
    allow_changed_model: bool = False,
    instrument: Instrument = Instrument(),
) -> AblationResult:
    """Ablate an analysis' expert sets (and the baselines), or resume the runs of the same call.

    ``baselines``: some of random, shuffle and none (:mod:`xici.ablation.conditions`); ``random_pool``: where
    the random sets are drawn from, ``window`` (the paper's) or ``window-minus-blacklist``.

    ``grader_options`` build the analysis' grader (the judge's model...); None: the options the recorded run
    was graded with when it used that grader, none otherwise. ``backend`` None is the recorded run's;
    ``engine_options`` are the vLLM engine's (:data:`~xici.recorder.vllm_backend.ENGINE_OPTIONS`). Everything
    that can be refused is refused before anything is written. The model is loaded only when some run has
    work left (and closed before returning); ``ray`` loads it on Ray workers instead, which ask every
    condition's batches (:mod:`xici.recorder.ray_pool`). ``stop_after_batches`` returns after committing
    that many batches, leaving the rest for the next call (an interruption on purpose). ``instrument``:
    boost the sets instead, or switch their experts off one at a time (one run per rank, no baselines),
    optionally for the first N questions only. Returns each run's progress and the analysis' stored
    metrics (of every seed run so far).

    The checkpoint (the recorded run's, or ``model``: where it is now, when it moved) must have the files the
    run was recorded with (:mod:`xici.recorder.fingerprint`), unless ``allow_changed_model``; which one was
    used, and what changed, is stored with each ablation run.
    """
    if batch_size < 1:
        raise XiciError("--batch-size must be at least 1", where=f"--batch-size {batch_size}")
    if seed < 0:
        raise XiciError("--seed must be a non-negative integer", where=f"--seed {seed}")
    baselines = () if instrument.per_expert else check_baselines(baselines)
    random_pool = check_random_pool(random_pool)
    source = _source(lake, analysis_id, grader_options, model, allow_changed_model, instrument.questions)
    backend = backend or source.spec.backend
    device = placement(device, ray, backend, engine_options)
    plans = _plans(lake, source, backend, baselines, seed, random_pool, instrument)

    result = AblationResult(analysis_id)
    pool: Pool | None = None
    with contextlib.ExitStack() as opened:
        for plan in plans:
            if plan.status == "finished":
                n = len(_units(source, plan))
                result.runs.append(
                    ConditionResult(
                        plan.condition,
                        plan.seed,
                        plan.run_id,
                        False,
                        n,
                        n,
                        already_finished=True,
                        label=plan.label,
                    )
                )
                continue
            done = sum(r.batches for r in result.runs)
            left = None if stop_after_batches is None else stop_after_batches - done
            if left == 0:
                break
            if pool is None:
                asking = _asker(source, backend, device, engine_options)
                pool = opened.enter_context(contextlib.closing(open_pool(asking, ray, lake)))
            params = _params(source, plan, backend, pool.metadata, device, batch_size, instrument)
            run = _run(lake, source, plan, params, pool, batch_size, left, on_batch, instrument)
            result.runs.append(run)
            if not run.finished:
                break
    if pool is None:
        release(ray)
    result.metrics = lake.read(lambda con: metrics_rows(con, [analysis_id]))
    return result


def _source(
    lake: Lake,
    analysis_id: int,
    grader_options: Mapping[str, Any] | None,
    model: str | None,
    allow_changed_model: bool,
    questions: int | None = None,
) -> _Source:
    """Read and check the analysis, its recorded run, its checkpoint, grader and sets; the units of the
    questions with experts (the first ``questions`` of them when given)."""

    def read(con: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
        analysis = load_analysis(con, analysis_id)
        spec = RecordSpec.from_run(con, analysis.run_id)
        run = con.execute(
            "select run_key, status, model_config_hash, params -> 'grader_options',"
            " params ->> 'model_fingerprint' from runs where run_id = ?",
            [analysis.run_id],
        ).fetchone()
        versions = con.execute(
            "select distinct g.grader_version from grades g join sequences s using (seq_id)"
            " where s.run_id = ? and g.grader = ? order by 1",
            [analysis.run_id, analysis.grader],
        ).fetchall()
        units = load_units(con, spec.dataset, spec.languages, spec.limit)
        return analysis, spec, run, [v for (v,) in versions], units, xici_sets(con, analysis)

    analysis, spec, run, versions, recorded, sets = lake.read(read)
    run_key, status, config_hash, recorded_options, recorded_model = run
    if status != "finished":
        raise XiciError(
            f"run {analysis.run_id}, which analysis {analysis_id} read, is not finished",
            where="--analysis",
            fix="finish the recording (run the same xici record again), then analyse it again",
        )
    if not sets:
        raise XiciError(
            f"analysis {analysis_id} found experts for no question, so there is nothing to ablate",
            where="--analysis",
            fix="pick an analysis with experts (see the analysis_summary view), e.g. with a lower --tau",
        )
    if grader_options is None:
        same = spec.grader == analysis.grader and recorded_options is not None
        grader_options = json.loads(recorded_options) if same else {}
    grader = get_grader(analysis.grader, **grader_options)
    if versions != [grader.version]:
        found = " and ".join(map(repr, versions)) or "none"
        raise XiciError(
            f"the grades analysis {analysis_id} read are by {analysis.grader} version {found}, not by the "
            f"version the ablation would grade with ({grader.version!r})",
            where="--judge-* options" if analysis.grader == "judge" else "--analysis",
            fix="pass the grader options the recorded answers were graded with, or grade them again with "
            f"xici grade --run {analysis.run_id} --grader {analysis.grader} and analyse again",
        )
    checked = check_model(
        model or spec.model,
        None if recorded_model is None else json.loads(recorded_model),
        run_id=analysis.run_id,
        allow_changed=allow_changed_model,
        where="--model" if model else f"the model of run {analysis.run_id}",
    )
    spec = replace(spec, model=checked.model)
    deactivation = _deactivation(spec, None if allow_changed_model else config_hash)
    for assignment in sets:
        problem = deactivation.problem(assignment.pairs, f"the XICI set of question {assignment.question_id}")
        if problem is not None:
            raise problem
    sets = sets[:questions]
    asked = {a.question_id for a in sets}
    units = [replace(u, index=i) for i, u in enumerate(u for u in recorded if u.question_id in asked)]
    return _Source(
        analysis, spec, run_key, dict(grader_options), grader.version, units, sets, deactivation, checked
    )


def _plans(
    lake: Lake,
    source: _Source,
    backend: str,
    baselines: Sequence[str],
    seed: int,
    random_pool: str,
    instrument: Instrument = Instrument(),
) -> list[_Plan]:
    """Every condition's run, XICI first (per-expert: one XICI run per rank); the sets of runs not created
    yet are drawn here, up front."""
    pool: list[Pair] = []

    def read_pool() -> list[Pair]:
        if not pool:
            pool.extend(_pool(lake, source.analysis, source.deactivation.n_experts, random_pool))
        return pool

    def stored(key: str) -> tuple[int | None, str | None]:
        row = lake.read(
            lambda con: con.execute("select run_id, status from runs where run_key = ?", [key]).fetchone()
        )
        return row or (None, None)

    plans = []
    if instrument.per_expert:
        for position in range(1, max(len(a.pairs) for a in source.sets) + 1):
            assignments = per_expert_sets(source.sets, instrument.mode, position)
            if not assignments:
                continue
            key = _run_key(source, XICI, None, backend, None, instrument, position)
            run_id, status = stored(key)
            asked = frozenset(a.question_id for a in assignments)
            created = assignments if run_id is None else None
            plans.append(_Plan(XICI, None, None, key, run_id, status, created, position, asked))
        return plans
    for condition in (c for c in CONDITIONS if c == XICI or c in baselines):
        condition_seed = None if condition in (XICI, NONE) else seed  # nothing is drawn for these
        condition_pool = random_pool if condition == "random" else None
        key = _run_key(source, condition, condition_seed, backend, condition_pool, instrument)
        run_id, status = stored(key)
        assignments = None
        if run_id is None:
            assignments = condition_sets(
                source.sets, condition, condition_seed, source.deactivation, read_pool
            )
        plans.append(_Plan(condition, condition_seed, condition_pool, key, run_id, status, assignments))
    return plans


def _units(source: _Source, plan: _Plan) -> list[Unit]:
    """The units a plan asks, numbered in its own order."""
    if plan.asked is None:
        return source.units
    asked = (u for u in source.units if u.question_id in plan.asked)
    return [replace(u, index=i) for i, u in enumerate(asked)]


def _deactivation(spec: RecordSpec, config_hash: str | None) -> Deactivation:
    """Masks and mask checks for the recorded model, refusing a model whose config changed since (unless
    ``config_hash`` is None: a change allowed)."""
    config = load_config(spec.model)
    if config_hash is not None and config_sha256(config) != config_hash:
        raise XiciError(
            "the model's config is not the one the run was recorded with",
            where=spec.model,
            fix="restore the checkpoint the run was recorded with, or record and analyse again",
        )
    architecture = resolve(config)
    layout = architecture.layout(config)
    return Deactivation(architecture.make_gate(config), layout.n_moe_layers, layout.n_experts)


def _pool(lake: Lake, analysis: Analysis, n_experts: int, pool: str) -> list[Pair]:
    """The random baseline's pool; for the blacklist, the run's means are built if missing."""
    if pool == "window-minus-blacklist":
        lake.retrying(lambda _: ensure_means(lake, analysis.run_id))
    return lake.read(lambda con: random_pool(con, analysis, n_experts, pool))


def _asker(source: _Source, backend: str, device: str, engine_options: Mapping[str, Any] | None) -> AskerSpec:
    """The recorded run's way of asking (on ``backend``), graded like the analysis' grades."""
    recorded = replace(source.spec, backend=backend, grader=source.analysis.grader, store_logits=False)
    return recorded.asker(device, grader_options=source.grader_options, engine_options=engine_options)


def _run_key(
    source: _Source,
    condition: str,
    seed: int | None,
    backend: str,
    random_pool: str | None,
    instrument: Instrument = Instrument(),
    position: int | None = None,
) -> str:
    """What defines an ablation run's answers: the analysis (and so its recorded run), condition, seed,
    backend, the random baseline's pool, and the instrument (mode, boost, questions) and rank it runs."""
    pool = {} if random_pool is None else {"random_pool": random_pool}  # other conditions keep their keys
    rank = {} if position is None else {"position": position}
    payload = {
        **pool,
        **instrument.key(),
        **rank,
        "kind": "ablation",
        "version": ABLATION_VERSION,
        "analysis_key": source.analysis.analysis_key,
        "source_run_key": source.run_key,
        "condition": condition,
        "seed": seed,
        "backend": backend,
    }
    return stable_key(payload)


def _params(
    source: _Source,
    plan: _Plan,
    backend: str,
    engine: dict[str, Any],
    device: str,
    batch_size: int,
    instrument: Instrument,
) -> dict[str, Any]:
    """The run row's params: what defines the run, then how it was first run (device, batch size, the
    engine's settings)."""
    analysis, spec = source.analysis, source.spec
    asked_as = ("model", "dataset", "languages", "limit", "system", "prompt_template", "max_new_tokens")
    return {
        "ablation_version": ABLATION_VERSION,
        "analysis_id": analysis.analysis_id,
        "analysis_key": analysis.analysis_key,
        "source_run_id": analysis.run_id,
        "condition": plan.condition,
        "seed": plan.seed,
        "random_pool": plan.random_pool,
        **instrument.key(),
        "position": plan.position,
        "grader": analysis.grader,
        "grader_options": source.grader_options,
        "grader_version": source.grader_version,
        "backend": backend,
        **{name: getattr(spec, name) for name in asked_as},
        "dtype": spec.dtype,
        "gate_dtype": spec.gate_dtype,
        **source.model.params,
        "device": device,
        "batch_size": batch_size,
        "engine": engine,
    }


def _start(
    lake: Lake, source: _Source, plan: _Plan, params: dict[str, Any], instrument: Instrument, n_units: int
) -> tuple[int, bool, list[Assignment]]:
    """Create the run with its ablations row and sets (one transaction), or read the stored sets."""
    analysis, deactivation = source.analysis, source.deactivation

    def start(con: duckdb.DuckDBPyConnection) -> tuple[int, bool, list[tuple[Any, ...]]]:
        recorded = con.execute(
            "select dataset, model, model_config_hash, architecture from runs where run_id = ?",
            [analysis.run_id],
        ).fetchone()
        run_id, created = lake.get_or_create_run(
            con,
            plan.run_key,
            kind="ablation",
            **dict(zip(("dataset", "model", "model_config_hash", "architecture"), recorded, strict=True)),
            backend=params["backend"],
            n_moe_layers=deactivation.n_layers,
            n_experts=deactivation.n_experts,
            top_k=deactivation.gate.top_k,
            params=params,
            versions=library_versions(),
            n_units=n_units,
        )
        if not created:
            note_changes(con, run_id, source.model)
        if created:
            con.execute(
                "insert into ablations (run_id, analysis_id, source_run_id, condition, seed, grader, "
                "random_pool, mode, boost, position, questions) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    analysis.analysis_id,
                    analysis.run_id,
                    plan.condition,
                    plan.seed,
                    analysis.grader,
                    plan.random_pool,
                    instrument.mode,
                    instrument.boost,
                    plan.position,
                    instrument.questions,
                ],
            )
            experts = [[run_id, a.question_id, a.source, *pair] for a in plan.assignments for pair in a.pairs]
            if experts:  # none: no rows
                con.executemany(
                    "insert into ablation_experts (run_id, question_id, source_question_id, layer, expert) "
                    "values (?, ?, ?, ?, ?)",
                    experts,
                )
        stored = con.execute(
            "select question_id, any_value(source_question_id), list([layer, expert] order by layer, expert) "
            "from ablation_experts where run_id = ? group by question_id order by question_id",
            [run_id],
        ).fetchall()
        return run_id, created, stored

    run_id, created, stored = lake.write(start)
    if plan.condition == NONE:  # no rows: every question is asked with nothing off
        return run_id, created, nothing_off(source.sets)
    return run_id, created, [Assignment(q, source, tuple(map(tuple, pairs))) for q, source, pairs in stored]


def _run(
    lake: Lake,
    source: _Source,
    plan: _Plan,
    params: dict[str, Any],
    pool: Pool,
    batch_size: int,
    max_batches: int | None,
    on_batch: Callable[[str, BatchDone], None] | None,
    instrument: Instrument,
) -> ConditionResult:
    """Ask the units not yet committed, batch by batch (at most ``max_batches``); check and finish the run
    when all are in."""
    units, deactivation = _units(source, plan), source.deactivation
    run_id, created, assignments = _start(lake, source, plan, params, instrument, len(units))
    masks = {a.question_id: deactivation.mask(a.pairs) for a in assignments}
    if instrument.boost is not None:  # an additive bias on the set's logits instead of a mask
        masks = {q: mask.astype(np.float32) * np.float32(instrument.boost) for q, mask in masks.items()}
    check: list[DeactivationCheck] = []

    def finishing() -> Callable[[duckdb.DuckDBPyConnection], None]:
        """Check the stored routing; the check and the metrics land with the finished status. A boost's
        check is how often its experts were selected, against the recorded answers."""
        check.append(lake.retrying(lambda _: check_deactivation(lake, run_id)))
        before = None
        if instrument.boost is not None:
            source_run = source.analysis.run_id
            before = lake.retrying(lambda _: check_deactivation(lake, run_id, routing_of=source_run))

        def finish(con: duckdb.DuckDBPyConnection) -> None:
            if before is None:
                con.execute(
                    "update ablations set checked_tokens = ?, violations = ? where run_id = ?",
                    [check[0].checked_tokens, check[0].violations, run_id],
                )
            else:
                con.execute(
                    "update ablations set checked_tokens = ?, selected_before = ?, selected_after = ? "
                    "where run_id = ?",
                    [check[0].checked_tokens, before.selected_share, check[0].selected_share, run_id],
                )
            store_metrics(con, run_id)

        return finish

    done = run_batches(
        lake,
        run_id,
        units,
        pool,
        batch_size=batch_size,
        arrays={
            "n_layers": deactivation.n_layers,
            "top_k": deactivation.gate.top_k,
            "n_experts": deactivation.n_experts,
            "gate_dtype": params["gate_dtype"],
            "gate_sums": False,  # they serve the means of recording runs only
        },
        masks=lambda todo: torch.from_numpy(np.stack([masks[u.question_id] for u in todo])),
        max_batches=max_batches,
        on_batch=None if on_batch is None else lambda batch: on_batch(plan.condition, batch),
        finishing=finishing,
    )
    return ConditionResult(
        plan.condition,
        plan.seed,
        run_id,
        created,
        len(units),
        done.done_before,
        asked=done.asked,
        batches=done.batches,
        check=check[0] if done.finished else None,
        label=plan.label,
    )
