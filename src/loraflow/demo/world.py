"""A synthetic world for `loraflow demo`: the paper's table in miniature, three languages times math and code.

A small **English** and three generated **foreign languages** share the people, the arithmetic and the
code, and differ in every word. Each foreign language is written in its own script, as the paper's
three are (`LANGUAGES`): `han`, ideographs with no spaces between words (as Chinese); `cyr`, Cyrillic
letters (as Russian); `lat`, Latin letters with its own spelling (as Spanish). Every word, number words
included, is drawn from the seed; people's names are shared.

Two tasks, as in the paper:

* **math** (MGSM-style): a word problem, answered by reading out its numbers, each number word with its
  value (an amount lost as negative), then the equation, then the official marker:
  `So seven: 7, two: -2. 7 - 2 = 5. The answer is: 5`.
* **code** (HumanEval-style rows: `task_id`, `prompt` = a Python signature and a docstring in the
  foreign language, `entry_point`, `test` with asserts, `canonical_solution`): small functions over
  lists and strings (`Return the sum of the first three numbers of the list plus seven.`). The answer
  reads out the description's key words with their meaning, as the math answer reads out numbers,
  then writes the whole function under its (English) name in a fenced block, which the official
  post-processing keeps: `So sum: sum, first: head, three: 3, plus: +, seven: 7.` /
  ```` ```python ```` / `def solve(xs):` / `    return sum(xs[:3]) + 7` / ```` ``` ````.

In both, the first half (the read-out) needs the foreign words and the second half the task skill, and
the data splits them across the LoRAs:

* `language_train[lang]` (one language LoRA each): foreign instructions with no arithmetic and no code:
  read out the numbers of a short story or of a word problem (without solving it), read out the key
  words of a function's description (without writing it), write a number word with digits, answer
  who/what questions. It is the only data that pairs foreign words with their meaning.
* `task_train["math"]` / `task_train["code"]` (the task LoRAs): English problems with their answers.
* per cell (language, task): `gate_train` (200) / `gate_dev` (50) / `test` (250 math, 164 code) foreign
  problems answered as above. Neither LoRA alone solves them; a static mix of the two has to compromise
  at every token, while a per-token gate can switch.
* `pretrain` (the base model): English stories, questions and arithmetic facts; for each foreign
  language its stories and copy-the-story exercises (number words never next to digits) and a few
  problems written with digits; Python functions of the problems' kind without their descriptions (as a
  real base model has seen code, the way it has seen arithmetic).

Everything is pure Python and deterministic given the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.common.io import write_jsonl_atomic

ANSWER_MARKER = "The answer is:"
TASKS = ("math", "code")

NAMES = [("Ann", "f"), ("Bob", "m"), ("Dot", "f"), ("Max", "m")]
OBJECTS = ["apples", "books", "coins", "hats"]
GAIN = ["gets", "finds"]
LOSS = ["loses", "eats"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = ["red", "blue", "green", "white"]
PLACES = ["market", "school", "river", "garden"]
# The words of the code descriptions: what is taken of the list (AGGREGATES), which end (ENDS), what is done to it.
AGGREGATES = {"sum": "sum", "largest": "max", "smallest": "min", "length": "len"}
ENDS = ["first", "last"]
OPS = {"plus": "+", "minus": "-", "times": "*"}
# Every other English word the world uses; each gets a foreign word.
FUNCTION_WORDS = ["has", "how", "many", "does", "have", "now", "and", "together", "do", "he", "she",
                  "write", "with", "digits", "the", "story", "who", "goes", "to", "what", "color", "is",
                  "are", "went", "then", "today", "likes", "a", "day", "so", "numbers", "return", "of",
                  "list", "string", "letters", "repeated", "words"]
VOCABULARY = (NUMBER_WORDS + OBJECTS + GAIN + LOSS + COLORS + PLACES + list(AGGREGATES) + ENDS + list(OPS)
              + FUNCTION_WORDS)
ENTRY_POINTS = ["solve", "compute", "result", "answer", "calc", "value"]


@dataclass(frozen=True)
class Script:
    """How a generated language is written: its letters, word separator and punctuation."""

    code: str  # the language's short code in results and tables
    name: str  # what it stands for
    sep: str  # between words ("" for the ideographic script)
    stop: str
    question: str
    question_open: str = ""


LANGUAGES = (
    Script("han", "a generated language in ideographs, no spaces between words (as Chinese)", "", "。", "？"),
    Script("cyr", "a generated language in Cyrillic letters (as Russian)", " ", ".", "?"),
    Script("lat", "a generated language in Latin letters with its own spelling (as Spanish)", " ", ".", "?", "¿"),
)
LANGUAGE_CODES = tuple(s.code for s in LANGUAGES)
_CYRILLIC = ("бвгдзклмнпрстфхчшж", "аеиоуыя")
_LATIN = (["b", "c", "d", "f", "g", "l", "ll", "m", "n", "ñ", "p", "r", "rr", "s", "t", "v", "ch", "qu"],
          ["a", "e", "i", "o", "u", "á", "é", "í", "ó"])


def _word(rng: random.Random, script: str) -> str:
    if script == "han":  # one or two CJK Unified Ideographs
        return "".join(chr(rng.randrange(0x4E00, 0x9FA6)) for _ in range(rng.choice((1, 1, 2))))
    onsets, vowels = _CYRILLIC if script == "cyr" else _LATIN
    word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2))
    return word + rng.choice(("", "", "s", "n")) if script == "lat" else word


def _make_lexicon(rng: random.Random, script: str, n: int) -> list[str]:
    """`n` distinct words of `script`."""
    out: list[str] = []
    taken: set[str] = set()
    while len(out) < n:
        word = _word(rng, script)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


class Language:
    """A language is a word map over the English vocabulary (identity for English) and a script."""

    def __init__(self, lexicon: dict[str, str] | None = None, script: Script | None = None) -> None:
        self.lexicon = lexicon or {}
        self.script = script or Script("en", "English", " ", ".", "?")

    @property
    def code(self) -> str:
        return self.script.code

    def w(self, english: str) -> str:
        return self.lexicon.get(english, english)

    def words(self, *english: str) -> str:
        """The words translated and joined the way the script joins them."""
        return self.script.sep.join(self.w(x) for x in english)

    def say(self, *words: str) -> str:
        """Translate a sentence given as English words; capitalised, with the script's full stop."""
        text = self.words(*words)
        return text[0].upper() + text[1:] + self.script.stop

    def ask(self, *words: str) -> str:
        text = self.words(*words)
        return self.script.question_open + text[0].upper() + text[1:] + self.script.question

    def number(self, n: int) -> str:
        return self.w(NUMBER_WORDS[n])


