"""Qwen3-MoE testbed models: softmax gates, top-k renormalised, every layer MoE, a router balance loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from xici.testbed.families import Family, common_fields

if TYPE_CHECKING:
    from xici.testbed.train import ModelConfig


def hf_config(model: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeConfig:
    """The shipped design's config (changing it changes the shipped checkpoint's bytes)."""
    return Qwen3MoeConfig(
        **common_fields(model, tokenizer),
        num_experts=model.experts,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=model.router_aux_loss,
    )


class BalanceLoss:
    """The model's own router balance loss (Switch-Transformer style), weighted by ``router_aux_loss``."""

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def tokens(self, weights: torch.Tensor) -> None:
        """The loss counts every token the router saw, as transformers computes it."""

    def extra_loss(self, outputs: Any) -> torch.Tensor:
        return self.coef * outputs.aux_loss

    def after_step(self) -> None:
        """Nothing outside the gradients to train."""


@contextmanager
def training(model: Qwen3MoeForCausalLM, config: ModelConfig) -> Iterator[BalanceLoss]:
    yield BalanceLoss(config.router_aux_loss)


FAMILY = Family(
    arch="qwen3-moe",
    model_class=Qwen3MoeForCausalLM,
    hf_config=hf_config,
    training=training,
    # The shipped checkpoint's (README.md, "Training").
    defaults={"layers": 4, "steps": 1200},
)
