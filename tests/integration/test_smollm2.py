"""The real SmolLM2-135M-Instruct (GGUF, Q4_1): a non-Llama-2 instruct model with its own chat
template, grouped-query attention and tied embeddings, through loraflow's loaders and workflow."""

from __future__ import annotations

import pytest
import torch

from loraflow.core.model import load_base, load_tokenizer

pytestmark = pytest.mark.integration


def test_gguf_base_loads_dense_with_its_tokenizer(smollm2):
    model, tok = smollm2["model"], smollm2["tokenizer"]
    cfg = model.config
    # GQA (3 key/value heads for 9 query heads) and tied input/output embeddings, as the model card says
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.is_quantized and all(p.dtype == torch.float32 for p in model.parameters())
    assert "<|im_start|>" in tok.chat_template
    # the tokenizer of the in-memory GGUF model is found again (its name_or_path is the GGUF's title)
    assert load_tokenizer(model).chat_template == tok.chat_template


def test_saved_dir_reproduces_the_gguf_model(smollm2):
    again = load_base(smollm2["dir"])
    ids = smollm2["tokenizer"]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, smollm2["model"](ids).logits, rtol=0, atol=0)