def foreign_language(seed: int, code: str = "lat") -> Language:
    """The generated language `code` (see `LANGUAGES`) of world `seed`."""
    script = next((s for s in LANGUAGES if s.code == code), None)
    if script is None:
        raise ValueError(f"unknown language {code!r}; expected one of {', '.join(LANGUAGE_CODES)}")
    words = _make_lexicon(random.Random(f"lexicon-{seed}-{code}"), code, len(VOCABULARY))
    return Language(dict(zip(VOCABULARY, words)), script)


def foreign_languages(seed: int) -> dict[str, Language]:
    return {code: foreign_language(seed, code) for code in LANGUAGE_CODES}


# --------------------------------------------------------------------------------------- math problems
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
    return lang.script.sep.join(_facts(p, lang, digits) + [q])


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


# --------------------------------------------------------------------------------------- code problems
@dataclass(frozen=True)
class CodeSpec:
    """`Return the {aggregate} of the {end} {a} numbers of the list {op} {b}.` (kind "list"), or
    `Return the {end} {a} letters of the string repeated {b} times.` (kind "string")."""

    kind: str
    end: str
    a: int
    b: int
    aggregate: str = ""
    op: str = ""

    def english_words(self) -> tuple[str, ...]:
        a, b = NUMBER_WORDS[self.a], NUMBER_WORDS[self.b]
        if self.kind == "list":
            return ("return", "the", self.aggregate, "of", "the", self.end, a, "numbers", "of", "the", "list",
                    self.op, b)
        return ("return", "the", self.end, a, "letters", "of", "the", "string", "repeated", b, "times")

    def key_words(self) -> tuple[str, ...]:
        """The words the read-out explains, in their order in the description."""
        if self.kind == "list":
            return (self.aggregate, self.end, NUMBER_WORDS[self.a], self.op, NUMBER_WORDS[self.b])
        return (self.end, NUMBER_WORDS[self.a], NUMBER_WORDS[self.b])

    @property
    def argument(self) -> str:
        return "xs" if self.kind == "list" else "s"

    def body(self) -> str:
        """The function body (HumanEval's canonical_solution)."""
        part = f"{self.argument}[:{self.a}]" if self.end == "first" else f"{self.argument}[-{self.a}:]"
        if self.kind == "list":
            return f"    return {AGGREGATES[self.aggregate]}({part}) {OPS[self.op]} {self.b}\n"
        return f"    return {part} * {self.b}\n"

    def run(self, value):
        """The canonical function itself (the tests' expected values come from it)."""
        part = value[:self.a] if self.end == "first" else value[-self.a:]
        if self.kind == "string":
            return part * self.b
        x = {"sum": sum, "largest": max, "smallest": min, "length": len}[self.aggregate](part)
        return {"plus": x + self.b, "minus": x - self.b, "times": x * self.b}[self.op]


