"""One GPU, one script, under 8 minutes: does xici's vLLM backend keep vLLM's speed, and stay right, on a
Qwen3-30B-A3B-shaped model in vLLM's default mode (torch.compile and CUDA graphs)?

1. builds a random checkpoint of Qwen3-30B-A3B's architecture in bfloat16 (``--layers`` of its 48 layers,
   8 by default so that writing, loading and compiling fit the time; the output says how many), on disk;
2. times plain vLLM (vLLM's own worker, no taps), capture, and capture + a different expert mask per
   request (25 (layer, expert) pairs, as an ablation), interleaved rounds on two engines side by side, both
   in vLLM's default compiled mode; prints throughputs and ratios (goal: capture >= 0.95x plain);
3. checks parity against transformers on the same GPU: a few prompts' vLLM answers are run through the
   transformers model (teacher-forced, :class:`~xici.recorder.capture.hf.RouterTap`), unmasked and under
   their masks; the share of (token, layer) rows with the same expert set, and the largest gate-weight
   difference where the sets agree, are printed (bfloat16: ties differ on a fraction of a percent of rows);
4. checks that no masked expert is selected in the recorded routing, and that the masked runs agree with
   transformers under the same masks (which they would not if vLLM's kernel had used other experts).

Run where a GPU is lent (``python benchmarks/gpu_check.py``), then put the figures in benchmarks/README.md.
Exits 1 when a check fails. Needs ``xici[vllm]`` (CUDA vLLM 0.32) and about 30 GB of GPU memory and disk at
8 layers.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # two engines side by side, a process each
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm_capture import QUESTIONS, interleaved, qwen3_30b_a3b, random_masks, report

from xici.recorder.capture.hf import RouterTap
from xici.recorder.prompting import PromptFormat
from xici.recorder.vllm_backend import RoutedGeneration, VLLMEngine, generate_with_routing, load_engine

#: Parity goals in bfloat16: share of rows with the same expert set, and gate-weight difference.
SAME_SETS = 0.99
WEIGHT_ATOL = 2e-2
CAPTURE_GOAL = 0.95
N_PARITY = 4


def build_checkpoint(folder: Path, layers: int) -> Path:
    """Qwen3-30B-A3B's configuration cut to ``layers`` layers, random bfloat16 weights, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen3_30b_a3b(folder)
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = layers
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def timing(path: Path, args: argparse.Namespace) -> tuple[list[list[int]], dict[str, Any]]:
    """Step 2; returns the prompts and the capture runs kept for the checks."""
    settings = {"max_model_len": 1024, "max_num_seqs": args.batch, "gpu_memory_utilization": 0.35}
    with contextlib.ExitStack() as stack:
        engines: dict[str, VLLMEngine] = {}
        for name, taps in (("plain", False), ("xici", True)):
            start = time.perf_counter()
            engines[name] = stack.enter_context(load_engine(str(path), taps=taps, **settings))
            print(f"  {name} engine started in {time.perf_counter() - start:.0f} s", flush=True)
        xici = engines["xici"]
        meta = xici.metadata
        print(
            f"  vLLM {meta['vllm_version']}, {meta['dtype']}, compilation mode {meta['compilation_mode']}, "
            f"CUDA graphs {meta['cudagraph_mode']}, max {meta['max_num_batched_tokens']} batched tokens"
        )
        prompts = [
            PromptFormat().encode(xici.tokenizer, QUESTIONS[i % len(QUESTIONS)]).ids
            for i in range(args.batch)
        ]
        masks = random_masks(xici, args.batch, seed=0)
        new = args.max_new_tokens
        kept: dict[str, Any] = {"masks": masks}

        def capture() -> list[RoutedGeneration]:
            kept["capture"] = generate_with_routing(xici, prompts, max_new_tokens=new)
            return kept["capture"]

        def masked() -> list[RoutedGeneration]:
            kept["masked"] = generate_with_routing(xici, prompts, max_new_tokens=new, masks=masks)
            return kept["masked"]

        modes = {
            "plain": lambda: generate_with_routing(
                engines["plain"], prompts, max_new_tokens=new, capture=False
            ),
            "capture": capture,
            "capture+masks": masked,
        }
        speeds = interleaved(modes, args.repeats)
    print(f"  batch {args.batch} x {new} new tokens, {args.repeats} interleaved rounds, medians:")
    for name, values in speeds.items():
        report(name, values, speeds["plain"])
    ratio = statistics.median(s[0] / p[0] for p, s in zip(speeds["plain"], speeds["capture"], strict=True))
    kept["capture_ratio"] = ratio
    print(f"  capture throughput / plain: {ratio:.3f} (goal >= {CAPTURE_GOAL})")
    return prompts, kept


