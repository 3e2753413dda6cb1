"""The generator interface: what recording, ablation and the judge need from an engine, and what every
engine shares.

:class:`Generator` is the protocol both backends implement (:class:`xici.recorder.hf_backend.HFGenerator`
for transformers, :class:`xici.recorder.vllm_backend.VLLMGenerator` for vLLM), :class:`Generation` what one
answered prompt comes back as. The helpers below are the backends' common ground: the same device and dtype
rules, the same tokenizer, the same stop tokens and the same answer decoding, so both write the same lake.
How each backend captures the routing is in :mod:`xici.recorder.capture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from xici.errors import XiciError
from xici.recorder import DTYPES
from xici.warehouse import TokenArrays


def resolve_device(device: str, *, cuda: bool | None = None) -> str:
    """``auto`` is the first GPU when there is one, else the CPU; anything else must name a usable device.

    ``cuda`` says whether the machines that will run the model have a CUDA GPU (None: this machine).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if device == "auto":
        return "cuda" if cuda else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise XiciError(
            f"{device!r} is not a device name", where="--device", fix="use auto, cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cuda" and not cuda:
        raise XiciError("no CUDA GPU is available here", where=f"--device {device}", fix="use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is bfloat16 on a GPU (what models ship in) and float32 on the CPU (fast and exact there)."""
    if dtype not in DTYPES:
        raise XiciError(
            f"dtype {dtype!r} is not supported", where="--dtype", fix=f"use one of {', '.join(DTYPES)}"
        )
    if dtype == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return dtype


def check_weights(model: str) -> None:
    """Refuse a local checkpoint whose safetensors files are damaged (truncated, overwritten), naming the
    file, before an engine spends minutes loading it. Reads each file's header only."""
    from safetensors import SafetensorError, safe_open

    folder = Path(model)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise XiciError(
                f"the weights file {path.name} is damaged ({exc})",
                where=str(path),
                fix="download or copy the checkpoint again (compare its size and checksum with the source)",
            ) from None


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer (no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise XiciError(
            f"cannot load the tokenizer of {model!r}: {exc}".replace("\n", " "),
            where="--model",
            fix="give a checkpoint directory (or hub id) that includes its tokenizer",
        ) from None


def stop_token_ids(eos_token_id: int | Sequence[int] | None, tokenizer: Any) -> set[int]:
    """Where greedy decoding stops: the generation config's EOS id(s) and the tokenizer's (both backends use
    this, so that they stop on the same tokens)."""
    ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def decode_answer(tokenizer: Any, ids: Sequence[int]) -> str:
    """The answer text: special tokens removed, surrounding whitespace stripped (both backends)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


@dataclass
class Generation:
    """One answered prompt.

    ``routing`` has one row per token the model processed, ``prompt_ids + output_ids[:-1]``, or is None
    when generation ran without capture.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    routing: TokenArrays | None


class Generator(Protocol):
    """What recording, ablation and the judge need from a backend; ``HFGenerator`` and ``VLLMGenerator``
    both are one, so either writes the same lake."""

    tokenizer: Any
    stop_ids: set[int]

    @property
    def metadata(self) -> dict[str, Any]:
        """The engine's settings as it runs, for the run's params (not part of its key)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        masks: torch.Tensor | None = None,
        capture: bool = True,
        logits: bool = False,
    ) -> list[Generation]: ...

    def close(self) -> None: ...
