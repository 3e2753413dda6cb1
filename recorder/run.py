"""A recording run: ask every (question, language) of a dataset, record its routing, grade it, resume.

The unit of work is one (question, language), in the fixed order (question_id, lang). Batches are a fixed
partition of that order (units ``[i * batch_size, (i + 1) * batch_size)``) and each batch is committed in one
go (:meth:`Lake.commit_sequences`, grades in the same transaction), so a run that is killed and run again
recomputes exactly the batches it had not committed, with the same padding and numerics, and the finished
lake is the one an uninterrupted run leaves. The run key hashes everything that changes the recorded data;
operational knobs (device, batch size, progress) are not in it, so re-running a command resumes its run.

This module resolves what a recording is (:class:`RecordSpec`, its units, prompts and run key); asking and
committing the batches is the lifecycle every batched run shares (:func:`~xici.recorder.batches.run_batches`).
The batches are asked by a pool (:mod:`xici.recorder.pool`): this process, or workers on Ray, which write
the same lake. Either asks through either backend (transformers or vLLM); the backend is part of the run
key, the engine's and the pool's operational settings are only stored in the run's params.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import torch

from xici.corpora.graders import Grader, get_grader
from xici.errors import XiciError
from xici.keys import stable_key
from xici.moe.base import MoELayout
from xici.recorder.asking import AskerSpec, Unit
from xici.recorder.batches import BatchDone, run_batches
from xici.recorder.fingerprint import check_model, note_changes
from xici.recorder.generator import load_tokenizer, resolve_dtype
from xici.recorder.pool import RayOptions, open_pool, placement, release
from xici.recorder.prompting import DEFAULT_SYSTEM, Prompt, PromptFormat
from xici.warehouse import Lake
from xici.warehouse.gates import GATE_DTYPES

# The run-key fields: everything that changes the recorded tokens and arrays (not the grader: see xici grade).
_DEFINING = (
    "backend",
    "model",
    "model_config_sha256",
    "dataset",
    "languages",
    "limit",
    "system",
    "prompt_template",
    "prompts_sha256",
    "max_new_tokens",
    "dtype",
    "gate_dtype",
    "store_logits",
)
_VERSIONED = ("xici", "torch", "transformers", "tokenizers", "duckdb", "zarr", "numpy", "pyarrow")


@dataclass(frozen=True)
class RecordSpec:
    """What a recording is: equal specs (with equal model files and prompts) record identical data.

    ``languages`` None means every language of the dataset; ``limit`` keeps the first questions in
    question_id order (all their languages); ``dtype`` "auto" resolves per device (see
    :func:`~xici.recorder.generator.resolve_dtype`); an empty ``system`` sends no system turn; ``backend``
    is one of :data:`~xici.recorder.BACKENDS`.
    """

    model: str
    dataset: str
    languages: tuple[str, ...] | None = None
    limit: int | None = None
    system: str | None = DEFAULT_SYSTEM
    prompt_template: str | None = None
    max_new_tokens: int = 32
    dtype: str = "auto"
    gate_dtype: str = "float16"
    store_logits: bool = False
    grader: str = "match"
    backend: str = "transformers"

    def __post_init__(self) -> None:
        """Normalise and refuse impossible parameters before anything is loaded or written."""
        if self.languages is not None:
            object.__setattr__(self, "languages", tuple(self.languages))
        object.__setattr__(self, "system", self.system or None)
        if self.max_new_tokens < 1:
            raise XiciError(
                "--max-new-tokens must be at least 1", where=f"--max-new-tokens {self.max_new_tokens}"
            )
        if self.limit is not None and self.limit < 1:
            raise XiciError("--limit must be at least 1 question", where=f"--limit {self.limit}")
        if self.gate_dtype not in GATE_DTYPES:
            raise XiciError(
                f"gate dtype {self.gate_dtype!r} is not supported",
                where="--gate-dtype",
                fix=f"use one of {', '.join(GATE_DTYPES)}",
            )
        if self.languages is not None and not self.languages:
            raise XiciError("no language given", where="--languages", fix="list language tags: de,en,fr")
        PromptFormat(self.system, self.prompt_template)

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.system, self.prompt_template)

    def asker(
        self,
        device: str,
        *,
        grader_options: Mapping[str, Any] | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> AskerSpec:
        """How this recording asks (a resolved ``device``; ``dtype`` as stored, resolved at record time)."""
        return AskerSpec(
            backend=self.backend,
            model=self.model,
            device=device,
            dtype=self.dtype,
            grader=self.grader,
            max_new_tokens=self.max_new_tokens,
            system=self.system,
            prompt_template=self.prompt_template,
            store_logits=self.store_logits,
            grader_options=dict(grader_options or {}),
            engine_options=dict(engine_options or {}),
        )

    @classmethod
    def from_run(cls, con: duckdb.DuckDBPyConnection, run_id: int) -> RecordSpec:
        """The spec a recorded run was made with (as stored in its run row)."""
        row = con.execute("select kind, params from runs where run_id = ?", [run_id]).fetchone()
        if row is None:
            raise XiciError(f"there is no run {run_id} in this lake", where="--run")
        if row[0] != "record":
            raise XiciError(f"run {run_id} is an {row[0]} run, not a recording", where="--run")
        params = json.loads(row[1])
        return cls(**{name: params[name] for name in cls.__dataclass_fields__})


def load_units(
    con: duckdb.DuckDBPyConnection,
    dataset: str,
    languages: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Unit]:
    """The units of a dataset in run order (question_id, lang); XiciError for an unknown dataset/language."""
    found = con.execute("select distinct lang from prompts where dataset = ? order by lang", [dataset])
    available = [r[0] for r in found.fetchall()]
    if not available:
        names = [r[0] for r in con.execute("select distinct dataset from prompts order by 1").fetchall()]
        raise XiciError(
            f"there is no dataset {dataset!r} in this lake",
            where="--dataset",
            fix=f"import it first with xici datasets import (datasets here: {', '.join(names) or 'none'})",
        )
    langs = available if languages is None else _pick_languages(dataset, languages, available)
    marks = ", ".join("?" for _ in langs)
    question_ids = [
        r[0]
        for r in con.execute(
            f"select distinct question_id from prompts where dataset = ? and lang in ({marks}) order by 1"
            + ("" if limit is None else f" limit {int(limit)}"),
            [dataset, *langs],
        ).fetchall()
    ]
    rows = con.execute(
        f"select question_id, lang, question, answers from prompts where dataset = ? and lang in ({marks})"
        " and question_id in (select unnest(?)) order by question_id, lang",
        [dataset, *langs, question_ids],
    ).fetchall()
    return [Unit(i, q, lang, text, tuple(answers)) for i, (q, lang, text, answers) in enumerate(rows)]


def _pick_languages(dataset: str, wanted: Sequence[str], available: list[str]) -> list[str]:
    """The dataset's own tags for the wanted languages (case-insensitive), sorted and without repeats."""
    by_lower = {tag.lower(): tag for tag in available}
    missing = [tag for tag in wanted if tag.lower() not in by_lower]
    if missing:
        raise XiciError(
            f"dataset {dataset!r} has no language {', '.join(missing)}",
            where="--languages",
            fix=f"choose among {', '.join(available)}",
        )
    return sorted({by_lower[tag.lower()] for tag in wanted})