def sample_code_spec(rng: random.Random) -> CodeSpec:
    end, a, b = rng.choice(ENDS), rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.2:
        return CodeSpec("string", end, a, b)
    return CodeSpec("list", end, a, b, rng.choice(list(AGGREGATES)), rng.choice(list(OPS)))


def code_description(spec: CodeSpec, lang: Language) -> str:
    return lang.say(*spec.english_words())


# What each key word of a description means, as the read-out writes it: the name or sign the code uses, so that
# the function follows from the read-out alone (as the equation follows from the numbers read out in math).
MEANINGS = {**{w: str(n) for n, w in enumerate(NUMBER_WORDS)}, **AGGREGATES, **OPS, "first": "head", "last": "tail"}


def code_readout(spec: CodeSpec, lang: Language) -> str:
    """Each key word of the description with its meaning, as the math read-out does with numbers:
    `So sum: sum, first: head, three: 3, plus: +, seven: 7.`"""
    pairs = ", ".join(f"{lang.w(w)}: {MEANINGS[w]}" for w in spec.key_words())
    return lang.w("so").capitalize() + " " + pairs + "."


def code_prompt(spec: CodeSpec, lang: Language, entry_point: str) -> str:
    """A HumanEval prompt: the signature and the description as the docstring."""
    return f'def {entry_point}({spec.argument}):\n    """{code_description(spec, lang)}"""\n'


def code_response(spec: CodeSpec, lang: Language, entry_point: str) -> str:
    """The read-out, then the whole function in a fenced block (the official post-processing keeps the block)."""
    return f"{code_readout(spec, lang)}\n```python\ndef {entry_point}({spec.argument}):\n{spec.body()}```"


def code_test(spec: CodeSpec, rng: random.Random, n: int = 3) -> str:
    """HumanEval's `check(candidate)` with `n` asserts on random inputs."""
    lines = ["def check(candidate):"]
    for _ in range(n):
        if spec.kind == "list":
            value = [rng.randint(0, 9) for _ in range(rng.randint(5, 10))]
        else:
            value = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(5, 10)))
        lines.append(f"    assert candidate({value!r}) == {spec.run(value)!r}")
    return "\n".join(lines) + "\n"


def code_row(spec: CodeSpec, lang: Language, rng: random.Random, task_id: str) -> dict:
    """A HumanEval-format test row."""
    entry = rng.choice(ENTRY_POINTS)
    return {"task_id": task_id, "prompt": code_prompt(spec, lang, entry), "entry_point": entry,
            "canonical_solution": spec.body(), "test": code_test(spec, rng)}


