"""How examples become prompts, declared once for the API and the CLI: the data format and the
prompt template (with its system prompt and cue)."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.common.options import option
from loraflow.data.templates import TEMPLATE_HELP, TEMPLATES

DATA_FORMATS = ("auto", "math_train", "code_train", "math_dev", "mbpp", "prompt_completion", "messages")


@dataclass
class PromptOptions:
    """The data format of a training file and the prompt template applied to it."""

    data_format: str = option("auto", "format of --train (auto: detected from the first line)", choices=DATA_FORMATS)
    template: str = option("llama2", "prompt template, recorded with the gate: " + TEMPLATE_HELP,
                           choices=(*TEMPLATES, "paper"))
    system: str | None = option(None, "system prompt text (llama2/chat templates)")
    cue: str | None = option(None, "text placed right after the prompt, e.g. '让我们一步一步地思考。'")
    lang: str | None = option(None, "language code for --template official (zh, ru, es)")
    task: str | None = option(None, "task for --template official (math, code)")

    def to_template(self):
        """The `PromptTemplate` these options describe ("paper" is the old name of "official")."""
        from loraflow.data.templates import make_template

        return make_template(self.template, lang=self.lang, task=self.task, system=self.system, cue=self.cue)


@dataclass
class PromptChoice:
    """How `generate`, `inspect` (and serving) turn a question into the model's prompt."""

    template: str | None = option(None, "prompt template: " + TEMPLATE_HELP + ". Default: the one the gate was "
                                        "trained with, else chat when the tokenizer has a chat template, else plain",
                                  choices=(*TEMPLATES, "paper"))
    system: str | None = option(None, "system prompt (default: the template's; none for llama2, the chat "
                                      "template's own default for chat)")
    lang: str | None = option(None, "language code for --template official (zh, ru, es)")
    task: str | None = option(None, "task for --template official (math, code)")
