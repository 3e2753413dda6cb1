"""The MoE registry against real tiny transformers models of every supported architecture.

The reference is always the model itself: what its experts module receives (ids and weights), captured with
hooks, or an independent row-by-row recomputation of the documented gating rule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3MoeConfig

from xici.errors import XiciError
from xici.moe import SUPPORTED, load_config, resolve
from xici.recorder.capture.hf import RouterTap, StepRouting

QUESTIONS = ("What is the capital of France?", "Какая столица?", "法国的首都是什么？谁写了这本书？")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Callable[..., Path]) -> Callable[[str], tuple[Any, Any]]:
    """``loaded(architecture) -> (model, tokenizer)``, loaded once per module from a tiny checkpoint."""
    cache: dict[str, tuple[Any, Any]] = {}

    def load(architecture: str) -> tuple[Any, Any]:
        if architecture not in cache:
            path = tiny_checkpoint(architecture)
            cache[architecture] = (
                AutoModelForCausalLM.from_pretrained(path).eval(),
                AutoTokenizer.from_pretrained(path),
            )
        return cache[architecture]

    return load


def encode(tokenizer: Any, questions: tuple[str, ...] = QUESTIONS) -> dict[str, torch.Tensor]:
    """A left-padded chat batch (the prompts have different lengths, so there is padding)."""
    chats = [[{"role": "user", "content": q}] for q in questions]
    return tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )


def dense(ids: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[N, k] ids and weights as the [N, E] gate matrix, zero outside the top-k."""
    return torch.zeros(ids.shape[0], n_experts).scatter(1, ids.long(), weights.float())