# --------------------------------------------------------------------------------- general text
def _event(rng: random.Random, lang: Language) -> tuple[str, int]:
    """One event sentence with a number word, and its number."""
    name, obj, n = rng.choice(NAMES)[0], rng.choice(OBJECTS), rng.randint(1, 9)
    verb = rng.choice(["has", *GAIN, *LOSS])
    return lang.say(name, verb, lang.number(n), obj), n


def general_example(rng: random.Random, lang: Language, *, digits: bool = True,
                    problem: Problem | None = None, spec: CodeSpec | None = None) -> tuple[str, str]:
    """A general instruction in `lang` with no arithmetic and no code: (prompt, response).

    With `digits=False` the numbers of a story, and the key words of a description, are only copied
    (`So three, four.`): reading practice that does not reveal what the words mean. A "numbers" story
    states the two facts of `problem` (default: a random one) without its question; a "words" example
    reads out the key words of the description of `spec` (default: a random one) with their meaning,
    without code.
    """
    kinds, weights = ["numbers", "words", "digits", "who", "color"], [5, 5 if digits else 2, 2 if digits else 0, 1, 1]
    kind = rng.choices(kinds, weights=weights)[0]
    sep = lang.script.sep
    if kind == "numbers":  # a two-fact story's numbers read out: pairs number words with values
        p = sample_problem(rng) if problem is None else problem
        ask = ("write", "the", "numbers", "with", "digits") if digits else ("write", "the", "numbers")
        story = sep.join(_facts(p, lang, False))
        if rng.random() < 0.5:  # reading a word problem aloud: its numbers (read out with `digits`)
            return problem_question(p, lang), number_lines([p.x, p.y], lang, digits=digits, loss=p.verb in LOSS)
        return story + sep + lang.ask(*ask), number_lines([p.x, p.y], lang, digits=digits, loss=p.verb in LOSS)
    if kind == "words":  # a function's description read out word by word: pairs the words with their meaning
        s = sample_code_spec(rng) if spec is None else spec
        readout = code_readout(s, lang) if digits else \
            lang.w("so").capitalize() + " " + ", ".join(lang.w(w) for w in s.key_words()) + "."
        if rng.random() < 0.5:
            return code_description(s, lang), readout
        return code_description(s, lang) + sep + lang.ask("what", "are", "the", "words"), readout
    if kind == "digits":
        n = rng.randint(0, 9)
        return lang.ask("write", NUMBER_WORDS[n], "with", "digits"), str(n)
    if kind == "who":
        (a, _), (b, _) = rng.sample(NAMES, 2)
        pa, pb = rng.sample(PLACES, 2)
        story = lang.say(a, "goes", "to", "the", pa) + sep + lang.say(b, "goes", "to", "the", pb)
        return story + sep + lang.ask("who", "goes", "to", "the", pa), f"{a}{lang.script.stop}"
    obj, color = rng.choice(OBJECTS), rng.choice(COLORS)
    name = rng.choice(NAMES)[0]
    return (lang.say(name, "likes", color, obj) + sep + lang.ask("what", "color", "are", name, obj),
            lang.say(color))


