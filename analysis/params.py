"""Parameters of an analysis (method.md, Stage 2), per-model presets, sweeps and the analysis key.

Defaults are the paper's where it gives them (method.md, Stage 2): at most 25 experts per question,
blacklist = top 1% of a sequence's ranking in more than 5% of sequences. alpha 0.05 is xici's choice: the
paper's value is not legible (method.md, "Choices where the paper is open"). tau and the layer window
depend on the model, so they come from a preset: ``qwen3-30b-a3b`` (tau 0.005, MoE layers 6:42 of 48) and
``glm-4.5-air`` (tau 0.01, MoE layers 5:40 of 45, i.e. model layers 6..40 after the dense layer 0). With
``preset="auto"`` the preset whose name occurs in the run's model id is used; other models get tau 0.005
and a window that drops round(L/8) layers at each end (6 of 48, like Qwen3; 1 of 4 for a tiny testbed
model), which ``xici analyze`` prints. Explicit values override the preset. tau is on the scale of the
model's gate weights (method.md, "Weights and the scale of tau").

Layer windows are half-open ranges of MoE-layer indices counted from 0, written ``START:END``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from xici.analysis.mwu import METHODS as MWU_METHODS
from xici.errors import XiciError
from xici.keys import stable_key

#: Bump when a change to the method changes the expert sets of the same data and parameters, so stored
#: analyses are not reused for a different computation.
METHOD_VERSION = 2  # 2: "p < alpha" decided on exact counts where p is exact; --mwu, --min-group

DEFAULT_TAU = 0.005

#: Localizers (method.md, "Rival localizers"): ``xici`` (the test), ``median-diff`` (the same deltas ranked
#: by median difference, no test), ``risk-diff`` (SteerMoE's contrast of routing frequencies).
METHODS: tuple[str, ...] = ("xici", "risk-diff", "median-diff")
#: How many experts a rival localizer keeps per question: ``matched``, as many as XICI's set of the same
#: parameters (so rates compare like for like); ``cap``, up to ``max_experts``. XICI itself ignores it.
BUDGETS: tuple[str, ...] = ("matched", "cap")
#: Fields added with the rival localizers, and their values before them: left out of the analysis key at
#: these values, so analyses stored earlier keep their keys.
_LOCALIZER_DEFAULTS: dict[str, Any] = {
    "method": "xici",
    "lang_mean": True,
    "blacklist": True,
    "budget": "matched",
}


@dataclass(frozen=True)
class Preset:
    """Model-specific defaults from method.md."""

    name: str
    n_moe_layers: int
    layers: tuple[int, int]
    tau: float


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qwen3-30b-a3b", n_moe_layers=48, layers=(6, 42), tau=0.005),
        Preset("glm-4.5-air", n_moe_layers=45, layers=(5, 40), tau=0.01),
    )
}


@dataclass(frozen=True)
class AnalysisParams:
    """Everything besides the recorded data that decides an analysis' expert sets."""

    layer_start: int
    layer_stop: int
    alpha: float = 0.05
    tau: float = DEFAULT_TAU  # on the scale of the gate weights: 1 per token, or as the model mixes them
    max_experts: int = 25
    blacklist_top: float = 0.01
    blacklist_share: float = 0.05
    grader: str = "match"
    mwu: str = "auto"  # how the test's p is computed: auto, exact or asymptotic (analysis/mwu.py)
    min_group: int = 1  # a question is tested with at least this many correct and this many wrong languages
    method: str = "xici"  # the localizer (METHODS)
    lang_mean: bool = True  # subtract the language mean (Eq. 2); False drops that step
    blacklist: bool = True  # never choose generalist experts; False drops that step
    budget: str = "matched"  # experts per question of a rival localizer (BUDGETS)

    def validate(self, n_moe_layers: int) -> None:
        """Refuse values that make no sense for a run with ``n_moe_layers`` MoE layers."""
        if not 0 <= self.layer_start < self.layer_stop <= n_moe_layers:
            raise XiciError(
                f"layer window {self.layer_start}:{self.layer_stop} is not inside the run's "
                f"{n_moe_layers} MoE layers",
                where="--layers",
                fix=f"give START:END with 0 <= START < END <= {n_moe_layers} (END excluded)",
            )
        if not 0.0 < self.alpha <= 1.0:
            raise XiciError(f"alpha must be in (0, 1], got {self.alpha}", where="--alpha")
        if not (math.isfinite(self.tau) and self.tau >= 0.0):
            raise XiciError(f"tau must be a finite number >= 0, got {self.tau}", where="--tau")
        if self.max_experts < 1:
            raise XiciError(f"max-experts must be at least 1, got {self.max_experts}", where="--max-experts")
        for name in ("blacklist_top", "blacklist_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                option = "--" + name.replace("_", "-")
                raise XiciError(f"{option} is a share and must be in [0, 1]", where=option)
        if not self.grader:
            raise XiciError("the grader name is empty", where="--grader")
        if self.mwu not in MWU_METHODS:
            raise XiciError(
                f"unknown Mann-Whitney method {self.mwu!r}",
                where="--mwu",
                fix=f"use one of {', '.join(MWU_METHODS)}",
            )
        if self.min_group < 1:
            raise XiciError(f"min-group must be at least 1, got {self.min_group}", where="--min-group")
        for name, value, known in (("method", self.method, METHODS), ("budget", self.budget, BUDGETS)):
            if value not in known:
                fix = f"use one of {', '.join(known)}"
                raise XiciError(f"unknown {name} {value!r}", where=f"--{name}", fix=fix)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_label(params: AnalysisParams | dict[str, Any]) -> str:
    """``risk-diff`` / ``xici, no language mean`` / ``median-diff (cap), no blacklist``: the localizer and
    the steps it dropped."""
    values = params.as_dict() if isinstance(params, AnalysisParams) else params
    label = values["method"] + (" (cap)" if values["method"] != "xici" and values["budget"] == "cap" else "")
    steps = (("lang_mean", "language mean"), ("blacklist", "blacklist"))
    dropped = [step for name, step in steps if not values[name]]
    return ", ".join([label, *(f"no {step}" for step in dropped)])


def default_window(n_moe_layers: int) -> tuple[int, int]:
    """Drop round(L/8) layers at each end, or keep everything when nothing would be left."""
    drop = math.floor(n_moe_layers / 8 + 0.5)
    return (drop, n_moe_layers - drop) if n_moe_layers - 2 * drop >= 1 else (0, n_moe_layers)


def parse_layers(text: str) -> tuple[int, int]:
    """``"6:42"`` -> (6, 42)."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(stop)
    except ValueError:
        raise XiciError(
            f"cannot read the layer window {text!r}",
            where="--layers",
            fix="write START:END, a half-open range of MoE-layer indices from 0, e.g. 6:42",
        ) from None


def find_preset(name: str, model: str, n_moe_layers: int) -> Preset | None:
    """The preset named ``name``; ``auto``: the one whose name is in the model id; ``none``: no preset."""
    if name == "none":
        return None
    if name == "auto":
        found = [p for p in PRESETS.values() if p.name in model.lower()]
        return found[0] if found and found[0].n_moe_layers == n_moe_layers else None
    if name not in PRESETS:
        raise XiciError(
            f"unknown preset {name!r}", where="--preset", fix=f"use auto, none or one of {', '.join(PRESETS)}"
        )
    preset = PRESETS[name]
    if preset.n_moe_layers != n_moe_layers:
        raise XiciError(
            f"preset {name} is for a model with {preset.n_moe_layers} MoE layers, "
            f"but the run has {n_moe_layers}",
            where="--preset",
            fix="pick the preset of the run's model, or give --layers and --tau yourself",
        )
    return preset


def resolve(preset: Preset | None, n_moe_layers: int, **given: Any) -> AnalysisParams:
    """Parameters from the preset (or the generic defaults), overridden by the values given (None: unset)."""
    start, stop = preset.layers if preset else default_window(n_moe_layers)
    base = AnalysisParams(start, stop, tau=preset.tau if preset else DEFAULT_TAU)
    chosen = {k: v for k, v in given.items() if v is not None}
    if "layers" in chosen:
        chosen["layer_start"], chosen["layer_stop"] = chosen.pop("layers")
    params = replace(base, **chosen)
    params.validate(n_moe_layers)
    return params


#: --sweep names -> (field, parser)
SWEEPABLE: dict[str, tuple[str, Any]] = {
    "alpha": ("alpha", float),
    "tau": ("tau", float),
    "max-experts": ("max_experts", int),
    "blacklist-top": ("blacklist_top", float),
    "blacklist-share": ("blacklist_share", float),
    "layers": ("layers", parse_layers),
    "mwu": ("mwu", str),
    "min-group": ("min_group", int),
    "method": ("method", str),
}


def parse_sweep(items: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """``["tau=0.001,0.01", "max-experts=5,25"]`` -> {"tau": [0.001, 0.01], "max_experts": [5, 25]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in SWEEPABLE or not values:
            raise XiciError(
                f"cannot read --sweep {item!r}",
                where="--sweep",
                fix=f"write NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}",
            )
        field, parse = SWEEPABLE[name]
        if field in grid:
            raise XiciError(f"--sweep {name} is given twice", where="--sweep", fix="give each name once")
        try:
            grid[field] = [parse(v) for v in values.split(",")]
        except ValueError:
            raise XiciError(f"cannot read the values of --sweep {item!r}", where="--sweep") from None
    return grid


def expand(base: AnalysisParams, grid: dict[str, list[Any]], n_moe_layers: int) -> list[AnalysisParams]:
    """Every point of the grid over ``base``, in the order the values were given (last name fastest)."""
    points = []
    for values in itertools.product(*grid.values()):
        change = dict(zip(grid, values, strict=True))
        if "layers" in change:
            change["layer_start"], change["layer_stop"] = change.pop("layers")
        point = replace(base, **change)
        point.validate(n_moe_layers)
        if point not in points:
            points.append(point)
    return points


def analysis_key(run_id: int, fingerprint: dict[str, Any], params: AnalysisParams | dict[str, Any]) -> str:
    """sha256 of what decides the result: the method version, the run's data and the parameters (as stored
    in ``analyses.params``, or the dataclass)."""
    values = params.as_dict() if isinstance(params, AnalysisParams) else params
    values = {k: v for k, v in values.items() if k not in _LOCALIZER_DEFAULTS or _LOCALIZER_DEFAULTS[k] != v}
    if values.get("method", "xici") == "xici":
        values.pop("budget", None)  # XICI keeps what passes, up to the cap, whatever the budget says
    payload = {"method": METHOD_VERSION, "run_id": run_id, "data": fingerprint, "params": values}
    return stable_key(payload)


def param_names() -> list[str]:
    """Field names of :class:`AnalysisParams`, which are also columns of the ``analyses`` table."""
    return [f.name for f in fields(AnalysisParams)]
