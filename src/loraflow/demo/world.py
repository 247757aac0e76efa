"""A synthetic bilingual world for `loraflow demo`: the paper's MGSM setting in miniature.

Two languages share the people and the arithmetic and differ in every word:

* the **base** language is a small English (`Ann has three apples.`);
* the **foreign** language is generated from the seed: its own word for every English word,
  number words included (`Ann tiru zolo kapel.`). People's names are shared.

A word problem is answered step by step: first its numbers are read out, each number word with
its value (an amount lost as negative), then the equation, then the official marker:
`So seven: 7, two: -2. 7 - 2 = 5. The answer is: 5`. The two halves need two different skills,
and the data splits them across the LoRAs:

* `language_train` (language LoRA): foreign instructions with **no arithmetic**: read out the
  numbers of a short foreign story or of a foreign word problem (without solving it), write a
  number word with digits, answer who/what questions. It is the only data that pairs foreign
  number words (and gain/loss verbs) with their values.
* `task_train` (task LoRA): base-language word problems with their step-by-step answers.
* `gate_train` (200) / `gate_dev` / `test` (250): foreign word problems (number words in the
  question), answered as above in the foreign language: the restatement needs the language
  LoRA, the equation the task LoRA, so neither LoRA alone solves them, and a static mix of the
  two has to compromise at every token, while a per-token gate can switch.
* `pretrain` (the base model): base-language stories, questions and arithmetic facts; foreign
  stories and foreign copy-the-story exercises (number words never next to digits); and a few
  foreign problems written with digits, so the base has seen the foreign problem format (the
  issue's lesson (a)).

Everything is pure Python and deterministic given the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.common.io import write_jsonl_atomic

ANSWER_MARKER = "The answer is:"

NAMES = [("Ann", "f"), ("Bob", "m"), ("Dot", "f"), ("Max", "m")]
OBJECTS = ["apples", "books", "coins", "hats"]
GAIN = ["gets", "finds"]
LOSS = ["loses", "eats"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = ["red", "blue", "green", "white"]
PLACES = ["market", "school", "river", "garden"]
# Every other English word the world uses; each gets a foreign word.
FUNCTION_WORDS = ["has", "how", "many", "does", "have", "now", "and", "together", "do", "he", "she",
                  "write", "with", "digits", "the", "story", "who", "goes", "to", "what", "color", "is",
                  "are", "went", "then", "today", "likes", "a", "day", "so", "numbers"]


def _make_lexicon(rng: random.Random, n: int) -> list[str]:
    """`n` distinct pronounceable two-syllable words, none of them English words we use."""
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    taken = set(OBJECTS + GAIN + LOSS + NUMBER_WORDS + COLORS + PLACES + FUNCTION_WORDS)
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


class Language:
    """A language is a word map over the English vocabulary (identity for the base language)."""

    def __init__(self, lexicon: dict[str, str] | None = None) -> None:
        self.lexicon = lexicon or {}

    def w(self, english: str) -> str:
        return self.lexicon.get(english, english)

    def say(self, *words: str) -> str:
        """Translate a sentence given as English words; capitalised, with a full stop."""
        text = " ".join(self.w(x) for x in words)
        return text[0].upper() + text[1:] + "."

    def ask(self, *words: str) -> str:
        text = " ".join(self.w(x) for x in words)
        return text[0].upper() + text[1:] + "?"

    def number(self, n: int) -> str:
        return self.w(NUMBER_WORDS[n])


def foreign_language(seed: int) -> Language:
    vocab = NUMBER_WORDS + OBJECTS + GAIN + LOSS + COLORS + PLACES + FUNCTION_WORDS
    words = _make_lexicon(random.Random(f"lexicon-{seed}"), len(vocab))
    return Language(dict(zip(vocab, words)))


# --------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """`name` has `x` objects, then `verb`s `y` (or, kind "together", `other` has `y`)."""

    kind: str  # "change" or "together"
    name: str
    obj: str
    x: int
    verb: str
    y: int
    other: str = ""

    @property
    def answer(self) -> int:
        return self.x - self.y if self.verb in LOSS else self.x + self.y

    @property
    def equation(self) -> str:
        op = "-" if self.verb in LOSS else "+"
        return f"{self.x} {op} {self.y} = {self.answer}"


def sample_problem(rng: random.Random) -> Problem:
    (name, _), (other, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    if rng.random() < 0.3:
        return Problem("together", name, obj, rng.randint(1, 9), "has", rng.randint(1, 9), other)
    verb = rng.choice(GAIN + LOSS)
    x = rng.randint(2 if verb in LOSS else 1, 9)
    y = rng.randint(1, x - 1) if verb in LOSS else rng.randint(1, 9)
    return Problem("change", name, obj, x, verb, y)


def _pronoun(name: str) -> str:
    return "she" if dict(NAMES)[name] == "f" else "he"


def _facts(p: Problem, lang: Language, digits: bool) -> list[str]:
    num = (lambda n: str(n)) if digits else lang.number
    if p.kind == "together":
        return [lang.say(p.name, "has", num(p.x), p.obj), lang.say(p.other, "has", num(p.y), p.obj)]
    return [lang.say(p.name, "has", num(p.x), p.obj), lang.say(_pronoun(p.name), p.verb, num(p.y), p.obj)]


def problem_question(p: Problem, lang: Language, *, digits: bool = False) -> str:
    """The question; numbers as words unless `digits`."""
    if p.kind == "together":
        q = lang.ask("how", "many", p.obj, "do", p.name, "and", p.other, "have", "together")
    else:
        q = lang.ask("how", "many", p.obj, "does", p.name, "have", "now")
    return " ".join(_facts(p, lang, digits) + [q])


def number_lines(ns: list[int], lang: Language, *, digits: bool | str = True, loss: bool = False) -> str:
    """The story's numbers, each word read out with its value: `So three: 3, four: 4.`

    Each number word is copied first and its value follows it, so the value depends only on the
    token just before it (and, with `loss`, on the story's verb: an amount lost is read out as
    negative, `So seven: 7, two: -2.`, which is all the equation needs to know about the verb).
    With `digits=False` the words are only copied: `So three, four.`; with `digits="only"` only
    the values are written: `So 7, -2.`
    """
    vals = [str(n) for n in ns]
    if loss:
        vals[-1] = f"-{ns[-1]}"
    parts = [f"{lang.number(n)}: {v}" if digits is True else (v if digits == "only" else lang.number(n))
             for n, v in zip(ns, vals)]
    return lang.w("so").capitalize() + " " + ", ".join(parts) + "."


def problem_response(p: Problem, lang: Language, *, digits: bool = False) -> str:
    """The numbers read out (`So 3, 4.` if the question had `digits`), the equation, the marker."""
    head = number_lines([p.x, p.y], lang, digits="only" if digits else True, loss=p.verb in LOSS)
    return " ".join([head, f"{p.equation}.", f"{ANSWER_MARKER} {p.answer}"])


# --------------------------------------------------------------------------------- general text
def _event(rng: random.Random, lang: Language) -> tuple[str, int]:
    """One event sentence with a number word, and its number."""
    name, obj, n = rng.choice(NAMES)[0], rng.choice(OBJECTS), rng.randint(1, 9)
    verb = rng.choice(["has", *GAIN, *LOSS])
    return lang.say(name, verb, lang.number(n), obj), n


def general_example(rng: random.Random, lang: Language, *, digits: bool = True,
                    problem: Problem | None = None) -> tuple[str, str]:
    """A general instruction in `lang` with no arithmetic: (prompt, response).

    With `digits=False` the numbers of a story are only copied (`So three, four.`): reading
    practice that does not reveal what the number words mean. A "numbers" story states the two
    facts of `problem` (default: a random one) without its question.
    """
    kind = rng.choices(["numbers", "digits", "who", "color"], weights=[6, 2 if digits else 0, 1, 1])[0]
    if kind == "numbers":  # a two-fact story's numbers read out: pairs number words with values
        p = sample_problem(rng) if problem is None else problem
        ask = ("write", "the", "numbers", "with", "digits") if digits else ("write", "the", "numbers")
        story = " ".join(_facts(p, lang, False))
        if rng.random() < 0.5:  # reading a word problem aloud: its numbers (read out with `digits`)
            return problem_question(p, lang), number_lines([p.x, p.y], lang, digits=digits, loss=p.verb in LOSS)
        return f"{story} {lang.ask(*ask)}", number_lines([p.x, p.y], lang, digits=digits, loss=p.verb in LOSS)
    if kind == "digits":
        n = rng.randint(0, 9)
        return lang.ask("write", NUMBER_WORDS[n], "with", "digits"), str(n)
    if kind == "who":
        (a, _), (b, _) = rng.sample(NAMES, 2)
        pa, pb = rng.sample(PLACES, 2)
        story = f"{lang.say(a, 'goes', 'to', 'the', pa)} {lang.say(b, 'goes', 'to', 'the', pb)}"
        return f"{story} {lang.ask('who', 'goes', 'to', 'the', pa)}", f"{a}."
    obj, color = rng.choice(OBJECTS), rng.choice(COLORS)
    name = rng.choice(NAMES)[0]
    return (f"{lang.say(name, 'likes', color, obj)} {lang.ask('what', 'color', 'are', name, obj)}",
            lang.say(color))


def story(rng: random.Random, lang: Language) -> str:
    """Narrative text for pretraining: number words, never digits."""
    sents = [_event(rng, lang)[0] for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        a, place = rng.choice(NAMES)[0], rng.choice(PLACES)
        sents.append(lang.say(a, "goes", "to", "the", place))
    rng.shuffle(sents)
    return " ".join(sents)


def arithmetic_facts(rng: random.Random) -> str:
    eqs = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        eqs.append(f"{a} + {b} = {a + b}" if rng.random() < 0.5 else f"{max(a, b)} - {min(a, b)} = {abs(a - b)}")
    return ". ".join(eqs) + "."


# ------------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the generated splits (documents or examples)."""

    n_pretrain_base_stories: int = 1500
    n_pretrain_base_general: int = 3000
    n_pretrain_facts: int = 2000
    n_pretrain_foreign_stories: int = 1500
    n_pretrain_foreign_general: int = 4000
    n_pretrain_foreign_math: int = 600
    n_language: int = 2000
    n_task: int = 2000
    n_gate_train: int = 200
    n_gate_dev: int = 50
    n_test: int = 250

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass
class World:
    """All generated data of one seed, rows already in the on-disk formats."""

    seed: int
    config: WorldConfig
    pretrain: list[str] = field(repr=False)
    language_train: list[dict] = field(repr=False)
    task_train: list[dict] = field(repr=False)
    gate_train: list[dict] = field(repr=False)
    gate_dev: list[dict] = field(repr=False)
    test: list[dict] = field(repr=False)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write every split as JSONL under `out_dir`; return {split: path}.

        `pretrain` ({"text"}), `language_train` / `task_train` ({"prompt", "completion"}),
        `gate_train` ({"query", "response"}, the official math format), `gate_dev` (the official
        dev format: "question", worked "answer", "original_response") and `test` ({"question",
        "answer"}, MGSM format).
        """
        out_dir = Path(out_dir)
        splits = {"pretrain": [{"text": t} for t in self.pretrain], "language_train": self.language_train,
                  "task_train": self.task_train, "gate_train": self.gate_train, "gate_dev": self.gate_dev,
                  "test": self.test}
        paths = {}
        for name, rows in splits.items():
            paths[name] = out_dir / f"{name}.jsonl"
            write_jsonl_atomic(paths[name], rows)
        return paths


def build_world(seed: int, config: WorldConfig | None = None) -> World:
    """Generate the world of `seed`. Held-out foreign problems appear nowhere else."""
    cfg = config or WorldConfig()
    rng = random.Random(seed)
    en, fo = Language(), foreign_language(seed)

    held: list[Problem] = []
    seen: set[Problem] = set()
    while len(held) < cfg.n_gate_train + cfg.n_gate_dev + cfg.n_test:
        p = sample_problem(rng)
        if p not in seen:
            seen.add(p)
            held.append(p)

    def fresh() -> Problem:
        while True:
            p = sample_problem(rng)
            if p not in seen:
                return p

    n_train, n_dev = cfg.n_gate_train, cfg.n_gate_dev
    gate_train = [{"query": problem_question(p, fo), "response": problem_response(p, fo)} for p in held[:n_train]]
    # Official dev format: `answer` holds the worked solution, `original_response` the one with the marker.
    gate_dev = [{"question": problem_question(p, fo), "answer": problem_response(p, fo),
                 "original_response": problem_response(p, fo)} for p in held[n_train:n_train + n_dev]]
    test = [{"question": problem_question(p, fo), "answer": str(p.answer)} for p in held[n_train + n_dev:]]
    task_train = []
    for _ in range(cfg.n_task):
        p = fresh()
        task_train.append({"prompt": problem_question(p, en), "completion": problem_response(p, en)})
    language_train = [dict(zip(("prompt", "completion"), general_example(rng, fo, problem=fresh())))
                      for _ in range(cfg.n_language)]

    pretrain = [story(rng, en) for _ in range(cfg.n_pretrain_base_stories)]
    pretrain += ["\n".join(general_example(rng, en, problem=fresh())) for _ in range(cfg.n_pretrain_base_general)]
    pretrain += [arithmetic_facts(rng) for _ in range(cfg.n_pretrain_facts)]
    pretrain += [story(rng, fo) for _ in range(cfg.n_pretrain_foreign_stories)]
    pretrain += ["\n".join(general_example(rng, fo, digits=False, problem=fresh())) for _ in range(cfg.n_pretrain_foreign_general)]
    for _ in range(cfg.n_pretrain_foreign_math):
        p = fresh()
        pretrain.append(f"{problem_question(p, fo, digits=True)}\n{problem_response(p, fo, digits=True)}")
    rng.shuffle(pretrain)
    return World(seed, cfg, pretrain, language_train, task_train, gate_train, gate_dev, test)
