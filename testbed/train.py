"""Train a tiny MoE (Qwen3-MoE or GLM4-MoE, :mod:`xici.testbed.families`) from scratch on a synthetic world,
on CPU, reproducibly.

The result is an ordinary Hugging Face checkpoint (config, safetensors weights, word-level tokenizer with
the ChatML chat template of :mod:`xici.testbed.random_models`) that xici records and ablates like any hub
model. The model is trained on exactly the prompt the recorder sends (:class:`~xici.recorder.prompting.
PromptFormat`: chat template, the method's system instruction, the question as the user turn) and learns to
answer with the value word, then end of turn. Accuracies are graded by the recorder's match grader.

Speed: every training sequence starts with the same templated system turn, so that prefix is run once per
step and its key/value cache is shared by the whole batch (gradients flow back through it). The loss equals
that of running each sequence in full; only about a third of the tokens are computed.

Reproducibility: one thread, seeded generators, float32 and a fixed item order give the same checkpoint
bytes for the same seed on the same kind of machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from xici.corpora.graders import GradeItem, MatchGrader
from xici.errors import XiciError
from xici.recorder.prompting import PromptFormat
from xici.testbed.families import StepHooks, family
from xici.testbed.random_models import BOS, EOS, IM_START, PAD, chat_tokenizer
from xici.testbed.world import World, WorldConfig, generate_world

UNK = "<|unk|>"
_ROLE_WORDS = ("system", "user", "assistant")
#: The shipped checkpoint, dataset and accuracies (built by ``xici testbed build --out testbed/checkpoint``).
SHIPPED = Path(__file__).parent / "checkpoint"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and optimisation of the testbed model (defaults: the shipped one, see README.md).

    Fields left at None take the family's default (``arch``; :data:`xici.testbed.families.Family.defaults`).
    """

    #: Decoder layers, dense ones included (None: qwen3-moe 4, glm4-moe 5).
    layers: int | None = None
    hidden: int = 128
    heads: int = 4
    experts: int = 64
    top_k: int = 2
    expert_width: int = 32
    #: Weight of the router balance loss (families that train with one: qwen3-moe).
    router_aux_loss: float = 0.01
    #: Standard deviation of the initial weights. With transformers' default 0.02 the model sat on the
    #: "predict the value distribution" plateau for most of the budget; 0.08 leaves it within ~300 steps.
    init_std: float = 0.08
    #: Optimizer steps (None: the family's default).
    steps: int | None = None
    batch_size: int = 128
    #: Peak learning rate (AdamW, linear warm-up, cosine decay); 2e-3 and 3e-3 memorised slower or not at all.
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    #: The model family (``--arch``): ``qwen3-moe`` or ``glm4-moe``.
    arch: str = "qwen3-moe"
    #: Always-on shared experts per MoE layer, each as wide as a routed one (families that have them).
    shared_experts: int = 0
    #: Selection-bias step per optimizer step, toward balanced load (families with a selection bias).
    bias_rate: float = 1e-3

    def __post_init__(self) -> None:
        spec = family(self.arch)
        for name, value in spec.defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.steps < 1 or self.batch_size < 1:
            raise XiciError("steps and batch size must be at least 1", where="--steps")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise XiciError(
                "the hidden size must split into an even head size per attention head",
                where=f"hidden={self.hidden}, heads={self.heads}",
            )
        if self.experts < 2:
            raise XiciError(
                f"a MoE needs at least 2 experts per layer, got {self.experts}", where="--experts"
            )
        if not 1 <= self.top_k <= self.experts:
            raise XiciError(
                f"top-k must be between 1 and the number of experts ({self.experts}), got {self.top_k}",
                where="--top-k",
                fix="route fewer experts per token, or give more experts with --experts",
            )
        if self.shared_experts and not spec.shared_experts:
            raise XiciError(
                f"{self.arch} has no shared experts",
                where="--shared-experts",
                fix="leave --shared-experts out, or use an architecture with them (glm4-moe)",
            )
        if self.shared_experts < 0:
            raise XiciError(
                f"shared experts cannot be negative, got {self.shared_experts}", where="--shared-experts"
            )
        if self.layers - spec.dense_layers < 3:
            raise XiciError(
                f"the testbed needs at least 3 MoE layers: XICI leaves out the first and the last "
                f"({self.arch} has {spec.dense_layers} dense layer(s) before them)",
                where=f"layers={self.layers}",
                fix=f"use --layers {spec.dense_layers + 3} or more",
            )


@dataclass(frozen=True)
class TestbedPaths:
    """What :func:`build_testbed` writes, all in one folder so that it ships as one package-data folder."""

    checkpoint: Path
    dataset: Path
    accuracies: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TestbedPaths:
        """The layout :func:`build_testbed` writes into ``folder``."""
        folder = Path(folder)
        return cls(folder, folder / "dataset.jsonl", folder / "accuracies.json")


def shipped_testbed() -> TestbedPaths:
    """The trained testbed that ships with xici (so the demo never retrains)."""
    return TestbedPaths.in_folder(SHIPPED)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's vocabulary, with the chat template; decodes space-joined."""
    words = [PAD, BOS, EOS, IM_START, UNK, *_ROLE_WORDS, *world.vocabulary()]
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return chat_tokenizer(core, unk_token=UNK)


