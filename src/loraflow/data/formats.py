"""Training and dev data: the official few-shot files, generic JSONL, prompt templates, tokenisation.

Three pieces, used by gate training, LoRA training, dev-set selection and evaluation:

* `load_examples` reads a JSONL file into `Example` records (user query, target response, optional
  gold answer). The authors' files are read as they are; the format is detected from the keys of
  the first line, or given explicitly.
* `PromptTemplate` turns an `Example` into the prompt text and the response text:
  the official Llama-2 chat format (`llama2`), the tokenizer's own chat template (`chat`), the
  query verbatim (`plain`) or the query and a newline (`plain-nl`). The named templates users
  choose (official, released, ...) and the prompt rendering for generation live in
  `loraflow.data.templates`.
* `encode_example` / `encode_examples` / `collate` tokenise for causal-LM training with the loss on
  the response tokens only.

BOS/EOS handling (one rule for every template): a template produces *segments*, plain strings and
two markers, BOS and EOS. Strings are tokenised with `add_special_tokens=False`; an EOS marker
becomes exactly the tokenizer's `eos_token_id`, and a BOS marker its `bos_token_id` when the
tokenizer starts every sequence with BOS by itself (Llama, Mistral: `<s>`), and nothing when it does
not (GPT-2, Qwen, SmolLM2: their `bos_token`, if any, is no sequence start the model was trained on). So the literal `<s>` and `</s>` of
the Llama-2 template are never tokenised as text and never duplicated (the tokenizer adds no BOS
of its own), and the result is the same as tokenising the literal string with a tokenizer that
maps `<s>`/`</s>` to its special tokens, which is how Llama-2's tokenizer reads them. For a
tokenizer whose BOS/EOS are spelled differently (e.g. Llama-3's `<|begin_of_text|>`) the markers
still become the right ids. `render` shows the markers as the tokenizer's own BOS/EOS strings, or
as `<s>` / `</s>` when no tokenizer is given.

The prompt and the response are tokenised separately and concatenated, so the label boundary is
exact and the prompt tokens are the very ones the model sees at generation time (where the prompt
is tokenised alone); BPE merges never cross the prompt/response boundary.

`import loraflow.data.formats` does not import torch; only `collate` does.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraflow.common.errors import LoraFlowError
from loraflow.common.io import read_jsonl
from loraflow.data.protocol import official_system_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the causal-LM loss ignores (prompt and padding positions)."""

STEP_BY_STEP_CUE = "让我们一步一步地思考。"
"""The Chinese "let's think step by step" cue the released training script appends after `[/INST]`."""

