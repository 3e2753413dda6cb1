"""The model families the testbed trains, one module per architecture (as vLLM keeps one file per model).

A family module knows its transformers config and model class, the defaults its worlds train well with, and
what a training step needs beyond cross-entropy (Qwen3-MoE's router balance loss, GLM4-MoE's selection-bias
update). ``train.py`` stays generic: it asks the family for the config and for a :class:`StepHooks` and
calls those around every optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from xici.errors import XiciError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

    from xici.testbed.train import ModelConfig


class StepHooks(Protocol):
    """What a family adds to a training step; the generic loop calls these in this order."""

    def tokens(self, weights: torch.Tensor) -> None:
        """How many training sequences each token of the next forward pass stands for (0: padding)."""

    def extra_loss(self, outputs: Any) -> torch.Tensor | float:
        """A term added to the answer cross-entropy (from the model's outputs of the step)."""

    def after_step(self) -> None:
        """Runs after each optimizer step (for buffers that gradients do not train)."""


@dataclass(frozen=True)
class Family:
    """One architecture the testbed can train."""

    #: The name on the command line (``--arch``).
    arch: str
    #: The transformers model class (its checkpoints load with ``AutoModelForCausalLM``).
    model_class: Callable[[PretrainedConfig], PreTrainedModel]
    #: The transformers config of a testbed model (vocabulary and special-token ids from the tokenizer).
    hf_config: Callable[[ModelConfig, PreTrainedTokenizerFast], PretrainedConfig]
    #: Hooks for the training loop, entered for the whole training and left before the model is saved.
    training: Callable[[PreTrainedModel, ModelConfig], AbstractContextManager[StepHooks]]
    #: Leading layers with a dense MLP instead of experts.
    dense_layers: int = 0
    #: Whether the family has always-on shared experts (``--shared-experts``).
    shared_experts: bool = False
    #: What the ModelConfig fields that default to None (layers, steps) are for this family.
    defaults: dict[str, Any] = field(default_factory=dict)


def common_fields(model: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The transformers config fields every family sets alike: sizes, initialisation and special tokens."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": model.hidden,
        # Dense MLPs (where a family has them) are as wide as the routed experts a token uses.
        "intermediate_size": model.expert_width * model.top_k,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.heads,
        "head_dim": model.hidden // model.heads,
        "moe_intermediate_size": model.expert_width,
        "num_experts_per_tok": model.top_k,
        "norm_topk_prob": True,
        "initializer_range": model.init_std,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "float32",
    }


def families() -> dict[str, Family]:
    """Every family by its ``--arch`` name (the first is the default)."""
    from xici.testbed import glm4_moe, qwen3_moe

    return {f.arch: f for f in (qwen3_moe.FAMILY, glm4_moe.FAMILY)}


def family(arch: str) -> Family:
    """The family named ``arch``; a clear error for any other name."""
    known = families()
    if arch not in known:
        raise XiciError(
            f"unknown testbed architecture {arch!r}", where="--arch", fix=f"use one of {', '.join(known)}"
        )
    return known[arch]
