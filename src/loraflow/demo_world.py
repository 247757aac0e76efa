"""A synthetic bilingual world for `loraflow demo`: the paper's MGSM setting in miniature.

Two languages share one set of people and one arithmetic, and differ in everything else:

* the **base** language is plain English (SVO, English number words);
* the **foreign** language is generated from the seed: its own lexicon of nouns, verbs and
  function words, verb-final word order (`Ann apple seven buys.`), and its own compositional
  number words (units before tens, as in German: 47 = "<seven> <and> <forty>").

Skills are split across the data so that the foreign math test needs both LoRAs:

* `language_train` (the language LoRA): general foreign instructions with **no arithmetic**:
  reading quantities back with digits, shopping lists, days of the month, writing number
  words as digits, where-questions. It is the only data that pairs foreign number words with
  their values.
* `task_train` (the task LoRA): base-language word problems with a step-by-step answer:
  restate the facts with digits, one equation per step, then `The answer is: N`.
* `gate_train` / `gate_dev` / `test`: foreign word problems (number words in the question,
  digits in the answer). The reference answer restates the facts in the foreign language with
  digits (a language-LoRA skill), then writes the equations (a task-LoRA skill).
* `pretrain`: mostly base-language text (stories, general instructions, arithmetic facts,
  word problems with step-by-step answers); foreign stories and foreign instructions whose
  answers keep the number words (so the base reads and copies foreign text); and a little
  foreign math with digits in the question, so the base knows what the foreign verbs do to a
  quantity (lesson (a) of the issue: without it the task LoRA does not transfer). Foreign
  number words are never paired with digits outside `language_train`.

Everything is pure Python and deterministic given the seed; `World.write` writes the JSONL
files the rest of loraflow reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.io_utils import write_jsonl_atomic

ANSWER_MARKER = "The answer is:"
MAX_NUMBER = 99

_NAMES = [
    ("Ann", "f"), ("Bo", "m"), ("Cara", "f"), ("Dan", "m"), ("Eva", "f"), ("Finn", "m"),
    ("Gus", "m"), ("Hana", "f"), ("Ivo", "m"), ("Jana", "f"), ("Kai", "m"), ("Lia", "f"),
    ("Milo", "m"), ("Nora", "f"), ("Otto", "m"), ("Pia", "f"), ("Rex", "m"), ("Sara", "f"),
    ("Tom", "m"), ("Una", "f"), ("Vik", "m"), ("Wen", "f"), ("Yuri", "m"), ("Zoe", "f"),
]
_OBJECTS = [  # (singular, plural)
    ("apple", "apples"), ("pear", "pears"), ("book", "books"), ("coin", "coins"),
    ("egg", "eggs"), ("cup", "cups"), ("pen", "pens"), ("stone", "stones"),
    ("shell", "shells"), ("card", "cards"), ("fish", "fish"), ("hat", "hats"),
    ("plum", "plums"), ("box", "boxes"), ("cake", "cakes"), ("bead", "beads"),
]
# verb key -> (base 3rd-person form, sign of its effect on the subject's count)
_VERBS = {
    "has": ("has", 0), "buys": ("buys", +1), "finds": ("finds", +1), "gets": ("gets", +1),
    "eats": ("eats", -1), "loses": ("loses", -1), "sells": ("sells", -1), "gives": ("gives away", -1),
}
_CHANGE_VERBS = [v for v, (_, s) in _VERBS.items() if s != 0]
_PLACES = ["market", "school", "river", "garden", "library", "forest", "bakery", "harbour"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black"]
_FUNCTION_WORDS = [
    "how_many", "now", "together", "more_than", "they", "he_she", "and", "day", "goes_to",
    "where", "which_day", "digits", "list", "write", "is", "color", "what", "the_list",
    "read", "tell", "went", "then", "the", "opens", "on",
]

_EN_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
             "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
             "seventeen", "eighteen", "nineteen"]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def english_number(n: int) -> str:
    """English words for 0 <= n <= 99 (`47` -> `forty-seven`)."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number out of range 0..{MAX_NUMBER}: {n}")
    if n < 20:
        return _EN_UNITS[n]
    tens, units = divmod(n, 10)
    return _EN_TENS[tens] + ("" if units == 0 else "-" + _EN_UNITS[units])


