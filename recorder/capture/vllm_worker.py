"""Inside vLLM's worker: capture every MoE router's logits per (request, position) and deactivate experts.

:class:`RoutingCapture` is installed with ``LLM(..., worker_extension_cls=WORKER_EXTENSION)``; vLLM mixes it
into its worker class, and the driver (:mod:`xici.recorder.vllm_backend`) calls its ``xici_*`` methods through
``LLM.collective_rpc``. Only plain data crosses: names, numbers and one bytes blob each way.

For the duration of one ``generate_with_routing`` call the worker holds three kinds of hooks, all found
through the MoE registry (:meth:`xici.moe.base.MoEArchitecture.vllm_moe_blocks`):

- a wrapper around the model runner's ``_model_forward`` (its override point, called once per engine step and
  never by warm-up or dummy runs) reads the step's batch layout before the forward: which request owns each
  row (``input_batch.req_ids`` and ``query_start_loc``) and each row's token position (the ``positions``
  argument); padding rows past the scheduled tokens are ignored;
- a forward hook on each MoE block's router (``gate``) copies the layer's logits, as float32, into the step's
  ``[rows, n_moe_layers, n_experts]`` buffer;
- expert masks (each request's rows get that request's mask; rows of other requests are untouched), in one
  of two ways. Softmax gates: the same hook returns the logits with each masked expert's logit replaced by
  the row's minimum logit, one float step lower (method.md's deactivation; strictly lowest, so never in the
  top-k, and the softmax weights stay natural); vLLM's own routing then runs on them, a handful of tensor
  ops per layer. Gates with a selection bias or group limits, where a minimum logit can still be picked:
  a wrapper around the fused-experts router's ``select_experts`` replaces the masked rows' routing by the
  registry gate applied with the mask (masked experts are removed from the top-k), in vLLM's weight
  convention (some vLLM routers leave ``routed_scaling_factor`` to the runner).

Captured logits stay on the device; every so often, and at the end, they are turned into top-k ids and
weights by the registry gate of each layer (the same function the transformers backend uses, so both backends
store the same quantities), many steps at once. A token computed twice (a preempted request recomputes its
rows) keeps one row: the last one written for its (request, position).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xici.moe import resolve
from xici.moe.base import MoELayout
from xici.moe.gating import LayerGate, SoftmaxTopK
from xici.warehouse.gates import expert_id_dtype

#: What to pass as ``worker_extension_cls`` to ``vllm.LLM``.
WORKER_EXTENSION = "xici.recorder.capture.vllm_worker.RoutingCapture"

#: Captured float32 logits kept on the device before they are reduced to top-k ids and weights.
_PENDING_BYTES = 256 << 20


@dataclass
class _Step:
    """The layout of one forward call while it runs."""

    requests: np.ndarray  # int64 [rows]: batch index of each row's request, -1 for requests not ours
    positions: torch.Tensor  # int64 [rows], device
    logits: torch.Tensor  # float32 [rows, n_moe_layers, n_experts], device, filled layer by layer
    masked_rows: torch.Tensor | None  # int64 [m], device: rows whose request has a mask
    masks: torch.Tensor | None  # bool [m, n_moe_layers, n_experts], device
    row_masks: torch.Tensor | None  # bool [rows, n_moe_layers, n_experts], device (logit-level layers)


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
    owners: dict[str, int] = field(default_factory=dict)  # vLLM request id -> batch index (cache)
    pending: list[_Step] = field(default_factory=list)  # steps whose logits are still on the device
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

    def masked(self, requests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows whose request has a mask (``requests``: batch index per row, -1 = not ours), and each
        one's row in ``masks``."""
        slots = np.where(requests >= 0, self.mask_slots[requests], -1)
        where = np.flatnonzero(slots >= 0)
        return where, slots[where]


