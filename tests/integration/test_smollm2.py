"""The real SmolLM2-135M-Instruct (GGUF, Q4_1): a non-Llama-2 instruct model with its own chat
template, grouped-query attention and tied embeddings, through loraflow's loaders and workflow."""

from __future__ import annotations

import pytest
import torch

from loraflow.core.model import load_base

pytestmark = pytest.mark.integration


def test_gguf_base_loads_dense_with_its_tokenizer(smollm2):
    model, tok = smollm2["model"], smollm2["tokenizer"]
    cfg = model.config
    # GQA (3 key/value heads for 9 query heads) and tied input/output embeddings, as the model card says
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.is_quantized and all(p.dtype == torch.float32 for p in model.parameters())
    assert "<|im_start|>" in tok.chat_template
    # load_tokenizer(model) finds the GGUF file again: its name_or_path is only the GGUF's title
    assert model.config.name_or_path != str(smollm2["gguf"]) and model._loraflow_gguf == str(smollm2["gguf"])


def test_saved_dir_reproduces_the_gguf_model(smollm2):
    again = load_base(smollm2["dir"])
    ids = smollm2["tokenizer"]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, smollm2["model"](ids).logits, rtol=0, atol=0)


def _rows(path, n: int, lang_word: str):
    import json

    rows = [{"messages": [{"role": "user", "content": f"{lang_word} {i} + {i} = ?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}. The answer is: {2 * i}"}]}
            for i in range(1, n + 1)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_chat_template_prompt_is_apply_chat_templates(smollm2):
    from loraflow.data.formats import Example, encode_prompt
    from loraflow.data.templates import format_warning, make_template, render_prompt

    tok = smollm2["tokenizer"]
    messages = [{"role": "user", "content": "你好"}]
    text, special = render_prompt("chat", tok, "你好")
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert special is False and "You are a helpful AI assistant named SmolLM" in text  # its default system prompt
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert tok(text, add_special_tokens=special)["input_ids"] == ids == encode_prompt(Example("你好", ""), tok,
                                                                                      make_template("chat"))
    old = render_prompt("chat-empty-system", tok, "你好").text  # how `chat` rendered before template format 2
    assert old == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    # a Llama-2 format on this model: no <|im_start|> as a fake BOS, and a warning that says so
    assert render_prompt("released", tok, "你好").text == "[INST] 你好 [/INST]让我们一步一步地思考。"
    assert "own chat template" in format_warning("released", tok)


def test_workflow_on_smollm2_with_its_chat_template(smollm2, tmp_path, capsys):
    """train-lora x2, train-gate, generate, inspect, eval, report through the CLI, with --template chat
    given once (at training) and then taken from the gate; tiny step counts."""
    import csv
    import json

    from loraflow.cli.main import main

    base = str(smollm2["dir"])
    train = _rows(tmp_path / "train.jsonl", 4, "计算")
    common = ["--epochs", "1", "--batch-size", "2", "--max-length", "64", "--no-progress", "--threads", "1"]
    for name in ("zh", "math"):
        assert main(["train-lora", "--base", base, "--train", str(train), "--out", str(tmp_path / name),
                     "--template", "chat", "--rank", "2", "--alpha", "4", "--target-modules", "q_proj,v_proj",
                     "--seed", str(len(name)), *common]) == 0
    gate = tmp_path / "gate"
    adapters = ["--adapter", f"zh={tmp_path / 'zh' / 'best'}", "--adapter", f"math={tmp_path / 'math' / 'best'}"]
    assert main(["train-gate", "--base", base, *adapters, "--train", str(train), "--out", str(gate),
                 "--template", "chat", *common]) == 0
    recorded = json.loads((gate / "best" / "gate_config.json").read_text())["extra"]["training"]["template"]
    assert (recorded["kind"], recorded["name"], recorded["system"], recorded["format_version"]) == ("chat", "chat", None, 2)
    capsys.readouterr()

    model_args = ["--base", base, *adapters, "--gate", str(gate / "best"), "--device", "auto", "--threads", "1"]
    assert main(["generate", *model_args, "--prompt", "2 + 2 = ?", "--max-new-tokens", "4", "--show-weights"]) == 0
    out, err = capsys.readouterr()
    assert "template the gate was trained with: chat" in err and "\ufffd" not in out
    assert main(["generate", *model_args, "--prompt", "2 + 2 = ?", "--max-new-tokens", "4", "--do-sample",
                 "--top-p", "0.9", "--top-k", "20", "--sampling-temperature", "0.8", "--seed", "3"]) == 0
    capsys.readouterr()

    assert main(["inspect", *model_args, "--prompt", "用中文回答：你好吗？", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "w.png"), "--csv", str(tmp_path / "w.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "w.csv").open(encoding="utf-8")))
    assert len(rows) == 30 * len({r["token_index"] for r in rows}) and all(r["token"] for r in rows)
    assert not any("\ufffd" in r["token"] for r in rows)

    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"question": f"{i} + {i} = ?", "answer": str(2 * i)}) + "\n"
                            for i in range(1, 5)), encoding="utf-8")
    result_path = tmp_path / "results" / "zh" / "loraflow.json"
    assert main(["eval", *model_args, "--method", "loraflow", "--task", "math", "--lang", "zh", "--data", str(test),
                 "--out", str(result_path), "--limit", "2", "--max-new-tokens", "8", "--no-progress"]) == 0
    result = json.loads(result_path.read_text())
    assert result["total"] == 2 and result["partial"] is True and result["template"]["kind"] == "chat"
    assert json.loads(result_path.with_suffix(".outputs.jsonl").read_text().splitlines()[0])["prompt"].startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n1 + 1 = ?")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "results")]) == 0
    assert "†" in capsys.readouterr().out


def test_served_chat_prompt_is_apply_chat_templates(smollm2):
    """The server renders chats as `apply_chat_template` does (vLLM, TGI, `transformers serve` alike): SmolLM2's
    template adds its own system prompt to a chat without one, and a request's own system message replaces it."""
    import threading
    import types

    from loraflow.data.formats import chat_default_system
    from loraflow.serve.server import Server

    tok = smollm2["tokenizer"]
    injected = chat_default_system(tok)
    assert injected and "SmolLM" in injected
    server = types.SimpleNamespace(tokenizer=tok, _tokenizer_lock=threading.Lock())
    for messages in ([{"role": "user", "content": "What is 2+3?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        assert Server.chat_prompt(server, messages) == (ids if isinstance(ids, list) else ids["input_ids"])
        assert (injected in tok.decode(Server.chat_prompt(server, messages))) == (len(messages) == 1)
