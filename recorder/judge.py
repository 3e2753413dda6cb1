"""The LLM judge ("judge" grader): a chat model reads the question, the gold answers and the response, and
answers only YES or NO (the paper's autorater, method.md Stage 1).

Prompt. :data:`DEFAULT_TEMPLATE` filled with the item (:func:`judge_prompt`) is the user turn of the judge
model's chat template, with no system turn and thinking off (through the recorder's
:class:`~xici.recorder.prompting.PromptFormat`); a judge without a chat template reads the filled text as
is. A replacement template (``--judge-template FILE``, used as is) may use the fields ``{question}``,
``{answers}`` (the accepted answers joined by ``"; "``), ``{response}`` and ``{lang}`` (the language tag);
it must use ``{answers}`` and ``{response}``. Literal braces are written ``{{`` and ``}}``.

Verdict. :func:`parse_verdict` is strict: after cutting the judge's own thinking off (see
:mod:`xici.corpora.thinking`), Unicode NFKC and case folding, and skipping leading whitespace, punctuation
and symbols (``**YES**``), the first word must be YES or NO, or one of the few equivalents in
:data:`YES_WORDS` and :data:`NO_WORDS` (``Oui``, ``Nein``, ``はい``...). Anything else is undecided:
``Grade(None, raw answer)``, counted as undecided wherever grades are counted, never taken for NO. Every
grade keeps the judge's raw answer as its detail. An empty response is wrong without asking the judge.

Model. Any causal LM the transformers backend loads; generation is greedy, batched (``batch_size``
prompts, sorted by length to save padding) and without routing capture. By default the commands use the
recorded model as judge; a recording that grades with the judge borrows the recording's loaded model
(:meth:`JudgeGrader.reuse`, called by :class:`~xici.recorder.asking.Asker`) instead of loading it twice.
The grader's version names the model and a hash of the template, so grades by another judge are told apart
(and re-graded by ``xici grade``).
"""

from __future__ import annotations

import hashlib
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xici.corpora.graders import Grade, GradeItem, register_grader
from xici.corpora.thinking import split_thinking
from xici.errors import XiciError

if TYPE_CHECKING:
    from xici.recorder.hf_backend import HFGenerator

DEFAULT_TEMPLATE = (
    "You are grading the answer to a quiz question. The question and the answer may be in any language.\n"
    "\n"
    "Question: {question}\n"
    "Accepted answers (any one is enough): {answers}\n"
    "Response to grade: {response}\n"
    "\n"
    "Does the response give an accepted answer? A translation, transliteration or other spelling of it "
    "counts; a different answer, several contradicting answers or no answer do not. "
    "Reply with only YES or NO."
)
TEMPLATE_FIELDS = ("question", "answers", "response", "lang")
REQUIRED_FIELDS = ("answers", "response")
ANSWER_SEPARATOR = "; "

# Case-folded, NFKC first words taken for YES / NO: English, then the judge replying in the question's
# language (fr, de, es/it, pt, ru, zh, ja, ko, ar, hi, he, el, tr, id, pl, nl, sv/da).
YES_WORDS = frozenset(
    {
        *("yes", "oui", "ja", "sí", "sì", "si", "sim", "да", "是", "是的", "对", "對", "はい", "네", "예"),
        *("نعم", "हाँ", "हां", "כן", "ναι", "evet", "ya", "tak"),
    }
)
NO_WORDS = frozenset(
    {
        *("no", "non", "nein", "não", "нет", "否", "不", "不是", "不是的", "不对", "不對", "いいえ"),
        *("아니요", "아니오", "아니", "لا", "नहीं", "לא", "όχι", "hayır", "tidak", "nie", "nee", "nej"),
    }
)


def check_template(template: str) -> None:
    """Refuse a template with unknown or positional fields, bad braces, or without answers and response."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        template.format(**dict.fromkeys(TEMPLATE_FIELDS, ""))
    except (KeyError, IndexError, ValueError) as exc:
        raise XiciError(
            f"the judge template is not valid ({exc!r}); its fields are {{{'}, {'.join(TEMPLATE_FIELDS)}}}",
            where="--judge-template",
            fix="write literal braces as {{ and }}",
        ) from None
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise XiciError(
            f"the judge template has no {', '.join('{' + m + '}' for m in missing)} field",
            where="--judge-template",
            fix="the judge must see the accepted answers and the response: put {answers} and {response} in",
        )


def judge_prompt(template: str, item: GradeItem) -> str:
    """The judge's user turn for one item: the template with the item's fields filled in."""
    return template.format(
        question=item.question,
        answers=ANSWER_SEPARATOR.join(item.answers),
        response=item.response,
        lang=item.lang,
    )


def _is_word_char(ch: str) -> bool:
    """Letters, marks (Devanagari vowel signs), digits and connectors (``NO_ANSWER`` is one word)."""
    category = unicodedata.category(ch)
    return category[0] in "LMN" or category == "Pc"


def parse_verdict(text: str) -> bool | None:
    """True for YES, False for NO, None for anything else (see the module docstring)."""
    answer = unicodedata.normalize("NFKC", split_thinking(text).answer).casefold()
    start = 0
    while start < len(answer) and not _is_word_char(answer[start]):
        start += 1
    end = start
    while end < len(answer) and _is_word_char(answer[end]):
        end += 1
    word = answer[start:end]
    return True if word in YES_WORDS else False if word in NO_WORDS else None


def model_id(model: str) -> str:
    """A local checkpoint as its absolute path, a hub id as given: the same model always reads the same."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


