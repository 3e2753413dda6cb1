"""Thinking parts: split off responses (strings), and cut off before grading and stored apart when a real tiny
model writes ``<think>`` / ``</think>`` tokens during a recording."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import rows
from test_recorder_support import QUESTIONS, new_lake
from transformers import AutoModelForCausalLM, AutoTokenizer

from xici.corpora.graders import Grade, register_grader
from xici.corpora.thinking import SplitResponse, split_thinking
from xici.recorder.hf_backend import HFGenerator
from xici.recorder.prompting import PromptFormat
from xici.recorder.run import RecordSpec, record

torch.set_num_threads(1)
MAX_NEW = 8


@pytest.mark.parametrize(
    ("text", "answer", "thinking"),
    [
        ("Paris", "Paris", None),
        ("<think>The capital... Paris.</think>\n\nParis", "Paris", "The capital... Paris."),
        ("  <think>\nhmm\n</think>Paris.", "Paris.", "hmm"),
        ("<think></think>Paris", "Paris", ""),
        ("<think>still thinking when the limit hit", "", "still thinking when the limit hit"),
        ("reasoning opened by the template</think> Berlin", "Berlin", "reasoning opened by the template"),
        ("Paris <think>not at the start</think>", "Paris <think>not at the start</think>", None),
        ("a <think> tag alone mid-answer", "a <think> tag alone mid-answer", None),
        ("<think>a</think>b</think>c", "b</think>c", "a"),
        ("", "", None),
    ],
)
def test_split_thinking(text: str, answer: str, thinking: str | None) -> None:
    assert split_thinking(text) == SplitResponse(answer, thinking)


def with_new_tokens(
    source: Path, target: Path, words: list[str], edit_head: Callable[[torch.Tensor, list[int]], None]
) -> Path:
    """A copy of a tiny checkpoint whose tokenizer has ``words`` as added (non-special) tokens, as real
    thinking models have ``<think>``; ``edit_head(lm_head_weight, new_ids)`` then changes what it writes.

    The new rows are drawn from a seeded generator (transformers' own resizing is not seeded).
    """
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer.add_tokens(words)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = tokenizer.convert_tokens_to_ids(words)
    seeded = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[new_ids] = (
                torch.randn((len(new_ids), weight.shape[1]), generator=seeded) * weight[: -len(new_ids)].std()
            )
        edit_head(model.get_output_embeddings().weight, new_ids)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def thinking_checkpoint(source: Path, target: Path) -> Path:
    """A tiny model that writes ``<think>`` where it wrote its most frequent first token, and ``</think>``
    where it wrote its most frequent later token (their output rows are swapped), so some toy answers think,
    some do not, some never close the block."""
    generator = HFGenerator(str(source), device="cpu", dtype="float32")
    prompts = [
        PromptFormat().encode(generator.tokenizer, q).ids
        for langs in QUESTIONS.values()
        for q in langs.values()
    ]
    outputs = [g.output_ids for g in generator.generate(prompts, max_new_tokens=MAX_NEW, capture=False)]
    first = collections.Counter(o[0] for o in outputs).most_common(1)[0][0]
    later = collections.Counter(t for o in outputs for t in o[1:-1] if t != first).most_common(1)[0][0]

    def swap(head: torch.Tensor, new_ids: list[int]) -> None:
        for old, new in zip((first, later), new_ids, strict=True):
            head[[old, new]] = head[[new, old]]

    return with_new_tokens(source, target, ["<think>", "</think>"], swap)


class EchoGrader:
    """Keeps the response it was given as its detail: shows exactly what a grader sees."""

    name = "echo"
    version = "1"

    def grade(self, items):
        return [Grade(None, item.response) for item in items]


register_grader("echo", EchoGrader)


def test_recording_cuts_thinking_off_before_grading_and_keeps_it(tiny_checkpoint, tmp_path: Path) -> None:
    model = thinking_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path / "thinker")
    lake = new_lake(tmp_path / "lake")
    spec = RecordSpec(
        model=str(model), dataset="toy", max_new_tokens=MAX_NEW, grader="echo", gate_dtype="float32"
    )
    run_id = record(lake, spec, device="cpu", batch_size=4).run_id

    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    gates = lake.gates(read_only=True)
    stored = rows(
        lake,
        "select s.token_start, s.n_tokens, s.n_prompt_tokens, s.response_text, t.thinking_text, g.detail"
        " from sequences s join grades g using (seq_id) left join thinking t using (seq_id) order by s.unit",
    )
    kinds = set()
    for start, n, n_prompt, response, thinking, graded in stored:
        tokens = gates.read(run_id, start, start + n).token_ids
        with torch.no_grad():  # the last generated token is not in the gate store: recompute it
            last = (
                reference(input_ids=torch.tensor(tokens[None], dtype=torch.long))
                .logits[0, -1]
                .argmax()
                .item()
            )
        text = tokenizer.decode([*tokens[n_prompt:].tolist(), last], skip_special_tokens=True).strip()
        want = split_thinking(text)
        assert (response, thinking) == (want.answer, want.thinking)
        assert graded == response  # the grader saw the answer only
        kinds.add("none" if thinking is None else "unterminated" if "</think>" not in text else "closed")
    assert kinds == {"none", "unterminated", "closed"}, kinds
    assert rows(lake, "select count(*) from thinking where seq_id not in (select seq_id from sequences)") == [
        (0,)
    ]
