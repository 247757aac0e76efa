"""The demo's synthetic world: three scripts, math and code, deterministic, disjoint splits, skills split as
designed, and code problems that the real scorer runs."""

from __future__ import annotations

import re
import unicodedata

import pytest

from loraflow.demo.world import (
    LANGUAGE_CODES, WorldConfig, build_world, foreign_language, foreign_languages,
)
from loraflow.evaluation.scoring import official_gold_answer, official_output_answer, score_predictions

SMALL = WorldConfig(n_pretrain_base_stories=200, n_pretrain_base_general=200, n_pretrain_facts=100,
                    n_pretrain_foreign_stories=100, n_pretrain_foreign_general=100, n_pretrain_foreign_math=30,
                    n_language=300, n_task=300, n_test_math=100, n_test_code=60)
CELLS = [(lang, task) for lang in ("han", "cyr", "lat") for task in ("math", "code")]


@pytest.fixture(scope="module")
def world():
    return build_world(0, SMALL)


def _script_of(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return "han" if name.startswith("CJK UNIFIED IDEOGRAPH") else "cyr" if "CYRILLIC" in name else \
        "lat" if "LATIN" in name else "other"


def test_three_languages_in_three_scripts():
    assert LANGUAGE_CODES == ("han", "cyr", "lat")
    langs = foreign_languages(0)
    for code, lang in langs.items():
        words = list(lang.lexicon.values())
        assert len(set(words)) == len(words)  # every English word has its own foreign word
        assert {_script_of(ch) for w in words for ch in w} == {code}, code
    # the ideographic one writes no spaces between words; the other two do
    sentence = ("Ann", "has", "three", "apples")
    assert langs["han"].say(*sentence) == "Ann" + "".join(langs["han"].w(w) for w in sentence[1:]) + "。"
    assert langs["cyr"].say(*sentence).count(" ") == 3 and langs["lat"].ask(*sentence).startswith("¿")
    assert foreign_language(0, "cyr").lexicon != foreign_language(1, "cyr").lexicon
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        foreign_language(0, "xx")


def test_world_is_deterministic_and_seeded(world):
    again, other = build_world(0, SMALL), build_world(1, SMALL)
    assert again.pretrain == world.pretrain and again.language_train == world.language_train
    assert all(again.cells[c].test == world.cells[c].test for c in CELLS)
    assert all(other.cells[c].test != world.cells[c].test for c in CELLS)


def test_split_sizes_and_held_out_problems_appear_nowhere_else(world):
    assert sorted(world.cells) == sorted(CELLS)
    training = "\n".join(world.pretrain + [r["prompt"] + r["completion"] for rows in
                                           [*world.language_train.values(), *world.task_train.values()] for r in rows])
    for (lang, task), cell in world.cells.items():
        assert (len(cell.gate_train), len(cell.gate_dev)) == (200, 50)
        assert len(cell.test) == (100 if task == "math" else 60)
        if task == "math":
            test_q = {r["question"] for r in cell.test}
            few_shot = {r["query"] for r in cell.gate_train} | {r["question"] for r in cell.gate_dev}
        else:  # a code problem is its description: the docstring
            test_q = {r["prompt"].split('"""')[1] for r in cell.test}
            few_shot = {r["data"][0].split('"""')[1] for r in cell.gate_train} | \
                {r["text"].split('"""')[1] for r in cell.gate_dev}
        assert len(test_q) == len(cell.test) and not test_q & few_shot, (lang, task)
        assert not any(q in training for q in test_q), (lang, task)
        if task == "code":  # nor does a held-out function's code (the base model sees functions of other problems)
            assert "def " in training and not any(r["canonical_solution"] in training for r in cell.test), lang


def test_math_answers_follow_the_official_format(world):
    for lang in ("han", "cyr", "lat"):
        cell = world.cells[(lang, "math")]
        for row in cell.gate_train:
            gold = row["response"].rsplit(" ", 1)[-1]
            assert row["response"].endswith(f"The answer is: {gold}")
            assert official_output_answer(row["response"]) == official_gold_answer(gold)
        assert all(r["answer"].isdigit() and not re.search(r"\d", r["question"]) for r in cell.test)


def test_foreign_words_meet_their_meaning_only_in_language_data(world):
    """Number words next to digits, and the code words next to their meaning, only in each language's LoRA data,
    which holds no arithmetic and no code."""
    for code, lang in foreign_languages(0).items():
        numbers = [lang.number(n) for n in range(10)]

        def pairs(text: str) -> bool:
            return any(f"{w}: " in text for w in numbers) or any(f"{lang.w(w)}: {m}" in text
                                                                   for w, m in (("sum", "sum"), ("plus", "+")))

        assert not any(pairs(t) for t in world.pretrain), code
        assert not any(pairs(r["prompt"] + r["completion"]) for rows in world.task_train.values() for r in rows)
        language = world.language_train[code]
        assert sum(pairs(r["prompt"] + " " + r["completion"]) for r in language) > 100, code
        # glosses such as `plus: +` are words' meanings; equations and code never appear
        assert not any(re.search(r"=|\d ?[-+*] ?\d|def |return |\(", r["completion"]) for r in language), code


def test_code_answers_read_out_the_words_then_write_the_function(world):
    """The read-out, then the whole function in the fenced block that the official post-processing keeps."""
    from loraflow.evaluation.scoring import postprocess_code

    en_code = world.task_train["code"][0]
    assert en_code["completion"].startswith("So ") and "\n```python\ndef " in en_code["completion"]
    for lang in ("han", "cyr", "lat"):
        row = world.cells[(lang, "code")].gate_train[0]
        prompt, response = row["data"]
        readout, function = response.split("\n", 1)
        signature = prompt.split("\n", 1)[0]
        assert re.fullmatch(r"\S+ .+?: [\w+*-]+(, .+?: [\w+*-]+)+\.", readout), readout
        assert postprocess_code(response) == function.removeprefix("```python\n").removesuffix("\n```")
        assert postprocess_code(response).startswith(signature + "\n    return ")


def test_code_problems_run_through_the_real_scorer(world):
    """Whole functions with the canonical body pass; the same with a constant off by one fail."""
    rows = [r for lang in ("han", "cyr", "lat") for r in world.cells[(lang, "code")].test[:8]]
    right = ["So ...\n```python\n" + r["prompt"].split("\n", 1)[0] + "\n" + r["canonical_solution"] + "```"
             for r in rows]
    wrong = [re.sub(r"(\d+)\n```$", lambda m: f"{int(m.group(1)) + 1}\n```", out) for out in right]
    assert all(a != b for a, b in zip(right, wrong))
    passed = score_predictions("code", rows, right, workers=2)
    assert passed["status_counts"]["passed"] == len(rows), passed["examples"]
    failed = score_predictions("code", rows, wrong, workers=2)
    assert failed["status_counts"]["failed"] == len(rows), failed["examples"]


def test_the_tokenizer_round_trips_every_script(world, tmp_path):
    from transformers import AutoTokenizer

    from loraflow.demo.base import train_tokenizer

    train_tokenizer(world.pretrain, 1024, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    samples = [world.cells[(lang, task)].test[0]["question" if task == "math" else "prompt"] for lang, task in CELLS]
    samples += [world.task_train["math"][0]["prompt"], world.cells[("han", "code")].gate_train[0]["data"][1]]
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
    # each script has tokens of its own, not only bytes: a Han number word takes fewer tokens than its UTF-8 bytes
    han = foreign_language(0, "han")
    word = han.number(3)
    assert len(tok(word, add_special_tokens=False)["input_ids"]) < len(word.encode("utf-8"))


def test_written_files_load_with_loraflow_data(world, tmp_path):
    from loraflow.data.formats import detect_format, load_examples
    from loraflow.common.io import read_jsonl

    paths = world.write(tmp_path)
    assert len(load_examples(paths["lang_han"])) == 300
    for lang, task in CELLS:
        assert len(load_examples(paths[f"{lang}_{task}_train"])) == 200
        dev = read_jsonl(paths[f"{lang}_{task}_dev"])
        assert detect_format(dev[0]) == ("math_dev" if task == "math" else "mbpp")
        assert paths[f"{lang}_{task}_test"] == tmp_path / "test" / f"{lang}_{task}_test.jsonl"
    dev = load_examples(paths["han_math_dev"])
    assert len(dev) == 50 and all(e.answer and e.response.endswith(e.answer) for e in dev)


def test_number_readout_carries_the_sign_the_equation_needs(world):
    rows = world.task_train["math"] + [{"completion": r["response"]} for lang in ("han", "cyr", "lat")
                                       for r in world.cells[(lang, "math")].gate_train]
    for row in rows:
        m = re.match(r"\S+ \S+: (\d), \S+: (-?\d)\. (\d) ([+-]) (\d) = (\d+)\.", row["completion"])
        assert m, row["completion"]
        x, y = int(m.group(1)), int(m.group(2))
        assert (m.group(4) == "-") == (y < 0) and int(m.group(6)) == x + y
