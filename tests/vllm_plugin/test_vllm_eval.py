"""`loraflow eval --engine vllm` writes the same outputs and score as the default engine (greedy, fp32)."""

from __future__ import annotations

import json

import pytest
from vllm_support import require_vllm, tiny_fusion  # noqa: F401 (fixture)

require_vllm()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loraflow", "static:0.7,-0.3"])
def test_eval_with_vllm_equals_the_default_engine(tiny_fusion, tmp_path, method):
    import torch

    from loraflow.evaluation.harness import EvalConfig, evaluate

    data = tmp_path / "test.jsonl"
    questions = ["hello world, the answer is", "hola mundo la respuesta es", "привет мир", "2 + 2 ="]
    data.write_text("".join(json.dumps({"question": q, "answer": "42"}) + "\n" for q in questions))
    cfg = EvalConfig(task="math", template="plain", max_new_tokens=12, batch_size=4)
    adapters = [(n, str(p)) for n, p in tiny_fusion["adapters"].items()]
    results = {}
    for engine in ("default", "vllm"):
        out = tmp_path / f"{engine}.json"
        results[engine] = evaluate(tiny_fusion["base"], adapters, method, data, out, cfg,
                                   gate=tiny_fusion["gates"]["zh-math"] if method == "loraflow" else None,
                                   torch_dtype=torch.float32, device="cpu", progress=False, engine=engine,
                                   vllm_kwargs={"max_model_len": 256, "enforce_eager": True})
        results[engine]["outputs"] = [json.loads(line)["output"]
                                      for line in out.with_suffix(".outputs.jsonl").read_text().splitlines()]
    assert results["vllm"]["engine"] == "vllm"
    assert any(results["default"]["outputs"]), "empty outputs would make the comparison meaningless"
    assert results["vllm"]["outputs"] == results["default"]["outputs"]
    assert results["vllm"]["score"] == results["default"]["score"]
