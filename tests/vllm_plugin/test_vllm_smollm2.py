"""LoRA-Flow on vLLM with the real SmolLM2-135M-Instruct (30 layers, GQA, fp32): a mixed batch of gate,
static, single and off requests gives the transformers engine's greedy tokens and log-probabilities."""

from __future__ import annotations

import pytest
from vllm_support import require_vllm

require_vllm()

FUSIONS = ["gate", "static:0.6,0.4", "single:b", "off"]
NEW_TOKENS = 8
TOL = 2e-4  # 30 fp32 layers (2.7e-5 measured on the gate row)


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_mixed_batch_equals_the_transformers_engine(smollm2, tmp_path):
    import torch
    from conftest import make_peft_adapter
    from vllm import LLM, SamplingParams

    from loraflow.core.model import LoraFlowModel
    from loraflow.vllm.prepare import prepare_model_dir
    from loraflow.vllm.requests import VllmFusions

    adapters = {"a": make_peft_adapter(smollm2["model"], tmp_path / "a", seed=1, r=4, strength=0.2),
                "b": make_peft_adapter(smollm2["model"], tmp_path / "b", seed=2, r=8, strength=0.2,
                                       targets=["q_proj", "v_proj", "up_proj", "down_proj"])}
    model = LoraFlowModel.from_pretrained(smollm2["dir"], adapters, gate_init_std=0.05, seed=3,
                                          torch_dtype=torch.float32).eval()
    gate = model.save_gate(tmp_path / "gate")
    prepared = prepare_model_dir(tmp_path / "prepared", smollm2["dir"], adapters, {"g": gate})
    tok = smollm2["tokenizer"]
    texts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Once upon a time"]
    prompts = [tok(t)["input_ids"] for t in texts]

    helper = VllmFusions.from_model_dir(prepared)
    llm = LLM(model=str(prepared), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    base = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0)
    pairs = [helper.request(p, f, base) for p, f in zip(prompts, FUSIONS)]
    outs = llm.generate([p for p, _ in pairs], [s for _, s in pairs], use_tqdm=False)
    for out, prompt, fusion in zip(outs, prompts, FUSIONS):
        ids = torch.tensor([prompt])
        with torch.no_grad(), model.fusion(fusion):
            want_tokens, want_logprobs = [], []
            for _ in range(NEW_TOKENS):
                logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
                want_tokens.append(int(logp.argmax()))
                want_logprobs.append(float(logp.max()))
                ids = torch.cat([ids, torch.tensor([[want_tokens[-1]]])], dim=1)
        got = out.outputs[0]
        assert list(got.token_ids) == want_tokens, fusion
        worst = max(abs(lp[t].logprob - w) for t, lp, w in zip(got.token_ids, got.logprobs, want_logprobs))
        assert worst < TOL, f"{fusion}: log-probs differ by {worst:.2e}"