# ---------------------------------------------------------------------------------------------
# The two languages
# ---------------------------------------------------------------------------------------------


class English:
    """The base language: SVO order, English number words."""

    def number(self, n: int) -> str:
        return english_number(n)

    def obj(self, o: int, n: int | None = None) -> str:
        return _OBJECTS[o][0] if n == 1 else _OBJECTS[o][1]

    def event(self, who: str, verb: str, n: int | str, o: int, *, digits: bool = False) -> str:
        """`Ann buys seven apples.`; with `digits`, `Ann buys 7 apples.`"""
        qty = str(n) if digits else self.number(int(n))
        return f"{who} {_VERBS[verb][0]} {qty} {self.obj(o, int(n))}."

    def pronoun(self, gender: str) -> str:
        return "She" if gender == "f" else "He"

    def q_how_many_now(self, who: str, o: int) -> str:
        return f"How many {self.obj(o)} does {who} have now?"

    def q_together(self, a: str, b: str, o: int) -> str:
        return f"How many {self.obj(o)} do {a} and {b} have together?"

    def q_more_than(self, a: str, b: str, o: int) -> str:
        return f"How many more {self.obj(o)} does {a} have than {b}?"

    def q_literal(self, who: str, verb: str, o: int) -> str:
        base = {"has": "have", "gives": "give away"}.get(verb, verb[:-1])
        return f"How many {self.obj(o)} does {who} {base}?"

    def i_digits(self, words: str) -> str:
        return f"Write with digits: {words}"

    def i_list(self, who: str, items: list[tuple[int, int]]) -> str:
        goods = ", ".join(f"{self.number(n)} {self.obj(o, n)}" for o, n in items)
        return f"Write the shopping list. {who} buys {goods}."

    def a_list(self, items: list[tuple[int, int]], *, digits: bool = True) -> str:
        return ", ".join(f"{self.obj(o)} {n if digits else self.number(n)}" for o, n in items)

    def s_day(self, place: str, n: int | str, *, digits: bool = False) -> str:
        qty = str(n) if digits else self.number(int(n))
        return f"The {place} opens on day {qty}."

    def q_day(self, place: str) -> str:
        return f"On which day does the {place} open?"

    def s_goes(self, who: str, place: str) -> str:
        return f"{who} goes to the {place}."

    def q_where(self, who: str) -> str:
        return f"Where does {who} go?"

    def s_color(self, o: int, color: str) -> str:
        return f"The {self.obj(o, 1)} is {color}."

    def q_color(self, o: int) -> str:
        return f"What color is the {self.obj(o, 1)}?"


