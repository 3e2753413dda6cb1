"""The planted-knowledge testbed: a reproducible world, a trainable checkpoint, and the shipped model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from xici.cli.main import cli
from xici.corpora.graders import GradeItem, MatchGrader
from xici.corpora.store import import_dataset
from xici.errors import XiciError
from xici.recorder.prompting import DEFAULT_SYSTEM
from xici.testbed.train import ModelConfig, build_testbed, shipped_testbed
from xici.testbed.world import WorldConfig, generate_world, language_tag
from xici.warehouse import Lake

SMALL_WORLD = WorldConfig(n_entities=12, n_languages=3, n_values=6, n_syllables=8)
SMALL_MODEL = ModelConfig(layers=3, hidden=32, heads=2, experts=4, expert_width=16, steps=20, batch_size=16)


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def chat_answers(folder: Path, questions: list[str]) -> list[str]:
    """Greedy answers through the plain Hugging Face API, with the chat prompt the recorder sends."""
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    for start in range(0, len(questions), 480):
        chats = [
            [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": q}]
            for q in questions[start : start + 480]
        ]
        batch = tokenizer.apply_chat_template(
            chats,
            add_generation_prompt=True,
            enable_thinking=False,
            padding=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**batch, do_sample=False, max_new_tokens=4)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def test_same_seed_same_world_other_seed_other_world() -> None:
    first, again = generate_world(WorldConfig(seed=3)), generate_world(WorldConfig(seed=3))
    other = generate_world(WorldConfig(seed=4))
    assert first.to_json() == again.to_json()
    assert first.dataset_rows() == again.dataset_rows()
    assert first.training_items() == again.training_items()
    assert first.to_json() != other.to_json()
    assert first.dataset_rows() != other.dataset_rows()


def test_dataset_asks_every_question_in_every_language() -> None:
    world = generate_world()
    config = world.config
    rows = world.dataset_rows()
    assert len(rows) == config.n_entities * config.n_relations * config.n_languages
    by_question: dict[str, list[dict]] = {}
    for row in rows:
        by_question.setdefault(row["question_id"], []).append(row)
    for question_rows in by_question.values():
        assert [r["lang"] for r in question_rows] == [language_tag(i) for i in range(config.n_languages)]
        assert len({tuple(r["answers"]) for r in question_rows}) == 1
        assert len({r["question"] for r in question_rows}) == config.n_languages
    # Every word of the dataset is in the vocabulary, and answers are single value words.
    vocabulary = set(world.vocabulary())
    assert all(set(r["question"].split()) <= vocabulary for r in rows)
    assert {r["answers"][0] for r in rows} <= set(world.values)


def test_exposure_falls_from_the_pivot_to_the_last_language() -> None:
    world = generate_world()
    config = world.config
    shared = [
        sum(world.names[lang][e] == world.shared_names[e] for e in range(config.n_entities))
        / config.n_entities
        for lang in range(config.n_languages)
    ]
    taught = [
        sum(map(sum, world.qa_taught[lang])) / (config.n_entities * config.n_relations)
        for lang in range(config.n_languages)
    ]
    assert shared[0] == 1.0 and taught[0] == 1.0
    assert 0.65 < shared[1] < 0.95 and 0.05 < shared[-1] < 0.35
    assert all(abs(t - config.qa_taught) < 0.1 for t in taught[1:])
    # Dictionary items teach only local aliases, in both directions.
    items = world.training_items()
    dictionary = [i for i in items if i.question.split()[0] in {lang.means for lang in world.languages}]
    assert len(dictionary) == 2 * sum(map(sum, world.alias_taught))
    assert not any(world.alias_taught[0])


@pytest.mark.parametrize(
    ("config", "where"),
    [
        (dict(n_languages=1), "n_languages"),
        (dict(n_entities=300, n_syllables=24), "n_entities"),
        (dict(qa_taught=1.5), "qa_taught"),
        (dict(n_syllables=2), "n_syllables"),
    ],
)
def test_impossible_worlds_are_refused(config: dict, where: str) -> None:
    with pytest.raises(XiciError) as caught:
        WorldConfig(**config)
    assert caught.value.where == where


def test_impossible_models_are_refused() -> None:
    with pytest.raises(XiciError, match="at least 3 MoE layers"):
        ModelConfig(layers=2)
    with pytest.raises(XiciError, match="top-k"):
        ModelConfig(experts=4, top_k=5)


def test_small_world_trains_to_a_loadable_chat_checkpoint_reproducibly(tmp_path: Path) -> None:
    first = build_testbed(tmp_path / "a", seed=5, world_config=SMALL_WORLD, model_config=SMALL_MODEL)
    again = build_testbed(tmp_path / "b", seed=5, world_config=SMALL_WORLD, model_config=SMALL_MODEL)
    other = build_testbed(tmp_path / "c", seed=6, world_config=SMALL_WORLD, model_config=SMALL_MODEL)
    assert digests(first.checkpoint) == digests(again.checkpoint)
    assert digests(first.checkpoint)["model.safetensors"] != digests(other.checkpoint)["model.safetensors"]

    rows = [json.loads(line) for line in first.dataset.read_text().splitlines()]
    assert len(rows) == 12 * 2 * 3
    stored = json.loads(first.accuracies.read_text())
    assert list(stored["per_language"]) == ["x-lang00", "x-lang01", "x-lang02"]
    assert stored["seed"] == 5 and stored["model"]["steps"] == 20

    config = AutoConfig.from_pretrained(first.checkpoint)
    assert config.model_type == "qwen3_moe" and config.num_experts == 4 and config.num_hidden_layers == 3
    responses = chat_answers(first.checkpoint, [row["question"] for row in rows[:6]])
    assert len(responses) == 6 and all(isinstance(r, str) for r in responses)


def test_cli_builds_a_testbed(tmp_path: Path) -> None:
    out = tmp_path / "tb"
    args = ["testbed", "build", "--out", str(out), "--steps", "3", "--entities", "6", "--languages", "2"]
    result = CliRunner().invoke(cli, ["--lake", str(tmp_path / "lake"), *args])
    assert result.exit_code == 0, result.output
    assert "x-lang01" in result.output
    assert (out / "model.safetensors").is_file() and (out / "dataset.jsonl").is_file()


def test_cli_refuses_a_too_shallow_model(tmp_path: Path) -> None:
    args = ["testbed", "build", "--out", str(tmp_path / "tb"), "--layers", "2"]
    result = CliRunner().invoke(cli, ["--lake", str(tmp_path / "lake"), *args])
    assert result.exit_code != 0
    assert "layers" in result.output and "Traceback" not in result.output


def test_shipped_dataset_imports_as_jsonl(tmp_path: Path) -> None:
    shipped = shipped_testbed()
    summary = import_dataset(Lake(tmp_path / "lake"), "testbed", shipped.dataset, "jsonl")
    stored = json.loads(shipped.accuracies.read_text())
    world = stored["world"]
    assert summary.languages == world["n_languages"]
    assert summary.questions == world["n_entities"] * world["n_relations"]
    assert summary.prompts == summary.questions * summary.languages


@pytest.mark.slow
def test_shipped_checkpoint_reproduces_its_accuracies() -> None:
    shipped = shipped_testbed()
    assert sum(f.stat().st_size for f in shipped.checkpoint.iterdir()) <= 25 * 2**20
    rows = [json.loads(line) for line in shipped.dataset.read_text().splitlines()]
    responses = chat_answers(shipped.checkpoint, [row["question"] for row in rows])
    grades = MatchGrader().grade(
        [
            GradeItem(r["question"], r["answers"], resp, r["lang"])
            for r, resp in zip(rows, responses, strict=True)
        ]
    )
    hits: dict[str, list[bool]] = {}
    for row, grade in zip(rows, grades, strict=True):
        hits.setdefault(row["lang"], []).append(bool(grade.correct))
    measured = {lang: sum(h) / len(h) for lang, h in hits.items()}
    stored = json.loads(shipped.accuracies.read_text())["per_language"]
    assert measured.keys() == stored.keys()
    # Batched float32 matmuls may round differently on another CPU; allow one answer in 200 to flip.
    for lang in stored:
        assert measured[lang] == pytest.approx(stored[lang], abs=0.005), lang
    # The design's point: recall falls from the pivot, so questions are mixed across languages.
    assert stored["x-lang00"] >= 0.95
    assert min(stored.values()) < 0.75
