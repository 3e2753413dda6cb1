"""The pipeline from Python: ``xici.record``, ``xici.analyze``, ``xici.ablate``, ``xici.report``.

These are the functions behind the ``xici`` commands of the same names: each takes the lake (a
:class:`~xici.warehouse.Lake` or its folder) and the command's parameters under the options' names
(``--max-new-tokens`` is ``max_new_tokens``), checks them the same way, shows a progress bar for long work,
and returns what it did. The commands parse their options, call these, and print the result; so the two
cannot drift apart, and an option added to a command is added here. Like the commands, everything is
resumable and idempotent: calling again with the same parameters continues or reuses what the lake holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xici.ablation.conditions import DEFAULT_BASELINES, RANDOM_POOLS
from xici.errors import XiciError
from xici.recorder.prompting import DEFAULT_SYSTEM
from xici.warehouse import Lake

if TYPE_CHECKING:
    from xici.ablation.runner import AblationResult
    from xici.analysis.identify import AnalysisRecord
    from xici.analysis.means import RunInfo
    from xici.analysis.params import Preset
    from xici.recorder.judge import JudgeOptions
    from xici.recorder.pool import RayOptions
    from xici.recorder.run import RecordResult
    from xici.report import ReportFiles


def writable(lake: Lake | str | Path) -> Lake:
    """The lake to write: a folder becomes a Lake; a Lake opened read-only is refused (it says how)."""
    if not isinstance(lake, Lake):
        return Lake(lake)
    lake._ensure_root()  # refuses a read-only lake and releases this process's relations on it
    return lake


def record(
    lake: Lake | str | Path,
    *,
    model: str,
    dataset: str,
    languages: Sequence[str] | None = None,
    limit: int | None = None,
    system: str = DEFAULT_SYSTEM,
    prompt_template: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    device: str = "auto",
    backend: str = "transformers",
    engine_options: Mapping[str, Any] | None = None,
    ray: RayOptions | None = None,
    gates_url: str | None = None,
    dtype: str = "auto",
    gate_dtype: str = "float16",
    store_logits: bool = False,
    grader: str = "match",
    judge: JudgeOptions | None = None,
    allow_changed_model: bool = False,
) -> RecordResult:
    """Ask every question of a dataset in every language and record its routing (``xici record``).

    ``model`` is a checkpoint folder or hub id of a supported MoE model, ``dataset`` an imported dataset;
    ``languages`` (default: all) and ``limit`` (first questions by id) narrow it. ``system`` is the system
    turn ("": none). Greedy decoding, ``max_new_tokens`` per answer, graded
    by ``grader`` (``judge`` holds the judge's options). ``batch_size``, ``device``, ``engine_options`` (vLLM
    settings) and ``ray`` (:class:`~xici.recorder.pool.RayOptions`) say how to run, not what is recorded:
    calling again with other values resumes the same run, but only with the checkpoint files it was
    recorded with, unless ``allow_changed_model``. Returns the run id and what this call did.
    """
    from xici.recorder.run import RecordSpec
    from xici.recorder.run import record as run_record

    lake = writable(lake)
    spec = RecordSpec(
        model=model,
        dataset=dataset,
        languages=None if languages is None else tuple(languages),
        limit=limit,
        system=system,
        prompt_template=prompt_template,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        gate_dtype=gate_dtype,
        store_logits=store_logits,
        grader=grader,
        backend=backend,
    )
    grader_options = _judge(judge).for_grader(grader, model=lambda: model, device=device, dtype=dtype)
    with lake.using_gates(gates_url):
        return _with_progress(
            lambda progress: run_record(
                lake,
                spec,
                device=device,
                batch_size=batch_size,
                on_batch=lambda done: progress("recording", done),
                grader_options=grader_options,
                engine_options=engine_options,
                ray=ray,
                allow_changed_model=allow_changed_model,
            )
        )


@dataclass(frozen=True)
class Analyses:
    """What :func:`analyze` did: the stored analyses of its parameter points, and their summaries."""

    run_id: int
    model: str
    n_moe_layers: int
    #: The preset behind the defaults of tau and the layer window (None: the generic defaults).
    preset: Preset | None
    records: list[AnalysisRecord]
    #: Per analysis id, its row of the ``analysis_summary`` view (the paper's Table 1).
    summaries: dict[int, dict[str, Any]] = field(repr=False)
    #: The parameters a sweep varied, in the order given.
    swept: list[str] = field(default_factory=list)
    #: What to know about the result: an unfinished run analysed as it stands, gate weights not summing to 1.
    notes: list[str] = field(default_factory=list)

    @property
    def analysis_ids(self) -> list[int]:
        return [record.analysis_id for record in self.records]


def analyze(
    lake: Lake | str | Path,
    run: int,
    *,
    preset: str = "auto",
    layers: str | tuple[int, int] | None = None,
    sweep: Mapping[str, Sequence[Any]] | Sequence[str] = (),
    partial: bool = False,
    **params: Any,
) -> Analyses:
    """Find the experts behind each question of a run (``xici analyze --run RUN``).

    ``preset`` (auto: the one named in the run's model id; none; or a name) sets tau and the layer window;
    ``layers`` is a half-open MoE-layer window, ``"6:42"`` or ``(6, 42)``. ``params`` are the other
    parameters of :class:`~xici.analysis.params.AnalysisParams` (alpha, tau, max_experts, blacklist_top,
    blacklist_share, grader, mwu, min_group, ...); None or absent: the preset's or the method's default.
    ``sweep`` runs a grid, ``{"tau": [0.001, 0.01], "max-experts": [5, 25]}`` (or the command's
    ``"tau=0.001,0.01"`` strings). A point stored earlier with the same data is reused. A run that is
    not finished is refused unless ``partial``: its analysis would be that of part of the dataset.
    """
    from xici.analysis.identify import analyze as run_analyses
    from xici.analysis.means import run_info, weight_per_token
    from xici.analysis.params import SWEEPABLE, expand, find_preset, parse_layers, parse_sweep, resolve
    from xici.analysis.summary import summaries

    lake = writable(lake)
    known = _parameter_names()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise XiciError(
            f"analyze has no parameter {', '.join(unknown)}",
            where="xici.analyze",
            fix=f"use preset, layers, sweep, partial or one of {', '.join(known)}",
        )
    items = (
        [f"{name.replace('_', '-')}={','.join(map(_sweep_value, values))}" for name, values in sweep.items()]
        if isinstance(sweep, Mapping)
        else list(sweep)
    )
    info = lake.write(lambda con: run_info(con, run))  # a writing connection: migrates an old warehouse
    notes = [note for note in [_unfinished(info, partial)] if note is not None]
    chosen = find_preset(preset, info.model, info.n_moe_layers)
    window = parse_layers(layers) if isinstance(layers, str) else layers
    base = resolve(chosen, info.n_moe_layers, layers=window, **params)
    grid = parse_sweep(items)
    points = expand(base, grid, info.n_moe_layers) if grid else [base]
    # Idempotent (stored points are reused), so it can simply run again when another process held the lock.
    records = lake.retrying(lambda _: run_analyses(lake, run, points))
    rows = {row["analysis_id"]: row for row in lake.read(summaries)}
    swept = [SWEEPABLE[item.partition("=")[0]][0] for item in items]
    mine = {r.analysis_id: rows[r.analysis_id] for r in records}
    scale = lake.read(lambda con: weight_per_token(con, run))
    if scale is not None and abs(scale - 1) > 0.02:  # beyond the rounding of 16-bit weights
        notes.append(
            f"The model's gate weights sum to {scale:.3g} per token, not 1 (scaled, or not renormalised): m, "
            'the median differences and --tau are on that scale (docs/method.md, "Weights and the scale of '
            'tau").'
        )
    return Analyses(run, info.model, info.n_moe_layers, chosen, records, mine, swept, notes)


def _unfinished(info: RunInfo, partial: bool) -> str | None:
    """Refuse an unfinished run unless ``partial``: its language means, blacklist and question splits would be
    those of part of the dataset, and the expert sets would go on to ablation and the report as the run's.
    With ``partial`` the analysis is stored for the run as it is now (its key holds the run's sequence count,
    so it is not reused once the run grows), with a warning."""
    if not info.unfinished:
        return None
    state = f"run {info.run_id} is not finished: {info.n_sequences} of {info.n_units} units are recorded"
    if not partial:
        raise XiciError(
            state,
            where="--run",
            fix="finish it by running its xici record command again (it resumes where it stopped), or pass "
            "--partial to analyse the units recorded so far",
        )
    return f"Warning: {state}; analysing those only (--partial)."


def _parameter_names() -> list[str]:
    from xici.analysis.params import param_names

    return [name for name in param_names() if name not in ("layer_start", "layer_stop")]


def _sweep_value(value: Any) -> str:
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple | list) else str(value)


def ablate(
    lake: Lake | str | Path,
    analysis: int,
    *,
    baselines: str | Sequence[str] = DEFAULT_BASELINES,
    random_pool: str = RANDOM_POOLS[0],
    boost: float | None = None,
    per_expert: bool = False,
    leave_one_out: bool = False,
    questions: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    backend: str | None = None,
    model: str | None = None,
    allow_changed_model: bool = False,
    engine_options: Mapping[str, Any] | None = None,
    ray: RayOptions | None = None,
    judge: JudgeOptions | None = None,
) -> AblationResult:
    """Switch each question's experts off and ask it again in every language (``xici ablate``).

    ``baselines``: besides XICI, some of random (expert sets of the same size, drawn from ``random_pool``:
    ``window``, the paper's, or ``window-minus-blacklist``), shuffle (another question's set) and none (asked
    again with nothing off: the noise floor), as names or the command's comma-separated text; ``()`` for
    XICI alone. Draws use ``seed``. Instead of switching the sets off: ``boost`` raises their router logits
    by that much; ``per_expert`` switches each expert off alone (and with ``leave_one_out`` all but it);
    ``questions`` keeps the first N questions with experts. ``backend`` defaults to the recorded run's;
    ``judge`` holds the judge's options when the analysis' grader is the judge (default: the recording's).
    The checkpoint must have the files the run was recorded with (``model``: where it is now, when it moved),
    unless ``allow_changed_model`` (stored with the runs). Returns every condition's run and the paper's
    Table 2 (``result.metrics``); raises :class:`DeactivationFailed` when a deactivated expert was selected,
    which the routing check of every ablated token rules out.
    """
    from xici.ablation.conditions import check_baselines, label, parse_baselines
    from xici.ablation.runner import AblationResult, Instrument, run_ablation

    lake = writable(lake)
    if leave_one_out and not per_expert:
        raise XiciError("--leave-one-out goes with --per-expert", where="--leave-one-out")
    if per_expert and boost is not None:
        raise XiciError("give --boost or --per-expert, not both", where="--boost")
    if per_expert:
        modes = ["single", *(["all-but-one"] if leave_one_out else [])]
        instruments = [Instrument(mode, questions=questions) for mode in modes]
    elif boost is not None:
        instruments = [Instrument("boost", boost=boost, questions=questions)]
    else:
        instruments = [Instrument(questions=questions)]
    names = parse_baselines(baselines) if isinstance(baselines, str) else check_baselines(list(baselines))
    grader_options = _ablation_grader(lake, analysis, _judge(judge), device, model)
    result = AblationResult(analysis)
    for instrument in instruments:
        done = _with_progress(
            lambda progress, instrument=instrument: run_ablation(
                lake,
                analysis,
                baselines=names,
                random_pool=random_pool,
                seed=seed,
                batch_size=batch_size,
                device=device,
                grader_options=grader_options,
                backend=backend,
                engine_options=engine_options,
                ray=ray,
                model=model,
                allow_changed_model=allow_changed_model,
                on_batch=lambda condition, batch: progress(f"ablating: {label(condition)}", batch),
                instrument=instrument,
            )
        )
        result.runs.extend(done.runs)
        result.metrics = done.metrics
    broken: list[Any] = [row for row in result.metrics if row.violations]
    if boost is None:  # a boost selects its experts more often; only a deactivation promises never
        broken += [run for run in result.runs if run.check is not None and run.check.violations]
    if broken:
        raise DeactivationFailed(result, len(broken))
    return result


class DeactivationFailed(XiciError):
    """Deactivated experts were selected in an ablation: a bug in xici's deactivation for the model.

    ``result`` holds the runs and their Table 2, so the check's counts can be shown with the error.
    """

    def __init__(self, result: AblationResult, n_broken: int) -> None:
        super().__init__(
            f"deactivated experts were selected in {n_broken} ablation runs of analysis {result.analysis_id}",
            where="the deactivation check",
            fix="this is a bug in xici's expert deactivation for this model: please report it with the "
            "model's config; the routing of the runs is in the lake (xici sql)",
        )
        self.result = result


def _ablation_grader(
    lake: Lake, analysis_id: int, judge: JudgeOptions, device: str, model: str | None
) -> dict[str, Any] | None:
    """Options of the analysis' grader: None (the runner takes the recording's) when the recording graded
    with it and no judge option is given, else built from the judge options with the defaults of xici grade
    (the recorded model judges)."""
    from xici.recorder.judge import JudgeOptions

    row = lake.read(
        lambda con: con.execute(
            "select a.grader, r.model, r.params ->> 'grader' from analyses a join runs r using (run_id)"
            " where a.analysis_id = ?",
            [analysis_id],
        ).fetchall()
    )
    if not row or (row[0][0] == row[0][2] and judge == JudgeOptions()):
        return None
    return judge.for_grader(row[0][0], model=lambda: model or row[0][1], device=device)


def report(
    lake: Lake | str | Path,
    out: str | Path | None = None,
    *,
    run: int | None = None,
    analysis: int | None = None,
) -> ReportFiles:
    """Write the paper's tables and figures for the lake (``xici report``): report.md, a self-contained
    report.html and the figures, into ``out`` (default ``<lake>/report``). Figures show ``run`` (default:
    the newest recording) and ``analysis`` (default: the run's newest with default parameters)."""
    from xici.report import build_report

    lake = lake if isinstance(lake, Lake) else Lake(lake)
    return build_report(lake, None if out is None else Path(out), run_id=run, analysis_id=analysis)


def _judge(judge: JudgeOptions | None) -> JudgeOptions:
    from xici.recorder.judge import JudgeOptions

    return judge if judge is not None else JudgeOptions()


def _with_progress(work: Any) -> Any:
    """``work(progress)`` with one progress bar per label of batched work (see xici.progress)."""
    from xici.progress import BatchProgress, progress_bar

    with progress_bar() as bar:
        return work(BatchProgress(bar))
