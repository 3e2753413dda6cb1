"""The recorder on real tiny MoE checkpoints, a real DuckDB warehouse and a real Zarr store.

The central test recomputes every recorded sequence independently (one unpadded forward pass per sequence,
hooks on the transformers routers) and compares tokens, expert ids, gate weights and logits for every token
and MoE layer.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import rows
from test_recorder_support import (
    N_UNITS,
    QUESTIONS,
    assert_same_lake,
    fill,
    new_lake,
    snapshot,
    stopping_checkpoint,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from xici.cli.main import cli
from xici.corpora.graders import Grade, register_grader
from xici.errors import XiciError
from xici.recorder.grading import regrade
from xici.recorder.prompting import DEFAULT_SYSTEM
from xici.recorder.run import RecordSpec, load_units, record
from xici.warehouse import Lake

torch.set_num_threads(1)
MAX_NEW = 8


class ParityGrader:
    """A test grader with all three verdicts: even-length answers are right, odd wrong, empty undecided."""

    name = "parity"
    version = "7"

    def grade(self, items):
        return [
            Grade(None if not i.response else len(i.response) % 2 == 0, f"{len(i.response)} chars")
            for i in items
        ]


register_grader("parity", ParityGrader)


@pytest.fixture(scope="module", params=["qwen3_moe", "glm4_moe"])
def checkpoint(request, tiny_checkpoint, tmp_path_factory) -> Path:
    source = tiny_checkpoint(request.param)
    return stopping_checkpoint(source, tmp_path_factory.mktemp("stop") / request.param, MAX_NEW)


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint, tmp_path_factory) -> Path:
    return stopping_checkpoint(
        tiny_checkpoint("qwen3_moe"), tmp_path_factory.mktemp("stop") / "qwen", MAX_NEW
    )


def spec_for(model: Path, **kw) -> RecordSpec:
    return RecordSpec(
        **{"model": str(model), "dataset": "toy", "max_new_tokens": MAX_NEW, "gate_dtype": "float32", **kw}
    )


def reference(model, token_ids: np.ndarray):
    """One unpadded forward pass: each MoE router's (logits, expert ids, weights) and the LM logits."""
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    seen = []
    handles = [r.register_forward_hook(lambda m, a, out: seen.append(out)) for r in routers]
    try:
        with torch.no_grad():
            lm = model(input_ids=torch.tensor(token_ids[None], dtype=torch.long)).logits[0]
    finally:
        for h in handles:
            h.remove()
    logits, weights, ids = (torch.stack([out[i] for out in seen], dim=1).numpy() for i in range(3))
    return logits, ids, weights, lm


