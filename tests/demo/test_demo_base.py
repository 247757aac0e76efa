"""The demo's tokenizer and from-scratch base model."""

from __future__ import annotations

import torch

from loraflow.demo.base import pretrain_base, train_tokenizer

TEXTS = ["Ann has three apples. She gets 4 apples.", "Zuke tidi natu.", "3 + 4 = 7. 12 - 5 = 7."] * 20


def test_tokenizer_round_trips_and_splits_digits(tmp_path):
    from transformers import AutoTokenizer

    train_tokenizer(TEXTS, 300, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Ann has 123 apples. Привет, 你好!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    digits = tok("123", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in digits] == ["1", "2", "3"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_pretraining_is_seeded_and_saves_a_standard_model(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(TEXTS, 300, tmp_path / "tok")
    kw = dict(seed=3, hidden=32, layers=1, heads=2, steps=4, batch_size=2, seq_len=32, progress=False)
    torch.set_num_threads(1)
    pretrain_base(TEXTS, tok, tmp_path / "a", **kw)
    pretrain_base(TEXTS, tok, tmp_path / "b", **kw)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.config.model_type == "llama" and a.config.num_hidden_layers == 1