def _encode_items(
    world: World, tokenizer: PreTrainedTokenizerFast
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The prompt prefix all items share, then per item the rest of its sequence and its target positions.

    Returns (prefix ids, suffix ids [items, S], targets [items, S]); ``targets[i, j]`` says whether suffix
    token j of item i is predicted with loss (the answer words and the closing end of turn).
    """
    prompts = PromptFormat()
    sequences, answer_lengths = [], []
    for item in world.training_items():
        answer = [*tokenizer(item.answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        sequences.append(prompts.encode(tokenizer, item.question).ids + answer)
        answer_lengths.append(len(answer))
    shared = min(len(seq) - n for seq, n in zip(sequences, answer_lengths, strict=True))
    prefix_length = next((j for j in range(shared) if len({seq[j] for seq in sequences}) > 1), shared)
    width = max(len(seq) for seq in sequences) - prefix_length
    suffix = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, n) in enumerate(zip(sequences, answer_lengths, strict=True)):
        rest = seq[prefix_length:]
        suffix[row, : len(rest)] = torch.tensor(rest)
        targets[row, len(rest) - n : len(rest)] = True
    return sequences[0][:prefix_length], suffix, targets


def _step_loss(
    model: PreTrainedModel,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    targets: torch.Tensor,
    hooks: StepHooks,
) -> torch.Tensor:
    """Cross-entropy on the target tokens plus the family's extra loss, with the shared prefix run once."""
    batch = suffix.shape[0]
    hooks.tokens(torch.full(prefix.shape, batch))
    cache = model.model(input_ids=prefix, use_cache=True).past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    # No attention mask: padding only ever follows an item's targets, and attention is causal.
    hooks.tokens(suffix != model.config.pad_token_id)
    out = model(input_ids=suffix, past_key_values=cache, use_cache=True, output_router_logits=True)
    # Suffix logit j - 1 predicts suffix token j. Token 0 never is a target (every suffix opens with the
    # question), so the logit the prefix's last token would give for it is not needed.
    logits = out.logits[:, :-1][targets[:, 1:]]
    loss = torch.nn.functional.cross_entropy(logits, suffix[:, 1:][targets[:, 1:]])
    return loss + hooks.extra_loss(out)


def train_model(
    world: World,
    out: Path,
    model_config: ModelConfig,
    *,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Train on ``world`` with one thread and save the checkpoint (weights, config, tokenizer) to ``out``."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    tokenizer = build_tokenizer(world)
    prefix_ids, suffix, targets = _encode_items(world, tokenizer)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    spec = family(model_config.arch)
    model = spec.model_class(spec.hf_config(model_config, tokenizer))
    # Grouped matmuls: the per-expert loop is ~50x slower on CPU.
    model.set_experts_implementation("grouped_mm")
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=model_config.learning_rate, weight_decay=model_config.weight_decay
    )

    def schedule(step: int) -> float:
        if step < model_config.warmup_steps:
            return (step + 1) / model_config.warmup_steps
        progress = (step - model_config.warmup_steps) / max(1, model_config.steps - model_config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    prefix = torch.tensor([prefix_ids])
    order = torch.empty(0, dtype=torch.long)
    with spec.training(model, model_config) as hooks:
        for step in range(model_config.steps):
            if len(order) < model_config.batch_size:
                order = torch.cat([order, torch.randperm(len(suffix), generator=generator)])
            batch, order = order[: model_config.batch_size], order[model_config.batch_size :]
            loss = _step_loss(model, prefix, suffix[batch], targets[batch], hooks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hooks.after_step()
            scheduler.step()
            if on_step is not None:
                on_step(step, loss.item())

    model.eval()
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer


@torch.no_grad()
def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    questions: Sequence[str],
    *,
    batch_size: int = 256,
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers under the recorder's chat prompt, decoded without special tokens."""
    prompts = PromptFormat()
    responses = []
    for start in range(0, len(questions), batch_size):
        chunk = [prompts.encode(tokenizer, q).ids for q in questions[start : start + batch_size]]
        encoded = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
        generated = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
        responses += tokenizer.batch_decode(
            generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return responses


def measure_accuracies(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict]
) -> dict[str, float]:
    """Share of dataset rows answered correctly (match grader), per language, in the rows' language order."""
    torch.set_num_threads(1)
    responses = answer_questions(model, tokenizer, [row["question"] for row in rows])
    grades = MatchGrader().grade(
        [
            GradeItem(row["question"], row["answers"], response, row["lang"])
            for row, response in zip(rows, responses, strict=True)
        ]
    )
    hits: dict[str, list[bool]] = {}
    for row, grade in zip(rows, grades, strict=True):
        hits.setdefault(row["lang"], []).append(bool(grade.correct))
    return {lang: sum(h) / len(h) for lang, h in hits.items()}


def build_testbed(
    out: Path,
    *,
    seed: int = 0,
    world_config: WorldConfig | None = None,
    model_config: ModelConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TestbedPaths:
    """Generate the world of ``seed``, train its model, write checkpoint, dataset and accuracies to ``out``.

    ``world_config`` and ``model_config`` default to the shipped design; the world's own ``seed`` is
    replaced by ``seed`` so that one number fixes everything. ``on_step(step, loss)`` reports progress.
    """
    world_config = WorldConfig(**{**asdict(world_config or WorldConfig()), "seed": seed})
    model_config = model_config or ModelConfig()
    world = generate_world(world_config)
    paths = TestbedPaths.in_folder(out)
    model, tokenizer = train_model(world, paths.checkpoint, model_config, seed=seed, on_step=on_step)

    rows = world.dataset_rows()
    paths.dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (paths.checkpoint / "world.json").write_text(world.to_json() + "\n")
    report = {
        "seed": seed,
        "per_language": measure_accuracies(model, tokenizer, rows),
        "world": asdict(world_config),
        "model": asdict(model_config),
    }
    paths.accuracies.write_text(json.dumps(report, indent=2) + "\n")
    return paths