class ExpertInputs:
    """Hooks on each MoE block: the router's logits and the (ids, weights) its experts module receives.

    Registered after a RouterTap, so the logits are the raw ones and the ids/weights are what was used.
    """

    def __init__(self, model: Any) -> None:
        self.logits: list[torch.Tensor] = []
        self.used: list[tuple[torch.Tensor, torch.Tensor]] = []
        layout = resolve(model.config).layout(model.config)
        mlps = [model.model.layers[block].mlp for block in layout.moe_layers]
        self.handles = [m.gate.register_forward_hook(self._logits) for m in mlps]
        self.handles += [m.experts.register_forward_pre_hook(self._used) for m in mlps]

    def _logits(self, module: Any, args: Any, output: Any) -> None:
        self.logits.append(output[0].detach().float())

    def _used(self, module: Any, args: Any) -> None:
        self.used.append((args[1], args[2]))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def expected_gates(model: Any, layer: int, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The gating rule written out row by row: min-replace masked logits, never pick masked experts."""
    config = model.config
    layout = resolve(config).layout(config)
    k, n_experts = layout.top_k, layout.n_experts
    out = torch.zeros(logits.shape[0], n_experts)
    router = model.model.layers[layout.moe_layers[layer]].mlp.gate
    for row, (z, off) in enumerate(zip(logits, mask, strict=True)):
        z = torch.where(off, z.min(), z)
        allowed = [e for e in range(n_experts) if not off[e]]
        if layout.gating == "softmax":
            p = z.softmax(-1)
            chosen = sorted(allowed, key=lambda e: -p[e])[:k]
            w = p[chosen]
            if config.model_type == "mixtral" or config.norm_topk_prob:
                w = w / w.sum()
        else:
            s = z.sigmoid()
            c, size = s + router.e_score_correction_bias, n_experts // config.n_group
            best_two = [sorted(c[g * size : (g + 1) * size].tolist())[-2:] for g in range(config.n_group)]
            groups = sorted(range(config.n_group), key=lambda g: -sum(best_two[g]))[: config.topk_group]
            chosen = sorted((e for e in allowed if e // size in groups), key=lambda e: -c[e])[:k]
            w = s[chosen] / s[chosen].sum() * config.routed_scaling_factor
        out[row, chosen] = w
    return out


@pytest.mark.parametrize("architecture", SUPPORTED)
def test_registry_gates_equal_the_models_own_weights(architecture: str, loaded: Callable) -> None:
    model, tokenizer = loaded(architecture)
    layout = resolve(model.config).layout(model.config)
    sparse_blocks = tuple(i for i, block in enumerate(model.model.layers) if hasattr(block.mlp, "experts"))
    assert layout.moe_layers == sparse_blocks
    batch = encode(tokenizer)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    spy = ExpertInputs(model)
    with torch.no_grad():
        model(**batch)
    spy.remove()
    gates = resolve(model.config).hf_gates(model)
    assert len(gates) == len(spy.used) == layout.n_moe_layers
    for gate, logits, (ids, weights) in zip(gates, spy.logits, spy.used, strict=True):
        assert logits.shape == (batch["input_ids"].numel(), layout.n_experts)
        mine_ids, mine_weights = gate(logits)
        mine = dense(mine_ids, mine_weights, layout.n_experts)
        torch.testing.assert_close(mine, dense(ids, weights, layout.n_experts), rtol=0, atol=1e-6)


@pytest.mark.parametrize("architecture", SUPPORTED)
def test_tap_records_generate_without_changing_it(architecture: str, loaded: Callable) -> None:
    model, tokenizer = loaded(architecture)
    batch = encode(tokenizer)
    plain = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    with RouterTap(model) as tap:
        spy = ExpertInputs(model)
        tapped = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        spy.remove()
        steps = tap.pop_steps()
        assert tap.pop_steps() == []
    assert torch.equal(plain, tapped)
    n_rows, prompt_len = batch["input_ids"].shape
    assert [s.logits.shape[0] for s in steps] == [n_rows * prompt_len] + [n_rows] * (NEW_TOKENS - 1)
    layout = tap.layout
    n_layers = layout.n_moe_layers
    for step_no, step in enumerate(steps):
        assert step.logits.dtype == step.topk_weights.dtype == torch.float32
        assert step.topk_ids.dtype == torch.int64
        assert step.topk_ids.shape == step.topk_weights.shape == (step.logits.shape[0], n_layers, 2)
        for layer in range(n_layers):
            ids, weights = spy.used[step_no * n_layers + layer]
            torch.testing.assert_close(step.logits[:, layer], spy.logits[step_no * n_layers + layer])
            torch.testing.assert_close(
                dense(step.topk_ids[:, layer], step.topk_weights[:, layer], layout.n_experts),
                dense(ids, weights, layout.n_experts),
                rtol=0,
                atol=1e-6,
            )
    # The hooks are gone after the block: nothing more is recorded.
    model.generate(**batch, max_new_tokens=2)
    assert tap.pop_steps() == []


def chosen_counts(steps: list[StepRouting], n_experts: int) -> torch.Tensor:
    """How often each expert was selected, per MoE layer: [L, E]."""
    ids = torch.cat([s.topk_ids for s in steps]).transpose(0, 1)
    return torch.stack([torch.bincount(layer.flatten(), minlength=n_experts) for layer in ids])


def strong_mask(model: Any, counts: torch.Tensor, n_off: int = 3) -> torch.Tensor:
    """[L, E] mask of the most used experts (and, with a selection bias, the most biased one) that the
    gates accept; these are the experts whose deactivation changes the most."""
    architecture = resolve(model.config)
    gates = architecture.hf_gates(model)
    routers = architecture.hf_routers(model)
    mask = torch.zeros(counts.shape, dtype=torch.bool)
    for layer, gate in enumerate(gates):
        order = counts[layer].argsort(descending=True).tolist()
        if architecture.bias_attr:
            order.insert(0, int(routers[layer].e_score_correction_bias.argmax()))
        for expert in order:
            trial = mask[layer].clone()
            trial[expert] = True
            try:
                gate.check_mask(trial, where="test")
            except XiciError:
                continue
            mask[layer] = trial
            if int(trial.sum()) == n_off:
                break
    return mask


@pytest.mark.parametrize("architecture", SUPPORTED)
def test_deactivated_experts_are_never_used_and_the_rest_follow_the_rule(
    architecture: str, loaded: Callable
) -> None:
    model, tokenizer = loaded(architecture)
    batch = encode(tokenizer)
    with RouterTap(model) as tap:
        model.generate(**batch, max_new_tokens=NEW_TOKENS)
        before = chosen_counts(tap.pop_steps(), tap.layout.n_experts)
        mask = strong_mask(model, before)
        assert (mask.sum(-1) >= 2).all()
        assert (before * mask).sum(-1).gt(0).all(), "the masked experts must be used without the mask"
        tap.set_masks(mask.expand(batch["input_ids"].shape[0], -1, -1))
        spy = ExpertInputs(model)
        model.generate(**batch, max_new_tokens=NEW_TOKENS)
        spy.remove()
        steps = tap.pop_steps()
    n_layers, n_experts = tap.layout.n_moe_layers, tap.layout.n_experts
    assert (chosen_counts(steps, n_experts) * mask).sum() == 0
    for index, (ids, weights) in enumerate(spy.used):
        step, layer = divmod(index, n_layers)
        assert not mask[layer][ids].any(), "a deactivated expert reached the experts module"
        logits = steps[step].logits[:, layer]
        torch.testing.assert_close(spy.logits[index], logits)
        # Padding tokens have all-zero logits (every expert ties), so any top-k is right for them.
        real = batch["attention_mask"].flatten().bool() if step == 0 else slice(None)
        expected = expected_gates(model, layer, logits[real], mask[layer].expand_as(logits[real]))
        torch.testing.assert_close(dense(ids, weights, n_experts)[real], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("architecture", ["qwen3_moe", "glm4_moe"])
def test_per_row_masks_equal_one_prompt_at_a_time(architecture: str, loaded: Callable) -> None:
    model, tokenizer = loaded(architecture)
    with RouterTap(model) as tap:
        model.generate(**encode(tokenizer), max_new_tokens=NEW_TOKENS)
        counts = chosen_counts(tap.pop_steps(), tap.layout.n_experts)
        masks = torch.stack([torch.zeros_like(counts, dtype=torch.bool), strong_mask(model, counts, 2)])
        masks = torch.cat([masks, strong_mask(model, counts, 3)[None]])
        batch = encode(tokenizer)
        tap.set_masks(masks)
        together = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        steps = tap.pop_steps()
        prompt_len = batch["input_ids"].shape[1]
        for row, question in enumerate(QUESTIONS):
            alone_batch = encode(tokenizer, (question,))
            tap.set_masks(masks[row : row + 1])
            alone = model.generate(**alone_batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            alone_steps = tap.pop_steps()
            assert torch.equal(together[row, prompt_len:], alone[0, alone_batch["input_ids"].shape[1] :])
            own_len = alone_batch["input_ids"].shape[1]
            prefill = steps[0].topk_ids.unflatten(0, (len(QUESTIONS), prompt_len))[row, -own_len:]
            assert torch.equal(prefill.sort(-1).values, alone_steps[0].topk_ids.sort(-1).values)
            for step, alone_step in zip(steps[1:], alone_steps[1:], strict=True):
                assert torch.equal(step.topk_ids[row].sort(-1).values, alone_step.topk_ids[0].sort(-1).values)
            used = torch.cat([s.topk_ids for s in alone_steps])
            assert not masks[row].gather(1, used.transpose(0, 1).flatten(1)).any()


@pytest.mark.parametrize("architecture", ["qwen3_moe", "glm4_moe"])
def test_masks_that_leave_too_few_experts_are_refused_up_front(architecture: str, loaded: Callable) -> None:
    model, _ = loaded(architecture)
    with RouterTap(model) as tap:
        n_layers, n_experts = tap.layout.n_moe_layers, tap.layout.n_experts
        too_many = torch.zeros(2, n_layers, n_experts, dtype=torch.bool)
        too_many[1, -1, : n_experts - 1] = True
        with pytest.raises(XiciError, match="fewer than the 2"):
            tap.set_masks(too_many)
        with pytest.raises(XiciError, match="bool tensor"):
            tap.set_masks(torch.zeros(2, n_layers + 1, n_experts, dtype=torch.bool))
        if architecture == "glm4_moe":
            # A group and half another off: five experts remain, but the group limit may keep just those two.
            size = n_experts // model.config.n_group
            groups_off = torch.zeros(1, n_layers, n_experts, dtype=torch.bool)
            groups_off[0, 0, : 2 * size - 1] = True
            with pytest.raises(XiciError, match="groups"):
                tap.set_masks(groups_off)


@pytest.mark.parametrize("architecture", SUPPORTED)
def test_gates_skip_masked_experts_even_on_ties_and_bias(architecture: str, loaded: Callable) -> None:
    model, _ = loaded(architecture)
    entry = resolve(model.config)
    n_experts = entry.layout(model.config).n_experts
    bias = torch.zeros(n_experts)
    bias[0] = 10.0  # a selection bias that would always pick expert 0
    gate = entry.make_gate(model.config, bias if entry.bias_attr else None)
    mask = torch.zeros(4, n_experts, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 2] = True
    # The masked experts have the best logits; min-replaced, every expert of a row ties.
    logits = torch.where(mask, 5.0, 0.0)
    gate.check_mask(mask, where="test")
    ids, weights = gate(logits, mask)
    assert not mask.gather(1, ids).any()
    assert torch.isfinite(weights).all() and (weights > 0).all()
    unmasked_ids, _ = gate(logits)
    assert mask.gather(1, unmasked_ids).any(dim=-1).all(), "without the mask a masked expert is chosen"


def test_layout_follows_sparse_step_and_dense_layers() -> None:
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    )
    model = AutoModelForCausalLM.from_config(config)
    layout = resolve(config).layout(config)
    sparse_blocks = tuple(i for i, block in enumerate(model.model.layers) if hasattr(block.mlp, "experts"))
    assert layout.moe_layers == sparse_blocks
    assert layout.moe_layers == (1, 5) and layout.n_moe_layers == 2
    assert len(resolve(config).hf_routers(model)) == 2


def test_non_moe_and_unknown_models_are_refused(tmp_path: Path, tiny_checkpoint: Callable) -> None:
    with pytest.raises(XiciError) as error:
        resolve(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    assert "'llama'" in str(error.value)
    assert all(name in str(error.value) for name in SUPPORTED)
    dense_qwen = Qwen3MoeConfig(num_hidden_layers=2, num_experts=0)
    with pytest.raises(XiciError, match="no MoE layers"):
        resolve(dense_qwen).layout(dense_qwen)
    with pytest.raises(XiciError, match="cannot read the model config"):
        load_config(tmp_path / "missing")
    assert resolve(load_config(tiny_checkpoint("olmoe"))).name == "olmoe"
