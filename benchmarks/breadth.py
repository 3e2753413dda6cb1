"""XICI against routing breadth (issue 20): planted-knowledge worlds trained at several top-k of E experts,
for both testbed families, each run through xici's default pipeline; prints a table, draws a figure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/breadth.py --out ../breadth-study \\
        [--families qwen3-moe,glm4-moe] [--breadths 2/64,4/64,8/64] [--shared 0] [--seeds 0] \\
        [--diagnose] [--questions 40] [--setting tau=0.01,max-experts=10 ...] [--report] [--figure PNG]

A world is (family, experts E, top-k, shared experts, seed): the shipped testbed's world design (200
entities, 2 relations, 12 languages) with the family's model at that routing. Each world has its folder
under ``--out``: ``worlds/NAME`` (the testbed build: checkpoint, dataset, accuracies), ``lakes/NAME`` (its
xici lake) and ``results/NAME.json`` (what this script measured, with wall and CPU seconds per step).
Everything is cached: a trained world, a recorded run, a stored analysis or ablation is reused, so an
interrupted run resumes and several processes can work on different worlds at once. Qwen3-MoE 2 of 64,
seed 0 is the shipped checkpoint, not retrained.

Per world, the default pipeline: import the dataset, record (greedy, 8 new tokens, float32, CPU), analyse
with xici's defaults, ablate with the random and shuffled baselines (draw seed 0). ``--setting`` adds
other analysis parameters (``tau=0.01,max-experts=10``), each analysed and ablated the same way.
``--diagnose`` adds the instruments: a tau x max-experts sweep (set sizes and what limits them: the test,
tau or the cap; no ablation), per-expert necessity over the first ``--questions`` questions with experts,
and the rival localizers risk-diff and median-diff (their own sets, matched budget, ablated without
baselines). ``--report`` only collects the results that exist into the table and the figure.

Benchmark: prints figures, asserts nothing. One torch thread per process (the testbed's choice).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("qwen3-moe", "glm4-moe")
SWEEP = {"tau": [0.0, 0.001, 0.005, 0.01, 0.02], "max-experts": [5, 10, 25, 50]}
RIVALS = ("risk-diff", "median-diff")
MAX_NEW_TOKENS = 8  # as the demo: one value word and the end of turn, room for a wrong ramble


@dataclass(frozen=True)
class World:
    """One trained world of the study."""

    family: str
    experts: int
    top_k: int
    shared: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.family}-e{self.experts}-k{self.top_k}-s{self.shared}-seed{self.seed}"

    @property
    def breadth(self) -> float:
        """Share of the routed experts a token selects."""
        return self.top_k / self.experts

    @property
    def shipped(self) -> bool:
        return self == World("qwen3-moe", 64, 2, 0, 0)


@contextmanager
def timed(into: dict[str, Any], step: str) -> Iterator[None]:
    """Wall and CPU seconds (this process and its children) of a step, stored under ``step``; a step timed
    before (its result reused by a later call) keeps its first figures."""
    if step in into:
        yield
        return
    wall, cpu = time.perf_counter(), _cpu()
    yield
    into[step] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(_cpu() - cpu, 1)}
    print(f"  {step}: {into[step]['wall_s']} s wall, {into[step]['cpu_s']} s CPU", flush=True)


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train(world: World, out: Path, times: dict[str, Any]) -> Path:
    """The world's testbed folder: the shipped one, one built earlier, or built now."""
    from xici.testbed.train import ModelConfig, TestbedPaths, build_testbed, shipped_testbed

    if world.shipped:
        return shipped_testbed().checkpoint
    folder = out / "worlds" / world.name
    paths = TestbedPaths.in_folder(folder)
    if paths.accuracies.exists():  # written last by build_testbed: the build is whole
        return folder
    config = ModelConfig(
        arch=world.family, experts=world.experts, top_k=world.top_k, shared_experts=world.shared
    )
    start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if step % 100 == 0:
            print(
                f"  {world.name} step {step} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    with timed(times, "train"):
        build_testbed(folder, seed=world.seed, model_config=config, on_step=on_step)
    return folder


def pipeline_result(lake: Any, run: int, analysis: int) -> dict[str, Any]:
    """An analysis' summary, what limited its sets, and its ablations' Table 2 rows."""
    from xici.ablation.metrics import metrics_rows

    summary = lake.read(
        lambda con: con.execute(
            "select s.mixed, s.with_experts, s.avg_experts, s.tau, s.max_experts, s.layer_start,"
            " s.layer_stop, s.blacklisted, s.average_accuracy, avg(q.n_significant), avg(q.n_passed),"
            " avg((q.n_passed > s.max_experts)::int) from analysis_summary s"
            " join analysis_questions q using (analysis_id) where analysis_id = ? and q.outcome = 'mixed'"
            " group by all",
            [analysis],
        ).fetchone()
    )
    names = [
        "mixed",
        "with_experts",
        "avg_experts",
        "tau",
        "max_experts",
        "layer_start",
        "layer_stop",
        "blacklisted",
        "average_accuracy",
        "avg_significant",
        "avg_passed",
        "share_capped",
    ]
    rows = lake.read(lambda con: metrics_rows(con, [analysis]))
    conditions = {
        row.condition: {
            "asr": row.metrics.asr,
            "sgr": row.metrics.sgr,
            "rate_diff": row.metrics.rate_diff,
            "questions": row.metrics.n_questions,
            "violations": row.violations,
            "checked_tokens": row.checked_tokens,
        }
        for row in rows
        if row.seed in (None, 0)
    }
    return {
        "run": run,
        "analysis": analysis,
        **dict(zip(names, summary, strict=True)),
        "conditions": conditions,
    }


def parse_setting(text: str) -> dict[str, Any]:
    """``tau=0.01,max-experts=10`` -> analyze's keyword arguments."""
    from xici.analysis.params import SWEEPABLE

    given: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        field, parse = SWEEPABLE[name]
        given[field] = parse(value)
    return given


def run_world(world: World, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) the world, run the pipeline and the asked instruments; the result, also saved."""
    import xici
    from xici.cli.demo import import_once

    path = out / "results" / f"{world.name}.json"
    result = json.loads(path.read_text()) if path.exists() else {"world": asdict(world), "times": {}}
    times = result["times"]
    print(f"== {world.name} (breadth {world.breadth:.1%})", flush=True)
    checkpoint = train(world, out, times)
    result["accuracies"] = json.loads((checkpoint / "accuracies.json").read_text())["per_language"]
    lake = xici.open(out / "lakes" / world.name, read_only=False)
    import_once(lake, "testbed", checkpoint / "dataset.jsonl")
    with timed(times, "record"):
        run = xici.record(
            lake,
            model=str(checkpoint),
            dataset="testbed",
            max_new_tokens=MAX_NEW_TOKENS,
            dtype="float32",
            device="cpu",
            batch_size=args.batch_size,
        ).run_id
    for label, given in [("default", {}), *((s, parse_setting(s)) for s in args.setting)]:
        if label in result and not args.refresh:
            continue
        suffix = "" if label == "default" else f" {label}"
        with timed(times, "analyze" + suffix):
            (analysis,) = xici.analyze(lake, run, **given).analysis_ids
        with timed(times, "ablate" + suffix):
            xici.ablate(lake, analysis, device="cpu", batch_size=args.batch_size)
        result[label] = pipeline_result(lake, run, analysis)
        _save(path, result)
    if args.diagnose:
        result["diagnosis"] = diagnose(
            lake, run, result["default"]["analysis"], args.questions, args.batch_size
        )
    _save(path, result)
    lake.close()
    return result


def _save(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def diagnose(lake: Any, run: int, analysis: int, questions: int, batch_size: int) -> dict[str, Any]:
    """The instruments on one world: set sizes over a sweep, per-expert necessity, rival localizers."""
    import xici

    found: dict[str, Any] = {"sweep": []}
    sweep = xici.analyze(lake, run, sweep=SWEEP)
    for point in sweep.analysis_ids:
        row = pipeline_result(lake, run, point)
        found["sweep"].append(
            {
                k: row[k]
                for k in (
                    "tau",
                    "max_experts",
                    "with_experts",
                    "avg_experts",
                    "avg_significant",
                    "avg_passed",
                    "share_capped",
                )
            }
        )
    xici.ablate(
        lake,
        analysis,
        baselines=(),
        per_expert=True,
        questions=questions,
        device="cpu",
        batch_size=batch_size,
    )
    necessity = lake.read(
        lambda con: con.execute(
            "select count(*), avg((n_now_wrong > 0)::int), sum(n_now_wrong) / sum(n_correct_before)"
            " from expert_necessity where analysis_id = ? and question_limit = ?",
            [analysis, questions],
        ).fetchone()
    )
    set_asr = lake.read(
        lambda con: con.execute(
            "select count(*) filter (where p.before and not p.after) / count(*) filter (where p.before"
            " and p.after is not null) from ablations b join ablation_pairs p using (run_id)"
            " where b.analysis_id = ? and b.condition = 'xici' and b.mode = 'deactivate'"
            " and b.questions is null"
            " and p.question_id in (select distinct question_id from expert_necessity"
            "  where analysis_id = ? and question_limit = ?)",
            [analysis, analysis, questions],
        ).fetchone()
    )
    found["per_expert"] = {
        "questions": questions,
        "experts": necessity[0],
        "share_necessary": necessity[1],
        "single_asr": necessity[2],
        "set_asr_same_questions": set_asr[0],
    }
    found["rivals"] = {}
    for method in RIVALS:
        (rival,) = xici.analyze(lake, run, method=method).analysis_ids
        xici.ablate(lake, rival, baselines=(), device="cpu", batch_size=batch_size)
        found["rivals"][method] = pipeline_result(lake, run, rival)
    return found


def _ratio(xici_rd: float | None, base: float | None) -> str:
    if xici_rd is None or base is None:
        return "-"
    if base <= 0 or xici_rd / base > 100:
        return "> 100x"  # a baseline at or below zero: no effect beyond chance
    return f"{xici_rd / base:.1f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(results: list[dict[str, Any]], label: str = "default") -> str:
    """The study's markdown table, one row per world that has ``label``."""
    lines = [
        "| family | breadth | shared | seed | with experts | experts / question | XICI ASR | XICI RD "
        "| random RD | shuffled RD | RD / random | RD / shuffled | violations |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        if label not in result:
            continue
        world, row = World(**result["world"]), result[label]
        cond = row["conditions"]
        rd = {name: cond.get(name, {}).get("rate_diff") for name in ("xici", "random", "shuffle")}
        lines.append(
            f"| {world.family} | {world.top_k}/{world.experts} ({world.breadth:.1%}) | {world.shared} "
            f"| {world.seed} | {row['with_experts']} / {row['mixed']} | {row['avg_experts'] or 0:.1f} "
            f"| {_pct(cond.get('xici', {}).get('asr'))} | {_pct(rd['xici'])} | {_pct(rd['random'])} "
            f"| {_pct(rd['shuffle'])} | {_ratio(rd['xici'], rd['random'])} "
            f"| {_ratio(rd['xici'], rd['shuffle'])} "
            f"| {sum(c['violations'] for c in cond.values())} |"
        )
    return "\n".join(lines)


def figure(results: list[dict[str, Any]], path: Path, settings: list[str]) -> None:
    """Rate difference of XICI and both baselines against breadth, one panel per family; seeds as points,
    lines through their means. XICI under each of ``settings`` (its baselines left out) is dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    families = [f for f in FAMILIES if any(r["world"]["family"] == f and "default" in r for r in results)]
    fig = Figure(figsize=(3.4 * max(1, len(families)), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(families)), sharey=True, squeeze=False)[0]
    lines = [("default", "xici", "XICI", "C3", "-"), ("default", "random", "random", "C0", "-")]
    lines += [("default", "shuffle", "shuffled", "C2", "-")]
    lines += [(s, "xici", f"XICI, {s}", f"C{4 + i}", "--") for i, s in enumerate(settings)]
    for ax, family in zip(axes, families, strict=False):
        mine = [r for r in results if r["world"]["family"] == family and not r["world"]["shared"]]
        for label, condition, name, color, style in lines:
            points: dict[float, list[float]] = {}
            for r in mine:
                value = r.get(label, {}).get("conditions", {}).get(condition, {}).get("rate_diff")
                if value is not None:
                    points.setdefault(100 * World(**r["world"]).breadth, []).append(100 * value)
            xs = sorted(points)
            if not xs:
                continue
            means = [sum(points[x]) / len(points[x]) for x in xs]
            ax.plot(xs, means, color=color, ls=style, label=name, marker="o", ms=3)
            for x in xs:
                ax.scatter([x] * len(points[x]), points[x], color=color, s=10, alpha=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(family)
        ax.set_xlabel("routing breadth: top-k / experts (%)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("rate difference (%)")
    fig.savefig(path, dpi=90)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("breadth-study"), help="worlds, lakes and results")
    parser.add_argument("--families", default="qwen3-moe", help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--breadths", default="2/64,4/64,8/64", help="top-k/experts, comma-separated")
    parser.add_argument("--shared", type=int, default=0, help="shared experts (GLM4-MoE)")
    parser.add_argument("--seeds", default="0", help="world seeds, comma-separated")
    parser.add_argument("--setting", action="append", default=[], help="more analysis parameters to ablate")
    parser.add_argument(
        "--diagnose", action="store_true", help="sweep, per-expert necessity, rival localizers"
    )
    parser.add_argument("--questions", type=int, default=40, help="questions for per-expert necessity")
    parser.add_argument("--batch-size", type=int, default=128, help="prompts generated together")
    parser.add_argument("--refresh", action="store_true", help="re-collect results of stored analyses")
    parser.add_argument("--report", action="store_true", help="only collect the existing results")
    parser.add_argument("--figure", type=Path, help="write the figure here (PNG)")
    parser.add_argument("--figure-setting", action="append", default=[], help="a --setting drawn too")
    args = parser.parse_args()

    if not args.report:
        import torch

        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        for family in args.families.split(","):
            for breadth in args.breadths.split(","):
                top_k, experts = map(int, breadth.split("/"))
                for seed in map(int, args.seeds.split(",")):
                    run_world(World(family, experts, top_k, args.shared, seed), args.out, args)
    results = [json.loads(p.read_text()) for p in sorted((args.out / "results").glob("*.json"))]
    results.sort(
        key=lambda r: (
            FAMILIES.index(r["world"]["family"]),
            World(**r["world"]).breadth,
            r["world"]["shared"],
            r["world"]["seed"],
        )
    )
    print(table(results))
    for label in sorted({k for r in results for k in r if re.match(r"^[a-z-]+=", k)}):
        print(f"\n{label}\n{table(results, label)}")
    if args.figure:
        figure(results, args.figure, args.figure_setting)


if __name__ == "__main__":
    main()
