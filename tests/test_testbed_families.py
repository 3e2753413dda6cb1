"""The testbed's model families: GLM4-MoE worlds train reproducibly, their selection bias balances the load,
and xici records and ablates them as it would GLM-4.5-Air; wrong options are refused clearly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import rows
from safetensors.torch import load_file
from test_ablation_support import insert_analysis, routing
from test_testbed import SMALL_WORLD, digests
from transformers import AutoConfig

from xici.ablation.runner import run_ablation
from xici.cli.main import cli
from xici.corpora.store import import_dataset
from xici.errors import XiciError
from xici.recorder.run import RecordSpec, record
from xici.testbed.families import families, family
from xici.testbed.train import ModelConfig, build_testbed, build_tokenizer, shipped_testbed, train_model
from xici.testbed.world import WorldConfig, generate_world
from xici.warehouse import Lake

torch.set_num_threads(1)
SMALL_GLM = ModelConfig(
    arch="glm4-moe",
    layers=4,
    hidden=32,
    heads=2,
    experts=8,
    top_k=2,
    expert_width=16,
    steps=20,
    batch_size=16,
)
BIAS = "e_score_correction_bias"


def biases(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if k.endswith(BIAS)}


def test_glm_world_trains_reproducibly_to_the_glm_architecture(tmp_path: Path) -> None:
    config = replace(SMALL_GLM, shared_experts=1)
    first = build_testbed(tmp_path / "a", seed=5, world_config=SMALL_WORLD, model_config=config)
    again = build_testbed(tmp_path / "b", seed=5, world_config=SMALL_WORLD, model_config=config)
    other = build_testbed(tmp_path / "c", seed=6, world_config=SMALL_WORLD, model_config=config)
    assert digests(first.checkpoint) == digests(again.checkpoint)
    assert digests(first.checkpoint)["model.safetensors"] != digests(other.checkpoint)["model.safetensors"]

    hf = AutoConfig.from_pretrained(first.checkpoint)
    assert hf.model_type == "glm4_moe" and hf.first_k_dense_replace == 1
    assert (hf.n_routed_experts, hf.num_experts_per_tok, hf.n_shared_experts) == (8, 2, 1)
    assert (hf.n_group, hf.topk_group, hf.routed_scaling_factor, hf.norm_topk_prob) == (1, 1, 1.0, True)
    # One selection bias per MoE layer (the dense first layer has none), moved off its zero start.
    trained = biases(first.checkpoint)
    assert sorted(trained) == [f"model.layers.{i}.mlp.gate.{BIAS}" for i in (1, 2, 3)]
    assert all(b.abs().max() > 0 for b in trained.values())
    stored = json.loads(first.accuracies.read_text())["model"]
    assert stored["arch"] == "glm4-moe" and stored["shared_experts"] == 1


def _load_spread(folder: Path, bias_rate: float, tmp_path: Path) -> tuple[float, list[torch.Tensor]]:
    """Train the small GLM world with ``bias_rate``; the spread (std / mean) of the experts' loads on its
    training prompts at the end, averaged over MoE layers, and the final biases."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    from xici.testbed.train import _encode_items

    world = generate_world(SMALL_WORLD)
    config = replace(SMALL_GLM, steps=60, bias_rate=bias_rate)
    model, tokenizer = train_model(world, tmp_path / folder, config, seed=3)
    prefix, suffix, _ = _encode_items(world, tokenizer)
    sequences = torch.cat([torch.tensor([prefix]).expand(len(suffix), -1), suffix], dim=1)
    real = (sequences != tokenizer.pad_token_id).flatten()
    loads: list[torch.Tensor] = []

    def count(_router: Glm4MoeTopkRouter, _args: tuple, out: tuple[torch.Tensor, ...]) -> None:
        loads.append(torch.bincount(out[2][real].flatten(), minlength=SMALL_GLM.experts))

    routers = [m for m in model.modules() if isinstance(m, Glm4MoeTopkRouter)]
    handles = [router.register_forward_hook(count) for router in routers]
    with torch.no_grad():
        model(input_ids=sequences)
    for handle in handles:
        handle.remove()
    spread = float(np.mean([(load.float().std() / load.float().mean()).item() for load in loads]))
    return spread, [r.e_score_correction_bias.clone() for r in routers]


def test_selection_bias_moves_toward_balanced_load(tmp_path: Path) -> None:
    frozen, frozen_bias = _load_spread(Path("frozen"), 0.0, tmp_path)
    balanced, bias = _load_spread(Path("balanced"), 0.02, tmp_path)
    assert all((b == 0).all() for b in frozen_bias)
    # The bias trained the aux-loss-free way leaves the experts' loads more even than a frozen one.
    assert balanced < frozen * 0.8, (balanced, frozen)
    assert all(b.abs().max() > 0 for b in bias)