def config_sha256(config: Any) -> str:
    """Hash of the model config's content (not where it was loaded from, nor the library version)."""
    data = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def prompts_sha256(units: Sequence[Unit], prompts: Sequence[Prompt]) -> str:
    """Hash of every unit's prompt ids: covers the dataset text, languages, limit, template and tokenizer."""
    digest = hashlib.sha256()
    for unit, prompt in zip(units, prompts, strict=True):
        digest.update(json.dumps([unit.question_id, unit.lang, prompt.ids]).encode() + b"\n")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers, stored with each run."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


@dataclass
class RecordResult:
    """What a call to :func:`record` did."""

    run_id: int
    created: bool
    n_units: int
    done_before: int
    recorded: int = 0
    already_finished: bool = False


def record(
    lake: Lake,
    spec: RecordSpec,
    *,
    device: str = "auto",
    batch_size: int = 8,
    on_batch: Callable[[BatchDone], None] | None = None,
    grader_options: Mapping[str, Any] | None = None,
    engine_options: Mapping[str, Any] | None = None,
    ray: RayOptions | None = None,
    allow_changed_model: bool = False,
) -> RecordResult:
    """Record a dataset with a model into the lake, or resume the run of the same spec.

    ``grader_options`` build the grader (``get_grader(spec.grader, **grader_options)``, e.g. the judge's
    model); they are kept in the run's params, and a run continues only with the same grader version.
    ``engine_options`` are the vLLM engine's (:data:`~xici.recorder.vllm_backend.ENGINE_OPTIONS`); they and
    the engine's resolved settings are kept in the params (``engine``) of the run this call creates.
    ``ray`` asks the batches on Ray workers (:mod:`xici.recorder.ray_pool`); the run is the same either way.
    The checkpoint's fingerprint (:mod:`xici.recorder.fingerprint`) is stored with a new run; a run is resumed
    only with the checkpoint it was started with, unless ``allow_changed_model`` (stored with the run).

    Everything that can be refused (unsupported model, unknown dataset or language, bad parameters) is
    refused before anything is written; the model weights are loaded only when there is work left.
    """
    from xici.moe import load_config, resolve

    if batch_size < 1:
        raise XiciError("--batch-size must be at least 1", where=f"--batch-size {batch_size}")
    grader_options = dict(grader_options or {})
    grader = get_grader(spec.grader, **grader_options)
    config = load_config(spec.model)
    layout = resolve(config).layout(config)
    device = placement(device, ray, spec.backend, engine_options)
    plan = _plan(lake, spec, device, config, layout, (engine_options or {}).get("max_model_len"))
    plan.params.update(
        device=device, batch_size=batch_size, grader_options=grader_options, grader_version=grader.version
    )
    spec, units = plan.spec, plan.units

    existing = lake.read(lambda con: _existing_run(con, plan.run_key, grader))
    if existing is not None and existing[1] == "finished":
        release(ray)
        return RecordResult(existing[0], False, len(units), len(units), already_finished=True)
    model = check_model(
        spec.model,
        None if existing is None else existing[2],
        run_id=0 if existing is None else existing[0],
        allow_changed=allow_changed_model,
        where="--model",
    )
    asking = spec.asker(device, grader_options=grader_options, engine_options=engine_options)
    with contextlib.closing(open_pool(asking, ray, lake)) as pool:
        params = {**plan.params, **model.params, "engine": pool.metadata}
        arrays = {
            "n_layers": layout.n_moe_layers,
            "top_k": layout.top_k,
            "n_experts": layout.n_experts,
            "gate_dtype": spec.gate_dtype,
            "store_logits": spec.store_logits,
        }

        def start(con: duckdb.DuckDBPyConnection) -> tuple[int, bool]:
            """The run row and its arrays together: a store that cannot be written leaves no run behind."""
            run_id, created = lake.get_or_create_run(
                con,
                plan.run_key,
                kind="record",
                dataset=spec.dataset,
                model=spec.model,
                model_config_hash=params["model_config_sha256"],
                architecture=layout.architecture,
                backend=spec.backend,
                n_moe_layers=layout.n_moe_layers,
                n_experts=layout.n_experts,
                top_k=layout.top_k,
                params=params,
                versions=library_versions(),
                n_units=len(units),
            )
            if not created:
                note_changes(con, run_id, model)
            lake.gates(con=con).create_run(run_id, **arrays)
            return run_id, created

        run_id, created = lake.write(start)
        done = run_batches(lake, run_id, units, pool, batch_size=batch_size, arrays=arrays, on_batch=on_batch)
    return RecordResult(run_id, created, len(units), done.done_before, recorded=done.asked)


