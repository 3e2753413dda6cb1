"""A deterministic synthetic world whose facts a tiny MoE learns unevenly across synthetic languages.

XICI needs questions that a model answers correctly in some languages and wrongly in others. Real models get
that from uneven pre-training data; here it is planted. Every fact (entity, relation -> value) is taught in a
pivot language. In the other languages only part of the facts are taught directly, and an entity is often
called by a language-local alias that the model can only resolve through dictionary items, when those were
taught at all. How often the shared ("international") name is used falls across the languages, so recall
falls smoothly from the pivot to the last language and almost every question ends up mixed.

Every word is a made-up token drawn from a seeded generator, so the same seed always gives the same world,
vocabulary, training items and dataset, independent of the platform.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import pre_tokenizers

from xici.errors import XiciError
from xici.recorder.prompting import DEFAULT_SYSTEM

#: Word orders of a question: P = the language's particle, N = the two name tokens, R = the relation word.
#: The relation word always follows the name, so the name is known when the relation is read.
WORD_ORDERS: tuple[tuple[str, ...], ...] = (("P", "N", "R"), ("N", "R", "P"), ("N", "P", "R"))

#: Same-language paraphrases of the pivot's questions (the paper's Table 3, languages against paraphrases):
#: templates of the pivot's own words (P particle, N name, R relation word; R always after N), the first
#: being its own order. The model learnt the other orders from other languages and a doubled or missing
#: particle from none, so recall varies by template. As many templates as the shipped world has languages,
#: so both recordings split a question's variants into groups of like sizes.
PARAPHRASE_TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("P", "N", "R"),
    ("N", "R", "P"),
    ("N", "P", "R"),
    ("P", "N", "P", "R"),
    ("N", "R"),
    ("P", "P", "N", "R"),
    ("N", "R", "P", "P"),
    ("P", "N", "R", "P"),
    ("N", "P", "R", "P"),
    ("N", "P", "P", "R"),
    ("P", "P", "N", "P", "R"),
    ("P", "N", "R", "P", "P"),
)

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class WorldConfig:
    """The knobs of a world; the defaults are the shipped testbed's (see testbed/README.md for why)."""

    seed: int = 0
    n_languages: int = 12
    n_entities: int = 200
    n_relations: int = 2
    n_values: int = 32
    n_syllables: int = 24
    #: Share of entities called by the shared name, falling linearly from the first non-pivot language
    #: to the last one (the pivot always uses it).
    shared_name_first: float = 0.8
    shared_name_last: float = 0.2
    #: Probability that a local alias is taught at all (by dictionary items in both directions).
    alias_taught: float = 0.5
    #: Probability that a (non-pivot language, entity, relation) question is itself in the training data.
    qa_taught: float = 0.25

    def __post_init__(self) -> None:
        if self.n_languages < 2:
            raise XiciError("A world needs at least 2 languages", where="n_languages", fix="use 2 or more")
        if self.n_entities < 1 or self.n_relations < 1 or self.n_values < 2:
            raise XiciError(
                "A world needs at least 1 entity, 1 relation and 2 values",
                where="n_entities / n_relations / n_values",
            )
        if not 4 <= self.n_syllables <= len(_CONSONANTS) * len(_VOWELS):
            raise XiciError(
                f"n_syllables must be between 4 and {len(_CONSONANTS) * len(_VOWELS)}", where="n_syllables"
            )
        if self.n_entities > self.n_syllables**2 // 2:
            raise XiciError(
                f"{self.n_entities} entities need more than {self.n_syllables} syllables for unique names",
                where="n_entities",
                fix=f"use at most {self.n_syllables**2 // 2} entities or more syllables",
            )
        for name in ("shared_name_first", "shared_name_last", "alias_taught", "qa_taught"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise XiciError(f"{name} is a probability and must be in [0, 1]", where=name)


@dataclass(frozen=True)
class Language:
    """One synthetic language: its own function words and word order."""

    tag: str
    particle: str
    means: str
    relation_words: tuple[str, ...]
    order: tuple[str, ...]


@dataclass(frozen=True)
class TrainingItem:
    """One chat exchange the model is trained on: a user turn and the exact reply expected."""

    question: str
    answer: str


@dataclass
class World:
    """The generated world: languages, names, facts and what of it is taught."""

    config: WorldConfig
    syllables: list[str]
    values: list[str]
    languages: list[Language]
    shared_names: list[tuple[str, str]]
    #: names[lang][entity]: the name used for the entity in that language.
    names: list[list[tuple[str, str]]]
    #: alias_taught[lang][entity]: a local alias that the dictionary items teach (False for shared names).
    alias_taught: list[list[bool]]
    #: facts[entity][relation]: index into values.
    facts: list[list[int]]
    #: qa_taught[lang][entity][relation]: the question in that language is in the training data.
    qa_taught: list[list[list[bool]]]
    _vocabulary: list[str] = field(default_factory=list, repr=False)

    def question(self, lang: int, entity: int, relation: int, order: tuple[str, ...] | None = None) -> str:
        """The question text: words in the language's order (or ``order``), then a question mark."""
        language = self.languages[lang]
        parts = {
            "P": [language.particle],
            "N": list(self.names[lang][entity]),
            "R": [language.relation_words[relation]],
        }
        return " ".join(word for slot in order or language.order for word in parts[slot]) + " ?"

    def answer(self, entity: int, relation: int) -> str:
        """The value word that answers (entity, relation) in every language."""
        return self.values[self.facts[entity][relation]]

    def question_id(self, entity: int, relation: int) -> str:
        """Stable id shared by all languages of one question."""
        return f"e{entity:03d}-r{relation}"

    def training_items(self) -> list[TrainingItem]:
        """Everything the model is taught: taught questions and dictionary items, in a fixed order."""
        items = []
        for lang, language in enumerate(self.languages):
            for entity in range(self.config.n_entities):
                for relation in range(self.config.n_relations):
                    if self.qa_taught[lang][entity][relation]:
                        items.append(
                            TrainingItem(self.question(lang, entity, relation), self.answer(entity, relation))
                        )
                if self.alias_taught[lang][entity]:
                    alias, shared = " ".join(self.names[lang][entity]), " ".join(self.shared_names[entity])
                    items.append(TrainingItem(f"{language.means} {alias} ?", shared))
                    items.append(TrainingItem(f"{language.means} {shared} ?", alias))
        return items

    def dataset_rows(self) -> list[dict]:
        """The XICI dataset: every question in every language with its accepted answers (jsonl format)."""
        return [
            {
                "question_id": self.question_id(entity, relation),
                "lang": language.tag,
                "question": self.question(lang, entity, relation),
                "answers": [self.answer(entity, relation)],
            }
            for entity in range(self.config.n_entities)
            for relation in range(self.config.n_relations)
            for lang, language in enumerate(self.languages)
        ]

    def paraphrase_rows(self) -> list[dict]:
        """The same questions (same ids and answers) in the pivot language only, once per paraphrase
        template, each template a variant tagged ``x-para0``, ``x-para1``... (jsonl format)."""
        return [
            {
                "question_id": self.question_id(entity, relation),
                "lang": paraphrase_tag(index),
                "question": self.question(0, entity, relation, template),
                "answers": [self.answer(entity, relation)],
            }
            for entity in range(self.config.n_entities)
            for relation in range(self.config.n_relations)
            for index, template in enumerate(PARAPHRASE_TEMPLATES)
        ]

    def vocabulary(self) -> list[str]:
        """Every word the world can produce, including the system prompt's, in a fixed order."""
        return list(self._vocabulary)

    def to_json(self) -> str:
        """A canonical serialisation, for comparing worlds and for storing next to a checkpoint."""
        data = asdict(self)
        data.pop("_vocabulary")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def language_tag(index: int) -> str:
    """BCP-47 private-use tag of synthetic language ``index``: x-lang00, x-lang01, ..."""
    return f"x-lang{index:02d}"


def paraphrase_tag(index: int) -> str:
    """BCP-47 private-use tag of paraphrase template ``index``: x-para0, x-para1, ..."""
    return f"x-para{index}"


def world_of(folder: Path) -> World:
    """The world a testbed folder was built from (its ``world.json``), regenerated and checked equal."""
    path = Path(folder) / "world.json"
    try:
        stored = json.loads(path.read_text())
        world = generate_world(WorldConfig(**stored["config"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise XiciError(
            f"cannot read the testbed's world: {error}",
            where=str(path),
            fix="give a folder written by `xici testbed build` (or the shipped one)",
        ) from None
    if json.loads(world.to_json()) != stored:
        raise XiciError(
            "the testbed's world.json is not the world its config generates (edited, or from another xici)",
            where=str(path),
            fix="rebuild the testbed with `xici testbed build`",
        )
    return world


def _system_words() -> list[str]:
    """The recorder's system instruction split as the word-level tokenizer splits it (all in vocabulary)."""
    return [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(DEFAULT_SYSTEM)]


class _WordMaker:
    """Draws unique pronounceable pseudo-words; the length of a word tells its class apart."""

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng = rng
        self.used = set(reserved)

    def draw(self, n_syllables: int) -> str:
        while True:
            word = "".join(
                self.rng.choice(_CONSONANTS) + self.rng.choice(_VOWELS) for _ in range(n_syllables)
            )
            if word not in self.used:
                self.used.add(word)
                return word


def generate_world(config: WorldConfig | None = None) -> World:
    """Build the world of ``config`` (default: the shipped testbed's); same config, same world."""
    config = config or WorldConfig()
    rng = random.Random(f"xici-testbed-world-{config.seed}")
    words = _WordMaker(rng, set(_system_words()))

    syllables = [words.draw(1) for _ in range(config.n_syllables)]
    values = [words.draw(2) for _ in range(config.n_values)]
    languages = [
        Language(
            tag=language_tag(lang),
            particle=words.draw(3),
            means=words.draw(3),
            relation_words=tuple(words.draw(3) for _ in range(config.n_relations)),
            order=WORD_ORDERS[lang % len(WORD_ORDERS)],
        )
        for lang in range(config.n_languages)
    ]

    all_pairs = [(a, b) for a in syllables for b in syllables]
    rng.shuffle(all_pairs)
    shared_names = all_pairs[: config.n_entities]
    alias_pool = all_pairs[config.n_entities :]

    names: list[list[tuple[str, str]]] = [list(shared_names)]
    alias_taught: list[list[bool]] = [[False] * config.n_entities]
    for lang in range(1, config.n_languages):
        share = _shared_name_share(config, lang)
        aliases = iter(rng.sample(alias_pool, config.n_entities))
        lang_names, lang_taught = [], []
        for entity in range(config.n_entities):
            alias = next(aliases)
            if rng.random() < share:
                lang_names.append(shared_names[entity])
                lang_taught.append(False)
            else:
                lang_names.append(alias)
                lang_taught.append(rng.random() < config.alias_taught)
        names.append(lang_names)
        alias_taught.append(lang_taught)

    facts = [
        [rng.randrange(config.n_values) for _ in range(config.n_relations)] for _ in range(config.n_entities)
    ]
    qa_taught = [
        [
            [lang == 0 or rng.random() < config.qa_taught for _ in range(config.n_relations)]
            for _ in range(config.n_entities)
        ]
        for lang in range(config.n_languages)
    ]

    vocabulary = [*_system_words(), "?", *syllables, *values]
    for language in languages:
        vocabulary += [language.particle, language.means, *language.relation_words]
    vocabulary = list(dict.fromkeys(vocabulary))
    return World(
        config, syllables, values, languages, shared_names, names, alias_taught, facts, qa_taught, vocabulary
    )


def _shared_name_share(config: WorldConfig, lang: int) -> float:
    """Share of shared names in non-pivot language ``lang`` (linear from first to last)."""
    if config.n_languages == 2:
        return config.shared_name_first
    step = (lang - 1) / (config.n_languages - 2)
    return config.shared_name_first + step * (config.shared_name_last - config.shared_name_first)
