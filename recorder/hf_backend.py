"""Batched greedy generation with a transformers model, capturing the routing of every processed token.

The decoding loop is written out (prefill, then one token per step with the KV cache) rather than delegated
to ``model.generate``: greedy decoding is then exactly argmax over the logits whatever the checkpoint's
``generation_config`` says (repetition penalties, forced tokens...), and each forward call maps to known
rows: prompts are left-padded, pad positions and rows of sequences that already stopped are dropped, so no
padding ever reaches the recorded routing. The last generated token is never fed back through the model,
so a sequence's routing covers its prompt and all generated tokens but the last.

Routing comes from :class:`xici.recorder.capture.hf.RouterTap`, which also applies per-row expert masks
(ablation). The interface this implements is :class:`xici.recorder.generator.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xici.errors import XiciError
from xici.recorder.generator import (
    Generation,
    decode_answer,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    stop_token_ids,
)
from xici.warehouse import TokenArrays

if TYPE_CHECKING:
    from xici.recorder.capture.hf import RouterTap

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFGenerator:
    """A transformers MoE model ready for batched greedy generation with routing capture."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto") -> None:
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        # xici shows its own progress; transformers' per-shard loading bars would interleave with it.
        hf_logging.disable_progress_bar()

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(model)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model, dtype=_TORCH_DTYPES[self.dtype], trust_remote_code=False
            )
        except (OSError, ValueError, SafetensorError) as exc:
            raise XiciError(
                f"cannot load the model {model!r}: {exc}".replace("\n", " "),
                where="--model",
                fix="give a complete checkpoint directory (config, weights, tokenizer) or a hub id",
            ) from None
        self.model.to(self.device).eval()
        self.stop_ids = stop_token_ids(self.model.generation_config.eos_token_id, self.tokenizer)
        self.pad_id = next(
            i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None
        )

    @property
    def metadata(self) -> dict[str, Any]:
        """Where and how the model runs, for the run's params."""
        return {"backend": "transformers", "device": self.device, "dtype": self.dtype}

    def decode(self, ids: Sequence[int]) -> str:
        """The answer text: special tokens removed, surrounding whitespace stripped."""
        return decode_answer(self.tokenizer, ids)

    def close(self) -> None:
        """Release the weights now rather than at garbage collection: a command that loads another model
        next (``xici demo`` records, then ablates) needs the memory. The generator is unusable afterwards."""
        del self.model
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        masks: torch.Tensor | None = None,
        capture: bool = True,
        logits: bool = False,
    ) -> list[Generation]:
        """Greedy-decode a batch of prompts (token ids) together.

        ``masks`` (bool ``[B, n_moe_layers, n_experts]``, one row per prompt) deactivates experts per prompt;
        ``logits`` keeps the raw router logits in the routing; ``capture=False`` runs the plain model (for
        the overhead benchmark).
        """
        from xici.recorder.capture.hf import RouterTap

        if max_new_tokens < 1:
            raise XiciError("max_new_tokens must be at least 1", where="--max-new-tokens")
        if not prompts:
            return []
        if masks is not None and not capture:
            raise ValueError("expert masks need the router tap (capture=True)")
        if capture:
            with RouterTap(self.model) as tap:
                tap.set_masks(masks)
                return self._decode(prompts, max_new_tokens, tap, logits)
        return self._decode(prompts, max_new_tokens, None, logits)

    def _decode(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, tap: RouterTap | None, logits: bool
    ) -> list[Generation]:
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention, positions = (t.to(self.device) for t in (input_ids, attention, positions))

        # Rows of the first forward call that hold real prompt tokens (batch-major, pads on the left).
        ends = width * np.arange(1, batch + 1)
        keep = np.concatenate([np.arange(end - len(p), end) for end, p in zip(ends, prompts, strict=True)])
        owner = np.repeat(np.arange(batch), [len(p) for p in prompts])
        captured: list[_Captured] = []
        outputs: list[list[int]] = [[] for _ in range(batch)]
        live = np.ones(batch, dtype=bool)
        past = None
        for _ in range(max_new_tokens):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            if tap is not None:
                captured.append(_Captured.take(tap, keep, owner, logits))
            chosen = out.logits[:, -1, :].argmax(dim=-1).tolist()
            for row in np.flatnonzero(live):
                outputs[row].append(chosen[row])
                if chosen[row] in self.stop_ids or len(outputs[row]) == max_new_tokens:
                    live[row] = False
            if not live.any():
                break
            keep = owner = np.flatnonzero(live)
            fed = [chosen[r] if live[r] else self.pad_id for r in range(batch)]
            input_ids = torch.tensor(fed, dtype=torch.long, device=self.device)[:, None]
            attention = torch.cat([attention, attention.new_ones((batch, 1))], dim=1)
            positions = positions[:, -1:] + 1

        processed = [np.asarray([*p, *o[:-1]], dtype=np.int32) for p, o in zip(prompts, outputs, strict=True)]
        routings = _Captured.per_sequence(captured, processed, logits) if tap is not None else [None] * batch
        return [
            Generation(list(p), o, "stop" if o[-1] in self.stop_ids else "length", r)
            for p, o, r in zip(prompts, outputs, routings, strict=True)
        ]


@dataclass
class _Captured:
    """The real rows of one forward call's routing, still on the model's device; ``owner`` = batch row."""

    owner: np.ndarray
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    logits: torch.Tensor | None

    @classmethod
    def take(cls, tap: RouterTap, keep: np.ndarray, owner: np.ndarray, logits: bool) -> _Captured:
        steps = tap.pop_steps()
        if len(steps) != 1:
            raise RuntimeError(f"expected the routing of one forward call, got {len(steps)}")
        step = steps[0]
        rows = torch.as_tensor(keep, device=step.topk_ids.device)
        return cls(owner, step.topk_ids[rows], step.topk_weights[rows], step.logits[rows] if logits else None)

    @staticmethod
    def per_sequence(steps: list[_Captured], processed: list[np.ndarray], logits: bool) -> list[TokenArrays]:
        """Each batch row's routing in token order, next to the token ids it processed.

        A stable sort by owner keeps the forward calls' order; one device-to-host copy per field serves the
        whole batch.
        """
        owner = np.concatenate([s.owner for s in steps])
        counts = np.bincount(owner, minlength=len(processed))
        lengths = [len(tokens) for tokens in processed]
        if not np.array_equal(counts, lengths):
            raise RuntimeError(f"captured {counts.tolist()} routing rows for {lengths} processed tokens")
        order = np.argsort(owner, kind="stable")
        names = ("topk_ids", "topk_weights", "logits") if logits else ("topk_ids", "topk_weights")
        fields = [
            np.split(
                torch.cat([getattr(s, name) for s in steps]).to("cpu").numpy()[order], np.cumsum(counts)[:-1]
            )
            for name in names
        ]
        return [
            TokenArrays(tokens, ids, weights, raw[0] if raw else None)
            for tokens, ids, weights, *raw in zip(processed, *fields, strict=True)
        ]
