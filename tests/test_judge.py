"""The LLM judge on real tiny checkpoints and real lakes: the documented prompt, strict parsing, unparsable
answers of a random model counted as undecided, a YES/NO judge checked against an independent greedy decode,
resumable re-grading, ``xici grade --grader judge`` next to match, ``xici record --grader judge``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import rows
from test_recorder_support import N_UNITS, new_lake
from test_thinking import with_new_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from xici.cli.main import cli
from xici.corpora.graders import GradeItem, get_grader
from xici.errors import XiciError
from xici.recorder.grading import RegradeProgress, regrade
from xici.recorder.hf_backend import HFGenerator
from xici.recorder.judge import DEFAULT_TEMPLATE, JudgeGrader, judge_prompt, parse_verdict
from xici.recorder.run import RecordSpec, record
from xici.warehouse import Lake

torch.set_num_threads(1)
MAX_NEW = 6


def test_the_judge_prompt_is_the_documented_template() -> None:
    item = GradeItem(
        "Quelle est la capitale de la France ?", ["Paris", "Paris, France"], "C'est {Paris}.", "fr"
    )
    assert judge_prompt(DEFAULT_TEMPLATE, item) == (
        "You are grading the answer to a quiz question. The question and the answer may be in any language.\n"
        "\n"
        "Question: Quelle est la capitale de la France ?\n"
        "Accepted answers (any one is enough): Paris; Paris, France\n"
        "Response to grade: C'est {Paris}.\n"
        "\n"
        "Does the response give an accepted answer? A translation, transliteration or other spelling of it "
        "counts; a different answer, several contradicting answers or no answer do not. "
        "Reply with only YES or NO."
    )
    own = "{{JSON}} [{lang}] {question} => {response} | gold: {answers}"
    assert judge_prompt(
        own, item
    ) == "{JSON} [fr] Quelle est la capitale de la France ? => C'est {Paris}. | " + (
        "gold: Paris; Paris, France"
    )


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("YES", True),
        ("NO", False),
        ("Yes.", True),
        ("  no\n", False),
        ("**YES**", True),
        ('"No", because the capital is Paris.', False),
        ("Yes, it is", True),
        ("<think>The gold answer is Paris, the response says Paris.</think>\n\nYES", True),
        ("<think>Still thinking when the limit", None),
        ("Oui.", True),
        ("Nein", False),
        ("はい", True),
        ("不是", False),
        ("हाँ", True),
        ("ＹＥＳ", True),  # full-width, NFKC
        ("YESNO", None),
        ("NO_ANSWER", None),
        ("Y", None),
        ("nope", None),
        ("Maybe yes", None),
        ("The answer is YES", None),
        ("1", None),
        ("", None),
    ],
)
def test_parse_verdict_is_strict(text: str, verdict: bool | None) -> None:
    assert parse_verdict(text) is verdict


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"template": "{question} {response}"}, r"no \{answers\} field"),
        ({"template": "{answers} {response} {model}"}, "not valid"),
        ({"template": "{answers} {response} {}"}, "not valid"),
        ({"template": "{answers} {response} {"}, "not valid"),
        ({"batch_size": 0}, "at least 1"),
        ({"max_new_tokens": 0}, "at least 1"),
    ],
)
def test_bad_judge_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(XiciError, match=message):
        get_grader("judge", model="any", **options)


def test_the_judge_needs_a_model() -> None:
    with pytest.raises(XiciError, match="missing a required argument: 'model'"):
        get_grader("judge")


def yes_no_checkpoint(source: Path, target: Path) -> Path:
    """A judge that always answers YES or NO: every output row is zero but YES's (+10 on the first hidden
    coordinate) and NO's (-10), so the first word is YES when that coordinate of the last hidden state is
    positive, else NO; which one depends on the prompt."""

    def edit(head: torch.Tensor, new_ids: list[int]) -> None:
        yes, no = new_ids
        head.zero_()
        head[yes, 0], head[no, 0] = 10.0, -10.0

    return with_new_tokens(source, target, ["YES", "NO"], edit)


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    source = tiny_checkpoint("qwen3_moe")
    return {
        "recorded": source,
        "yes_no": yes_no_checkpoint(source, tmp_path_factory.mktemp("judge") / "yes_no"),
    }


@pytest.fixture(scope="module")
def recorded_lake(models, tmp_path_factory) -> Path:
    """A toy run recorded and graded by match; tests work on copies."""
    lake = new_lake(tmp_path_factory.mktemp("recorded") / "lake")
    spec = RecordSpec(
        model=str(models["recorded"]), dataset="toy", max_new_tokens=MAX_NEW, gate_dtype="float32"
    )
    assert record(lake, spec, device="cpu", batch_size=8).run_id == 1
    return lake.root


@pytest.fixture
def lake(recorded_lake: Path, tmp_path: Path) -> Lake:
    shutil.copytree(recorded_lake, tmp_path / "lake")
    return Lake(tmp_path / "lake")


def judged(lake: Lake) -> list[tuple]:
    """(question, answers, response, lang, correct, detail, grader_version) of every judge grade."""
    return rows(
        lake,
        "select p.question, p.answers, s.response_text, s.lang, g.correct, g.detail, g.grader_version"
        " from sequences s join prompts p using (question_id, lang) join grades g using (seq_id)"
        " where g.grader = 'judge' order by s.seq_id",
    )


def reference_answers(model: Path, judged_rows: list[tuple], max_new_tokens: int) -> list[str | None]:
    """The judge's answer to each row, recomputed apart: the documented prompt as the only user turn of the
    chat template (thinking off), one unpadded greedy forward pass per token; None where the response is
    empty (the judge is not asked)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    eos = reference.generation_config.eos_token_id
    stop = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    answers = []
    for question, gold, response, lang, *_ in judged_rows:
        if not response.strip():
            answers.append(None)
            continue
        text = DEFAULT_TEMPLATE.format(
            question=question, answers="; ".join(gold), response=response, lang=lang
        )
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            enable_thinking=False,
            tokenize=True,
        )["input_ids"]
        out: list[int] = []
        while len(out) < max_new_tokens and (not out or out[-1] not in stop):
            with torch.no_grad():
                out.append(int(reference(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
        answers.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    return answers


def test_a_yes_no_judge_reads_the_documented_prompt(lake: Lake, models: dict[str, Path]) -> None:
    judge = models["yes_no"]
    scores = regrade(lake, 1, "judge", model=str(judge), max_new_tokens=1, batch_size=4, device="cpu")
    graded = judged(lake)
    assert len(graded) == N_UNITS
    for row, answer in zip(graded, reference_answers(judge, graded, 1), strict=True):
        correct, detail, version = row[4:]
        assert version.startswith(f"1:{judge.resolve()}:")
        if answer is None:
            assert (correct, detail) == (False, "empty response; the judge was not asked")
        else:
            assert detail == answer and correct is (answer == "YES")
    assert {row[5] for row in graded} >= {"YES", "NO"}, "the toy prompts should get both verdicts"
    assert sum(s.undecided for s in scores) == 0
    assert sum(s.correct for s in scores) == sum(1 for row in graded if row[5] == "YES")


def test_a_random_judge_is_mostly_unparsable_and_counted(lake: Lake, models: dict[str, Path]) -> None:
    """``xici grade --grader judge`` with the default judge, the recorded (random) model: its answers are
    stored raw, undecided unless they start with YES or NO, counted in the table and below it."""
    args = [
        "--lake",
        str(lake.root),
        "grade",
        "--run",
        "1",
        "--grader",
        "judge",
        "--judge-max-new-tokens",
        "4",
    ]
    out = CliRunner().invoke(cli, [*args, "--judge-batch-size", "3", "--judge-device", "cpu"])
    assert out.exit_code == 0, out.output
    graded = judged(lake)
    for row, answer in zip(graded, reference_answers(models["recorded"], graded, 4), strict=True):
        correct, detail = row[4:6]
        assert correct is (False if answer is None else parse_verdict(answer))
        assert answer is None or detail == answer
    undecided = sum(1 for row in graded if row[4] is None)
    assert undecided > N_UNITS // 2, "a random model should mostly answer neither YES nor NO"
    assert f"{undecided} judge answers were neither YES nor NO" in out.output
    all_row = next(line for line in out.output.splitlines() if line.startswith("│ all"))
    assert [cell.strip() for cell in all_row.split("│")[2:5]] == [str(N_UNITS), "0", str(undecided)]
    counts = rows(lake, "select grader, count(*) from grades group by 1 order by 1")
    assert counts == [("judge", N_UNITS), ("match", N_UNITS)]  # side by side with the match grades


class Stop(Exception):
    pass


def test_judge_grading_resumes_and_force_grades_again(lake: Lake, models: dict[str, Path]) -> None:
    judge = {"model": str(models["yes_no"]), "max_new_tokens": 1, "device": "cpu"}
    seen: list[RegradeProgress] = []

    def stop_after_two_chunks(progress: RegradeProgress) -> None:
        seen.append(progress)
        if progress.done == 8:
            raise Stop

    with pytest.raises(Stop):
        regrade(lake, 1, "judge", chunk_size=4, on_progress=stop_after_two_chunks, **judge)
    assert [p.done for p in seen] == [0, 4, 8] and seen[0] == RegradeProgress(0, N_UNITS, 0)
    first = rows(lake, "select seq_id, graded_at from grades where grader = 'judge' order by seq_id")
    assert len(first) == 8

    seen.clear()
    regrade(lake, 1, "judge", chunk_size=4, on_progress=seen.append, **judge)
    assert seen[0] == RegradeProgress(0, N_UNITS - 8, 8) and seen[-1].done == N_UNITS - 8
    kept = rows(lake, "select seq_id, graded_at from grades where grader = 'judge' order by seq_id")
    assert kept[:8] == first and len(kept) == N_UNITS

    seen.clear()
    regrade(lake, 1, "judge", force=True, on_progress=seen.append, **judge)
    assert seen[0] == RegradeProgress(0, N_UNITS, 0)

    seen.clear()  # another template is another judge version: everything is graded again
    template = "{question}\n{answers}\n{response}\nYES or NO?"
    regrade(lake, 1, "judge", template=template, on_progress=seen.append, **judge)
    assert seen[0] == RegradeProgress(0, N_UNITS, 0)
    versions = rows(lake, "select distinct grader_version from grades where grader = 'judge'")
    assert versions == [(get_grader("judge", template=template, **judge).version,)]


def test_grade_with_the_judge_then_compare(lake: Lake, models: dict[str, Path], tmp_path: Path) -> None:
    """The acceptance path: judge grades land next to the match grades and compare prints the agreement."""
    template = tmp_path / "judge.txt"
    template.write_text(DEFAULT_TEMPLATE, encoding="utf-8")
    runner = CliRunner()
    lake_args = ["--lake", str(lake.root)]
    args = [
        *lake_args,
        "grade",
        "--run",
        "1",
        "--grader",
        "judge",
        "--judge-model",
        str(models["yes_no"]),
        "--judge-max-new-tokens",
        "1",
        "--judge-template",
        str(template),
    ]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "run 1, grader judge" in first.output and "neither YES nor NO" not in first.output
    again = runner.invoke(cli, args)
    assert again.exit_code == 0 and f"{N_UNITS} answers already graded by judge are kept" in again.output

    compared = runner.invoke(cli, [*lake_args, "grade", "compare", "--run", "1"])
    assert compared.exit_code == 0, compared.output
    assert "judge (A) vs match (B)" in compared.output  # graders in name order
    both = rows(
        lake,
        "select j.correct, m.correct from grades j join grades m using (seq_id)"
        " where m.grader = 'match' and j.grader = 'judge'",
    )
    all_row = next(line for line in compared.output.splitlines() if line.startswith("│ all"))
    cells = [cell.strip() for cell in all_row.split("│")[2:8]]
    pairs = [(True, True), (True, False), (False, True), (False, False)]
    assert cells == [str(N_UNITS), *(str(both.count(p)) for p in pairs), "0"]


def test_record_with_the_judge_of_the_recorded_model(lake: Lake, models: dict[str, Path]) -> None:
    """``xici record --grader judge``: the recorded model judges (loaded once), its options stay with the run,
    and the run only continues with the same judge."""
    fresh = new_lake(lake.root.parent / "fresh")
    model = str(models["recorded"])
    args = [
        "--lake",
        str(fresh.root),
        "record",
        "--model",
        model,
        "--dataset",
        "toy",
        "--limit",
        "2",
        "--max-new-tokens",
        str(MAX_NEW),
        "--device",
        "cpu",
        "--grader",
        "judge",
        "--judge-max-new-tokens",
        "2",
    ]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    params = rows(
        fresh, "select params ->> 'grader_options' ->> 'model', params ->> 'grader_version' from runs"
    )
    version = get_grader("judge", model=model).version
    assert params == [(str(Path(model).resolve()), version)]
    assert rows(fresh, "select grader, grader_version, count(*) from grades group by all") == [
        ("judge", version, 6)
    ]

    other = CliRunner().invoke(cli, [*args, "--judge-model", str(models["yes_no"])])
    assert other.exit_code == 1 and "graded by judge version" in other.output
    mixed = CliRunner().invoke(cli, [*args[:-4], "--judge-batch-size", "2"])
    assert mixed.exit_code == 1 and "--judge-batch-size only apply to --grader judge" in mixed.output


def test_the_judge_borrows_a_loaded_model_only_if_it_is_the_same(models: dict[str, Path]) -> None:
    generator = HFGenerator(str(models["recorded"]), device="cpu", dtype="float32")
    assert JudgeGrader(str(models["recorded"]), device="cpu").reuse(generator)
    assert not JudgeGrader(str(models["recorded"]), device="cpu", dtype="bfloat16").reuse(generator)
    assert not JudgeGrader(str(models["yes_no"]), device="cpu").reuse(generator)


def test_grade_needs_run_and_grader(lake: Lake) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["--lake", str(lake.root), "grade", "--run", "1"])
    assert out.exit_code == 2 and "needs --run and --grader" in out.output
    missing = runner.invoke(cli, ["--lake", str(lake.root), "grade", "--run", "7", "--grader", "judge"])
    assert missing.exit_code == 1 and "no run 7" in missing.output