def test_glm_testbed_is_recorded_and_ablated_like_glm_4_5_air(tmp_path: Path) -> None:
    config = replace(SMALL_GLM, shared_experts=0)
    built = build_testbed(tmp_path / "tb", seed=1, world_config=SMALL_WORLD, model_config=config)
    lake = Lake(tmp_path / "lake")
    import_dataset(lake, "tb", built.dataset, "jsonl")
    spec = RecordSpec(model=str(built.checkpoint), dataset="tb", limit=3, max_new_tokens=3, dtype="float32")
    record(lake, spec, device="cpu", batch_size=8)
    assert rows(lake, "select architecture, n_moe_layers, n_experts, top_k from runs where run_id = 1") == [
        ("glm4_moe", 3, 8, 2)
    ]
    # Each question loses, at every MoE layer, the expert its recorded tokens chose most often.
    before = routing(lake, 1)
    sets: dict[str, list[tuple[int, int]]] = {}
    for question in sorted({q for q, _ in before}):
        ids = np.concatenate([v for (q, _), v in before.items() if q == question])
        sets[question] = [(layer, int(np.bincount(ids[:, layer].ravel()).argmax())) for layer in range(3)]
    analysis = insert_analysis(lake, 1, sets, layers=(0, 3), grader="match")
    (run,) = run_ablation(lake, analysis, baselines=(), device="cpu", batch_size=8).runs
    assert run.finished and run.check.violations == 0 and run.check.checked_tokens > 0
    for (question, _), ids in routing(lake, run.run_id).items():
        assert all(not (ids[:, layer] == expert).any() for layer, expert in sets[question])


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        (dict(arch="qwen3-moe", shared_experts=1), "--shared-experts"),
        (dict(arch="glm4-moe", experts=8, top_k=9), "--top-k"),
        (dict(arch="glm4-moe", shared_experts=-1), "--shared-experts"),
        (dict(arch="glm4-moe", layers=3), "layers=3"),
        (dict(arch="mixtral"), "--arch"),
    ],
)
def test_impossible_family_options_are_refused(fields: dict, where: str) -> None:
    with pytest.raises(XiciError) as caught:
        ModelConfig(**fields)
    assert caught.value.where == where


def test_each_family_fills_in_its_own_defaults() -> None:
    assert next(iter(families())) == "qwen3-moe" == ModelConfig().arch
    assert (ModelConfig().layers, ModelConfig().steps) == (4, 1200)  # the shipped checkpoint's
    glm = ModelConfig(arch="glm4-moe", experts=64, top_k=8)
    assert (glm.layers, glm.steps) == (
        family("glm4-moe").defaults["layers"],
        family("glm4-moe").defaults["steps"],
    )
    assert ModelConfig(arch="glm4-moe", layers=6).layers == 6


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--shared-experts", "1"], "qwen3-moe has no shared experts"),
        (["--arch", "glm4-moe", "--experts", "4", "--top-k", "5"], "top-k must be between 1"),
    ],
)
def test_cli_refuses_impossible_families_without_a_traceback(
    tmp_path: Path, args: list[str], said: str
) -> None:
    result = CliRunner().invoke(
        cli, ["--lake", str(tmp_path / "lake"), "testbed", "build", "--out", str(tmp_path / "tb"), *args]
    )
    assert result.exit_code != 0 and said in result.output and "Traceback" not in result.output


def test_cli_builds_a_glm_testbed(tmp_path: Path) -> None:
    out = tmp_path / "tb"
    args = ["--arch", "glm4-moe", "--experts", "8", "--top-k", "4", "--shared-experts", "1", "--steps", "2"]
    args += ["--entities", "6", "--languages", "2", "--layers", "4"]
    result = CliRunner().invoke(
        cli, ["--lake", str(tmp_path / "lake"), "testbed", "build", "--out", str(out), *args]
    )
    assert result.exit_code == 0, result.output
    hf = AutoConfig.from_pretrained(out)
    assert (hf.model_type, hf.n_routed_experts, hf.num_experts_per_tok, hf.n_shared_experts) == (
        "glm4_moe",
        8,
        4,
        1,
    )


def test_qwen_family_still_gives_the_shipped_config() -> None:
    shipped = shipped_testbed().checkpoint
    tokenizer = build_tokenizer(generate_world(WorldConfig(seed=0)))
    spec = family("qwen3-moe")
    built = spec.hf_config(ModelConfig(), tokenizer).to_diff_dict()
    stored = json.loads((shipped / "config.json").read_text())
    ignored = {"architectures", "transformers_version"}
    assert {k: v for k, v in built.items() if k not in ignored} == {
        k: v for k, v in stored.items() if k not in ignored
    }
