"""What routing capture and per-request expert masks cost in vLLM generation, compiled and eager.

For each model shape, three vLLM engines generate the same batch of chat prompts greedily: plain vLLM in its
default compiled mode (vLLM's own worker, no taps), and xici's engine compiled (the default) and eager
(``enforce_eager=True``). xici's engines run with routing capture (``generate_with_routing``) and with
capture plus a different expert mask per request (25 (layer, expert) pairs each, as an ablation does). The
engines run side by side, each in its own process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``), so repetitions are
interleaved (the mode order rotates) and machine load hits every mode alike; medians of generated tokens per
second and of the per-round time ratios to plain are printed (wall clock, and CPU time of this process and
the engines' processes, which other processes' load moves less; idle engines count too, alike in every
mode), with each engine's start-up time (compilation included) and the threads used.

``--prefix-caching`` measures instead what prefix caching would gain on a recording-like workload: the
default system instruction and chat template, questions of ECLeKTic's length (its median question length
per language, at about 3 characters per token, as random tokens) in 12 languages each, one batch per
question group, each prompt asked once (the cache is emptied before every batch, as a recording never asks
a prompt twice). Two plain compiled engines, prefix caching on and off, interleaved; printed: the share of
prompt tokens served from the cache and the time ratio.

Shapes: ``tiny`` (0.9M parameters) and ``30m`` (~28M) are random Qwen3-MoE checkpoints built on the spot
(:func:`xici.testbed.random_models.build_random_moe`); ``qwen3-30b-a3b`` is Qwen3-30B-A3B's configuration with
vLLM's random ("dummy") weights, for a GPU: ``python benchmarks/vllm_capture.py --shape qwen3-30b-a3b``.

Run on the CPU: ``OMP_NUM_THREADS=1 python benchmarks/vllm_capture.py`` (needs vllm installed). Targets:
capture ratio <= 1.10 to plain in either mode; prefix caching is worth supporting if it gains >= 10%.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # an engine per process: several side by side
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local; offline, vLLM would wait ~30 s for the hub

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from xici.recorder.prompting import PromptFormat
from xici.recorder.vllm_backend import VLLMEngine, generate_with_routing, load_engine
from xici.testbed.random_models import build_random_moe, build_tokenizer

QUESTIONS = (
    "What is the capital of France?",
    "Quelle est la capitale de la France?",
    "Was ist die Hauptstadt von Frankreich?",
    "¿Cuál es la capital de Francia?",
    "Какая столица Франции?",
    "Ποια είναι η πρωτεύουσα της Γαλλίας;",
    "ما هي عاصمة فرنسا؟",
    "फ्रांस की राजधानी क्या है?",
    "法国的首都是什么？",
    "フランスの首都はどこですか？",
    "프랑스의 수도는 무엇입니까?",
    "Who wrote the answer in 2024?",
    "Qui a écrit la réponse en 1919?",
    "Wer schrieb die Antwort?",
    "¿Quién escribió la respuesta?",
    "Кто написал ответ?",
)
MASKED_PAIRS = 25


def build_shape(shape: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    """A model directory for the shape, and extra vLLM arguments it needs."""
    if shape == "tiny":
        return build_random_moe(folder, "qwen3_moe"), {}
    if shape == "30m":
        return build_random_moe(folder, "qwen3_moe", n_layers=8, n_experts=32, top_k=4, hidden_size=256), {}
    if shape == "qwen3-30b-a3b":
        return qwen3_30b_a3b(folder), {"load_format": "dummy"}
    raise SystemExit(f"unknown shape {shape!r}")


def qwen3_30b_a3b(folder: Path) -> Path:
    """Qwen3-30B-A3B's configuration (48 layers, 128 experts, top-8) with the test tokenizer, no weights."""
    from transformers import GenerationConfig, Qwen3MoeConfig

    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=151_936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=40_960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    config.architectures = ["Qwen3MoeForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    GenerationConfig(do_sample=False, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_masks(engine: VLLMEngine, n: int, seed: int) -> list[np.ndarray]:
    """Per request, MASKED_PAIRS random (layer, expert) pairs, at most a quarter of a layer's experts."""
    layout = engine.layout
    rng = np.random.default_rng(seed)
    per_layer = max(1, min(layout.n_experts // 4, layout.n_experts - layout.top_k))
    masks = []
    for _ in range(n):
        mask = np.zeros((layout.n_moe_layers, layout.n_experts), dtype=bool)
        for pair in rng.permutation(mask.size):
            layer, expert = divmod(int(pair), layout.n_experts)
            if mask.sum() == MASKED_PAIRS:
                break
            if mask[layer].sum() < per_layer:
                mask[layer, expert] = True
        masks.append(mask)
    return masks


def cpu_seconds() -> float:
    """CPU time so far of this process and its children (the engines' processes)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return total


def timed(run: Callable[[], list[Any]]) -> tuple[float, float]:
    """Generated tokens per wall-clock second and per CPU second (this process and the engines') of one call.

    On a shared CPU machine the CPU-time rate is the steadier one: other processes' load barely moves it.
    """
    wall, cpu = time.perf_counter(), cpu_seconds()
    results = run()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    tokens = sum(len(r.output_ids) for r in results)
    return tokens / wall, tokens / cpu


def interleaved(
    modes: dict[str, Callable[[], list[Any]]], repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) tokens/s per mode; one warm-up call each, then ``repeats`` rounds in rotating order."""
    for run in modes.values():
        run()
    names = list(modes)
    speeds: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            speeds[name].append(timed(modes[name]))
    return speeds


def report(
    name: str, speeds: list[tuple[float, float]], plain: list[tuple[float, float]], paired: bool = True
) -> None:
    """Median tokens/s and time ratio to plain (> 1 = slower), wall clock and CPU time.

    Interleaved runs give the median of the per-round ratios, with their range (a round's modes share the
    machine's load); otherwise the ratio of the medians.
    """
    columns = []
    for i, label in ((0, "wall"), (1, "CPU")):
        rate = statistics.median(s[i] for s in speeds)
        if paired:
            ratios = sorted(p[i] / s[i] for p, s in zip(plain, speeds, strict=True))
            ratio = f"{statistics.median(ratios):5.3f} [{ratios[0]:.2f}-{ratios[-1]:.2f}]"
        else:
            ratio = f"{statistics.median(p[i] for p in plain) / rate:5.3f}"
        columns.append(f"{label} {rate:7,.0f} tok/s, ratio {ratio}")
    note = "" if paired else "   (separate engine, not interleaved)"
    print(f"  {name:<15} " + "   ".join(columns) + note)


def engine_settings(on_gpu: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Settings shared by the engines; on the CPU xici sizes the KV cache (for ``--batch`` sequences)."""
    settings: dict[str, Any] = {"max_model_len": args.max_model_len, "max_num_seqs": args.batch}
    return settings if on_gpu else {**settings, "block_size": 32}


def started(build: Callable[[], VLLMEngine]) -> tuple[VLLMEngine, float]:
    """An engine and its start-up seconds (loading and compiling)."""
    start = time.perf_counter()
    engine = build()
    return engine, time.perf_counter() - start


def bench_shape(shape: str, args: argparse.Namespace, on_gpu: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        path, extra = build_shape(shape, Path(tmp) / shape)
        settings = engine_settings(on_gpu, args)
        engines: dict[str, VLLMEngine] = {}
        startup: dict[str, float] = {}
        for name, options in (
            ("plain", {"taps": False}),
            ("compiled", {}),
            ("eager", {"enforce_eager": True}),
        ):
            engines[name], startup[name] = started(
                lambda options=options: load_engine(str(path), engine_args=extra, **settings, **options)
            )
            stack.enter_context(engines[name])
        prompts = [
            PromptFormat().encode(engines["plain"].tokenizer, QUESTIONS[i % len(QUESTIONS)]).ids
            for i in range(args.batch)
        ]
        masks = random_masks(engines["compiled"], args.batch, seed=0)
        new = args.max_new_tokens
        modes: dict[str, Callable[[], list[Any]]] = {
            "plain": lambda: generate_with_routing(
                engines["plain"], prompts, max_new_tokens=new, capture=False
            )
        }
        for name in ("compiled", "eager"):
            engine = engines[name]
            modes[f"{name} capture"] = lambda e=engine: generate_with_routing(e, prompts, max_new_tokens=new)
            modes[f"{name} +masks"] = lambda e=engine: generate_with_routing(
                e, prompts, max_new_tokens=new, masks=masks
            )
        speeds = interleaved(modes, args.repeats)
        meta = engines["compiled"].metadata
        layout = engines["compiled"].layout
        print(
            f"\n{shape}: {param_count(path) / 1e6:,.1f}M parameters, {layout.n_moe_layers} MoE layers x "
            f"{layout.n_experts} experts, top-{layout.top_k}; {meta['device']}, {meta['dtype']}, "
            f"engine threads {meta['threads']}, driver threads {torch.get_num_threads()}"
        )
        print(
            "  start-up s (compiled: mode "
            f"{meta['compilation_mode']}, CUDA graphs {meta['cudagraph_mode']}): "
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in startup.items())
        )
        print(
            f"  batch {args.batch} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x "
            f"{new} new tokens, {args.repeats} interleaved repetitions, medians"
        )
        for name, values in speeds.items():
            report(name, values, speeds["plain"])


#: ECLeKTic's median question length in characters, per language (its 12 languages).
ECLEKTIC_CHARS = {
    "en": 72, "de": 75, "es": 76, "fr": 81, "he": 56, "hi": 69,
    "id": 69, "it": 81, "ja": 36, "ko": 37, "pt": 77, "zh": 32,
}  # fmt: skip
CHARS_PER_TOKEN = 3


def recording_prompts(tokenizer: Any, n_questions: int, seed: int) -> tuple[list[list[int]], int]:
    """Chat prompts (default system instruction) of ECLeKTic-length questions, 12 languages a question
    (random tokens of about its median length per language, +-30%, stand for each translation), and the
    length of the prefix they all share."""
    rng = np.random.default_rng(seed)
    text = PromptFormat().render(tokenizer, "\x00")
    before, after = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in text.split("\x00"))
    special = set(tokenizer.all_special_ids)
    words = np.array([i for i in range(len(tokenizer)) if i not in special])
    prompts = []
    for _ in range(n_questions):
        for chars in ECLEKTIC_CHARS.values():
            n = max(1, round(chars / CHARS_PER_TOKEN * rng.uniform(0.7, 1.3)))
            prompts.append([*before, *rng.choice(words, n).tolist(), *after])
    return prompts, len(before)


def bench_prefix_caching(shape: str, args: argparse.Namespace, on_gpu: bool) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        path, extra = build_shape(shape, Path(tmp) / shape)
        settings = {**engine_settings(on_gpu, args), "taps": False}
        engines = {
            name: stack.enter_context(
                load_engine(str(path), engine_args=extra, enable_prefix_caching=cache, **settings)
            )
            for name, cache in (("cache off", False), ("cache on", True))
        }
        n_questions = max(1, args.batch // len(ECLEKTIC_CHARS))
        prompts, shared = recording_prompts(engines["cache off"].tokenizer, n_questions, seed=0)
        new = args.max_new_tokens

        def run(engine: VLLMEngine) -> list[Any]:
            engine.llm.reset_prefix_cache()  # a recording asks each prompt once
            return generate_with_routing(engine, prompts, max_new_tokens=new, capture=False)

        speeds = interleaved(
            {name: lambda e=engine: run(e) for name, engine in engines.items()}, args.repeats
        )
        cache = engines["cache on"]
        cache.llm.reset_prefix_cache()
        outputs = cache.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=new),
            use_tqdm=False,
        )
        share = sum(o.num_cached_tokens or 0 for o in outputs) / sum(len(p) for p in prompts)
        print(
            f"\n{shape}, prefix caching: {n_questions} questions x {len(ECLEKTIC_CHARS)} languages, prompts "
            f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens sharing a {shared}-token prefix, "
            f"{new} new tokens, block size {cache.metadata['block_size']}, {args.repeats} interleaved "
            f"repetitions; {share:.1%} of prompt tokens came from the cache"
        )
        for name, values in speeds.items():
            report(name, values, speeds["cache off"])


def param_count(path: Path) -> int:
    """Parameters of the model from its config (shapes only, no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=["tiny", "30m", "qwen3-30b-a3b"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--prefix-caching", action="store_true", help="measure prefix caching instead")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device = f"GPU {torch.cuda.get_device_name()}" if on_gpu else "CPU"
    print(
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
        f"VLLM_ENABLE_V1_MULTIPROCESSING={os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING')} "
        f"torch threads {torch.get_num_threads()}, {device}"
    )
    bench = bench_prefix_caching if args.prefix_caching else bench_shape
    for shape in args.shape or ["tiny", "30m"]:
        bench(shape, args, on_gpu)


if __name__ == "__main__":
    main()
