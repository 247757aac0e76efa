"""One prompt-template notion for every command and the API: how a question becomes model input.

Templates (names a user passes as `--template`, recorded with a trained gate):

* `official`: the paper's prompts. Training: Llama-2 chat with the official system prompt of
  (lang, task). Generation/evaluation: the official MGSM prompt (the same string) for math and the
  official translated-HumanEval prompt (`[INST]{instruction}:\\n{prompt}\\n\\n[/INST]`) for code.
* `released`: the authors' released training script: Llama-2 chat, no system prompt, the cue
  `让我们一步一步地思考。` after `[/INST]`.
* `llama2`: Llama-2 chat, no system prompt unless one is given.
* `chat`: the tokenizer's own chat template, exactly as `tokenizer.apply_chat_template(messages,
  add_generation_prompt=True)` renders it: a default system prompt the template injects when none
  is given (SmolLM2, Qwen2.5) included, as in vLLM, TGI and `transformers serve`.
* `chat-empty-system`: the chat template with an empty system turn in place of such a default
  (`chat` before template format 2; gates recorded then as `chat` use it).
* `plain`: the question verbatim, no special tokens.
* `plain-nl`: the question and a newline (`plain` before template format 2; the demo's format).

`render_prompt` is what generation, inspection, evaluation and serving call; its ids are the very
prompt tokens training used (`loraflow.data.formats.encode_prompt`). Pure Python, no torch import.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

from loraflow.common.errors import LoraFlowError
from loraflow.data import protocol
from loraflow.data.formats import BOS, EOS, Example, PromptTemplate, starts_with_bos

TEMPLATES = ("official", "released", "llama2", "chat", "chat-empty-system", "plain", "plain-nl")
TEMPLATE_HELP = (
    "official (the paper's prompts; needs --lang and --task), released (the authors' released training "
    "script: Llama-2 format, no system prompt, Chinese step-by-step cue), llama2 (Llama-2 chat format), "
    "chat (the tokenizer's own chat template, as apply_chat_template renders it, its default system prompt "
    "included), chat-empty-system (the same with an empty system turn instead of that default), plain (the "
    "question verbatim) or plain-nl (the question and a newline)"
)


class RenderedPrompt(NamedTuple):
    """A prompt as text, and how to tokenise it: `tokenizer(text, add_special_tokens=...)`."""

    text: str
    add_special_tokens: bool


def make_template(name: str | PromptTemplate, *, lang: str | None = None, task: str | None = None,
                  system: str | None = None, cue: str | None = None) -> PromptTemplate:
    """The PromptTemplate for a template name (see the module docstring), with optional overrides.

    Raises:
        LoraFlowError: an unknown name, or `official` without lang and task.
    """
    template = name if isinstance(name, PromptTemplate) else PromptTemplate.from_preset(name, lang=lang, task=task)
    if system is not None:
        template = replace(template, system=system or None)
    if cue is not None:
        template = replace(template, cue=cue)
    return template


def _official_code(template: PromptTemplate, task: str | None) -> bool:
    return template.name == "official" and task == "code"


def prompt_segments(template: PromptTemplate, tokenizer: Any, question: str, *, lang: str | None = None,
                    task: str | None = None) -> list:
    """The prompt as segments (strings and BOS/EOS markers) for one question."""
    if _official_code(template, task):
        if lang is None:
            raise LoraFlowError("the official code prompt needs --lang (zh, ru or es)")
        return [BOS, protocol.build_code_prompt(question, lang)]
    prompt, _ = template.segments(Example(prompt=question, response=""), tokenizer)
    return prompt


def render_prompt(template: str | PromptTemplate, tokenizer: Any, question: str, system: str | None = None, *,
                  lang: str | None = None, task: str | None = None) -> RenderedPrompt:
    """The prompt text for `question` and the `add_special_tokens` to tokenise it with.

    `tokenizer(text, add_special_tokens=flag)["input_ids"]` are the prompt ids training used for the
    same template: a tokenizer that starts sequences with BOS by itself (Llama) gets the text without
    the BOS and flag True, exactly as the paper's evaluation did; any other gets flag False.

    Args:
        template: a name (one of `TEMPLATES`) or a PromptTemplate.
        tokenizer: the model's tokenizer (its chat template for `chat`, its BOS for the others).
        question: the user's question, as written.
        system: a system prompt that replaces the template's (None keeps it).
        lang, task: for `official` (the system prompt / code instruction of the pair).
    """
    template = make_template(template, lang=lang, task=task, system=system)
    segs = prompt_segments(template, tokenizer, question, lang=lang, task=task)
    auto_bos = starts_with_bos(tokenizer)
    lead = bool(segs) and segs[0] is BOS and auto_bos
    parts = []
    for s in segs[1:] if lead else segs:
        if s is BOS:
            parts.append(tokenizer.bos_token if auto_bos else "")
        elif s is EOS:
            parts.append(tokenizer.eos_token)
        else:
            parts.append(s)
    return RenderedPrompt("".join(parts), lead)


LLAMA2_NAMES = ("official", "released", "llama2")


def format_warning(template: str | PromptTemplate, tokenizer: Any) -> str | None:
    """A warning when a Llama-2 format is used with a model whose own chat template is another format."""
    kind = template.kind if isinstance(template, PromptTemplate) else ("llama2" if template in LLAMA2_NAMES else template)
    own = getattr(tokenizer, "chat_template", None)
    if kind != "llama2" or not isinstance(own, str) or "[INST]" in own:
        return None
    name = template.name if isinstance(template, PromptTemplate) else template
    model = getattr(tokenizer, "name_or_path", "") or "this model"
    return (f"template {name or kind!r} uses the Llama-2 chat format, but {model} has its own chat template; "
            "use --template chat to prompt it as it was instruction-tuned (the gate's template must match)")
