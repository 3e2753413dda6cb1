"""Recording benchmarks: bytes stored per token, and the cost of capturing routing during generation.

(a) Storage. Routing of a Qwen3-30B-A3B-shaped model (48 MoE layers, 128 experts, top-8, softmax gating) is
    synthesised with realistic structure (per-layer expert popularity, a per-sequence topic component,
    token noise), written by the real writer (:class:`xici.warehouse.GateStore`, batch by batch as the
    recorder commits, each sequence's gate sums with it) and measured on disk; the time the gate sums take
    to compute, per token. Target: at most 1/8 of dense float16 logits
    (48 * 128 * 2 = 12,288 bytes per token).
(b) Throughput. The same batch is generated greedily on a tiny random model with capture on and off
    (the recorder's own decoding loop), and with ``model.generate`` for reference; repetitions are
    interleaved and medians reported, with the thread count used.

Run: ``.venv/bin/python benchmarks/recording.py`` (one torch thread unless ``--threads``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xici.warehouse import GateStore, TokenArrays
from xici.warehouse.sums_kernel import sequence_sums

LAYERS, EXPERTS, TOP_K = 48, 128, 8
DENSE_FP16 = LAYERS * EXPERTS * 2


def synthetic_routing(rng: np.random.Generator, n_tokens: int, popularity: np.ndarray) -> TokenArrays:
    """One sequence: softmax of (layer popularity + sequence topic + token noise), top-8, renormalised."""
    topic = rng.normal(0.0, 0.8, size=(1, LAYERS, EXPERTS))
    logits = popularity + topic + rng.normal(0.0, 1.5, size=(n_tokens, LAYERS, EXPERTS))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1)[..., :TOP_K]
    weights = np.take_along_axis(probs, ids, -1)
    weights /= weights.sum(-1, keepdims=True)
    token_ids = np.minimum(rng.zipf(1.3, size=n_tokens), 151_000).astype(np.int32)
    return TokenArrays(token_ids, ids.astype(np.uint8), weights.astype(np.float32), logits.astype(np.float32))


def storage(n_sequences: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    popularity = rng.normal(0.0, 1.0, size=(1, LAYERS, EXPERTS))
    sequences = [synthetic_routing(rng, int(rng.integers(60, 240)), popularity) for _ in range(n_sequences)]
    n_tokens = sum(len(s) for s in sequences)
    print(
        f"(a) storage: {n_sequences} sequences, {n_tokens:,} tokens, "
        f"{LAYERS} layers x {EXPERTS} experts, top-{TOP_K}"
    )
    print(f"    dense float16 logits: {DENSE_FP16:,} bytes/token; target <= {DENSE_FP16 / 8:,.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        store = GateStore(Path(tmp) / "gates.zarr")
        for run_id, (gate_dtype, logits) in enumerate(
            [("float16", False), ("float32", False), ("float16", True)], start=1
        ):
            store.create_run(
                run_id,
                n_layers=LAYERS,
                top_k=TOP_K,
                n_experts=EXPERTS,
                gate_dtype=gate_dtype,
                store_logits=logits,
            )
            sums_seconds = 0.0
            for start in range(0, n_sequences, 32):  # one append per committed batch, as the recorder does
                batch = sequences[start : start + 32]
                parts = [s if logits else TokenArrays(s.token_ids, s.topk_ids, s.topk_weights) for s in batch]
                store.append_sequences(run_id, parts)  # tokens and gate sums
                began = time.perf_counter()  # the gate sums alone, computed again to time them
                sequence_sums(
                    np.concatenate([p.topk_ids for p in parts]),
                    np.concatenate([p.topk_weights for p in parts]).astype(gate_dtype),
                    EXPERTS,
                    np.array([len(p) for p in parts]),
                )
                sums_seconds += time.perf_counter() - began
            per_token = store.nbytes_stored(run_id) / n_tokens
            sums = sum(
                f.stat().st_size for f in (Path(tmp) / f"gates.zarr/runs/{run_id}/gate_sums").rglob("*")
            )
            label = f"gates {gate_dtype}" + (" + logits" if logits else "")
            default = gate_dtype == "float16" and not logits  # what the target is for
            verdict = ("  OK" if per_token <= DENSE_FP16 / 8 else "  OVER TARGET") if default else ""
            print(
                f"    {label:<24} {per_token:9,.0f} bytes/token "
                f"= 1/{DENSE_FP16 / per_token:5.1f} of dense{verdict} (gate sums {sums / n_tokens:,.0f} "
                f"bytes/token, computed in {sums_seconds / n_tokens * 1e6:.1f} us/token)"
            )


def throughput(repeats: int, batch: int, new_tokens: int) -> None:
    from xici.recorder.hf_backend import HFGenerator
    from xici.recorder.prompting import PromptFormat
    from xici.testbed.random_models import build_random_moe

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_moe(Path(tmp) / "tiny", "qwen3_moe")
        generator = HFGenerator(str(model_dir), device="cpu", dtype="float32")
        generator.stop_ids = set()  # every row generates exactly new_tokens tokens in every mode
        questions = [f"what is the capital of river {i} city year?" * (1 + i % 3) for i in range(batch)]
        prompts = [PromptFormat().encode(generator.tokenizer, q).ids for q in questions]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[generator.pad_id] * (width - len(p)) + p for p in prompts])
        attention = (
            torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]
        ).long()

        def hf_generate() -> None:
            generator.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=generator.pad_id,
            )

        modes = {
            "capture on": lambda: generator.generate(prompts, max_new_tokens=new_tokens),
            "capture off": lambda: generator.generate(prompts, max_new_tokens=new_tokens, capture=False),
            "model.generate": hf_generate,
        }
        for run in modes.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(repeats):
            for name, run in modes.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    generated = batch * new_tokens
    print(
        f"(b) throughput: {batch} prompts x {new_tokens} new tokens, tiny Qwen3-MoE, {repeats} interleaved "
        f"repetitions, torch threads = {torch.get_num_threads()}"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"    {name:<16} {generated / median:8,.0f} generated tokens/s (median {median * 1000:.0f} ms)")
    print(
        f"    capture on / capture off throughput ratio: {medians['capture off'] / medians['capture on']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=256, help="synthetic sequences for (a)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions for (b)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (one is stable on small machines)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    storage(args.sequences, args.seed)
    throughput(args.repeats, args.batch, args.new_tokens)


if __name__ == "__main__":
    main()
