"""Scoring: official/strict math extraction, prompts, code post-processing, assembly, `loraflow score`.

Expected values come from the reference's description of the authors' protocol, written out by
hand; none is computed with the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from loraflow.cli import main
from loraflow.common.errors import LoraFlowError
from loraflow.data.protocol import (
    CODE_INSTRUCTIONS,
    MATH_STOP_STRINGS,
    OFFICIAL_SYSTEM_PROMPTS,
    build_code_prompt,
    build_math_prompt,
    truncate_at_stop,
)
from loraflow.evaluation.scoring import (
    assemble_program,
    humaneval_english_prompts,
    official_gold_answer,
    official_output_answer,
    parse_number,
    postprocess_code,
    score_file,
    score_math_example,
    score_predictions,
    strict_answer,
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------ official output extraction

@pytest.mark.parametrize(
    "text, expected",
    [
        # (1) "The answer is: " -> first match, commas removed, then non-digits deleted
        ("珍妮特每天剩下 9 个鸡蛋，9 * 2 = 18。\nThe answer is: 18", "18"),
        ("Она зарабатывает 18 долларов.\nThe answer is: 1,250", "1250"),
        ("Gana 5 dólares. The answer is: 5\nLuego... The answer is: 7", "5"),
        ("#### 3\nThe answer is: 4", "4"),  # (1) wins over (2) wherever it is
        # (2) "#### " when (1) does not match (a "$" after "The answer is: " defeats (1))
        ("Итого 16 - 3 - 4 = 9 яиц.\n#### 1,234", "1234"),
        ("The answer is: $18\n#### 18", "18"),
        ("La respuesta: #### -20", "20"),
        ("所以她每天赚 18 美元。\n#### 18", "18"),
        # (3) first word after the last ">>" (GSM8K calculator annotations), beats (4)
        ("她卖掉 <<16-3-4=9>>9 个蛋，赚 <<9*2=18>>18 美元。", "18"),
        ("Продает <<16-3-4=9>>9 яиц по 2 $: <<9*2=18>>$18.", "18"),
        ("Vende <<16-3-4=9>>9 huevos = 9 y gana <<9*2=18>>18 dólares = 100", "18"),
        # ">>" with no word after it falls through to (4): after the last "=", "18>>" -> "18"
        ("Gana <<9*2=18>>", "18"),
        # (4) first word after the last "=", "$" stripped, commas removed, final "."
        ("16 - 3 - 4 = 9, 9 * 2 = $1,250.", "1250"),
        ("Всего: 9 * 2 = 18 долларов в день.", "18"),
        ("每天赚的钱 = 18元", "18"),  # "18元" -> non-digits deleted
        ("Gana 9 * 2 = 18 dólares.", "18"),
        ("x = ", ""),  # "=" with nothing after it: falls to (5), first word "x" -> ""
        # (5) last word that is all digits, returned as is
        ("Она продала 9 яиц и заработала 18 долларов", "18"),
        ("Vendió 9 huevos y ganó 18 dólares en total", "18"),
        ("答案 18 元", "18"),
        # (5) quirk: no all-digit word -> the loop leaves the FIRST word, then non-digits deleted
        ("The total is 18.", ""),
        ("La respuesta es 3,5 dólares", ""),
        ("Итого: восемнадцать долларов.", ""),
        ("Ответ:18. Она заработала 18$", "18"),  # first word "Ответ:18." happens to give the answer
        ("每天剩下9个鸡蛋，她赚了18美元。", "918"),
        ("18元。她每天赚18美元。", "1818"),
        ("Ответ: 70 000 рублей.", "000"),  # "000" is the last all-digit word
        ("", ""),
        # sign and decimal point are lost after (1)-(4)
        ("The answer is: -3.5", "35"),
        ("#### -0.25", "025"),
        ("y = -7", "7"),
        ("温度下降了 3.5 度。The answer is: -3.5", "35"),
        ("Разница: 2 - 5 = -3", "3"),
        ("La diferencia es #### -1.5", "15"),
    ],
)
def test_official_output_extraction(text, expected):
    assert official_output_answer(text) == expected


@pytest.mark.parametrize(
    "gold, expected",
    [
        ("18", "18"),
        ("70000", "70000"),
        ("2,125", "2,125"),  # keeps its comma (no digit filter): can never match an output
        ("114,200", "114,200"),
        ("-3", "-3"),  # no all-digit word: first word, kept as is
        ("The answer is: 5", "5"),  # no step (1) for golds: (5) finds the digit word "5"
        ("#### 1,234", "1234"),  # (2) still removes commas
        ("x = $7.", "7"),  # (4)
    ],
)
def test_official_gold_extraction(gold, expected):
    assert official_gold_answer(gold) == expected


def test_official_vs_strict_differences():
    # sign loss: official accepts -3 for gold 3, strict does not
    assert score_math_example("The answer is: -3", "3", "official")["correct"] is True
    assert score_math_example("The answer is: -3", "3", "strict")["correct"] is False
    # decimal loss: 1.5 reads as 15 (0.5 reads as "05", which still differs from "5")
    assert score_math_example("The answer is: 0.5", "5", "official")["correct"] is False
    assert score_math_example("The answer is: 1.5", "15", "official")["correct"] is True
    assert score_math_example("The answer is: 1.5", "15", "strict")["correct"] is False
    # thousands-separated gold: never matches officially, matches strictly
    for out in ("The answer is: 2,125", "#### 2125", "= 2125", "ответ 2125"):
        assert score_math_example(out, "2,125", "official")["correct"] is False
        assert score_math_example(out, "2,125", "strict")["correct"] is True
    # a trailing "." defeats official step (5) but not strict
    assert score_math_example("Итого она заработала 18.", "18", "official")["correct"] is False
    assert score_math_example("Итого она заработала 18.", "18", "strict")["correct"] is True
    # decimal comma (es/ru)
    assert score_math_example("La respuesta es 3,5 dólares", "3.5", "strict")["correct"] is True
    ex = score_math_example("The answer is: -3.50", "-3.5", "strict")
    assert ex == {"gold": "-3.5", "gold_answer": "-3.5", "answer": "-3.5", "correct": True}
    ex = score_math_example("The answer is: -3.50", "-3.5", "official")
    assert ex == {"gold": "-3.5", "gold_answer": "-3.5", "answer": "350", "correct": False}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is: -3.50", Fraction(-7, 2)),
        ("The answer is: $1,250.", Fraction(1250)),
        ("The answer is: **18**", Fraction(18)),
        ("The answer is: 5 ... The answer is: 7", Fraction(5)),  # first, like the official rule
        ("#### −4", Fraction(-4)),  # Unicode minus
        ("她每天赚 <<9*2=18>>18 美元", Fraction(18)),
        ("= 18元", Fraction(18)),
        ("= 18 рублей.", Fraction(18)),
        ("9 * 2 = $18.", Fraction(18)),
        ("所以她每天赚18美元。", Fraction(18)),  # (5): last number, no spaces needed
        ("每天剩下9个鸡蛋，她赚了１８美元。", Fraction(18)),  # full-width digits
        ("Ответ: 70 000 рублей.", Fraction(70000)),  # space as thousands separator
        ("Ответ: 70\u00a0000 рублей.", Fraction(70000)),  # no-break space
        ("Ganó 1.234.567,5 pesos", Fraction(2469135, 2)),
        ("Ganó 1.234,5 pesos", Fraction(2469, 2)),
        ("La mitad es 1/2", Fraction(1, 2)),
        ("Итого 3-5 яблок", Fraction(5)),  # a range is not a negative number
        ("no numbers here", None),
        ("= x + 3", None),  # (4) locates the word "x": no number there
    ],
)
def test_strict_extraction(text, expected):
    assert strict_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("2,125", 2125), ("-3.50", Fraction(-7, 2)), ("$18.", 18), ("18元", 18), ("18 рублей", 18),
     ("3,5", Fraction(7, 2)), ("1,5 кг", Fraction(3, 2)), ("-$3", -3), ("$-3", -3), ("abc", None)],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_math_extraction_on_the_official_gold_answers(shared_data):
    """A prediction that states each gold answer is right for all golds but the comma-separated ones."""
    comma_golds = {}
    for lang in ("zh", "ru", "es"):
        rows = _rows(shared_data / "test" / f"{lang}_math_test.jsonl")
        assert len(rows) == 250
        outputs = [f"The answer is: {r['answer']}" for r in rows]
        official = score_predictions("math", rows, outputs, mode="official")
        strict = score_predictions("math", rows, outputs, mode="strict")
        assert strict["correct"] == 250
        comma_golds[lang] = 250 - official["correct"]
        missed = [ex["gold"] for ex in official["examples"] if not ex["correct"]]
        assert all("," in g for g in missed)
    # the reference: four such items exist in the ru and es test files (none in zh)
    assert comma_golds == {"zh": 0, "ru": 4, "es": 4}


# ------------------------------------------------------------------ prompts and stop strings

def test_math_prompt_and_system_prompts(shared_data):
    official = json.loads((shared_data / "system_prompts.json").read_text(encoding="utf-8"))
    assert OFFICIAL_SYSTEM_PROMPTS == official
    for lang in ("zh", "ru", "es"):
        assert CODE_INSTRUCTIONS[lang] == official[f"{lang}_code"]


def test_math_prompt_format():
    q = "珍妮特的鸭子每天下 16 颗蛋。"
    system = OFFICIAL_SYSTEM_PROMPTS["zh_math"]
    assert build_math_prompt(q, "zh") == "[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + q + " [/INST]"
    assert build_math_prompt("2+2?", "es", system="S") == "[INST] <<SYS>>\nS\n<</SYS>>\n\n2+2? [/INST]"
    with pytest.raises(LoraFlowError, match="language"):
        build_math_prompt(q, "fr")


def test_code_prompt_format():
    prompt = "\n\ndef add(x, y):\n    \"\"\"Сложить\n        два числа\"\"\"\n"
    got = build_code_prompt(prompt, "ru")
    assert got == (
        "[INST]Создайте Python скрипт для этой задачи.:\n"
        "def add(x, y):\n\t\"\"\"Сложить\n\t\tдва числа\"\"\"\n\n[/INST]"
    )
    assert build_code_prompt("def f():\n    pass", "zh").startswith("[INST]为这个问题创建一个Python脚本:\ndef f():\n\tpass")
    assert build_code_prompt("x", "es") == "[INST]Crear un script de Python para este problema:\nx\n\n[/INST]"


def test_stop_strings_and_truncation():
    for word in ("Question", "USER", "ASSISTANT", "Instruction", "Response"):
        assert word in MATH_STOP_STRINGS and word + ":" in MATH_STOP_STRINGS
    assert "[INST]" in MATH_STOP_STRINGS
    assert truncate_at_stop("The answer is: 18\nQuestion: next one") == "The answer is: 18\n"
    assert truncate_at_stop("18 USER says [INST] hi") == "18 "
    assert truncate_at_stop("a Response b Question c") == "a "  # earliest wins, colon optional
    assert truncate_at_stop("Respuesta: 18") == "Respuesta: 18"  # case-sensitive, whole strings
    assert truncate_at_stop("no stop here") == "no stop here"
    # scoring cuts math outputs first: without the cut, step (4) would read the "= 99"
    rows = [{"question": "q", "answer": "18"}]
    out = ["9 * 2 = 18\nQuestion: and 99 * 1 = 99"]
    assert score_predictions("math", rows, out)["correct"] == 1
    assert score_predictions("math", rows, out, apply_stop_strings=False)["correct"] == 0


# ------------------------------------------------------------------ code post-processing

@pytest.mark.parametrize(
    "text, expected",
    [
        ("def f():\n\treturn 1", "def f():\n    return 1"),  # tabs -> 4 spaces
        ("def f():\r\n    return 1\r\n", "def f():\n    return 1"),  # \r dropped
        ("\n\n  def f(): pass  \n\n", "def f(): pass"),  # stripped
        # ```python: keep from the first, delete every ```python, cut at the next ```
        ("Here you go:\n```python\ndef f():\n    return 1\n```\nThis returns 1.", "def f():\n    return 1"),
        ("```python\na = 1\n```python\nb = 2\n```\nc = 3", "a = 1\n\nb = 2"),
        ("```\ndef f(): pass\n```", "```\ndef f(): pass\n```"),  # plain ``` fences are not touched
        # cut at the main guard, then at "# Example usage"
        ('def f():\n    return 1\n\nif __name__ == "__main__":\n    print(f())', "def f():\n    return 1"),
        ("def f():\n    return 1\n\n# Example usage\nprint(f())", "def f():\n    return 1"),
        ("```python\ndef f():\n    return 1\n# Example usage\nprint(f())\n```", "def f():\n    return 1"),
        # "The solution is:" keeps what follows, cut at "\n\nThe answer is:"
        ("Пояснение.\nThe solution is:\ndef f():\n    return 1\n\nThe answer is: f", "def f():\n    return 1"),
        # likewise "The answer is:"
        ("Explicación.\nThe answer is:\ndef f():\n    return 1", "def f():\n    return 1"),
        # strip after each cut: a bare indented body loses its first indentation
        ("    return x + y\n", "return x + y"),
        ("The solution is:\n    return x", "return x"),
    ],
)
def test_postprocess_code(text, expected):
    assert postprocess_code(text) == expected


# ------------------------------------------------------------------ program assembly and execution

def test_english_humaneval_prompts():
    prompts = humaneval_english_prompts()
    assert len(prompts) == 164
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in prompts["HumanEval/0"]
    assert "Check if in given list of numbers" in prompts["HumanEval/0"]


def test_assembly_uses_the_english_prompt(shared_data):
    row = next(r for r in _rows(shared_data / "test" / "ru_code_test.jsonl") if r["task_id"] == "HumanEval/5")
    english = humaneval_english_prompts()["HumanEval/5"]
    program = assemble_program(row, "def intersperse(numbers, delimeter):\n    return []")
    assert program.text == (
        english + "def intersperse(numbers, delimeter):\n    return []" + "\n" + row["test"] + "\n" + "check(intersperse)"
    )
    # the untrusted part runs apart from the tests, which see the prompt's helpers
    assert program.source == english + "def intersperse(numbers, delimeter):\n    return []"
    assert (program.test, program.entry_point, program.prelude) == (row["test"], "intersperse", english)
    assert row["prompt"] not in program.text  # the translated (Russian) code is not executed
    other = {"task_id": "MyBench/1", "prompt": "def g():\n", "test": "def check(c):\n    pass\n", "entry_point": "g"}
    assert assemble_program(other, "    return 1").text == "def g():\n    return 1\ndef check(c):\n    pass\n\ncheck(g)"


def _sample(shared_data, lang, step, offset=0):
    rows = _rows(shared_data / "test" / f"{lang}_code_test.jsonl")
    return rows[offset::step]


def test_canonical_solutions_pass_when_written_as_whole_english_functions(shared_data):
    """A model that writes the whole English function (prompt + canonical body) passes; 20 tasks, 3 languages."""
    english = humaneval_english_prompts()
    rows = _sample(shared_data, "zh", 24)[:7] + _sample(shared_data, "ru", 24, 5)[:7] + _sample(shared_data, "es", 27, 9)[:6]
    assert len(rows) == 20
    outputs = ["```python\n" + english[r["task_id"]] + r["canonical_solution"] + "```\nDone." for r in rows]
    result = score_predictions("code", rows, outputs, workers=2)
    assert [ex["status"] for ex in result["examples"]] == ["passed"] * 20, result["examples"]
    assert result["score"] == 1.0 and result["status_counts"]["passed"] == 20
    # the same functions returning None: every one fails, through the same tests
    wrong = ["```python\n" + english[r["task_id"]] + "    return None\n```" for r in rows]
    result = score_predictions("code", rows, wrong, workers=2)
    assert result["score"] == 0.0 and result["status_counts"]["failed"] == 20, result["status_counts"]


def test_bare_bodies_and_wrong_solutions_fail(shared_data):
    english = humaneval_english_prompts()
    rows = _sample(shared_data, "es", 40)[:5]
    # the canonical body alone: stripping moves its first line to column 0 -> never passes
    bare = score_predictions("code", rows, [r["canonical_solution"] for r in rows], workers=2)
    assert bare["correct"] == 0
    # whole English function with a wrong body
    wrong = [english[r["task_id"]] + "    return None\n" for r in rows]
    res = score_predictions("code", rows, wrong, workers=2)
    assert res["correct"] == 0
    assert {ex["status"] for ex in res["examples"]} == {"failed"}
    # the translated Russian prompt + canonical body is not valid Python for translated-code tasks
    ru = next(r for r in _rows(shared_data / "test" / "ru_code_test.jsonl") if r["task_id"] == "HumanEval/5")
    res = score_predictions("code", [ru], [ru["prompt"] + "\n" + ru["canonical_solution"]])
    assert res["examples"][0]["status"] in ("error", "failed")


def test_code_statuses_without_humaneval_ids():
    rows = [
        {"task_id": f"T/{i}", "prompt": 'def inc(x):\n    """Add one."""\n', "entry_point": "inc",
         "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
        for i in range(4)
    ]
    outputs = [
        "def inc(x):\n    return x + 1",  # whole function: passes
        "def inc(x):\n    return x",  # wrong
        "def inc(x)\n    return x + 1",  # syntax error
        "def inc(x):\n    while True:\n        pass",  # loops
    ]
    res = score_predictions("code", rows, outputs, workers=2, timeout=1.0)
    assert [ex["status"] for ex in res["examples"]] == ["passed", "failed", "error", "timeout"]
    assert res["correct"] == 1 and res["total"] == 4 and res["score"] == 0.25
    assert res["status_counts"] == {"passed": 1, "failed": 1, "timeout": 1, "error": 1}
    assert res["examples"][1]["detail"].startswith("AssertionError")


def test_score_predictions_errors():
    with pytest.raises(LoraFlowError, match="2 outputs for 1 test rows"):
        score_predictions("math", [{"answer": "1"}], ["a", "b"])
    with pytest.raises(LoraFlowError, match="unknown task"):
        score_predictions("poetry", [], [])
    with pytest.raises(LoraFlowError, match="unknown scoring mode"):
        score_predictions("math", [], [], mode="lenient")
    with pytest.raises(LoraFlowError, match="record 1 lacks"):
        score_predictions("code", [{"prompt": "x"}], ["y"])


# ------------------------------------------------------------------ CLI

def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_score_math(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "test.jsonl", [
        {"question": "q1", "answer": "18"}, {"question": "q2", "answer": "2,125"},
        {"question": "q3", "answer": "3"}, {"question": "q4", "answer": "70000"},
    ])
    pred = _write_jsonl(tmp_path / "pred.jsonl", [
        {"output": "9 * 2 = 18 долларов.\nThe answer is: 18"},
        {"output": "The answer is: 2,125"},
        {"output": "La respuesta es 3.0", "extra": 1},
        {"output": "总共 70000 美元\nQuestion: 下一题 = 5"},
    ])
    out = tmp_path / "res" / "RESULT.json"
    rc = main(["score", "--task", "math", "--data", str(data), "--predictions", str(pred), "--out", str(out),
               "--seed", "7", "--method", "loraflow", "--lang", "zh"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == "score: 2/4 = 50.0%"
    res = json.loads(out.read_text(encoding="utf-8"))
    assert (res["task"], res["mode"], res["correct"], res["total"], res["score"]) == ("math", "official", 2, 4, 0.5)
    assert [ex["correct"] for ex in res["examples"]] == [True, False, False, True]
    assert res["examples"][1] == {"index": 1, "gold": "2,125", "gold_answer": "2,125", "answer": "2125", "correct": False}
    assert res["config"]["data"] == str(data) and res["config"]["predictions"] == str(pred)
    assert res["config"]["seed"] == 7 and len(res["config"]["data_sha256"]) == 64
    assert (res["method"], res["lang"], res["seed"]) == ("loraflow", "zh", 7)
    assert main(["report", str(out)]) == 0  # `loraflow report` accepts what `loraflow score` writes
    assert "LoRA-Flow" in capsys.readouterr().out
    assert res["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert res["versions"]["loraflow"]

    rc = main(["score", "--task", "math", "--mode", "strict", "--data", str(data), "--predictions", str(pred),
               "--out", str(out)])
    assert rc == 0 and capsys.readouterr().out.strip() == "score: 4/4 = 100.0%"
    assert json.loads(out.read_text(encoding="utf-8"))["mode"] == "strict"


def test_cli_score_code(tmp_path, capsys):
    test = "def check(candidate):\n    assert candidate(2) == 4\n"
    stub = 'def sq(x):\n    """Square x."""\n'
    data = _write_jsonl(tmp_path / "code.jsonl", [
        {"task_id": "Mine/0", "prompt": stub, "entry_point": "sq", "test": test},
        {"task_id": "Mine/1", "prompt": stub, "entry_point": "sq", "test": test},
    ])
    pred = _write_jsonl(tmp_path / "pred.jsonl", [
        {"output": "```python\ndef sq(x):\n    return x * x\n```"},
        {"output": "def sq(x):\n    return x + x + 1"},
    ])
    out = tmp_path / "RESULT.json"
    rc = main(["score", "--task", "code", "--data", str(data), "--predictions", str(pred), "--out", str(out),
               "--workers", "2", "--timeout", "2"])
    assert rc == 0 and capsys.readouterr().out.strip() == "score: 1/2 = 50.0%"
    res = json.loads(out.read_text(encoding="utf-8"))
    assert [ex["status"] for ex in res["examples"]] == ["passed", "failed"]
    assert res["status_counts"]["passed"] == 1 and res["config"]["timeout"] == 2.0


def test_cli_count_mismatch_and_bad_rows(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "1"}] * 3)
    pred = _write_jsonl(tmp_path / "pred.jsonl", [{"output": "1"}] * 2)
    out = tmp_path / "RESULT.json"
    rc = main(["score", "--task", "math", "--data", str(data), "--predictions", str(pred), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loraflow score: error:")
    assert str(data) in err and str(pred) in err and " 2 " in err and " 3 " in err
    assert not out.exists()

    _write_jsonl(pred, [{"output": "1"}, {"text": "1"}, {"output": "1"}])
    assert main(["score", "--task", "math", "--data", str(data), "--predictions", str(pred), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "record 2" in err and "'output'" in err and err.count("\n") == 1


def test_cli_help_mentions_the_protocol(capsys):
    with pytest.raises(SystemExit) as e:
        main(["score", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--task", "--predictions", "official", "strict", "ENGLISH", "output"):
        assert word in text


def test_scoring_imports_no_torch():
    code = ("import sys, loraflow.evaluation.scoring, loraflow.evaluation.sandbox, loraflow.cli; "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------ hostile inputs (#9)

def test_huge_numbers_are_no_answer_instead_of_a_hang_or_a_crash():
    """10 MB of digits (once quadratic: > 10 min) and a 5,000-digit number (once over Python's int limit)."""
    flood = "7" * 10_000_000
    assert strict_answer(flood) is None
    assert score_math_example(flood, "7", mode="strict") == {"gold": "7", "gold_answer": "7", "answer": None,
                                                            "correct": False}
    assert score_math_example(flood, "7", mode="official")["correct"] is False
    long = "The answer is: " + "9" * 5000
    assert score_math_example(long, "9" * 5000, mode="strict")["correct"] is False
    assert score_math_example("The answer is: 12", "9" * 5000, mode="strict")["gold_answer"] is None
    assert strict_answer("x " + "1" * 100) == 10**100 // 9  # up to the cap, numbers still count
    assert score_math_example(flood, "7" * 10_000_000, mode="official")["correct"] is True  # strings compare


@pytest.mark.parametrize("options,needle", [
    ({"timeout": float("nan")}, "--timeout"), ({"timeout": float("inf")}, "--timeout"), ({"timeout": 0}, "--timeout"),
    ({"workers": 0}, "--workers"), ({"workers": -1}, "--workers"), ({"workers": 2.5}, "--workers"),
])
def test_score_file_refuses_bad_execution_options(tmp_path, options, needle):
    data = _write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "1"}])
    pred = _write_jsonl(tmp_path / "pred.jsonl", [{"output": "1"}])
    with pytest.raises(LoraFlowError, match=needle):
        score_file("math", data, pred, out_path=tmp_path / "r.json", **options)
    assert not (tmp_path / "r.json").exists()


def test_score_never_overwrites_its_inputs_and_reports_bad_encoding(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "1"}])
    pred = _write_jsonl(tmp_path / "pred.jsonl", [{"output": "1"}])
    before = data.read_bytes()
    for out in (data, pred):
        rc = main(["score", "--task", "math", "--data", str(data), "--predictions", str(pred), "--out", str(out)])
        assert rc == 2 and "input of this run" in capsys.readouterr().err
    assert data.read_bytes() == before
    rc = main(["score", "--task", "math", "--data", str(data), "--predictions", str(pred), "--out", str(tmp_path)])
    assert rc == 2 and "is a directory" in capsys.readouterr().err
    pred.write_bytes(b'{"output": "\xff"}\n')
    rc = main(["score", "--task", "math", "--data", str(data), "--predictions", str(pred), "--out",
               str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{pred}:1: not valid UTF-8" in err and err.count("\n") == 1