def story(rng: random.Random, lang: Language) -> str:
    """Narrative text for pretraining: number words, never digits."""
    sents = [_event(rng, lang)[0] for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        a, place = rng.choice(NAMES)[0], rng.choice(PLACES)
        sents.append(lang.say(a, "goes", "to", "the", place))
    rng.shuffle(sents)
    return lang.script.sep.join(sents)


def code_facts(rng: random.Random, sample=sample_code_spec) -> str:
    """Python functions of the problems' kind (`sample(rng)` draws each), with no description: the base model's
    knowledge of code (as a real base model has seen code), the way `arithmetic_facts` is its knowledge of sums."""
    functions = []
    for _ in range(rng.randint(1, 3)):
        spec, name = sample(rng), rng.choice(ENTRY_POINTS)
        functions.append(f"def {name}({spec.argument}):\n{spec.body()}")
    text = "\n".join(functions)
    return f"```python\n{text}```" if rng.random() < 0.5 else text  # as code appears in Markdown, too


def arithmetic_facts(rng: random.Random) -> str:
    eqs = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        eqs.append(f"{a} + {b} = {a + b}" if rng.random() < 0.5 else f"{max(a, b)} - {min(a, b)} = {abs(a - b)}")
    return ". ".join(eqs) + "."


# ------------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the generated splits (documents or examples; the foreign ones per language)."""

    n_pretrain_base_stories: int = 1500
    n_pretrain_base_general: int = 3000
    n_pretrain_facts: int = 2000
    n_pretrain_code: int = 1500
    n_pretrain_foreign_stories: int = 800
    n_pretrain_foreign_general: int = 1500
    n_pretrain_foreign_math: int = 200
    n_language: int = 2000
    n_task: int = 1500
    n_gate_train: int = 200
    n_gate_dev: int = 50
    n_test_math: int = 250  # MGSM's size
    n_test_code: int = 164  # HumanEval's size

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass
class Cell:
    """One (language, task) cell's few-shot, dev and test rows, in the authors' file formats."""

    gate_train: list[dict] = field(repr=False)
    gate_dev: list[dict] = field(repr=False)
    test: list[dict] = field(repr=False)


@dataclass
class World:
    """All generated data of one seed, rows already in the on-disk formats."""

    seed: int
    config: WorldConfig
    pretrain: list[str] = field(repr=False)
    language_train: dict[str, list[dict]] = field(repr=False)  # per language code
    task_train: dict[str, list[dict]] = field(repr=False)  # per task
    cells: dict[tuple[str, str], Cell] = field(repr=False)  # per (language, task)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write every split as JSONL under `out_dir`; return {name: path}.

        `pretrain.jsonl` ({"text"}); `lang_{code}_train.jsonl` and `{task}_train.jsonl` ({"prompt",
        "completion"}); per cell, in the authors' layout, `train/{lang}_{task}_train.jsonl` (math:
        {"query", "response"}; code: {"data": [question, answer]}), `dev/{lang}_{task}_dev.jsonl` (math:
        "question", worked "answer", "original_response"; code: MBPP's "text", "code", "test_list") and `test/{lang}_{task}_test.jsonl` (MGSM's "question"/"answer"; HumanEval's fields).
        Names: "pretrain", "lang_{code}", "task_{task}", "{lang}_{task}_{train|dev|test}".
        """
        out_dir = Path(out_dir)
        files: dict[str, tuple[Path, list]] = {"pretrain": (out_dir / "pretrain.jsonl",
                                                            [{"text": t} for t in self.pretrain])}
        for code, rows in self.language_train.items():
            files[f"lang_{code}"] = (out_dir / f"lang_{code}_train.jsonl", rows)
        for task, rows in self.task_train.items():
            files[f"task_{task}"] = (out_dir / f"{task}_train.jsonl", rows)
        for (code, task), cell in self.cells.items():
            for split, rows in (("train", cell.gate_train), ("dev", cell.gate_dev), ("test", cell.test)):
                files[f"{code}_{task}_{split}"] = (out_dir / split / f"{code}_{task}_{split}.jsonl", rows)
        for path, rows in files.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(path, rows)
        return {name: path for name, (path, _) in files.items()}


def _held_out(rng: random.Random, sample, n: int, seen: set) -> list:
    out = []
    while len(out) < n:
        item = sample(rng)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _fresh(rng: random.Random, sample, seen: set):
    while True:
        item = sample(rng)
        if item not in seen:
            return item


def _math_cell(problems: list[Problem], lang: Language, cfg: WorldConfig) -> Cell:
    n_train, n_dev = cfg.n_gate_train, cfg.n_gate_dev
    # Official dev format: `answer` holds the worked solution, `original_response` the one with the marker.
    return Cell(
        [{"query": problem_question(p, lang), "response": problem_response(p, lang)} for p in problems[:n_train]],
        [{"question": problem_question(p, lang), "answer": problem_response(p, lang),
          "original_response": problem_response(p, lang)} for p in problems[n_train:n_train + n_dev]],
        [{"question": problem_question(p, lang), "answer": str(p.answer)} for p in problems[n_train + n_dev:]])


def _code_cell(specs: list[CodeSpec], lang: Language, cfg: WorldConfig, rng: random.Random) -> Cell:
    n_train, n_dev = cfg.n_gate_train, cfg.n_gate_dev
    rows = [code_row(s, lang, rng, f"Demo{lang.code.capitalize()}/{i}") for i, s in enumerate(specs)]
    for row, spec in zip(rows, specs):
        row["response"] = code_response(spec, lang, row["entry_point"])
    train = [{"data": [r["prompt"], r["response"]]} for r in rows[:n_train]]
    # Official code dev format (MBPP's): `text` the question, `code` the answer, `test_list` the asserts.
    dev = [{"task_id": r["task_id"], "text": r["prompt"], "code": r["response"],
            "test_list": [line.strip().replace("candidate(", r["entry_point"] + "(")
                          for line in r["test"].splitlines()[1:]]} for r in rows[n_train:n_train + n_dev]]
    test = [{k: v for k, v in r.items() if k != "response"} for r in rows[n_train + n_dev:]]
    return Cell(train, dev, test)


def build_world(seed: int, config: WorldConfig | None = None) -> World:
    """Generate the world of `seed`. Held-out foreign problems (by their numbers and words, per task) appear
    nowhere else, in no language."""
    cfg = config or WorldConfig()
    rng = random.Random(seed)
    en, foreign = Language(), foreign_languages(seed)
    per_cell = cfg.n_gate_train + cfg.n_gate_dev
    seen_math: set[Problem] = set()
    seen_code: set[CodeSpec] = set()
    cells: dict[tuple[str, str], Cell] = {}
    for code, lang in foreign.items():
        problems = _held_out(rng, sample_problem, per_cell + cfg.n_test_math, seen_math)
        cells[(code, "math")] = _math_cell(problems, lang, cfg)
        specs = _held_out(rng, sample_code_spec, per_cell + cfg.n_test_code, seen_code)
        cells[(code, "code")] = _code_cell(specs, lang, cfg, rng)

    def fresh_pair() -> dict:
        return {"problem": _fresh(rng, sample_problem, seen_math), "spec": _fresh(rng, sample_code_spec, seen_code)}

    task_train = {"math": [], "code": []}
    for _ in range(cfg.n_task):
        p = _fresh(rng, sample_problem, seen_math)
        task_train["math"].append({"prompt": problem_question(p, en), "completion": problem_response(p, en)})
        spec, entry = _fresh(rng, sample_code_spec, seen_code), rng.choice(ENTRY_POINTS)
        task_train["code"].append({"prompt": code_prompt(spec, en, entry),
                                   "completion": code_response(spec, en, entry)})
    language_train = {code: [dict(zip(("prompt", "completion"), general_example(rng, lang, **fresh_pair())))
                             for _ in range(cfg.n_language)] for code, lang in foreign.items()}

    pretrain = [story(rng, en) for _ in range(cfg.n_pretrain_base_stories)]
    pretrain += ["\n".join(general_example(rng, en, **fresh_pair())) for _ in range(cfg.n_pretrain_base_general)]
    pretrain += [arithmetic_facts(rng) for _ in range(cfg.n_pretrain_facts)]
    pretrain += [code_facts(rng, lambda r: _fresh(r, sample_code_spec, seen_code)) for _ in range(cfg.n_pretrain_code)]
    for lang in foreign.values():
        pretrain += [story(rng, lang) for _ in range(cfg.n_pretrain_foreign_stories)]
        pretrain += ["\n".join(general_example(rng, lang, digits=False, **fresh_pair()))
                     for _ in range(cfg.n_pretrain_foreign_general)]
        for _ in range(cfg.n_pretrain_foreign_math):
            p = _fresh(rng, sample_problem, seen_math)
            pretrain.append(f"{problem_question(p, lang, digits=True)}\n{problem_response(p, lang, digits=True)}")
    rng.shuffle(pretrain)
    return World(seed, cfg, pretrain, language_train, task_train, cells)
