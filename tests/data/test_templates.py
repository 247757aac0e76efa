"""One template notion (loraflow.data.templates): every consumer's prompt ids are training's ids."""

from __future__ import annotations

import pytest

from conftest import build_tokenizer
from loraflow.common.errors import LoraFlowError
from loraflow.data import protocol
from loraflow.data.formats import Example, chat_default_system, encode_prompt
from loraflow.data.templates import TEMPLATES, format_warning, make_template, render_prompt

Q = "小明有3个苹果，又买了5个。他现在有几个？"
# A ChatML template that injects a default system prompt, as SmolLM2's and Qwen2.5's do.
CHATML_WITH_DEFAULT = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizers():
    llama_like = build_tokenizer(add_bos=True)
    chatml = build_tokenizer()
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = CHATML_WITH_DEFAULT
    return {"bos-adding": llama_like, "chatml": chatml}


@pytest.mark.parametrize("tok_name", ["bos-adding", "chatml"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_rendered_text_tokenises_to_the_training_prompt_ids(tok_name, name):
    tok = _tokenizers()[tok_name]
    if name.startswith("chat") and not tok.chat_template:
        with pytest.raises(LoraFlowError, match="no chat template"):
            render_prompt(name, tok, Q, lang="zh", task="math")
        return
    text, special = render_prompt(name, tok, Q, lang="zh", task="math")
    trained = encode_prompt(Example(prompt=Q, response=""), tok, make_template(name, lang="zh", task="math"))
    assert tok(text, add_special_tokens=special)["input_ids"] == trained
    assert (trained[0] == tok.bos_token_id) == (tok_name == "bos-adding" and name in ("official", "released", "llama2"))


def test_official_prompts_are_the_papers_evaluation_prompts():
    tok = build_tokenizer(add_bos=True)
    assert render_prompt("official", tok, Q, lang="zh", task="math") == (protocol.build_math_prompt(Q, "zh"), True)
    code = "def add(a, b):\n    return a + b\n"
    assert render_prompt("official", tok, code, lang="es", task="code") == (protocol.build_code_prompt(code, "es"), True)
    assert render_prompt("official", tok, Q, system="S", lang="zh", task="math").text == (
        protocol.build_math_prompt(Q, "zh", system="S"))
    with pytest.raises(LoraFlowError, match="needs lang and task"):
        render_prompt("official", tok, Q)


def test_released_and_llama2_strings():
    tok = build_tokenizer(add_bos=True)
    assert render_prompt("released", tok, Q).text == f"[INST] {Q} [/INST]让我们一步一步地思考。"
    assert render_prompt("llama2", tok, Q, system="S").text == f"[INST] <<SYS>>\nS\n<</SYS>>\n\n{Q} [/INST]"
    assert render_prompt("plain", tok, Q) == (Q, False)  # verbatim
    assert render_prompt("plain-nl", tok, Q) == (f"{Q}\n", False)
    with pytest.raises(LoraFlowError, match="unknown prompt template 'alpaca'"):
        render_prompt("alpaca", tok, Q)


def test_chat_empty_system_puts_an_empty_turn_in_place_of_the_default():
    tok = _tokenizers()["chatml"]
    assert chat_default_system(tok) == "You are a helpful assistant."
    assert render_prompt("chat", tok, "hi").text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    text, special = render_prompt("chat-empty-system", tok, "hi")
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert special is False
    asked = render_prompt("chat-empty-system", tok, "hi", system="Answer in Chinese.").text
    assert asked.startswith("<|im_start|>system\nAnswer in Chinese.<|im_end|>\n")
    plain_chat = build_tokenizer()  # a template with no default: no system turn at all
    plain_chat.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}" \
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert chat_default_system(plain_chat) is None
    assert render_prompt("chat-empty-system", plain_chat, "hi").text == "<|user|>hi<|assistant|>"
    assert render_prompt("chat", plain_chat, "hi").text == "<|user|>hi<|assistant|>"


def test_llama2_format_on_a_model_with_another_chat_template_warns():
    chatml, llama = _tokenizers()["chatml"], build_tokenizer(add_bos=True)
    for name in ("official", "released", "llama2"):
        assert "own chat template" in format_warning(name, chatml)
        assert "--template chat" in format_warning(make_template(name, lang="zh", task="math"), chatml)
        assert format_warning(name, llama) is None  # no chat template of its own
    for name in ("chat", "chat-empty-system", "plain", "plain-nl"):
        assert format_warning(name, chatml) is None
    llama.chat_template = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"
    assert format_warning("llama2", llama) is None  # its own template is Llama-2's
