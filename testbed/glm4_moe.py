"""GLM4-MoE testbed models (the GLM-4.5 / GLM-4.5-Air architecture): sigmoid gates with a selection bias,
top-k renormalised, one expert group, a dense first layer and optional always-on shared experts.

The selection bias (``e_score_correction_bias``) only decides which experts are chosen, not their weights,
so no gradient reaches it. It is trained as DeepSeek-V3 trains it, without an auxiliary loss: after each
optimizer step every MoE layer moves each expert's bias by a fixed rate toward balanced load (up if the
expert was chosen less than the mean in that step, down if more), so the router learns what to choose and
the bias keeps all experts in use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, PreTrainedTokenizerFast
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from xici.testbed.families import Family, common_fields

if TYPE_CHECKING:
    from xici.testbed.train import ModelConfig


def hf_config(model: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> Glm4MoeConfig:
    """GLM-4.5-Air's choices (attention bias, half-rotary heads, no q/k norm) at the testbed's size."""
    return Glm4MoeConfig(
        **common_fields(model, tokenizer),
        attention_bias=True,
        use_qk_norm=False,
        n_routed_experts=model.experts,
        n_shared_experts=model.shared_experts,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=FAMILY.dense_layers,
        num_mtp_layers=0,
    )


class BiasBalancer:
    """Counts each router's selections during a step, then nudges its selection bias toward balanced load."""

    def __init__(self, model: Glm4MoeForCausalLM, rate: float) -> None:
        self.rate = rate
        self.routers = [m for m in model.modules() if isinstance(m, Glm4MoeTopkRouter)]
        self.loads = [torch.zeros(r.num_experts) for r in self.routers]
        self.weights = torch.empty(0)
        self.handles = [r.register_forward_hook(self._count) for r in self.routers]

    def _count(self, router: Glm4MoeTopkRouter, args: Any, output: tuple[torch.Tensor, ...]) -> None:
        indices = output[2]  # [tokens, top_k]: the experts the router selected
        weights = self.weights.reshape(-1, 1).expand_as(indices)
        self.loads[self.routers.index(router)].index_add_(0, indices.reshape(-1), weights.reshape(-1))

    def tokens(self, weights: torch.Tensor) -> None:
        """Selections of padding count nothing; a shared prefix run once counts once per sequence."""
        self.weights = weights.to(torch.float32)

    def extra_loss(self, outputs: Any) -> float:
        """No auxiliary loss: balance comes from the bias alone."""
        return 0.0

    @torch.no_grad()
    def after_step(self) -> None:
        for router, load in zip(self.routers, self.loads, strict=True):
            router.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
            load.zero_()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def training(model: Glm4MoeForCausalLM, config: ModelConfig) -> Iterator[BiasBalancer]:
    balancer = BiasBalancer(model, config.bias_rate)
    try:
        yield balancer
    finally:
        balancer.close()


FAMILY = Family(
    arch="glm4-moe",
    model_class=Glm4MoeForCausalLM,
    hf_config=hf_config,
    training=training,
    dense_layers=1,
    shared_experts=True,
    # Like the shipped Qwen3-MoE: four MoE layers (after the dense one); converges within 1,200 steps.
    defaults={"layers": 5, "steps": 1200},
)