def parity(path: Path, prompts: list[list[int]], kept: dict[str, Any]) -> bool:
    """Steps 3 and 4: vLLM's recorded routing against transformers' on the same tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    masks = kept["masks"]
    ok = True
    for label, runs, with_masks in (("unmasked", kept["capture"], False), ("masked", kept["masked"], True)):
        same = rows = 0
        worst = 0.0
        for index in range(N_PARITY):
            got = runs[index]
            tokens = torch.tensor([[*got.prompt_ids, *got.output_ids[:-1]]], device="cuda")
            with torch.inference_mode(), RouterTap(model) as tap:
                tap.set_masks(torch.from_numpy(masks[index])[None].cuda() if with_masks else None)
                model(tokens)
                (step,) = tap.pop_steps()
            want_ids = np.sort(step.topk_ids.cpu().numpy(), -1)
            order = np.argsort(step.topk_ids.cpu().numpy(), -1)
            want_weights = np.take_along_axis(step.topk_weights.float().cpu().numpy(), order, -1)
            got_order = np.argsort(got.topk_ids.astype(np.int64), -1)
            got_ids = np.take_along_axis(got.topk_ids.astype(np.int64), got_order, -1)
            got_weights = np.take_along_axis(got.topk_weights, got_order, -1)
            agree = (got_ids == want_ids).all(-1)
            same += int(agree.sum())
            rows += agree.size
            if agree.any():
                worst = max(worst, float(np.abs(got_weights - want_weights)[agree].max()))
        share = same / rows
        passed = share >= SAME_SETS and worst <= WEIGHT_ATOL
        ok &= passed
        print(
            f"  parity {label}: {share:.4%} of {rows} (token, layer) rows with the same experts, max weight "
            f"difference {worst:.2e} ({'ok' if passed else 'FAIL'}; goals >= {SAME_SETS:.0%}, "
            f"<= {WEIGHT_ATOL})"
        )
    layers = np.arange(masks.shape[1])[None, :, None]
    selected = [
        i for i, run in enumerate(kept["masked"]) if masks[i][layers, run.topk_ids.astype(np.int64)].any()
    ]
    print(
        f"  masks: {len(selected)} of {len(kept['masked'])} recorded requests selected a masked expert "
        f"({'ok' if not selected else 'FAIL'})"
    )
    return ok and not selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="of Qwen3-30B-A3B's 48")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="where to write the checkpoint [a temporary folder]")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; on a CPU run benchmarks/vllm_capture.py")
    began = time.perf_counter()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "qwen3-30b-a3b-random"
        print(f"1. random Qwen3-30B-A3B architecture, {args.layers} of its 48 layers, bfloat16", flush=True)
        path = build_checkpoint(folder, args.layers)
        print(f"  written in {time.perf_counter() - began:.0f} s", flush=True)
        print("2. plain vLLM vs capture vs capture + masks (default compiled mode)", flush=True)
        prompts, kept = timing(path, args)
        print("3-4. parity with transformers on this GPU; masks", flush=True)
        ok = parity(path, prompts, kept) and kept["capture_ratio"] >= CAPTURE_GOAL
    print(f"total {time.perf_counter() - began:.0f} s; {'all checks passed' if ok else 'a check FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