# --------------------------------------------------------------------------------------------------
# Records and loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One training or dev example, before any prompt formatting.

    Attributes:
        prompt: the user query as written in the file (no template, no cue).
        response: the target text the model learns to produce (no EOS).
        answer: the gold final answer when the file has one (math dev: the `The answer is: X` of
            `original_response`; MGSM-style files: their short `answer`), for dev accuracy.
        system: a per-example system prompt that overrides the template's (chat `messages` files).
        history: earlier (user, assistant) turns of a multi-turn conversation, oldest first; they
            are part of the prompt and never trained on.
        meta: everything else on the line (ids, MBPP `test_list`, ...) plus `source` = "file:line"
            and `format` = the detected format.
    """

    prompt: str
    response: str
    answer: str | None = None
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


FORMATS = ("math_train", "code_train", "math_dev", "mbpp", "prompt_completion", "messages")
"""Formats `load_examples` understands; see `load_examples` for the keys of each."""

# Format detection: the first rule whose keys are all on the first line wins.
_DETECT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("prompt_completion", ("prompt", "completion")),
    ("math_train", ("query", "response")),
    ("code_train", ("data",)),
    ("math_dev", ("question", "answer")),
    ("mbpp", ("text", "code")),
)

_ANSWER_RE = re.compile(r"The answer is:\s*(.*)")


def detect_format(row: dict, where: str = "") -> str:
    """Name of the format whose required keys `row` has (see `FORMATS`).

    Raises:
        LoraFlowError: when no known format matches; the message lists the keys found.
    """
    for name, keys in _DETECT:
        if all(k in row for k in keys):
            return name
    expected = "; ".join(f"{name}: {'/'.join(keys)}" for name, keys in _DETECT)
    prefix = f"{where}: " if where else ""
    raise LoraFlowError(f"{prefix}cannot detect the data format from keys {sorted(row)}; expected one of: {expected}")


def _line_numbers(path: Path) -> list[int]:
    """1-based numbers of the non-empty lines of `path`: the lines `read_jsonl` turns into rows."""
    with path.open(encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def load_examples(path: str | os.PathLike, fmt: str = "auto") -> list[Example]:
    """Read a JSONL data file into `Example`s, strictly: a bad line stops the load.

    Formats (`fmt`, or detected from the first line's keys when `fmt="auto"`):

    * `math_train` (official train/*_math_train): `query` -> prompt, `response` -> response.
    * `code_train` (official train/*_code_train): `data: [question, answer]` (an even-length list
      [q1, a1, q2, a2, ...] is read as a conversation whose last pair is the target).
    * `math_dev` (official dev/*_math_dev, MGSM test files): `question` -> prompt, `answer` ->
      response. The official dev `answer` is a full translated solution, so the gold final answer
      is taken from `original_response` (last `The answer is: X`); without `original_response`,
      a one-line `answer` (MGSM style, number allowed) is itself the gold answer.
    * `mbpp` (official dev/*_code_dev): `text` -> prompt, `code` -> response (kept verbatim,
      `\\r\\n` included); `test_list` etc. stay in `meta`.
    * `prompt_completion`: `prompt`, `completion`; optional `answer`, `system`.
    * `messages`: `messages` = [{role, content}, ...]: an optional leading system message (the
      per-example system prompt), then alternating user/assistant turns ending with the assistant
      turn that is the target; earlier turns become `history`.

    Empty lines are skipped; nothing else is.

    Raises:
        LoraFlowError: `file:line: problem` for bad JSON, a missing key or a wrong type; an
            unknown `fmt`; a file with no examples.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise LoraFlowError(f"unknown data format fmt={fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    rows = read_jsonl(path)  # raises file:line on malformed JSON
    if not rows:
        raise LoraFlowError(f"{path}: no examples (the file is empty)")
    linenos = _line_numbers(path)
    if len(linenos) != len(rows):  # the file changed between the two reads
        raise LoraFlowError(f"{path}: file changed while reading it")
    if fmt == "auto":
        fmt = detect_format(rows[0], f"{path}:{linenos[0]}")
    parse = _PARSERS[fmt]
    examples = []
    for lineno, row in zip(linenos, rows):
        where = f"{path}:{lineno}"
        try:
            ex = parse(row)
        except _BadLine as e:
            raise LoraFlowError(f"{where}: {e} (format {fmt})") from None
        ex.meta.update(source=where, format=fmt)
        examples.append(ex)
    return examples


class _BadLine(Exception):
    """A line that does not fit its format; `load_examples` adds file:line."""


def _get_str(row: dict, key: str) -> str:
    if key not in row:
        raise _BadLine(f"missing key {key!r} (keys: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise _BadLine(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _meta(row: dict, used: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


def _parse_math_train(row: dict) -> Example:
    return Example(_get_str(row, "query"), _get_str(row, "response"), meta=_meta(row, ("query", "response")))


def _parse_code_train(row: dict) -> Example:
    data = row.get("data")
    if "data" not in row:
        raise _BadLine(f"missing key 'data' (keys: {sorted(row)})")
    if not isinstance(data, list) or len(data) < 2 or len(data) % 2:
        raise _BadLine("'data' must be a list [question, answer] (or [q1, a1, q2, a2, ...])")
    if not all(isinstance(t, str) for t in data):
        raise _BadLine("'data' must hold only strings")
    history = tuple((data[i], data[i + 1]) for i in range(0, len(data) - 2, 2))
    return Example(data[-2], data[-1], history=history, meta=_meta(row, ("data",)))


def _parse_math_dev(row: dict) -> Example:
    question = _get_str(row, "question")
    if "answer" not in row:
        raise _BadLine(f"missing key 'answer' (keys: {sorted(row)})")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _BadLine(f"'answer' must be a string or a number, got {type(answer).__name__}")
    answer = str(answer)
    gold: str | None = None
    if "original_response" in row:
        original = _get_str(row, "original_response")
        found = _ANSWER_RE.findall(original)
        if not found:
            raise _BadLine("'original_response' has no 'The answer is: X' line to take the gold answer from")
        gold = found[-1].strip()
    elif "\n" not in answer.strip():
        gold = answer.strip()
    return Example(question, answer, answer=gold, meta=_meta(row, ("question", "answer")))


def _parse_mbpp(row: dict) -> Example:
    return Example(_get_str(row, "text"), _get_str(row, "code"), meta=_meta(row, ("text", "code")))


def _parse_prompt_completion(row: dict) -> Example:
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise _BadLine(f"'answer' must be a string or a number, got {type(answer).__name__}")
    system = _get_str(row, "system") if row.get("system") is not None else None
    return Example(
        _get_str(row, "prompt"), _get_str(row, "completion"),
        answer=None if answer is None else str(answer), system=system or None,
        meta=_meta(row, ("prompt", "completion", "answer", "system")),
    )


def _parse_messages(row: dict) -> Example:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _BadLine("'messages' must be a non-empty list of {role, content} objects")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadLine(f"messages[{i}] must be an object with string 'role' and 'content'")
        turns.append((m["role"], m["content"]))
    system = None
    if turns[0][0] == "system":
        system = turns.pop(0)[1] or None
    if not turns or turns[-1][0] != "assistant":
        raise _BadLine("the last message must be the assistant's (it is the training target)")
    for i, (role, _) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise _BadLine(
                f"after an optional leading system message, messages must alternate user/assistant; "
                f"turn {i} has role {role!r}, expected {want!r}"
            )
    history = tuple((turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 2, 2))
    return Example(turns[-2][1], turns[-1][1], system=system, history=history, meta=_meta(row, ("messages",)))


_PARSERS = {
    "math_train": _parse_math_train,
    "code_train": _parse_code_train,
    "math_dev": _parse_math_dev,
    "mbpp": _parse_mbpp,
    "prompt_completion": _parse_prompt_completion,
    "messages": _parse_messages,
}


# --------------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------------


class _Marker:
    """BOS or EOS inside a segment list (rendered as text, encoded as the tokenizer's id)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


BOS = _Marker("BOS")
EOS = _Marker("EOS")
Segment = str | _Marker

TemplateKind = Literal["llama2", "chat", "chat-empty-system", "plain", "plain-nl"]
_KINDS = ("llama2", "chat", "chat-empty-system", "plain", "plain-nl")
# Version of the recorded template (`PromptTemplate.to_record`). Records without one (format 1) come from
# before `chat` rendered as `apply_chat_template` does and before `plain` meant the prompt verbatim: there
# `chat` was today's `chat-empty-system` and `plain` today's `plain-nl`.
TEMPLATE_FORMAT = 2
_FORMAT_1_KINDS = {"chat": "chat-empty-system", "plain": "plain-nl"}


@dataclass(frozen=True)
class PromptTemplate:
    """How an `Example` becomes the model's prompt and target.

    Kinds (`prompt -> target`, `{system}` block only when there is a system prompt):

    * `llama2` (the official format): `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{query} [/INST]{cue}`
      -> `{response} </s>`; without a system prompt the prefix is `<s>[INST] {query} [/INST]`.
      Earlier turns follow Llama-2's multi-turn format: `<s>[INST] {u1} [/INST] {a1} </s><s>[INST] ...`.
    * `chat`: the tokenizer's own `chat_template`, exactly as `apply_chat_template(messages,
      add_generation_prompt=True)` renders it (a default system prompt the template injects when there
      is none, as SmolLM2's and Qwen2.5's do, included), `{cue}` appended to it; target = what the
      template adds for the assistant turn (its own end-of-turn tokens included, no extra EOS).
    * `chat-empty-system`: `chat`, but with an empty system turn in place of the default system prompt
      a template would inject (how loraflow rendered `chat` before template format 2).
    * `plain`: `{query}{cue}` -> `{response}</s>`: the query verbatim (no BOS; `{system}\\n\\n` in front
      when set), for models without chat formatting.
    * `plain-nl`: `{query}\\n{cue}` -> `{response}</s>`, otherwise as `plain` (what `plain` meant before
      template format 2; the demo's format).

    Presets: `released()` reproduces the authors' released training script (no system prompt, cue
    `让我们一步一步地思考。` for every language and task); `paper(lang, task)` follows the paper's
    description (the official system prompt of that pair, no cue).

    Attributes:
        kind: "llama2", "chat", "chat-empty-system", "plain" or "plain-nl".
        system: default system prompt, or None for none (an `Example.system` overrides it).
        cue: text appended right after the prompt (after `[/INST]` for llama2) and before the response;
            part of the prompt, so never trained on and also given at generation time.
        name: the preset it was made from ("official", "released", or a kind's name), recorded
            with a trained gate so that every consumer can use the same prompts.
    """

    kind: TemplateKind = "llama2"
    system: str | None = None
    cue: str = ""
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"PromptTemplate: kind={self.kind!r} is not one of {_KINDS}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"PromptTemplate: system must be a string or None, got {type(self.system).__name__}")
        if self.system == "":
            raise ValueError("PromptTemplate: system='' is ambiguous; use system=None for no system prompt")
        if not isinstance(self.cue, str):
            raise ValueError(f"PromptTemplate: cue must be a string, got {type(self.cue).__name__}")

    @classmethod
    def released(cls) -> PromptTemplate:
        """The prompt of the authors' released training script: llama2, no system prompt, the Chinese cue."""
        return cls(kind="llama2", system=None, cue=STEP_BY_STEP_CUE, name="released")

    @classmethod
    def paper(cls, lang: str, task: str) -> PromptTemplate:
        """The prompt the paper describes: llama2 with the official system prompt of (lang, task), no cue."""
        return cls(kind="llama2", system=official_system_prompt(lang, task), cue="", name="official")

    @classmethod
    def from_preset(cls, name: str, *, lang: str | None = None, task: str | None = None) -> PromptTemplate:
        """Build a template by name: "official" (alias "paper"; needs lang and task), "released", or a
        kind ("llama2", "chat", "chat-empty-system", "plain", "plain-nl").

        Raises:
            LoraFlowError: unknown name, or "official" without lang/task.
        """
        if name == "released":
            return cls.released()
        if name in ("official", "paper"):
            if lang is None or task is None:
                raise LoraFlowError(f"prompt template {name!r} needs lang and task (e.g. lang='zh', task='math')")
            return cls.paper(lang, task)
        if name in _KINDS:
            return cls(kind=name, name=name)
        raise LoraFlowError(f"unknown prompt template {name!r}; expected official, released, {', '.join(_KINDS)}")

    def to_record(self) -> dict:
        """The template as recorded with a gate or a result: its fields and `format_version`."""
        return {**asdict(self), "format_version": TEMPLATE_FORMAT}

    @classmethod
    def from_record(cls, record: dict) -> PromptTemplate:
        """The template a gate or result recorded (`to_record`, or `asdict` before format 2); unknown keys
        are ignored. A record without `format_version` renders as it did then: its `chat` is
        `chat-empty-system` and its `plain` is `plain-nl` (see `TEMPLATE_FORMAT`).

        Raises:
            ValueError: a field of the wrong type, or a format newer than this loraflow knows.
        """
        known = {k: record[k] for k in ("kind", "system", "cue", "name") if k in record}
        version = record.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= TEMPLATE_FORMAT:
            raise ValueError(f"template format_version {version!r} is not one this loraflow reads "
                             f"(1..{TEMPLATE_FORMAT})")
        if version == 1 and known.get("kind") in _FORMAT_1_KINDS:
            known["kind"] = _FORMAT_1_KINDS[known["kind"]]
            known["name"] = _FORMAT_1_KINDS.get(known.get("name"), known.get("name"))
        return cls(**known)

    # ---- segments -------------------------------------------------------------------------------

    def segments(self, example: Example, tokenizer: Any = None) -> tuple[list[Segment], list[Segment]]:
        """(prompt segments, target segments): strings plus BOS/EOS markers, in order.

        `tokenizer` is needed only for kind="chat".
        """
        system = example.system if example.system is not None else self.system
        if self.kind == "llama2":
            return self._llama2(example, system)
        if self.kind in ("plain", "plain-nl"):
            return self._plain(example, system, "\n" if self.kind == "plain-nl" else "")
        return self._chat(example, system, tokenizer)

    def _llama2(self, ex: Example, system: str | None) -> tuple[list[Segment], list[Segment]]:
        turns = [*ex.history, (ex.prompt, None)]
        prompt: list[Segment] = []
        for i, (user, assistant) in enumerate(turns):
            if i == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            prompt += [BOS, f"[INST] {user} [/INST]"]
            if assistant is not None:
                prompt += [f" {assistant} ", EOS]
        prompt.append(self.cue)
        return _merge(prompt), _merge([ex.response + " ", EOS])

    def _plain(self, ex: Example, system: str | None, sep: str) -> tuple[list[Segment], list[Segment]]:
        prompt: list[Segment] = [f"{system}\n\n" if system is not None else ""]
        for user, assistant in ex.history:
            prompt += [f"{user}{sep}{assistant}", EOS]
        prompt.append(f"{ex.prompt}{sep}{self.cue}")
        return _merge(prompt), _merge([ex.response, EOS])

    def _chat(self, ex: Example, system: str | None, tokenizer: Any) -> tuple[list[Segment], list[Segment]]:
        if tokenizer is None:
            raise LoraFlowError("PromptTemplate(kind='chat') needs the tokenizer (its chat template)")
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise LoraFlowError(
                f"tokenizer {name!r} has no chat template; use kind='llama2' or kind='plain', "
                "or set tokenizer.chat_template"
            )
        if self.kind == "chat-empty-system" and system is None and chat_default_system(tokenizer) is not None:
            system = ""  # an empty system turn: the template would inject its own default otherwise
        messages = [{"role": "system", "content": system}] if system is not None else []
        for user, assistant in ex.history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": ex.prompt})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + self.cue
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": self.cue + ex.response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise LoraFlowError(
                "the tokenizer's chat template does not render the prompt as a prefix of the full "
                "conversation, so the response tokens cannot be separated; use kind='llama2' or 'plain'"
            )
        return [prompt], [full[len(prompt):]]

    # ---- rendering --------------------------------------------------------------------------------

    def render(self, example: Example, tokenizer: Any = None, *, with_response: bool = True) -> str:
        """The formatted text (prompt, plus target when `with_response`), markers spelled out.

        BOS/EOS are written as the tokenizer's `bos_token` / `eos_token` (BOS only for a tokenizer that
        starts sequences with it, see the module docstring), or `<s>` / `</s>` without a tokenizer, so
        `render(ex)` of a llama2 template is exactly the reference string.
        """
        prompt, target = self.segments(example, tokenizer)
        bos = "<s>" if tokenizer is None else tokenizer.bos_token if starts_with_bos(tokenizer) else ""
        eos = getattr(tokenizer, "eos_token", None) or "</s>"
        segs = prompt + target if with_response else prompt
        return "".join(bos if s is BOS else eos if s is EOS else s for s in segs)


def chat_default_system(tokenizer: Any) -> str | None:
    """The system prompt the tokenizer's chat template injects when a conversation has none
    (SmolLM2: "You are a helpful AI assistant named SmolLM, ..."), or None when it injects none.

    Found by rendering one user turn with and without a marker system message: the text in place of
    the marker in the first is what the template adds on its own.
    """
    marker, user = "\x00SYSTEM\x00", [{"role": "user", "content": "\x00USER\x00"}]
    without = tokenizer.apply_chat_template(user, tokenize=False)
    try:
        with_marker = tokenizer.apply_chat_template([{"role": "system", "content": marker}, *user], tokenize=False)
    except Exception:  # templates that refuse system messages (e.g. Gemma's) inject none either
        return None
    before, found, after = with_marker.partition(marker)
    if not found or not without.startswith(before) or not without.endswith(after):
        return None
    injected = without[len(before): len(without) - len(after)]
    return injected or None


def starts_with_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer begins every sequence with its BOS token by itself (Llama-style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def _merge(segs: list[Segment]) -> list[Segment]:
    """Join adjacent strings and drop empty ones."""
    out: list[Segment] = []
    for s in segs:
        if isinstance(s, str):
            if not s:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += s
                continue
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


def _encode_segments(segs: list[Segment], tokenizer: Any) -> list[int]:
    ids: list[int] = []
    with_bos = any(s is BOS for s in segs) and starts_with_bos(tokenizer)
    for s in segs:
        if isinstance(s, str):
            ids += tokenizer(s, add_special_tokens=False)["input_ids"]
        elif s is BOS:
            if with_bos:
                ids.append(tokenizer.bos_token_id)
        elif tokenizer.eos_token_id is None:
            raise LoraFlowError(
                "the prompt template needs an EOS token but the tokenizer has none; "
                "use PromptTemplate(kind='chat') or set the tokenizer's eos_token"
            )
        else:
            ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(example: Example, tokenizer: Any, template: PromptTemplate) -> list[int]:
    """Token ids of the prompt alone (BOS included, cue included), as given to `generate`.

    These are exactly the prompt tokens `encode_example` trains with.
    """
    prompt, _ = template.segments(example, tokenizer)
    return _encode_segments(prompt, tokenizer)


def _encode(example: Example, tokenizer: Any, template: PromptTemplate, max_length: int) -> tuple[dict, bool, bool]:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    prompt_segs, target_segs = template.segments(example, tokenizer)
    prompt_ids = _encode_segments(prompt_segs, tokenizer)
    target_ids = _encode_segments(target_segs, tokenizer)
    prompt_overflow = len(prompt_ids) >= max_length  # no room for a single response token
    truncated = len(prompt_ids) + len(target_ids) > max_length
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    item = {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}
    return item, truncated, prompt_overflow


def encode_example(example: Example, tokenizer: Any, template: PromptTemplate, max_length: int) -> dict[str, list[int]]:
    """Tokenise one example for causal-LM training, loss on the response (and its EOS) only.

    Returns:
        {"input_ids", "labels", "attention_mask"}: lists of equal length <= max_length; labels are
        `IGNORE_INDEX` (-100) on the prompt tokens and equal to input_ids on the target tokens.
        Too long: the target is cut from the right (its EOS may go); the prompt is kept. If the
        prompt alone fills max_length it is cut too, no label is left, and a warning is issued.
    """
    item, _, prompt_overflow = _encode(example, tokenizer, template, max_length)
    if prompt_overflow:
        warnings.warn(
            f"{example.meta.get('source', 'example')}: prompt alone is >= max_length={max_length} tokens; "
            "truncated, no response token left to train on",
            stacklevel=2,
        )
    return item


class TokenizedDataset(Sequence):
    """Encoded examples as a map-style dataset (works with `torch.utils.data.DataLoader` + `collate`).

    Attributes:
        items: the encoded examples (dicts of lists, see `encode_example`).
        num_truncated: examples whose prompt + target exceeded max_length.
        num_prompt_overflow: examples whose prompt alone filled max_length (no labels left).
    """

    def __init__(self, items: list[dict[str, list[int]]], num_truncated: int = 0, num_prompt_overflow: int = 0):
        self.items = items
        self.num_truncated = num_truncated
        self.num_prompt_overflow = num_prompt_overflow

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        return self.items[i]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return iter(self.items)


def encode_examples(
    examples: Sequence[Example], tokenizer: Any, template: PromptTemplate, max_length: int
) -> TokenizedDataset:
    """Encode many examples (see `encode_example`) and log one warning with the truncation counts."""
    items, n_trunc, n_over = [], 0, 0
    for ex in examples:
        item, truncated, overflow = _encode(ex, tokenizer, template, max_length)
        items.append(item)
        n_trunc += truncated
        n_over += overflow
    if n_trunc:
        logger.warning(
            "%d of %d examples exceed max_length=%d and were truncated (%d with no response token left)",
            n_trunc, len(items), max_length, n_over,
        )
    return TokenizedDataset(items, n_trunc, n_over)


def collate(
    batch: Sequence[dict[str, Any]], pad_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, Any]:
    """Pad a list of encoded examples into tensors of shape (B, T), T = the longest in the batch.

    input_ids are padded with `pad_id`, labels with -100, attention_mask with 0. Right padding
    is the usual choice for training; left padding for batched generation.

    Raises:
        ValueError: bad padding_side, pad_id None, or an empty batch.
    """
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token; pass e.g. tokenizer.eos_token_id")
    if not batch:
        raise ValueError("collate got an empty batch")
    length = max(len(b["input_ids"]) for b in batch)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {}
    for key, value in fill.items():
        rows = []
        for b in batch:
            seq = [int(x) for x in b[key]]
            pad = [value] * (length - len(seq))
            rows.append(seq + pad if padding_side == "right" else pad + seq)
        out[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
    return out