class Foreign:
    """The foreign language: a seeded lexicon, verb-final order, units-before-tens numbers."""

    def __init__(self, rng: random.Random) -> None:
        words = _make_lexicon(rng, 10 + 8 + 2 + len(_OBJECTS) + len(_VERBS) + len(_PLACES)
                              + len(_COLORS) + len(_FUNCTION_WORDS))
        take = iter(words)
        self.units = [next(take) for _ in range(10)]
        self.tens = ["", "", *(next(take) for _ in range(8))]  # 20..90
        self.ten = next(take)  # 10; 11..19 are "<unit> <ten>"
        self.zero = next(take)
        self.units[0] = self.zero
        self.objects = [next(take) for _ in _OBJECTS]
        self.verbs = {v: next(take) for v in _VERBS}
        self.places = {p: next(take) for p in _PLACES}
        self.colors = {c: next(take) for c in _COLORS}
        self.fw = {w: next(take) for w in _FUNCTION_WORDS}

    def number(self, n: int) -> str:
        if not 0 <= n <= MAX_NUMBER:
            raise ValueError(f"number out of range 0..{MAX_NUMBER}: {n}")
        if n < 10:
            return self.units[n]
        tens, units = divmod(n, 10)
        tens_word = self.ten if tens == 1 else self.tens[tens]
        return tens_word if units == 0 else f"{self.units[units]} {self.fw['and']} {tens_word}"

    def obj(self, o: int, n: int | None = None) -> str:
        return self.objects[o]  # no plural

    def event(self, who: str, verb: str, n: int | str, o: int, *, digits: bool = False) -> str:
        qty = str(n) if digits else self.number(int(n))
        return f"{who} {self.obj(o)} {qty} {self.verbs[verb]}."

    def pronoun(self, gender: str) -> str:
        return self.fw["he_she"].capitalize()

    def q_how_many_now(self, who: str, o: int) -> str:
        return f"{who} {self.obj(o)} {self.fw['how_many']} {self.fw['now']} {self.verbs['has']}?"

    def q_together(self, a: str, b: str, o: int) -> str:
        return (f"{a} {self.fw['and']} {b} {self.obj(o)} {self.fw['how_many']} "
                f"{self.fw['together']} {self.verbs['has']}?")

    def q_more_than(self, a: str, b: str, o: int) -> str:
        return f"{a} {b} {self.fw['more_than']} {self.obj(o)} {self.fw['how_many']} {self.verbs['has']}?"

    def q_literal(self, who: str, verb: str, o: int) -> str:
        return f"{who} {self.obj(o)} {self.fw['how_many']} {self.verbs[verb]}?"

    def i_digits(self, words: str) -> str:
        return f"{self.fw['write'].capitalize()} {self.fw['digits']}: {words}"

    def i_list(self, who: str, items: list[tuple[int, int]]) -> str:
        goods = ", ".join(f"{self.obj(o)} {self.number(n)}" for o, n in items)
        return f"{self.fw['the_list'].capitalize()} {self.fw['write']}. {who} {goods} {self.verbs['buys']}."

    def a_list(self, items: list[tuple[int, int]], *, digits: bool = True) -> str:
        return ", ".join(f"{self.obj(o)} {n if digits else self.number(n)}" for o, n in items)

    def s_day(self, place: str, n: int | str, *, digits: bool = False) -> str:
        qty = str(n) if digits else self.number(int(n))
        return f"{self.places[place].capitalize()} {self.fw['day']} {qty} {self.fw['on']} {self.fw['opens']}."

    def q_day(self, place: str) -> str:
        return f"{self.places[place].capitalize()} {self.fw['which_day']} {self.fw['opens']}?"

    def s_goes(self, who: str, place: str) -> str:
        return f"{who} {self.places[place]} {self.fw['goes_to']}."

    def q_where(self, who: str) -> str:
        return f"{who} {self.fw['where']} {self.fw['goes_to']}?"

    def s_color(self, o: int, color: str) -> str:
        return f"{self.obj(o).capitalize()} {self.colors[color]} {self.fw['is']}."

    def q_color(self, o: int) -> str:
        return f"{self.obj(o).capitalize()} {self.fw['color']} {self.fw['is']}?"


def _make_lexicon(rng: random.Random, n: int) -> list[str]:
    """`n` distinct pronounceable words of 2-3 CV(C) syllables, none an English word we use."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "", "", "n", "r", "l"]
    taken = {w for o in _OBJECTS for w in o} | set(_PLACES) | set(_COLORS) | set(_EN_UNITS)
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.choice((2, 2, 3))))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


Lang = English | Foreign


# ---------------------------------------------------------------------------------------------
# Math word problems
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One word problem in language-neutral form.

    `facts` are (person, verb, quantity, object) events in story order; `kind` is "change"
    (one person's count changes by 1-2 events), "together" or "more_than" (two people).
    """

    kind: str
    facts: tuple[tuple[str, str, int, int], ...]
    obj: int
    people: tuple[str, ...]
    answer: int

    def equations(self) -> list[str]:
        q = [f[2] for f in self.facts]
        if self.kind == "together":
            return [f"{q[0]} + {q[1]} = {self.answer}"]
        if self.kind == "more_than":
            return [f"{q[0]} - {q[1]} = {self.answer}"]
        eqs, total = [], q[0]
        for _, verb, n, _ in self.facts[1:]:
            sign = _VERBS[verb][1]
            new = total + sign * n
            eqs.append(f"{total} {'+' if sign > 0 else '-'} {n} = {new}")
            total = new
        return eqs