def by_expert(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, weights) sorted by expert id: the order inside the top-k is not meaningful."""
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


def test_recording_equals_an_independent_recomputation(checkpoint: Path, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    result = record(
        lake, spec_for(checkpoint, store_logits=True, grader="parity"), device="cpu", batch_size=4
    )
    assert (result.recorded, result.n_units, result.created) == (N_UNITS, N_UNITS, True)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    stop_ids = set(model.generation_config.eos_token_id)
    sequences = rows(
        lake,
        "select s.seq_id, s.unit, s.question_id, s.lang, s.token_start, s.n_tokens, s.n_prompt_tokens,"
        " s.n_generated, s.prompt_text, s.response_text, s.finish_reason,"
        " g.grader, g.grader_version, g.correct"
        " from sequences s join grades g using (seq_id) order by s.unit",
    )
    assert [s[1] for s in sequences] == list(range(N_UNITS))
    assert [(s[2], s[3]) for s in sequences] == sorted(
        (q, lang) for q, langs in QUESTIONS.items() for lang in langs
    )
    gates = lake.gates(read_only=True)
    assert gates.length(result.run_id) == sum(s[5] for s in sequences)  # nothing but the sequences' tokens

    finish = set()
    for seq_id, _, qid, lang, start, n, n_prompt, n_gen, prompt_text, response, reason, *grade in sequences:
        messages = [
            {"role": "system", "content": DEFAULT_SYSTEM},
            {"role": "user", "content": QUESTIONS[qid][lang]},
        ]
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=False, tokenize=True
        )["input_ids"]
        stored = gates.read(result.run_id, start, start + n, logits=True)
        tokens = stored.token_ids
        assert n == n_prompt + n_gen - 1 and n_prompt == len(prompt)
        assert tokens.tolist()[:n_prompt] == prompt  # the chat template, special tokens included, no padding
        assert prompt_text == tokenizer.decode(prompt)

        logits, ids, weights, lm = reference(model, tokens)
        greedy = lm.argmax(-1).numpy()
        assert np.array_equal(greedy[n_prompt - 1 : -1], tokens[n_prompt:])  # generated tokens are greedy
        generated = [*tokens[n_prompt:].tolist(), int(greedy[-1])]  # the last one is never fed back
        assert response == tokenizer.decode(generated, skip_special_tokens=True).strip()
        assert reason == ("stop" if generated[-1] in stop_ids else "length")
        assert reason == "stop" or n_gen == MAX_NEW
        finish.add(reason)
        assert grade == ["parity", "7", None if not response else len(response) % 2 == 0]

        got_ids, got_weights = by_expert(stored.topk_ids.astype(np.int64), stored.topk_weights)
        want_ids, want_weights = by_expert(ids, weights)
        assert np.array_equal(got_ids, want_ids), f"sequence {seq_id}: other experts selected"
        np.testing.assert_allclose(got_weights, want_weights, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(stored.router_logits, logits, atol=1e-4, rtol=1e-4)
    assert finish == {"stop", "length"}, "the toy run should have both early-stopped and full-length answers"
    lengths = [s[6] for s in sequences[:4]]
    assert len(set(lengths)) > 1, "the first batch should need padding"


def test_batch_size_changes_neither_the_run_nor_the_tokens(qwen: Path, tmp_path: Path) -> None:
    one, four = new_lake(tmp_path / "one"), new_lake(tmp_path / "four")
    record(one, spec_for(qwen), device="cpu", batch_size=1)
    record(four, spec_for(qwen), device="cpu", batch_size=4)
    a, b = snapshot(one), snapshot(four)
    key = "select run_key from runs"
    assert rows(one, key) == rows(four, key)
    assert a["sequences"] == b["sequences"] and a["grades"] == b["grades"]
    assert np.array_equal(a["arrays"][1]["token_ids"], b["arrays"][1]["token_ids"])
    assert np.array_equal(a["arrays"][1]["topk_ids"], b["arrays"][1]["topk_ids"])
    np.testing.assert_allclose(a["arrays"][1]["topk_weights"], b["arrays"][1]["topk_weights"], atol=1e-5)
    assert a["arrays"][1]["router_logits"] is None  # not asked for


def test_run_key_covers_what_changes_the_data(qwen: Path, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    first = record(lake, spec_for(qwen, languages=("fr", "en"), limit=2), device="cpu", batch_size=3)
    assert first.recorded == 4
    again = record(lake, spec_for(qwen, languages=("EN", "fr"), limit=2), device="cpu", batch_size=1)
    assert again.already_finished and again.run_id == first.run_id and again.recorded == 0
    other = record(lake, spec_for(qwen, languages=("fr", "en"), limit=2, max_new_tokens=3), device="cpu")
    assert other.run_id != first.run_id and other.created
    assert rows(
        lake, "select count(*) from sequences where run_id = ? and n_generated > 3", [other.run_id]
    ) == [(0,)]
    assert rows(lake, "select distinct question_id from sequences order by 1") == [("q01",), ("q02",)]
    params = rows(lake, "select params ->> 'languages', params ->> 'batch_size' from runs where run_id = 1")
    assert params == [('["en","fr"]', "3")]


def test_refused_before_anything_is_written(qwen: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    lake = new_lake(tmp_path / "lake")
    before = snapshot(lake)
    dense = tmp_path / "dense"
    shutil.copytree(qwen, dense, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = LlamaConfig(
        vocab_size=1100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(dense)
    cases = {
        "not a supported Mixture-of-Experts": spec_for(dense),
        "no dataset 'nope'": RecordSpec(model=str(qwen), dataset="nope"),
        "no language xx": spec_for(qwen, languages=("en", "xx")),
        "unknown grader": spec_for(qwen, grader="oracle"),
        "cannot read the model config": spec_for(tmp_path / "missing"),
    }
    for message, spec in cases.items():
        with pytest.raises(XiciError, match=message):
            record(lake, spec, device="cpu")
    with pytest.raises(XiciError, match=r"no \{question\} field"):
        spec_for(qwen, prompt_template="Q: A:")
    with pytest.raises(XiciError, match="at least 1"):
        spec_for(qwen, max_new_tokens=0)
    assert snapshot(lake) == before
    assert not lake.zarr_path.exists()


def test_raw_prompt_template_for_a_model_without_chat_template(qwen: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(qwen, base, ignore=shutil.ignore_patterns("chat_template.jinja"))
    lake = new_lake(tmp_path / "lake")
    with pytest.raises(XiciError, match="no chat template"):
        record(lake, spec_for(base), device="cpu")
    template = "Q: {question}\nA:"
    result = record(lake, spec_for(base, prompt_template=template, limit=1), device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(base)
    gates = lake.gates(read_only=True)
    for qid, lang, start, n_prompt, text in rows(
        lake,
        "select question_id, lang, token_start, n_prompt_tokens, prompt_text from sequences order by unit",
    ):
        want = tokenizer(template.format(question=QUESTIONS[qid][lang]))["input_ids"]
        assert gates.read(result.run_id, start, start + n_prompt).token_ids.tolist() == want
        assert text == tokenizer.decode(want)


def test_grader_is_fixed_for_a_run_and_regrading_upserts(qwen: Path, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    spec = spec_for(qwen, limit=3)
    run_id = record(lake, spec, device="cpu", batch_size=4).run_id
    with pytest.raises(XiciError, match="recorded with the grader 'match'"):
        record(lake, spec_for(qwen, limit=3, grader="parity"), device="cpu")

    scores = regrade(lake, run_id, "parity")
    responses = rows(lake, "select lang, response_text from sequences order by lang")
    for score in scores:
        mine = [r for lang, r in responses if lang == score.lang]
        assert score.n == len(mine)
        assert score.correct == sum(1 for r in mine if r and len(r) % 2 == 0)
        assert score.undecided == sum(1 for r in mine if not r)
    assert rows(lake, "select grader, count(*) from grades group by 1 order by 1") == [
        ("match", 9),
        ("parity", 9),
    ]

    # spoil the stored grades, then grade again from the CLI
    Lake(lake.root).write(
        lambda con: con.execute(
            "update grades set correct = null, detail = 'spoiled' where grader = 'parity'"
        )
    )
    args = ["--lake", str(lake.root), "grade", "--run", str(run_id), "--grader", "parity"]
    kept = CliRunner().invoke(cli, args)  # same grader and version: already graded answers are kept
    assert kept.exit_code == 0, kept.output
    assert rows(lake, "select count(*) from grades where detail = 'spoiled'") == [(9,)]
    out = CliRunner().invoke(cli, [*args, "--force"])
    assert out.exit_code == 0, out.output
    assert rows(lake, "select count(*) from grades where detail = 'spoiled'") == [(0,)]
    assert rows(lake, "select grader, count(*) from grades group by 1 order by 1") == [
        ("match", 9),
        ("parity", 9),
    ]
    total = sum(s.correct for s in scores)
    assert f"{total / 9:.1%}" in out.output and "de" in out.output

    missing = CliRunner().invoke(cli, ["--lake", str(lake.root), "grade", "--run", "7", "--grader", "match"])
    assert missing.exit_code == 1 and "no run 7" in missing.output


def test_asker_reasks_a_run_exactly_and_masks_experts_per_row(qwen: Path, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    run_id = record(lake, spec_for(qwen, limit=2), device="cpu", batch_size=6).run_id
    spec = lake.read(lambda con: RecordSpec.from_run(con, run_id))
    units = lake.read(lambda con: load_units(con, spec.dataset, spec.languages, spec.limit))
    asker = spec.asker("cpu").open()
    assert [(u.question_id, u.lang) for u in units] == rows(
        lake, "select question_id, lang from sequences order by unit"
    )
    plain = asker.ask(units)
    recorded = rows(
        lake,
        "select s.response_text, s.n_generated, g.correct"
        " from sequences s join grades g using (seq_id) order by unit",
    )
    assert [(a.response, len(a.generation.output_ids), a.grade.correct) for a in plain] == recorded

    layout_shape = plain[0].generation.routing.topk_ids.shape[1:]
    n_layers, n_experts = layout_shape[0], 8
    masks = torch.zeros((len(units), n_layers, n_experts), dtype=torch.bool)
    used = plain[0].generation.routing.topk_ids[-1]  # experts of the first unit's last processed token
    for layer in range(n_layers):
        masks[0, layer, used[layer, 0]] = True
    ablated = asker.ask(units, masks=masks)
    first = ablated[0].generation.routing.topk_ids
    for layer in range(n_layers):
        assert not (first[:, layer] == used[layer, 0]).any(), "a deactivated expert was selected"
    for a, b in zip(plain[1:], ablated[1:], strict=True):  # other rows of the batch are untouched
        assert a.generation.output_ids == b.generation.output_ids
        assert np.array_equal(a.generation.routing.topk_ids, b.generation.routing.topk_ids)


def chattr(flag: str, path: Path) -> bool:
    """Set or clear the immutable flag (which even root cannot write through)."""
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("failure", ["unwritable", "disk full"])
def test_storage_failure_mid_run_keeps_the_lake_consistent(
    failure: str, qwen: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if failure == "disk full":
        root = request.getfixturevalue("small_disk") / "lake"
    else:
        root = tmp_path / "lake"
        if not (chattr("+i", tmp_path) and chattr("-i", tmp_path)):
            pytest.skip("chattr +i is not permitted here")
    clean = new_lake(tmp_path / "clean")
    record(clean, spec_for(qwen), device="cpu", batch_size=4)
    lake = new_lake(root)
    broken: list[Path] = []

    def break_storage(done) -> None:
        if done.batch == 1:  # after two committed batches
            if failure == "disk full":
                broken.append(fill(root.parent))
            else:
                broken.append(lake.zarr_path / "runs" / str(done.run_id) / "topk_ids")
                assert chattr("+i", broken[0])

    try:
        expected = "disk holding the lake is full" if failure == "disk full" else "lake is not writable"
        with pytest.raises(XiciError, match=expected):
            record(lake, spec_for(qwen), device="cpu", batch_size=4, on_batch=break_storage)
    finally:
        if failure == "disk full":
            broken[0].unlink()
        else:
            chattr("-i", broken[0])
    assert rows(lake, "select count(*), max(unit) from sequences") == [(8, 7)]
    result = record(lake, spec_for(qwen), device="cpu", batch_size=4)
    assert (result.done_before, result.recorded) == (8, N_UNITS - 8)
    assert_same_lake(snapshot(lake), snapshot(clean))


def test_record_cli_reports_and_resumes(qwen: Path, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    args = [
        "--lake",
        str(lake.root),
        "record",
        "--model",
        str(qwen),
        "--dataset",
        "toy",
        "--languages",
        "en,de",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "Run 1: recorded 10 of 10 units." in first.output
    assert "batch 4/4 committed (10/10 units)" in first.output  # not a terminal: one line per batch
    assert "grader match" in first.output and "all" in first.output
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0 and "Run 1 is already finished (10 units); nothing to do." in second.output
    bad = CliRunner().invoke(cli, [*args[:-2], "--device", "cpu", "--languages", "en,xx"])
    assert bad.exit_code == 1 and "has no language xx" in bad.output and "Traceback" not in bad.output


ECLEKTIC = Path(__file__).resolve().parents[2] / "shared" / "data" / "eclektic" / "eclektic_long_subset.csv"


@pytest.mark.shared_data
@pytest.mark.slow
def test_eclektic_subset_in_twelve_languages(tiny_checkpoint, tmp_path: Path) -> None:
    if not ECLEKTIC.exists():
        pytest.skip(f"{ECLEKTIC} is absent")
    lake = ["--lake", str(tmp_path / "lake")]
    runner = CliRunner()
    imported = runner.invoke(
        cli, [*lake, "datasets", "import", "eclektic", str(ECLEKTIC), "--format", "eclektic"]
    )
    assert imported.exit_code == 0, imported.output
    model = str(tiny_checkpoint("qwen3_moe"))
    recorded = runner.invoke(
        cli,
        [
            *lake,
            "record",
            "--model",
            model,
            "--dataset",
            "eclektic",
            "--max-new-tokens",
            "2",
            "--batch-size",
            "32",
            "--device",
            "cpu",
        ],
    )
    assert recorded.exit_code == 0, recorded.output
    assert "recorded 468 of 468 units" in recorded.output
    out = runner.invoke(
        cli, [*lake, "sql", "select lang, count(*) from sequences group by lang order by lang"]
    )
    assert out.exit_code == 0, out.output
    counts = [line.split()[1::2] for line in out.output.splitlines() if line.startswith("│")]
    assert counts == [
        [lang, "39"] for lang in ("de", "en", "es", "fr", "he", "hi", "id", "it", "ja", "ko", "pt", "zh")
    ]
