"""The same parity under vLLM's torch.compile (the default when enforce_eager is off): the layers read the
routing buffers as data, so one compiled graph serves every mix of fusions."""

from __future__ import annotations

import pytest
from test_engine import FUSIONS, _prompts, assert_matches, make_llm, run


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