def _sample_problem(rng: random.Random, max_operand: int) -> Problem:
    o = rng.randrange(len(_OBJECTS))
    (a, ga), (b, _) = rng.sample(_NAMES, 2)
    kind = rng.choices(["change", "together", "more_than"], weights=[3, 1, 1])[0]
    if kind == "together":
        x, y = rng.randint(1, max_operand), rng.randint(1, max_operand)
        return Problem(kind, ((a, "has", x, o), (b, "has", y, o)), o, (a, b), x + y)
    if kind == "more_than":
        x, y = sorted(rng.sample(range(1, max_operand + 1), 2), reverse=True)
        return Problem(kind, ((a, "has", x, o), (b, "has", y, o)), o, (a, b), x - y)
    while True:
        total = rng.randint(2, max_operand)
        facts = [(a, "has", total, o)]
        ok = True
        for _ in range(rng.choice((1, 2))):
            verb = rng.choice(_CHANGE_VERBS)
            sign = _VERBS[verb][1]
            n = rng.randint(1, max_operand if sign > 0 else max(1, total - 1))
            total += sign * n
            ok &= 0 <= total <= MAX_NUMBER and n <= max_operand
            facts.append((a, verb, n, o))
        if ok:
            return Problem(kind, tuple(facts), o, (a,), total)


def _gender(name: str) -> str:
    return dict(_NAMES)[name]


def problem_question(p: Problem, lang: Lang, *, digits: bool = False) -> str:
    """The question text; numbers as words unless `digits`."""
    sents, prev = [], None
    for who, verb, n, o in p.facts:
        subj = lang.pronoun(_gender(who)) if who == prev else who
        sents.append(lang.event(subj, verb, n, o, digits=digits))
        prev = who
    if p.kind == "together":
        sents.append(lang.q_together(p.people[0], p.people[1], p.obj))
    elif p.kind == "more_than":
        sents.append(lang.q_more_than(p.people[0], p.people[1], p.obj))
    else:
        sents.append(lang.q_how_many_now(p.people[0], p.obj))
    return " ".join(sents)


def problem_response(p: Problem, lang: Lang) -> str:
    """Step-by-step answer: the facts restated with digits, the equations, the answer marker."""
    sents, prev = [], None
    for who, verb, n, o in p.facts:
        subj = lang.pronoun(_gender(who)) if who == prev else who
        sents.append(lang.event(subj, verb, n, o, digits=True))
        prev = who
    sents += [e + "." for e in p.equations()]
    return " ".join(sents) + f" {ANSWER_MARKER} {p.answer}"


# ---------------------------------------------------------------------------------------------
# General (non-math) instructions
# ---------------------------------------------------------------------------------------------


def _general_example(rng: random.Random, lang: Lang, max_number: int, *,
                     digits: bool = True) -> tuple[str, str]:
    """One general instruction in `lang`: no arithmetic, but numbers paired with their values.

    With `digits=False` every answer keeps the number words of the question, so the example
    teaches reading and copying but not what the number words mean.
    """
    kind = rng.choices(["literal", "list", "day", "digits", "where", "color"],
                       weights=[4, 2, 2, 2 if digits else 0, 1, 1])[0]
    if kind == "literal":  # a short story, then a question whose answer is read off the text
        people = rng.sample(_NAMES, rng.choice((1, 2)))
        facts = []
        for who, _ in people:
            for verb in rng.sample(list(_VERBS), rng.choice((1, 2))):
                facts.append((who, verb, rng.randint(1, max_number), rng.randrange(len(_OBJECTS))))
        rng.shuffle(facts)
        who, verb, n, o = rng.choice(facts)
        story = " ".join(lang.event(*f) for f in facts)
        return f"{story} {lang.q_literal(who, verb, o)}", lang.event(who, verb, n, o, digits=digits)
    if kind == "list":
        objs = rng.sample(range(len(_OBJECTS)), rng.choice((2, 3)))
        items = [(o, rng.randint(1, max_number)) for o in objs]
        return lang.i_list(rng.choice(_NAMES)[0], items), lang.a_list(items, digits=digits)
    if kind == "day":
        place, n = rng.choice(_PLACES), rng.randint(1, 31)
        other = rng.choice([p for p in _PLACES if p != place])
        story = f"{lang.s_day(place, n)} {lang.s_day(other, rng.randint(1, 31))}"
        return f"{story} {lang.q_day(place)}", lang.s_day(place, n, digits=digits)
    if kind == "digits":
        n = rng.randint(0, MAX_NUMBER)
        return lang.i_digits(lang.number(n)), str(n)
    if kind == "where":
        (a, _), (b, _) = rng.sample(_NAMES, 2)
        pa, pb = rng.sample(_PLACES, 2)
        return f"{lang.s_goes(a, pa)} {lang.s_goes(b, pb)} {lang.q_where(a)}", lang.s_goes(a, pa)
    o1, o2 = rng.sample(range(len(_OBJECTS)), 2)
    c1, c2 = rng.sample(_COLORS, 2)
    return f"{lang.s_color(o1, c1)} {lang.s_color(o2, c2)} {lang.q_color(o1)}", lang.s_color(o1, c1)