@dataclass(frozen=True)
class _Plan:
    """A recording resolved before anything is loaded or written: its spec as stored, units, key, params."""

    spec: RecordSpec
    units: list[Unit]
    run_key: str
    params: dict[str, Any]


def _plan(
    lake: Lake, spec: RecordSpec, device: str, config: Any, layout: MoELayout, max_model_len: int | None
) -> _Plan:
    """Check the dataset, encode every prompt (each must fit the context), and key the run on what changes
    its data."""
    units = lake.read(lambda con: load_units(con, spec.dataset, spec.languages, spec.limit))
    lake.gates()  # refuse another lake's gate store before anything is written
    tokenizer = load_tokenizer(spec.model)
    spec.prompt_format.check(tokenizer)
    prompts = [spec.prompt_format.encode(tokenizer, u.question) for u in units]
    _check_context(spec, units, prompts, context_length(config, max_model_len))
    spec = replace(
        spec,
        model=str(Path(spec.model).resolve()) if Path(spec.model).is_dir() else spec.model,
        languages=tuple(sorted({u.lang for u in units})),
        dtype=resolve_dtype(spec.dtype, device),
    )
    params = {
        **asdict(spec),
        "model_config_sha256": config_sha256(config),
        "prompts_sha256": prompts_sha256(units, prompts),
    }
    run_key = stable_key({"kind": "record", **{k: params[k] for k in _DEFINING}})
    params.update(
        moe_layers=list(layout.moe_layers),
        n_layers=layout.n_layers,
        n_shared_experts=layout.n_shared_experts,
        gating=layout.gating,
    )
    return _Plan(spec, units, run_key, params)


