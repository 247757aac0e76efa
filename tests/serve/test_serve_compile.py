"""`loraflow serve --compile`: the engine's prefill and decode forwards run under torch.compile
(fullgraph, dynamic shapes) and give the eager server's tokens, with a few graphs for every batch
composition and fusion. Backend "eager" (dynamo's graph capture and guards, without inductor's
kernel build) keeps the tests fast; tests/core/test_compile.py runs inductor once."""

from __future__ import annotations

import random

import pytest
import torch
from serve_helpers import load_model, save_tiny_setup

from loraflow.core.fusion_spec import FusionSpec
from loraflow.serve.batching import DecodeBatch
from loraflow.serve.engine import Engine, GenerationRequest, SamplingParams

ZH, OFF, MIX = FusionSpec("single", adapter="zh"), FusionSpec("off"), FusionSpec("static", weights=(0.7, 0.5))
GATE, GATE2 = FusionSpec("gate", gate="zh-math"), FusionSpec("gate", gate="g2")
FUSIONS = [GATE, ZH, OFF, GATE2, MIX]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return save_tiny_setup(tmp_path_factory.mktemp("serve_compile"))


def _request(prompt, fusion, max_tokens, **kw) -> GenerationRequest:
    out = {"tokens": [], "logprobs": [], "text": "", "reason": None, "prompt": None}

    def emit(update):
        out["text"] += update.text
        out["tokens"] += [t.token for t in update.logprobs or []]
        out["logprobs"] += [t.logprob for t in update.logprobs or []]
        out["prompt"] = out["prompt"] or update.prompt_logprobs
        out["reason"] = update.finish_reason

    request = GenerationRequest(list(prompt), fusion, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                     ignore_eos=True), emit=emit, logprobs=0, **kw)
    request.out = out
    return request


def _serve(model, tok) -> list[dict]:
    """Requests with mixed fusions arriving over time into one engine; each request's output."""
    cases = [  # (step it arrives, prompt, fusion, max_tokens)
        (0, [5, 6, 7], GATE, 9), (0, [8, 9, 10, 11, 12, 13, 14], ZH, 3), (2, [15], OFF, 8),
        (3, [27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37], GATE2, 7), (3, [30, 31], MIX, 5), (9, [40, 41], GATE, 4),
    ]
    requests = [_request(p, f, n, prompt_logprobs=1 if i == 3 else None) for i, (_, p, f, n) in enumerate(cases)]
    engine = Engine(model, tok, max_batch_size=8, max_model_len=256)
    for step in range(200):
        for (at, *_), request in zip(cases, requests):
            if at == step:
                engine.submit(request)
        engine.step()
        if step > 9 and all(r.out["reason"] for r in requests):
            break
    sample = engine.metrics.registry.get_sample_value
    assert sample("loraflow_decode_batch_size_sum") > sample("loraflow_decode_batch_size_count")  # rows met
    return [r.out for r in requests]


def test_a_compiled_server_gives_the_eager_tokens_for_mixed_fusion_requests(setup):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, tok = load_model(setup)
    eager = _serve(model, tok)
    counter = CompileCounterWithBackend("eager")
    model.compile(backend=counter, dynamic=True)
    compiled = _serve(model, tok)
    assert counter.frame_count >= 2  # the forwards really ran compiled (prefill and decode)
    for want, got in zip(eager, compiled):
        assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
        assert len(got["tokens"]) >= 3 and got["reason"] == "length"
        torch.testing.assert_close(got["logprobs"], want["logprobs"], atol=1e-4, rtol=0)
    scored = [(t.token, t.logprob) for t in compiled[3]["prompt"][1:]]
    want = [(t.token, t.logprob) for t in eager[3]["prompt"][1:]]
    assert [t for t, _ in scored] == [t for t, _ in want]
    torch.testing.assert_close([lp for _, lp in scored], [lp for _, lp in want], atol=1e-4, rtol=0)
    assert len({tuple(o["tokens"][:3]) for o in eager}) > 1  # the requests do not all decode alike


def _random_schedule(batch: DecodeBatch, seed: int, steps: int = 30) -> None:
    """Rows join (1 to 3, prompts of 1 to 9 tokens, some scoring every position), leave and decode."""
    rng = random.Random(seed)
    for _ in range(steps):
        op = rng.random()
        if not len(batch) or (op < 0.25 and len(batch) < 8):
            n = rng.choice([1, 2, 3])
            batch.prefill([[rng.randrange(3, 200) for _ in range(rng.choice([1, 2, 5, 9]))] for _ in range(n)],
                          [rng.choice(FUSIONS) for _ in range(n)], every_position=rng.random() < 0.2)
        elif op < 0.4:
            batch.keep(sorted(rng.sample(range(len(batch)), rng.randrange(0, len(batch) + 1))))
        else:
            batch.decode([rng.randrange(3, 200) for _ in range(len(batch))])


def test_compiles_stay_few_whatever_the_batch_composition_and_fusions(setup):
    """One graph per kind of forward (prefill, prefill scoring every position, decode; at batch 1 and at
    more): after a warm-up that meets each with two sizes, rows joining and leaving with any fusion and
    any prompt length never compile again."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _ = load_model(setup)
    counter = CompileCounterWithBackend("eager")
    model.compile(backend=counter, dynamic=True)
    batch = DecodeBatch(model)
    for every in (False, True):  # each kind of forward, at batch 1 and at a few sizes
        for n in (1, 2, 3):
            batch.keep([])
            batch.prefill([[5 + i] * (1 + 3 * i) for i in range(n)], FUSIONS[:n], every_position=every)
            batch.decode([7] * n)
            batch.decode([6] * n)
            batch.prefill([[9] * (n + 2)], [GATE2], every_position=every)
            batch.decode([8] * (n + 1))
    warm = counter.frame_count
    assert 3 <= warm <= 3 * 2 < torch._dynamo.config.recompile_limit  # beyond the limit dynamo runs eager
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            _random_schedule(DecodeBatch(model), seed)
    assert counter.frame_count == warm


def test_compile_flag_for_serve(setup):
    from loraflow.cli.args import build
    from loraflow.cli.main import build_parser
    from loraflow.serve.config import ServeConfig
    from loraflow.serve.registry import ServedModels
    from loraflow.serve.server import Server

    parser = build_parser()
    args = ["serve", "--base", "b", "--adapter", "zh=z"]
    assert build(ServeConfig, parser.parse_args([*args, "--compile"])).compile
    assert not build(ServeConfig, parser.parse_args(args)).compile
    with pytest.raises(ValueError, match="compile"):
        ServeConfig(compile="yes")
    torch._dynamo.reset()
    model, tok = load_model(setup)
    served = ServedModels.build(base_name="tiny", adapter_names=["zh", "math"], gate_names=["zh-math"], presets={})
    Server(model, tok, served, ServeConfig())
    assert not model.compiled
    Server(model, tok, served, ServeConfig(compile=True))
    assert model.compiled
