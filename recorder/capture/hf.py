"""Router hooks for transformers models: capture every MoE layer's routing and deactivate experts per row.

One forward hook per router sees the router's logits for the whole flattened batch; with masks set it
replaces the router's ``(logits, weights, ids)`` output by the registry gate applied with the mask, so the
experts really run with the deactivated routing. A float "mask" is an additive bias instead (the boost
experiment): the gate runs on the logits plus the row's bias. Everything is tensor ops over the batch (no
per-token Python), and it works across ``model.generate``'s prefill and cached decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from xici.errors import XiciError
from xici.moe import resolve
from xici.moe.base import MoELayout


@dataclass(frozen=True)
class StepRouting:
    """The routing of one forward call, rows in the model's flattened batch-major order (N = B*T).

    ``logits`` float32 [N, L, E] are the raw router logits (before any masking); ``topk_ids`` int64 [N, L, k]
    and ``topk_weights`` float32 [N, L, k] are what the model used (computed in float32 by the registry gate;
    a bfloat16 model mixes with these weights rounded to bfloat16). Tensors are on the model's device.
    """

    logits: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


class RouterTap:
    """Context manager hooking every MoE router of a transformers ``*ForCausalLM`` model.

    ``with RouterTap(model) as tap: model.generate(...); steps = tap.pop_steps()``. Hooks are removed on
    exit, also after an exception.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        architecture = resolve(model.config)
        self.layout: MoELayout = architecture.layout(model.config)
        self._routers = architecture.hf_routers(model)
        self._gates = architecture.hf_gates(model)
        self._masks: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._steps: list[StepRouting] = []

    def __enter__(self) -> RouterTap:
        self._handles = [
            router.register_forward_hook(self._hook(layer)) for layer, router in enumerate(self._routers)
        ]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_masks(self, masks: torch.Tensor | None) -> None:
        """Deactivate experts per batch row: bool ``[B, n_moe_layers, n_experts]``, True = off; or boost
        them: float32 of that shape, added to the router logits; None = nothing changed.

        Raises XiciError up front when a row leaves a layer too few experts to route to.
        """
        if masks is None:
            self._masks = None
            return
        shape = (self.layout.n_moe_layers, self.layout.n_experts)
        if (
            masks.dtype not in (torch.bool, torch.float32)
            or masks.dim() != 3
            or tuple(masks.shape[1:]) != shape
        ):
            raise XiciError(
                f"expert masks must be a bool tensor (or a float32 bias tensor) "
                f"[batch, {shape[0]}, {shape[1]}], got {masks.dtype} {list(masks.shape)}",
                where="RouterTap.set_masks",
                fix="build one row per prompt of the batch, one mask per MoE layer",
            )
        if masks.dtype == torch.float32:
            self._masks = masks
            return
        for layer, gate in enumerate(self._gates):
            where = f"MoE layer {layer} (block {self.layout.moe_layers[layer]})"
            gate.check_mask(masks[:, layer], where=where)
        self._masks = masks

    def pop_steps(self) -> list[StepRouting]:
        """The routing of every complete forward call since the last pop, oldest first."""
        steps, self._steps = self._steps, []
        return steps

    def _hook(self, layer: int) -> Any:
        gate = self._gates[layer]

        def hook(module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> Any:
            router_logits, model_weights, _ = output
            logits = router_logits.detach().float()
            mask = None
            if self._masks is not None:
                batch = self._masks.shape[0]
                if logits.shape[0] % batch:
                    raise XiciError(
                        f"the masks are for {batch} batch rows but the router saw {logits.shape[0]} tokens",
                        where="RouterTap.set_masks",
                        fix="set one mask row per prompt of the batch being run",
                    )
                rows = self._masks[:, layer].to(logits.device)
                mask = rows.repeat_interleave(logits.shape[0] // batch, dim=0)
            if mask is not None and mask.dtype == torch.float32:  # a boost: the gate sees biased logits
                ids, weights = gate(logits + mask, None)
            else:
                ids, weights = gate(logits, mask)
            self._record(layer, logits, ids, weights)
            if mask is None:
                return None
            return router_logits, weights.to(model_weights.dtype), ids

        return hook

    def _record(self, layer: int, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Collect one layer; a forward call is complete when the last MoE layer has run."""
        if layer == 0:
            self._layers = []
        self._layers.append((logits, ids, weights))
        if layer == len(self._gates) - 1 and len(self._layers) == len(self._gates):
            logits_, ids_, weights_ = (torch.stack(parts, dim=1) for parts in zip(*self._layers, strict=True))
            self._steps.append(StepRouting(logits_, ids_, weights_))
            self._layers = []