def context_length(config: Any, max_model_len: int | None = None) -> int | None:
    """Tokens a prompt and its answer may take together: the model's positions (``max_model_len`` of vLLM
    when smaller), None when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [n for n in (getattr(text, "max_position_embeddings", None), max_model_len) if n]
    return min(limits) if limits else None


def _check_context(
    spec: RecordSpec, units: Sequence[Unit], prompts: Sequence[Prompt], limit: int | None
) -> None:
    """Refuse, before a run starts, the questions whose prompt and answer would not fit the context (the
    engine would fail on them, or cut them, after the run had begun)."""
    if limit is None:
        return
    over = [
        (u, len(p.ids))
        for u, p in zip(units, prompts, strict=True)
        if len(p.ids) + spec.max_new_tokens > limit
    ]
    if not over:
        return
    named = ", ".join(f"{u.question_id} ({u.lang}, {n} tokens)" for u, n in over[:5])
    more = f" and {len(over) - 5} more" if len(over) > 5 else ""
    raise XiciError(
        f"{len(over)} prompt(s) and their {spec.max_new_tokens} new tokens do not fit the model's context of "
        f"{limit} tokens: {named}{more}",
        where=f"--dataset {spec.dataset}",
        fix="shorten or remove these questions and import the dataset again, leave their languages out "
        "(--languages), or lower --max-new-tokens",
    )


def _existing_run(
    con: duckdb.DuckDBPyConnection, run_key: str, grader: Grader
) -> tuple[int, str, dict[str, Any] | None] | None:
    """(run_id, status, model fingerprint) of the run with this key, refusing to continue it with another
    grader or version."""
    row = con.execute(
        "select run_id, status, params ->> 'grader', params ->> 'grader_version',"
        " params ->> 'model_fingerprint' from runs where run_key = ?",
        [run_key],
    ).fetchone()
    if row is None:
        return None
    if row[2] != grader.name:
        raise XiciError(
            f"run {row[0]} was recorded with the grader {row[2]!r}, not {grader.name!r}",
            where="--grader",
            fix=f"resume it with --grader {row[2]}, then: xici grade --run {row[0]} --grader {grader.name}",
        )
    if row[3] is not None and row[3] != grader.version:
        raise XiciError(
            f"run {row[0]} was graded by {grader.name} version {row[3]!r}, not {grader.version!r}",
            where="--judge-* options" if grader.name == "judge" else "--grader",
            fix=f"resume it with the options it was recorded with (runs.params), then grade it again with "
            f"xici grade --run {row[0]} --grader {grader.name}",
        )
    return row[0], row[1], None if row[4] is None else json.loads(row[4])
