"""Inside vLLM's worker: capture every MoE router's logits per (request, position) and deactivate experts,
in eager mode and in vLLM's compiled modes (torch.compile; CUDA graphs on GPUs).

The worker class is vLLM's own with :class:`RoutingCapture` mixed in (``LLM(..., worker_cls=...)``, see
:func:`worker_class`): right after the model is loaded, and so before vLLM traces and compiles it, the taps
are installed, and they stay for the engine's life. The driver (:mod:`xici.recorder.vllm_backend`) calls the
``xici_*`` methods through ``LLM.collective_rpc``; only plain data crosses: names, numbers and one bytes blob
each way.

What runs inside the model is three torch custom ops (``torch.ops.xici.*``, registered below with their
mutated arguments declared), so torch.compile traces them as opaque calls and a CUDA graph replays their
kernels; none of them needs Python at replay. They read and write persistent device buffers sized to the
engine's largest step (``max_num_batched_tokens`` rows), found through the MoE registry
(:meth:`xici.moe.base.MoEArchitecture.vllm_moe_blocks`):

- a forward hook on each MoE block's router (``gate``) calls ``capture_logits``, which copies the layer's
  logits (float32) into ``captured [n_moe_layers, rows, n_experts]``; padding rows are written and ignored;
- expert masks, from the per-row buffer ``row_masks [n_moe_layers, rows, n_experts]`` (True =
  deactivated; rows of requests without a mask are all False, so they are untouched), in one of two ways.
  Softmax gates: the same hook returns ``mask_logits``' output, the logits with each masked expert's logit
  replaced by the row's minimum logit, one float step lower (method.md's deactivation; strictly lowest, so
  never in the top-k, and the softmax weights stay natural); vLLM's own routing then runs on them. Gates with
  a selection bias or group limits, where a minimum logit can still be picked: a wrapper around the
  fused-experts router's ``select_experts`` calls ``mask_selection``, which replaces the routing of rows
  with a mask by the registry gate applied with the mask (masked experts are removed from the top-k), in
  vLLM's weight convention (some vLLM routers leave ``routed_scaling_factor`` to the runner).

Python runs around each step, outside the model: a wrapper around the model runner's ``_model_forward``
(its override point, called once per engine step and never by warm-up or dummy runs) reads the step's batch
layout before the forward (which request owns each row: ``input_batch.req_ids`` and ``query_start_loc``;
each row's token position: the ``positions`` argument), fills the per-row buffers from the per-request ones
(:attr:`_Capture.row_edits`: the masks, and the additive logit biases of the boost experiment), and after
the forward keeps a device copy of the step's captured rows.

Captured logits stay on the device; every so often, and at the end, they are turned into top-k ids and
weights by the registry gate of each layer (the same function the transformers backend uses, so both backends
store the same quantities), many steps at once. A token computed twice (a preempted request recomputes its
rows) keeps one row: the last one written for its (request, position). Outside a ``generate_with_routing``
call the taps still run (they are compiled in) and what they write is ignored.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.utils.torch_utils import direct_register_custom_op

from xici.moe import resolve
from xici.moe.base import MoELayout
from xici.moe.gating import LayerGate, SoftmaxTopK
from xici.warehouse.gates import expert_id_dtype

#: vLLM's worker class per device type, which :func:`worker_class` extends with :class:`RoutingCapture`.
_BASE_WORKERS = {
    "cpu": ("CPUCaptureWorker", "vllm.v1.worker.cpu_worker.CPUWorker"),
    "cuda": ("GPUCaptureWorker", "vllm.v1.worker.gpu_worker.Worker"),
}

#: Captured float32 logits kept on the device before they are reduced to top-k ids and weights.
_PENDING_BYTES = 256 << 20


def worker_class(device_type: str) -> str | None:
    """What to pass as ``worker_cls`` to ``vllm.LLM`` on this device type; None where xici has no worker."""
    entry = _BASE_WORKERS.get(device_type)
    return None if entry is None else f"{__name__}.{entry[0]}"


def __getattr__(name: str) -> type:
    """The worker classes, made on first use (importing vLLM's GPU worker on a CPU machine is not free)."""
    for worker, base in _BASE_WORKERS.values():
        if worker == name:
            module, _, base_name = base.rpartition(".")
            cls = type(name, (RoutingCapture, getattr(importlib.import_module(module), base_name)), {})
            cls.__module__ = __name__
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the custom ops -------------------------------------------------------------------------------------

_LIBRARY = torch.library.Library("xici", "FRAGMENT")
#: Gates of the layers masked at selection, by the key ``mask_selection`` gets: (registry gate, weight scale).
_SELECTION_GATES: dict[str, tuple[LayerGate, float]] = {}


def _capture_logits(logits: torch.Tensor, captured: torch.Tensor, layer: int) -> None:
    """Copy one MoE layer's router logits into rows 0..n-1 of ``captured[layer]``."""
    captured[layer, : logits.shape[0]].copy_(logits)


def _mutates_only(*args: Any) -> None:
    """Shape function (fake) of the ops that only write into their arguments."""


def _mask_logits(logits: torch.Tensor, row_masks: torch.Tensor, layer: int) -> torch.Tensor:
    """The logits with each row's masked experts (``row_masks[layer]``) made strictly the row's lowest."""
    return _below_min(logits, row_masks[layer, : logits.shape[0]])


def _mask_logits_fake(logits: torch.Tensor, row_masks: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(logits)


def _bias_logits(logits: torch.Tensor, row_bias: torch.Tensor, layer: int) -> torch.Tensor:
    """The logits plus each row's bias (``row_bias[layer]``; zero on rows without one: unchanged)."""
    return logits + row_bias[layer, : logits.shape[0]].to(logits.dtype)


def _bias_logits_fake(logits: torch.Tensor, row_bias: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(logits)


def _mask_selection(
    weights: torch.Tensor,
    ids: torch.Tensor,
    logits: torch.Tensor,
    row_masks: torch.Tensor,
    row_bias: torch.Tensor,
    layer: int,
    gate_key: str,
) -> None:
    """Overwrite vLLM's top-k of the rows with a mask or a bias by the registry gate's routing under them."""
    gate, scale = _SELECTION_GATES[gate_key]
    mask = row_masks[layer, : logits.shape[0]]
    bias = row_bias[layer, : logits.shape[0]]
    new_ids, new_weights = gate(logits.float() + bias, mask)
    masked = (mask | (bias != 0)).any(dim=-1, keepdim=True)
    ids.copy_(torch.where(masked, new_ids.to(ids.dtype), ids))
    weights.copy_(torch.where(masked, (new_weights * scale).to(weights.dtype), weights))


direct_register_custom_op("capture_logits", _capture_logits, ["captured"], _mutates_only, target_lib=_LIBRARY)
direct_register_custom_op("mask_logits", _mask_logits, [], _mask_logits_fake, target_lib=_LIBRARY)
direct_register_custom_op("bias_logits", _bias_logits, [], _bias_logits_fake, target_lib=_LIBRARY)
direct_register_custom_op(
    "mask_selection", _mask_selection, ["weights", "ids"], _mutates_only, target_lib=_LIBRARY
)


@dataclass
class _Step:
    """The layout of one forward call."""

    requests: np.ndarray  # int64 [rows]: batch index of each row's request, -1 for requests not ours
    positions: torch.Tensor  # int64 [rows], device


@dataclass
class _Rows:
    """Captured rows reduced to what is kept (numpy, host memory)."""

    requests: np.ndarray  # int64 [n]
    positions: np.ndarray  # int64 [n]
    topk_ids: np.ndarray  # [n, n_moe_layers, k]
    topk_weights: np.ndarray  # float32 [n, n_moe_layers, k]
    logits: np.ndarray | None  # float32 [n, n_moe_layers, n_experts]


@dataclass
class _Call:
    """One generation call: which requests are ours, their masks, what was captured so far."""

    prefix: str
    n_requests: int
    store_logits: bool
    mask_slots: np.ndarray  # int64 [n_requests]: row of ``masks`` per request, -1 for none
    masks: torch.Tensor | None  # bool [n_masked, n_moe_layers, n_experts], device
    bias_slots: np.ndarray  # int64 [n_requests]: row of ``bias`` per request, -1 for none
    bias: torch.Tensor | None  # float32 [n_biased, n_moe_layers, n_experts], device: added to the logits
    owners: dict[str, int] = field(default_factory=dict)  # vLLM request id -> batch index (cache)
    pending: list[tuple[_Step, torch.Tensor]] = field(default_factory=list)  # steps' logits on the device
    pending_bytes: int = 0
    done: list[_Rows] = field(default_factory=list)

    def owner(self, request_id: str) -> int:
        """Batch index of a vLLM request (internal ids carry a ``-<random>`` suffix); -1 if not ours."""
        index = self.owners.get(request_id)
        if index is None:
            index = -1
            if request_id.startswith(self.prefix):
                number = request_id[len(self.prefix) :].split("-", 1)[0]
                if number.isdigit() and int(number) < self.n_requests:
                    index = int(number)
            self.owners[request_id] = index
        return index

    def edits(self, requests: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """Per kind of row edit (masks, bias) the call has: the rows whose request has one (``requests``:
        batch index per row, -1 = not ours), each one's row in the per-request tensor, and that tensor."""
        found = {}
        for name, slots, values in (
            ("masks", self.mask_slots, self.masks),
            ("bias", self.bias_slots, self.bias),
        ):
            if values is not None:
                where, rows = _rows_with(requests, slots)
                if len(where):
                    found[name] = (where, rows, values)
        return found


def _rows_with(requests: np.ndarray, per_request: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose request has a slot in ``per_request``, and each one's slot."""
    slots = np.where(requests >= 0, per_request[requests], -1)
    where = np.flatnonzero(slots >= 0)
    return where, slots[where]


class _Capture:
    """The worker-side buffers, taps and state for one model runner."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        model = runner.get_model()
        config = runner.model_config.hf_config
        architecture = resolve(config)
        self.layout: MoELayout = architecture.layout(config)
        blocks = architecture.vllm_moe_blocks(model, config)
        self.gate_modules = [block.gate for block in blocks]
        self.routers = [block.experts.router for block in blocks]
        self.monolithic = any(block.experts.routed_experts.quant_method.is_monolithic for block in blocks)
        bias = architecture.bias_attr
        self.gates: list[LayerGate] = [
            architecture.make_gate(config, getattr(gate, bias) if bias else None)
            for gate in self.gate_modules
        ]
        # Layers whose masks are enforced at expert selection (see the module docstring), not on the logits.
        self.at_selection = [not isinstance(gate, SoftmaxTopK) for gate in self.gates]
        # Registry weights carry the model's routed scaling; a vLLM router may leave it to the MoE runner.
        self.weight_scale = [
            getattr(router, "routed_scaling_factor", 1.0) / getattr(gate, "scaling", 1.0)
            for router, gate in zip(self.routers, self.gates, strict=True)
        ]
        self.device = next(model.parameters()).device
        shape = (self.layout.n_moe_layers, runner.max_num_tokens, self.layout.n_experts)
        self.captured = torch.zeros(shape, dtype=torch.float32, device=self.device)
        #: Per-row edits of the router's work, filled before each step from each request's own; all zero
        #: (no edit) outside a call and on rows of requests without one.
        self.row_edits = {
            "masks": torch.zeros(shape, dtype=torch.bool, device=self.device),
            "bias": torch.zeros(shape, dtype=torch.float32, device=self.device),
        }
        self.edited_rows = 0  # rows 0..edited_rows-1 of the row edits may hold something
        self.call: _Call | None = None
        self._install()

    def _install(self) -> None:
        """Put the taps in the model (for good: compilation traces them once)."""
        for layer, gate in enumerate(self.gate_modules):
            gate.register_forward_hook(self._gate_hook(layer))
            if self.at_selection[layer]:
                router = self.routers[layer]
                key = f"{id(self)}.{layer}"
                _SELECTION_GATES[key] = (self.gates[layer], self.weight_scale[layer])
                router.select_experts = self._wrap_select(
                    layer, key, type(router).select_experts.__get__(router)
                )
        self.runner._model_forward = self._wrap_forward(type(self.runner)._model_forward.__get__(self.runner))

    def info(self) -> dict[str, Any]:
        return {
            "architecture": self.layout.architecture,
            "n_moe_layers": self.layout.n_moe_layers,
            "n_experts": self.layout.n_experts,
            "top_k": self.layout.top_k,
            "monolithic": self.monolithic,
            "eplb": any(router.eplb_state is not None for router in self.routers),
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "capture_rows": self.captured.shape[1],
        }

    # -- call lifecycle -------------------------------------------------------------------------------

    def begin(self, prefix: str, n_requests: int, store_logits: bool, masks_blob: bytes) -> None:
        self.end()
        arrays = np.load(io.BytesIO(masks_blob))
        slots = arrays["slots"].astype(np.int64)
        bias_slots = arrays["bias_slots"].astype(np.int64)
        masks = bias = None
        if (slots >= 0).any():
            masks = torch.from_numpy(np.unpackbits(arrays["packed"], axis=-1, count=self.layout.n_experts))
            masks = masks.to(self.device, torch.bool)
        if (bias_slots >= 0).any():
            bias = torch.from_numpy(arrays["bias"]).to(self.device, torch.float32)
        self.call = _Call(prefix, n_requests, store_logits, slots, masks, bias_slots, bias)

    def end(self) -> None:
        """Forget the call and clear the row edits (also after an error)."""
        self._clear_edits()
        self.call = None

    def collect(self) -> bytes:
        """The call's routing as one ``.npz`` blob, one row per (request, position), sorted; ends the call."""
        call = self.call
        if call is None:
            raise RuntimeError("xici_collect without xici_begin")
        try:
            self._reduce()
            chunks = call.done
            if not chunks:
                raise RuntimeError("no routing was captured: did the model run any of the call's requests?")
            requests = np.concatenate([c.requests for c in chunks])
            positions = np.concatenate([c.positions for c in chunks])
            arrival = np.arange(len(requests))
            order = np.lexsort((arrival, positions, requests))
            last = np.ones(len(order), dtype=bool)
            last[:-1] = (requests[order][1:] != requests[order][:-1]) | (
                positions[order][1:] != positions[order][:-1]
            )
            pick = order[last]
            pick = pick[requests[pick] >= 0]
            out = {
                "requests": requests[pick].astype(np.int32),
                "positions": positions[pick].astype(np.int32),
                "topk_ids": _cat([c.topk_ids for c in chunks], pick, expert_id_dtype(self.layout.n_experts)),
                "topk_weights": _cat([c.topk_weights for c in chunks], pick, np.float32),
            }
            if call.store_logits:
                out["logits"] = _cat([c.logits for c in chunks], pick, np.float32)
            buffer = io.BytesIO()
            np.savez(buffer, **out)
            return buffer.getvalue()
        finally:
            self.end()

    # -- taps (traced by torch.compile: tensor ops and the custom ops only) -------------------------------

    def _gate_hook(self, layer: int) -> Callable[..., Any]:
        on_logits = not self.at_selection[layer]
        captured, masks, bias = self.captured, self.row_edits["masks"], self.row_edits["bias"]

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            logits = output[0] if isinstance(output, tuple) else output
            torch.ops.xici.capture_logits(logits, captured, layer)
            if not on_logits:
                return None
            masked = torch.ops.xici.mask_logits(torch.ops.xici.bias_logits(logits, bias, layer), masks, layer)
            return (masked, *output[1:]) if isinstance(output, tuple) else masked

        return hook

    def _wrap_select(self, layer: int, key: str, select: Callable[..., Any]) -> Callable[..., Any]:
        masks, bias = self.row_edits["masks"], self.row_edits["bias"]

        def select_experts(
            hidden_states: torch.Tensor,
            router_logits: torch.Tensor,
            topk_indices_dtype: torch.dtype | None = None,
            *,
            input_ids: torch.Tensor | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = select(hidden_states, router_logits, topk_indices_dtype, input_ids=input_ids)
            torch.ops.xici.mask_selection(weights, ids, router_logits, masks, bias, layer, key)
            return weights, ids

        return select_experts

    # -- around each step (Python, outside the model) ----------------------------------------------------

    def _wrap_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def model_forward(*args: Any, **kwargs: Any) -> Any:
            if self.call is None:
                return forward(*args, **kwargs)
            step = self._layout(kwargs["positions"])
            output = forward(*args, **kwargs)
            self._keep(step)
            return output

        return model_forward

    def _layout(self, positions: torch.Tensor) -> _Step:
        """Who owns each row of the step about to run; the row edits filled for it."""
        call = self.call
        assert call is not None
        batch = self.runner.input_batch
        n_reqs = batch.num_reqs
        starts = self.runner.query_start_loc.np[: n_reqs + 1]
        owners = np.fromiter((call.owner(r) for r in batch.req_ids[:n_reqs]), dtype=np.int64, count=n_reqs)
        requests = np.repeat(owners, np.diff(starts))
        rows = len(requests)
        if positions.dim() != 1 or positions.shape[0] < rows or rows > self.captured.shape[1]:
            raise RuntimeError(
                f"unexpected positions {tuple(positions.shape)} for {rows} scheduled tokens "
                f"(buffers of {self.captured.shape[1]} rows)"
            )
        self._clear_edits()
        for name, (where, slots, values) in call.edits(requests).items():
            self.row_edits[name][:, self._to_device(where)] = values[self._to_device(slots)].transpose(0, 1)
            self.edited_rows = rows
        return _Step(requests, positions[:rows].clone())

    def _clear_edits(self) -> None:
        if self.edited_rows:
            for buffer in self.row_edits.values():
                buffer[:, : self.edited_rows] = 0
            self.edited_rows = 0

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """An index array on the model's device without a stream sync (pinned, non-blocking on a GPU)."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _keep(self, step: _Step) -> None:
        call = self.call
        if call is None or not (step.requests >= 0).any():
            return
        logits = self.captured[:, : len(step.requests)].clone()
        call.pending.append((step, logits))
        call.pending_bytes += logits.numel() * 4
        if call.pending_bytes > _PENDING_BYTES:
            self._reduce()

    def _reduce(self) -> None:
        """Turn pending logits into top-k ids and weights with the registry gates, many steps at once."""
        call = self.call
        assert call is not None
        if not call.pending:
            return
        requests = np.concatenate([step.requests for step, _ in call.pending])
        positions = torch.cat([step.positions for step, _ in call.pending])
        logits = torch.cat([captured for _, captured in call.pending], dim=1)  # [L, N, E]
        edits = {}
        for name, (where, slots, values) in call.edits(requests).items():
            edits[name] = torch.zeros(logits.shape, dtype=values.dtype, device=self.device)
            edits[name][:, self._to_device(where)] = values[self._to_device(slots)].transpose(0, 1)
        masks, bias = edits.get("masks"), edits.get("bias")
        parts = [
            gate(
                logits[layer] if bias is None else logits[layer] + bias[layer],
                None if masks is None else masks[layer],
            )
            for layer, gate in enumerate(self.gates)
        ]
        call.done.append(
            _Rows(
                requests,
                positions.cpu().numpy(),
                torch.stack([ids for ids, _ in parts], dim=1).cpu().numpy(),
                torch.stack([weights for _, weights in parts], dim=1).cpu().numpy(),
                logits.transpose(0, 1).cpu().numpy() if call.store_logits else None,
            )
        )
        call.pending, call.pending_bytes = [], 0


def _below_min(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked logits replaced by the row's minimum one float step lower: the registry's
    :func:`~xici.moe.gating.deactivate`, made strict so that a tie can never select a masked expert."""
    low = logits.min(dim=-1, keepdim=True).values
    return torch.where(mask, torch.nextafter(low, torch.full_like(low, float("-inf"))), logits)


def _cat(parts: list[Any], pick: np.ndarray, dtype: Any) -> np.ndarray:
    """Rows ``pick`` of the concatenated per-chunk arrays, as ``dtype``."""
    return np.concatenate(parts)[pick].astype(dtype, copy=False)


class RoutingCapture:
    """Mixed into vLLM's worker class (:func:`worker_class`): installs the taps when the model is loaded, and
    the ``xici_*`` methods the driver calls through ``collective_rpc``."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        self.__dict__["_xici_state"] = _Capture(self.model_runner)  # type: ignore[attr-defined]

    def xici_info(self) -> dict[str, Any]:
        """Routing shape and runtime facts of this worker."""
        return self._xici_capture().info()

    def xici_begin(self, prefix: str, n_requests: int, store_logits: bool, masks_blob: bytes) -> None:
        """Route requests ``<prefix><i>``, i < n_requests, with their packed masks, and capture them."""
        self._xici_capture().begin(prefix, n_requests, store_logits, masks_blob)

    def xici_collect(self) -> bytes:
        """Return the call's routing (rank 0 only; other tensor-parallel ranks return b"") and end it."""
        blob = self._xici_capture().collect()
        return blob if getattr(self, "rank", 0) == 0 else b""

    def xici_abort(self) -> None:
        """End the call and drop whatever was captured."""
        self._xici_capture().end()

    def _xici_capture(self) -> _Capture:
        return self.__dict__["_xici_state"]