def _story(rng: random.Random, lang: Lang, max_number: int) -> str:
    """Plain narrative text (pretraining): events with number words, places, colours."""
    sents = []
    for _ in range(rng.randint(2, 5)):
        r = rng.random()
        who = rng.choice(_NAMES)[0]
        if r < 0.6:
            sents.append(lang.event(who, rng.choice(list(_VERBS)), rng.randint(1, max_number),
                                    rng.randrange(len(_OBJECTS))))
        elif r < 0.75:
            sents.append(lang.s_goes(who, rng.choice(_PLACES)))
        elif r < 0.9:
            sents.append(lang.s_day(rng.choice(_PLACES), rng.randint(1, 31)))
        else:
            sents.append(lang.s_color(rng.randrange(len(_OBJECTS)), rng.choice(_COLORS)))
    return " ".join(sents)


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the generated splits.

    Attributes:
        max_operand: largest number in a word problem (answers stay in 0..99).
        n_pretrain_base_stories / _general / _facts / _math: base-language pretraining documents
            (stories; instructions as plain text; arithmetic facts, one line per group of
            equations; word problems with step-by-step answers, as in task_train).
        n_pretrain_foreign_stories: foreign stories (number words never paired with digits).
        n_pretrain_foreign_general: foreign instructions whose answers keep number words
            (teaches the base to read and copy foreign text, not what the numbers mean).
        n_pretrain_foreign_math: foreign word problems with digits in the question and the
            step-by-step answer (lesson a: the task LoRA transfers only if the base has seen a
            little foreign math); their number words appear nowhere but in language_train.
        n_language / n_task: LoRA training examples.
        n_gate_train / n_gate_dev / n_test: foreign math splits, all disjoint.
    """

    max_operand: int = 12
    n_pretrain_base_stories: int = 1500
    n_pretrain_base_general: int = 3000
    n_pretrain_base_facts: int = 2000
    n_pretrain_base_math: int = 4000
    n_pretrain_foreign_stories: int = 1500
    n_pretrain_foreign_general: int = 2000
    n_pretrain_foreign_math: int = 800
    n_language: int = 2000
    n_task: int = 2000
    n_gate_train: int = 200
    n_gate_dev: int = 50
    n_test: int = 250

    def __post_init__(self) -> None:
        if not 2 <= self.max_operand <= MAX_NUMBER:
            raise ValueError(f"max_operand must be in 2..{MAX_NUMBER}, got {self.max_operand}")
        for name, value in vars(self).items():
            if name.startswith("n_") and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass
class World:
    """All generated data of one seed. Rows are already in the on-disk formats."""

    seed: int
    config: WorldConfig
    pretrain: list[str] = field(repr=False)
    language_train: list[dict] = field(repr=False)
    task_train: list[dict] = field(repr=False)
    gate_train: list[dict] = field(repr=False)
    gate_dev: list[dict] = field(repr=False)
    test: list[dict] = field(repr=False)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write every split under `out_dir`; return {split name: path}.

        Files: `pretrain.jsonl` ({"text"}), `language_train.jsonl` and `task_train.jsonl`
        ({"prompt", "completion"}), `gate_train.jsonl` ({"query", "response"}, official math
        style), `gate_dev.jsonl` and `test.jsonl` ({"question", "answer"}, MGSM style, the
        answer an integer string).
        """
        out_dir = Path(out_dir)
        splits = {
            "pretrain": [{"text": t} for t in self.pretrain],
            "language_train": self.language_train,
            "task_train": self.task_train,
            "gate_train": self.gate_train,
            "gate_dev": self.gate_dev,
            "test": self.test,
        }
        paths = {}
        for name, rows in splits.items():
            paths[name] = out_dir / f"{name}.jsonl"
            write_jsonl_atomic(paths[name], rows)
        return paths


