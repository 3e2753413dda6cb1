"""Asking: one (question, language) unit put to a model, answered, graded, with its routing.

:class:`Asker` is what recording and ablation share: the recorded prompt format, greedy decoding and grader,
with optional per-row expert masks, through either backend (:func:`open_generator`: transformers or vLLM).
:class:`AskerSpec` says how to build one, so that a Ray worker (:mod:`xici.recorder.ray_pool`) builds the
same asker in its own process as this process would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xici.corpora.graders import Grade, GradeItem, get_grader
from xici.corpora.thinking import split_thinking
from xici.errors import XiciError
from xici.recorder import BACKENDS
from xici.recorder.generator import Generation, Generator, check_weights
from xici.recorder.hf_backend import HFGenerator
from xici.recorder.judge import JudgeGrader
from xici.recorder.prompting import Prompt, PromptFormat


@dataclass(frozen=True)
class Unit:
    """One (question, language) of a dataset; ``index`` is its place in the run's unit order."""

    index: int
    question_id: str
    lang: str
    question: str
    answers: tuple[str, ...]


@dataclass
class Answer:
    """A unit asked once: its prompt, the generation (with routing), the answer text and its grade.

    ``response`` is the answer without its thinking part, which is ``thinking`` (None when there was none;
    see :mod:`xici.corpora.thinking`); the grader saw only the answer.
    """

    unit: Unit
    prompt: Prompt
    generation: Generation
    response: str
    grade: Grade
    thinking: str | None = None

    def sequence_row(self) -> dict[str, Any]:
        """The ``sequences`` columns of this answer (the lake adds ids and token offsets)."""
        return {
            "unit": self.unit.index,
            "question_id": self.unit.question_id,
            "lang": self.unit.lang,
            "n_prompt_tokens": len(self.prompt.ids),
            "n_generated": len(self.generation.output_ids),
            "prompt_text": self.prompt.text,
            "response_text": self.response,
            "finish_reason": self.generation.finish_reason,
        }


class Asker:
    """Asks units with one prompt format, greedy decoding and one grader, optionally with expert masks."""

    def __init__(
        self,
        generator: Generator,
        prompt_format: PromptFormat,
        grader_name: str,
        *,
        max_new_tokens: int,
        store_logits: bool = False,
        grader_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.generator = generator
        self.prompt_format = prompt_format
        self.grader = get_grader(grader_name, **(grader_options or {}))
        # The LLM judge borrows this model when it is its own, rather than load it a second time.
        if isinstance(self.grader, JudgeGrader):
            self.grader.reuse(generator)
        self.max_new_tokens = max_new_tokens
        self.store_logits = store_logits

    def close(self) -> None:
        """Close the model (a vLLM engine must be shut down before another one is built)."""
        self.generator.close()

    def ask(self, units: Sequence[Unit], *, masks: torch.Tensor | None = None) -> list[Answer]:
        """Ask the units as one batch; ``masks``: bool ``[len(units), n_moe_layers, n_experts]``, True = off.

        One row per unit; the answers come back in the units' order, their thinking cut off, graded.
        """
        prompts = [self.prompt_format.encode(self.generator.tokenizer, u.question) for u in units]
        generations = self.generator.generate(
            [p.ids for p in prompts],
            max_new_tokens=self.max_new_tokens,
            masks=masks,
            logits=self.store_logits,
        )
        splits = [split_thinking(self.generator.decode(g.output_ids)) for g in generations]
        items = [
            GradeItem(u.question, list(u.answers), split.answer, u.lang)
            for u, split in zip(units, splits, strict=True)
        ]
        grades = self.grader.grade(items)
        return [
            Answer(unit, prompt, generation, split.answer, grade, split.thinking)
            for unit, prompt, generation, split, grade in zip(
                units, prompts, generations, splits, grades, strict=True
            )
        ]


@dataclass(frozen=True)
class AskerSpec:
    """Everything that builds an :class:`Asker`: a picklable recipe, opened where the model should run.

    ``device`` is already resolved (``cpu``, ``cuda``...), ``dtype`` too; ``engine_options`` are vLLM's.
    """

    backend: str
    model: str
    device: str
    dtype: str
    grader: str
    max_new_tokens: int
    system: str | None = None
    prompt_template: str | None = None
    store_logits: bool = False
    grader_options: Mapping[str, Any] = field(default_factory=dict)
    engine_options: Mapping[str, Any] = field(default_factory=dict)

    def open(self) -> Asker:
        """Load the model and the grader; close the asker when done."""
        generator = open_generator(
            self.backend, self.model, device=self.device, dtype=self.dtype, engine_options=self.engine_options
        )
        return Asker(
            generator,
            PromptFormat(self.system, self.prompt_template),
            self.grader,
            max_new_tokens=self.max_new_tokens,
            store_logits=self.store_logits,
            grader_options=self.grader_options,
        )


def check_backend(backend: str, device: str, engine_options: Mapping[str, Any] | None) -> None:
    """Refuse an unknown backend, engine options without vLLM, or vLLM where it cannot run, before any
    work."""
    if backend not in BACKENDS:
        raise XiciError(
            f"unknown backend {backend!r}", where="--backend", fix=f"use one of {', '.join(BACKENDS)}"
        )
    if backend == "vllm":
        from xici.recorder.vllm_backend import check_engine_options

        check_engine_options(device, engine_options)
    elif engine_options:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in engine_options)
        raise XiciError(
            f"{names} only apply to the vLLM backend",
            where=f"--backend {backend}",
            fix="add --backend vllm, or leave these options out",
        )


def open_generator(
    backend: str,
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    engine_options: Mapping[str, Any] | None = None,
) -> Generator:
    """The model loaded for generation by ``backend`` (``engine_options``: vLLM's only). Close it when done:
    a vLLM engine must be shut down before another one is built."""
    check_backend(backend, device, engine_options)
    check_weights(model)
    if backend == "vllm":
        from xici.recorder.vllm_backend import VLLMGenerator

        return VLLMGenerator(model, device=device, dtype=dtype, engine_options=engine_options)
    return HFGenerator(model, device=device, dtype=dtype)
