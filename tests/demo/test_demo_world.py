"""The demo's synthetic world: deterministic, disjoint splits, skills split as designed."""

from __future__ import annotations

import re

from loraflow.demo.world import NUMBER_WORDS, WorldConfig, build_world, foreign_language
from loraflow.evaluation.scoring import official_gold_answer, official_output_answer

SMALL = WorldConfig(n_pretrain_base_stories=200, n_pretrain_base_general=200, n_pretrain_facts=100,
                    n_pretrain_foreign_stories=200, n_pretrain_foreign_math=50, n_language=300, n_task=300)


def test_world_is_deterministic_and_seeded():
    a, b, c = build_world(0, SMALL), build_world(0, SMALL), build_world(1, SMALL)
    assert a.test == b.test and a.pretrain == b.pretrain and a.language_train == b.language_train
    assert a.test != c.test
    assert foreign_language(0).lexicon != foreign_language(1).lexicon


def test_split_sizes_and_disjoint_held_out_problems():
    w = build_world(0, SMALL)
    assert (len(w.gate_train), len(w.gate_dev), len(w.test)) == (200, 50, 250)
    test_q = {r["question"] for r in w.test}
    assert len(test_q) == 250
    assert not test_q & {r["query"] for r in w.gate_train}
    assert not test_q & {r["question"] for r in w.gate_dev}
    assert all(r["answer"].endswith("The answer is: " + r["answer"].rsplit(" ", 1)[-1]) for r in w.gate_dev)
    corpus = "\n".join(w.pretrain + [r["prompt"] for r in w.task_train + w.language_train])
    assert not any(q in corpus for q in test_q)


def test_gate_answers_follow_the_official_format():
    w = build_world(0, SMALL)
    for row in w.gate_train:
        gold = row["response"].rsplit(" ", 1)[-1]
        assert row["response"].endswith(f"The answer is: {gold}")
        assert official_output_answer(row["response"]) == official_gold_answer(gold)
    assert all(r["answer"].isdigit() for r in w.test)


def test_foreign_number_words_meet_digits_only_in_language_data():
    w = build_world(0, SMALL)
    lex = foreign_language(0).lexicon
    fo_numbers = {lex[x] for x in NUMBER_WORDS}
    word = re.compile(r"[a-z]+")

    def pairs_numbers_with_digits(text: str) -> bool:
        return bool(fo_numbers & set(word.findall(text))) and bool(re.search(r"\d", text))

    assert not any(pairs_numbers_with_digits(t) for t in w.pretrain)
    assert not any(pairs_numbers_with_digits(r["prompt"] + r["completion"]) for r in w.task_train)
    assert sum(pairs_numbers_with_digits(r["prompt"] + " " + r["completion"]) for r in w.language_train) > 100
    # and the language LoRA's data holds no arithmetic
    assert not any("=" in r["completion"] or "+" in r["completion"] for r in w.language_train)
    # the test questions are written with number words only
    assert not any(re.search(r"\d", r["question"]) for r in w.test)


def test_written_files_load_with_loraflow_data(tmp_path):
    from loraflow.data.formats import load_examples

    paths = build_world(0, SMALL).write(tmp_path)
    assert len(load_examples(paths["gate_train"])) == 200
    assert len(load_examples(paths["language_train"])) == 300
    dev = load_examples(paths["gate_dev"])
    assert len(dev) == 50 and all(e.answer and e.response.endswith(e.answer) for e in dev)


def test_number_readout_carries_the_sign_the_equation_needs():
    w = build_world(0, SMALL)
    for row in w.task_train + [{"completion": r["response"]} for r in w.gate_train]:
        m = re.match(r"\w+ \w+: (\d), \w+: (-?\d)\. (\d) ([+-]) (\d) = (\d+)\.", row["completion"])
        assert m, row["completion"]
        x, y = int(m.group(1)), int(m.group(2))
        assert (m.group(4) == "-") == (y < 0) and int(m.group(6)) == x + y
    # the language LoRA also reads out the numbers of foreign word problems, without solving them
    questions = [r for r in w.language_train if r["prompt"].endswith("?") and ":" in r["completion"]]
    assert any("-" in r["completion"] for r in questions) and not any("=" in r["completion"] for r in questions)