class JudgeGrader:
    """Grades with a chat model answering YES or NO; the model is loaded on the first batch to grade.

    ``template`` is the prompt text (None: :data:`DEFAULT_TEMPLATE`); ``max_new_tokens`` bounds the judge's
    answer (raise it for judges that think before answering).
    """

    name = "judge"

    def __init__(
        self,
        model: str,
        *,
        template: str | None = None,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 16,
    ) -> None:
        self.model = model_id(model)
        self.template = DEFAULT_TEMPLATE if template is None else template
        check_template(self.template)
        if batch_size < 1:
            raise XiciError(
                "the judge's batch size must be at least 1", where=f"--judge-batch-size {batch_size}"
            )
        if max_new_tokens < 1:
            raise XiciError(
                "the judge needs at least 1 new token", where=f"--judge-max-new-tokens {max_new_tokens}"
            )
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        template_sha = hashlib.sha256(self.template.encode()).hexdigest()[:12]
        self.version = f"1:{self.model}:{template_sha}"
        self._generator: HFGenerator | None = None

    def reuse(self, generator: object) -> bool:
        """Judge with an already loaded generator if it is a transformers one of this judge's model, device
        and dtype. The judge generates without the router tap, so no ablation mask ever touches it."""
        from xici.recorder.generator import resolve_device, resolve_dtype
        from xici.recorder.hf_backend import HFGenerator

        device = resolve_device(self.device)
        same = (
            isinstance(generator, HFGenerator)
            and model_id(generator.model.name_or_path) == self.model
            and generator.device == device
            and generator.dtype == resolve_dtype(self.dtype, device)
        )
        if same:
            self._generator = generator
        return same

    def _load(self) -> HFGenerator:
        if self._generator is None:
            from xici.recorder.hf_backend import HFGenerator

            self._generator = HFGenerator(self.model, device=self.device, dtype=self.dtype)
        return self._generator

    def grade(self, items: Sequence[GradeItem]) -> list[Grade]:
        grades = {
            i: Grade(False, "empty response; the judge was not asked")
            for i, item in enumerate(items)
            if not item.response.strip()
        }
        asked = [i for i in range(len(items)) if i not in grades]
        if asked:
            from xici.recorder.prompting import PromptFormat

            generator = self._load()
            tokenizer = generator.tokenizer
            chat = PromptFormat(None) if tokenizer.chat_template else PromptFormat(None, "{question}")
            prompts = {i: chat.encode(tokenizer, judge_prompt(self.template, items[i])).ids for i in asked}
            order = sorted(asked, key=lambda i: len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                generations = generator.generate(
                    [prompts[i] for i in batch], max_new_tokens=self.max_new_tokens, capture=False
                )
                for i, generation in zip(batch, generations, strict=True):
                    raw = generator.decode(generation.output_ids)
                    grades[i] = Grade(parse_verdict(raw), raw)
        return [grades[i] for i in range(len(items))]


register_grader("judge", JudgeGrader)


@dataclass(frozen=True)
class JudgeOptions:
    """The judge's options as given (the ``--judge-*`` options; None: not given, the default applies)."""

    model: str | None = None
    template: Path | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    device: str | None = None
    dtype: str | None = None

    def for_grader(
        self, grader: str, *, model: Callable[[], str], device: str = "auto", dtype: str = "auto"
    ) -> dict[str, Any]:
        """Options of ``get_grader(grader, ...)``: the judge's, with the command's model, device and dtype
        as defaults (``model`` is only called when no --judge-model is given); none for other graders."""
        given = [name for name, value in asdict(self).items() if value is not None]
        if grader != "judge":
            if given:
                names = ", ".join(f"--judge-{name.replace('_', '-')}" for name in given)
                raise XiciError(f"{names} only apply to --grader judge", where=f"--grader {grader}")
            return {}
        options: dict[str, Any] = {
            "model": self.model or model(),
            "device": self.device or device,
            "dtype": self.dtype or dtype,
        }
        if self.template is not None:
            try:
                options["template"] = self.template.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise XiciError(f"cannot read the judge template: {exc}", where=str(self.template)) from None
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options