class _Capture:
    """The worker-side state and hooks for one model runner."""

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
        self.call: _Call | None = None
        self.step: _Step | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

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
        }

    # -- call lifecycle -------------------------------------------------------------------------------

    def begin(self, prefix: str, n_requests: int, store_logits: bool, masks_blob: bytes) -> None:
        self.end()
        arrays = np.load(io.BytesIO(masks_blob))
        slots = arrays["slots"].astype(np.int64)
        masks = None
        if (slots >= 0).any():
            masks = torch.from_numpy(np.unpackbits(arrays["packed"], axis=-1, count=self.layout.n_experts))
            masks = masks.to(self.device, torch.bool)
        self.call = _Call(prefix, n_requests, store_logits, slots, masks)
        self.handles = [
            gate.register_forward_hook(self._gate_hook(layer)) for layer, gate in enumerate(self.gate_modules)
        ]
        self.runner._model_forward = self._wrap_forward(type(self.runner)._model_forward.__get__(self.runner))
        if masks is not None:
            for layer, router in enumerate(self.routers):
                if self.at_selection[layer]:
                    select = type(router).select_experts.__get__(router)
                    router.select_experts = self._wrap_select(layer, select)

    def end(self) -> None:
        """Remove every hook and forget the call (also after an error)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.runner.__dict__.pop("_model_forward", None)
        for router in self.routers:
            router.__dict__.pop("select_experts", None)
        self.call = None
        self.step = None

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

    # -- hooks -----------------------------------------------------------------------------------------

    def _wrap_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def model_forward(*args: Any, **kwargs: Any) -> Any:
            self.step = self._layout(kwargs["positions"])
            try:
                output = forward(*args, **kwargs)
            finally:
                step, self.step = self.step, None
            self._keep(step)
            return output

        return model_forward

    def _layout(self, positions: torch.Tensor) -> _Step:
        """Who owns each row of the step about to run, and where masked rows are."""
        call = self.call
        assert call is not None
        batch = self.runner.input_batch
        n_reqs = batch.num_reqs
        starts = self.runner.query_start_loc.np[: n_reqs + 1]
        owners = np.fromiter((call.owner(r) for r in batch.req_ids[:n_reqs]), dtype=np.int64, count=n_reqs)
        requests = np.repeat(owners, np.diff(starts))
        rows = len(requests)
        if positions.dim() != 1 or positions.shape[0] < rows:
            raise RuntimeError(f"unexpected positions {tuple(positions.shape)} for {rows} scheduled tokens")
        shape = (rows, self.layout.n_moe_layers, self.layout.n_experts)
        masked_rows = masks = row_masks = None
        if call.masks is not None:
            where, slots = call.masked(requests)
            if len(where):
                masked_rows = self._to_device(where)
                masks = call.masks[self._to_device(slots)]
                if not all(self.at_selection):
                    row_masks = torch.zeros(shape, dtype=torch.bool, device=self.device)
                    row_masks[masked_rows] = masks
        logits = torch.empty(shape, dtype=torch.float32, device=self.device)
        return _Step(requests, positions[:rows].clone(), logits, masked_rows, masks, row_masks)

    def _gate_hook(self, layer: int) -> Callable[..., Any]:
        on_logits = not self.at_selection[layer]

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            step = self.step
            if step is None:
                return None
            logits = output[0] if isinstance(output, tuple) else output
            rows = step.logits.shape[0]
            step.logits[:, layer] = logits[:rows]
            if not on_logits or step.row_masks is None:
                return None
            off = step.row_masks[:, layer]
            if logits.shape[0] > rows:  # padding rows past the scheduled tokens
                off = torch.cat([off, off.new_zeros(logits.shape[0] - rows, off.shape[1])])
            deactivated = _below_min(logits, off)
            return (deactivated, *output[1:]) if isinstance(output, tuple) else deactivated

        return hook

    def _wrap_select(self, layer: int, select: Callable[..., Any]) -> Callable[..., Any]:
        gate, scale = self.gates[layer], self.weight_scale[layer]

        def select_experts(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = select(*args, **kwargs)
            step = self.step
            if step is not None and step.masked_rows is not None:
                assert step.masks is not None
                rows = step.masked_rows
                new_ids, new_weights = gate(step.logits[rows, layer], step.masks[:, layer])
                ids[rows] = new_ids.to(ids.dtype)
                weights[rows] = (new_weights * scale).to(weights.dtype)
            return weights, ids

        return select_experts

    # -- bookkeeping -----------------------------------------------------------------------------------

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """An index array on the model's device without a stream sync (pinned, non-blocking on a GPU)."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _keep(self, step: _Step | None) -> None:
        call = self.call
        if step is None or call is None or not (step.requests >= 0).any():
            return
        call.pending.append(step)
        call.pending_bytes += step.logits.numel() * 4
        if call.pending_bytes > _PENDING_BYTES:
            self._reduce()

    def _reduce(self) -> None:
        """Turn pending logits into top-k ids and weights with the registry gates, many steps at once."""
        call = self.call
        assert call is not None
        if not call.pending:
            return
        requests = np.concatenate([c.requests for c in call.pending])
        positions = torch.cat([c.positions for c in call.pending])
        logits = torch.cat([c.logits for c in call.pending])
        masks = None
        if call.masks is not None:
            where, slots = call.masked(requests)
            if len(where):
                masks = torch.zeros(logits.shape, dtype=torch.bool, device=self.device)
                masks[self._to_device(where)] = call.masks[self._to_device(slots)]
        parts = [
            gate(logits[:, layer], None if masks is None else masks[:, layer])
            for layer, gate in enumerate(self.gates)
        ]
        call.done.append(
            _Rows(
                requests,
                positions.cpu().numpy(),
                torch.stack([ids for ids, _ in parts], dim=1).cpu().numpy(),
                torch.stack([weights for _, weights in parts], dim=1).cpu().numpy(),
                logits.cpu().numpy() if call.store_logits else None,
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
    """vLLM worker extension: the ``xici_*`` methods the driver calls through ``collective_rpc``."""

    def xici_info(self) -> dict[str, Any]:
        """Routing shape and runtime facts of this worker (also sets the capture up)."""
        return self._xici_capture().info()

    def xici_begin(self, prefix: str, n_requests: int, store_logits: bool, masks_blob: bytes) -> None:
        """Hook the model for requests ``<prefix><i>``, i < n_requests, with their packed masks."""
        self._xici_capture().begin(prefix, n_requests, store_logits, masks_blob)

    def xici_collect(self) -> bytes:
        """Unhook and return the call's routing (rank 0 only; other tensor-parallel ranks return b"")."""
        blob = self._xici_capture().collect()
        return blob if getattr(self, "rank", 0) == 0 else b""

    def xici_abort(self) -> None:
        """Unhook and drop whatever was captured."""
        self._xici_capture().end()

    def _xici_capture(self) -> _Capture:
        capture = self.__dict__.get("_xici_state")
        if capture is None:
            capture = self.__dict__["_xici_state"] = _Capture(self.model_runner)  # type: ignore[attr-defined]
        return capture