def build_world(seed: int, config: WorldConfig | None = None) -> World:
    """Generate the bilingual world of `seed` (deterministic; pure Python).

    Foreign math splits (gate_train, gate_dev, test) hold distinct questions, none of which
    appears (with digits or words) in pretraining.
    """
    cfg = config or WorldConfig()
    rng = random.Random(seed)
    en, fo = English(), Foreign(random.Random(f"lexicon-{seed}"))
    mx = cfg.max_operand

    # Held-out foreign math first, so nothing else can contain these problems.
    held: list[Problem] = []
    seen: set[tuple] = set()
    n_held = cfg.n_gate_train + cfg.n_gate_dev + cfg.n_test
    while len(held) < n_held:
        p = _sample_problem(rng, mx)
        key = (p.kind, p.facts)
        if key not in seen:
            seen.add(key)
            held.append(p)

    def fresh_problem() -> Problem:
        while True:
            p = _sample_problem(rng, mx)
            if (p.kind, p.facts) not in seen:
                return p

    gate_train = [{"query": problem_question(p, fo), "response": problem_response(p, fo)}
                  for p in held[:cfg.n_gate_train]]
    gate_dev = [{"question": problem_question(p, fo), "answer": str(p.answer)}
                for p in held[cfg.n_gate_train:cfg.n_gate_train + cfg.n_gate_dev]]
    test = [{"question": problem_question(p, fo), "answer": str(p.answer)}
            for p in held[cfg.n_gate_train + cfg.n_gate_dev:]]

    task_train = []
    for _ in range(cfg.n_task):
        p = fresh_problem()
        task_train.append({"prompt": problem_question(p, en), "completion": problem_response(p, en)})

    language_train = []
    for _ in range(cfg.n_language):
        prompt, completion = _general_example(rng, fo, mx)
        language_train.append({"prompt": prompt, "completion": completion})

    pretrain: list[str] = []
    pretrain += [_story(rng, en, mx) for _ in range(cfg.n_pretrain_base_stories)]
    pretrain += ["\n".join(_general_example(rng, en, mx)) for _ in range(cfg.n_pretrain_base_general)]
    for _ in range(cfg.n_pretrain_base_facts):  # the sums and differences problems need
        eqs = []
        for _ in range(rng.randint(3, 8)):
            a, b = rng.randint(0, 3 * mx), rng.randint(0, mx)
            if rng.random() < 0.5:
                eqs.append(f"{a} + {b} = {a + b}")
            else:
                a, b = max(a, b), min(a, b)
                eqs.append(f"{a} - {b} = {a - b}")
        pretrain.append(". ".join(eqs) + ".")
    for _ in range(cfg.n_pretrain_base_math):
        p = fresh_problem()
        pretrain.append(f"{problem_question(p, en)}\n{problem_response(p, en)}")
    pretrain += [_story(rng, fo, mx) for _ in range(cfg.n_pretrain_foreign_stories)]
    pretrain += ["\n".join(_general_example(rng, fo, mx, digits=False))
                 for _ in range(cfg.n_pretrain_foreign_general)]
    for _ in range(cfg.n_pretrain_foreign_math):
        p = fresh_problem()
        pretrain.append(f"{problem_question(p, fo, digits=True)}\n{problem_response(p, fo)}")
    rng.shuffle(pretrain)

    return World(seed, cfg, pretrain, language_train, task_train, gate_train, gate_dev, test)
