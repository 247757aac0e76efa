"""How examples become prompts, declared once for the API and the CLI: the data format and the
prompt template (with its system prompt and cue)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from loraflow.common.options import option

DATA_FORMATS = ("auto", "math_train", "code_train", "math_dev", "mbpp", "prompt_completion", "messages")
TEMPLATES = ("llama2", "released", "paper", "chat", "plain")


@dataclass
class PromptOptions:
    """The data format of a training file and the prompt template applied to it."""

    data_format: str = option("auto", "format of --train (auto: detected from the first line)", choices=DATA_FORMATS)
    template: str = option("llama2", "prompt format: llama2 (official template; no system prompt unless --system), "
                                     "released (the authors' released script: no system prompt, Chinese "
                                     "step-by-step cue after [/INST]), paper (official system prompt of --lang/"
                                     "--task), chat (the tokenizer's chat template) or plain", choices=TEMPLATES)
    system: str | None = option(None, "system prompt text (llama2/chat templates)")
    cue: str | None = option(None, "text placed right after the prompt, e.g. '让我们一步一步地思考。'")
    lang: str | None = option(None, "language code for --template paper (zh, ru, es)")
    task: str | None = option(None, "task for --template paper (math, code)")

    def to_template(self):
        """The `PromptTemplate` these options describe."""
        from loraflow.data.formats import PromptTemplate

        template = PromptTemplate.from_preset(self.template, lang=self.lang, task=self.task)
        if self.system is not None:
            template = replace(template, system=self.system or None)
        if self.cue is not None:
            template = replace(template, cue=self.cue)
        return template
