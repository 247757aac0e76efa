"""Continuous batching: rows that join and leave a running batch, each with its own fusion, decode
exactly as they do alone.

References are independent of the batching code: a full forward over each row's whole sequence
(no cache, no padding, the model in that row's fusion), and transformers' own `generate`.
"""

from __future__ import annotations

import threading

import pytest
import torch
from serve_helpers import fusion_alone, llama_byte_fallback_tokenizer, load_model, save_tiny_setup, unigram_cleanup_tokenizer

from loraflow.core.fusion_spec import FusionSpec
from loraflow.core.generation import generate_texts
from loraflow.serve.batching import DecodeBatch
from loraflow.serve.engine import Engine, GenerationRequest, SamplingParams

# fp32 on CPU; measured max |diff| between a batched row's logits and its own full forward: <= 3e-7
# (one fusion and mixed fusions with gates alike), so 1e-4 leaves a wide margin yet catches any masking error.
LOGIT_TOL = 1e-4
ZH, OFF, MIX = FusionSpec("single", adapter="zh"), FusionSpec("off"), FusionSpec("static", weights=(0.7, 0.5))
GATE, GATE2 = FusionSpec("gate", gate="zh-math"), FusionSpec("gate", gate="g2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return save_tiny_setup(tmp_path_factory.mktemp("serve_engine"))


@pytest.fixture
def model_tok(setup):
    return load_model(setup)


def _fusions(mixed: bool) -> list[FusionSpec]:
    return [GATE, ZH, OFF, GATE2, MIX] if mixed else [MIX] * 5


@torch.no_grad()
def _reference_logits(model, spec, seq) -> torch.Tensor:
    with fusion_alone(model, spec):
        return model(input_ids=torch.tensor([seq])).logits[0, -1].float()


@pytest.mark.parametrize("mixed", [False, True], ids=["one-fusion", "mixed-fusions"])
def test_rows_joining_and_leaving_keep_their_own_logits(model_tok, mixed):
    model, _ = model_tok
    fusions = _fusions(mixed)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [23]]
    batch = DecodeBatch(model)
    seqs, specs, worst = [], [], 0.0

    def check(logits):
        nonlocal worst
        for row, seq in enumerate(seqs):
            worst = max(worst, (logits[row] - _reference_logits(model, specs[row], seq)).abs().max().item())
        return logits.argmax(-1).tolist()

    def join(group):
        logits = batch.prefill([prompts[i] for i in group], [fusions[i] for i in group])
        seqs.extend(list(prompts[i]) for i in group)
        specs.extend(fusions[i] for i in group)
        for seq, tok in zip(seqs[-len(group):], logits.argmax(-1).tolist()):
            seq.append(tok)
        first = len(seqs) - len(group)
        for row in range(first, len(seqs)):  # the newcomers' prefill logits against their reference
            diff = logits[row - first] - _reference_logits(model, specs[row], seqs[row][:-1])
            prefill_diffs.append(diff.abs().max().item())

    prefill_diffs: list[float] = []
    join([0, 1])
    for step in range(8):
        if step == 2:
            join([2])  # longer than the running batch: the batch is padded
        if step == 4:
            join([3])  # shorter: the newcomer is padded
        if step == 5:
            batch.keep([1, 2, 3])  # row 0 leaves
            del seqs[0], specs[0]
        tokens = check(batch.decode([s[-1] for s in seqs]))
        for seq, tok in zip(seqs, tokens):
            seq.append(tok)
        if step == 6:
            batch.keep([2])  # only the last row stays; the cache is cut to its length
            seqs, specs = [seqs[2]], [specs[2]]
            assert batch.width == len(seqs[0]) - 1
    assert max(prefill_diffs) <= LOGIT_TOL
    assert worst <= LOGIT_TOL, f"batched logits differ from each row alone by {worst:.2e}"


def _drive(engine, schedule: dict[int, list[GenerationRequest]], max_steps: int = 2000) -> None:
    """Submit `schedule[step]` before each engine step until every request finished."""
    pending = [r for group in schedule.values() for r in group]
    for step in range(max_steps):
        for request in schedule.get(step, []):
            engine.submit(request)
        engine.step()
        if step >= max(schedule) and all(r._done for r in pending):
            return
    raise AssertionError("requests did not finish")


def _request(prompt, fusion, **params) -> GenerationRequest:
    out = {"text": "", "reason": None, "tokens": 0}

    def emit(update):
        out["text"] += update.text
        out["reason"], out["tokens"], out["error"] = update.finish_reason, update.completion_tokens, update.error
        if update.prompt_logprobs is not None:
            out["prompt_logprobs"] = update.prompt_logprobs
        request._done = update.finish_reason is not None

    request = GenerationRequest(list(prompt), fusion, SamplingParams(**{"max_tokens": 12, "temperature": 0.0,
                                                                       **params}), emit=emit)
    request._done, request.out = False, out
    return request


@pytest.mark.parametrize("mixed", [False, True], ids=["one-fusion", "mixed-fusions"])
def test_a_request_decodes_the_same_alone_and_in_a_changing_batch(model_tok, mixed):
    model, tok = model_tok
    fusions = _fusions(mixed)
    cases = [  # (step it arrives, prompt, fusion, params)
        (0, [5, 6, 7], fusions[0], dict(max_tokens=10, ignore_eos=True)),
        (0, [8, 9, 10, 11, 12, 13, 14], fusions[1], dict(max_tokens=4, ignore_eos=True)),
        (2, [15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26], fusions[2], dict(max_tokens=9)),
        (3, [27], fusions[3], dict(max_tokens=12, temperature=0.9, top_p=0.8, seed=1234, ignore_eos=True)),
        (3, [30, 31], fusions[4], dict(max_tokens=8, stop=("e",))),
    ]
    together = [_request(p, f, **kw) for _, p, f, kw in cases]
    schedule: dict[int, list] = {}
    for (step, *_), request in zip(cases, together):
        schedule.setdefault(step, []).append(request)
    engine = Engine(model, tok, max_batch_size=8, max_model_len=256)
    _drive(engine, schedule)
    sample = engine.metrics.registry.get_sample_value
    assert sample("loraflow_decode_batch_size_sum") > sample("loraflow_decode_batch_size_count"), \
        "the requests never shared a decode step"
    for (_, p, f, kw), batched in zip(cases, together):
        alone = _request(p, f, **kw)
        _drive(Engine(model, tok, max_model_len=256), {0: [alone]})
        assert batched.out == alone.out
    assert [r.out["reason"] for r in together[:2]] == ["length", "length"]
    assert [r.out["tokens"] for r in together[:2]] == [10, 4]


def test_greedy_output_equals_transformers_generate(model_tok):
    model, tok = model_tok
    prompts = ["hello world", "the answer is", "hola"]
    requests = [_request(tok(p)["input_ids"], MIX, max_tokens=15) for p in prompts]
    _drive(Engine(model, tok, max_model_len=256), {0: requests})
    with fusion_alone(model, MIX):
        reference = generate_texts(model, tok, prompts, max_new_tokens=15, batch_size=1, add_special_tokens=True)
    assert [r.out["text"] for r in requests] == [g.text for g in reference]
    assert any(r.out["text"] for r in requests)


def test_stop_strings_cut_the_text_and_never_leak_into_the_stream(model_tok):
    model, tok = model_tok
    free = _request(tok("hello")["input_ids"], MIX, max_tokens=30, ignore_eos=True)
    _drive(Engine(model, tok, max_model_len=256), {0: [free]})
    text = free.out["text"]
    stop = text[5:8]  # a stop string that the free run produces after 5 characters
    assert len(stop) == 3
    deltas = []
    stopped = _request(tok("hello")["input_ids"], MIX, max_tokens=30, ignore_eos=True, stop=(stop,))
    inner = stopped.emit
    stopped.emit = lambda u: (deltas.append(u.text), inner(u))
    _drive(Engine(model, tok, max_model_len=256), {0: [stopped]})
    assert stopped.out["text"] == text[: text.index(stop)]
    assert stopped.out["reason"] == "stop"
    assert all(stop not in "".join(deltas[:i + 1]) for i in range(len(deltas)))


def test_cancelled_rows_leave_at_the_next_step(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_model_len=256)
    keep = _request([5, 6], MIX, max_tokens=50, ignore_eos=True)
    drop = _request([7, 8, 9], MIX, max_tokens=50, ignore_eos=True)
    engine.submit(keep)
    engine.submit(drop)
    for _ in range(3):
        engine.step()
    assert len(engine._batch) == 2
    drop.cancel()
    engine.step()
    assert len(engine._batch) == 1 and drop.out["reason"] == "cancelled"
    assert engine.metrics.registry.get_sample_value("loraflow_batch_size") == 1


def _wait(request, timeout: float = 30.0) -> None:
    finished = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if request._done:
            return
        finished.wait(0.01)
    raise AssertionError("the request did not finish")


def test_a_failed_step_fails_its_rows_and_the_engine_keeps_serving(model_tok, caplog):
    """The failed rows' clients learn only that it failed (exception text can hold paths and internals); the
    server's log has the exception."""
    model, tok = model_tok
    engine = Engine(model, tok, max_model_len=256)
    victim = _request([5, 6], MIX, max_tokens=20, ignore_eos=True)
    engine.submit(victim)
    engine.step()

    def broken(tokens):
        raise RuntimeError("device lost")  # what an out-of-memory error would look like

    engine._batch.decode = broken
    engine.start()
    try:
        _wait(victim)
        assert victim.out["reason"] == "error"
        assert "device lost" not in victim.out["error"] and "server's log" in victim.out["error"]
        assert any("device lost" in str(r.exc_info) for r in caplog.records if r.exc_info)
        after = _request([5, 6], MIX, max_tokens=3)
        engine.submit(after)
        _wait(after)
        assert after.out["reason"] in ("stop", "length") and engine.running
    finally:
        engine.stop()


def test_only_rows_asking_for_prompt_logprobs_pay_for_them(model_tok):
    """Every position's logits (prompt x vocabulary, fp32) are computed for a row that asked for prompt
    log-probabilities alone, never for the rows admitted beside it; each still gets its answer."""
    model, tok = model_tok
    engine = Engine(model, tok, max_model_len=256)
    calls = []
    real = engine._batch.prefill

    def spy(prompts, fusions, *, every_position=False):
        calls.append((len(prompts), every_position))
        return real(prompts, fusions, every_position=every_position)

    engine._batch.prefill = spy
    asking = _request([5, 6, 7, 8], MIX, max_tokens=2)
    asking.prompt_logprobs = 1
    others = [_request([9, 10, 11], MIX, max_tokens=2), _request([12, 13], MIX, max_tokens=2)]
    for r in (others[0], asking, others[1]):
        engine.submit(r)
    while not all(r._done for r in (asking, *others)):
        engine.step()
    assert sorted(calls) == [(1, True), (2, False)], calls
    assert all(r.out["reason"] in ("stop", "length") for r in (asking, *others))


def test_a_stopping_engine_refuses_new_requests_and_ends_queued_ones(model_tok):
    from loraflow.serve.engine import Overloaded, ShuttingDown

    model, tok = model_tok
    engine = Engine(model, tok, max_model_len=256, max_queue=1)
    queued = _request([5, 6], MIX)
    engine.submit(queued)
    with pytest.raises(Overloaded, match="1 requests are already waiting"):
        engine.submit(_request([7], MIX))
    engine.stop()  # never started: the queued request still gets its answer
    assert queued.out["reason"] == "cancelled"
    with pytest.raises(ShuttingDown):
        engine.submit(_request([7], MIX))


def _streamed(request) -> GenerationRequest:
    """Record every delta a request receives (what a streaming client sees)."""
    request.deltas = []
    inner = request.emit
    request.emit = lambda u: (request.deltas.append(u.text), inner(u))
    return request


HOSTILE = {  # what each breaks: the logits, the sampler, the stop handling
    "inf-weights": ([40, 41], FusionSpec("static", weights=(1e30, 0.0)), dict(max_tokens=8)),
    "tiny-temperature": ([42, 43], MIX, dict(max_tokens=8, temperature=1e-40, seed=1)),  # logits / T overflow
    "bad-stop": ([44], MIX, dict(max_tokens=8, stop=(123,))),
}


@pytest.mark.parametrize("hostile", list(HOSTILE))
def test_a_hostile_request_fails_alone_and_the_others_decode_as_alone(model_tok, hostile):
    model, tok = model_tok
    cases = [  # (step it arrives, prompt, fusion, params): greedy and seeded sampling, one fusion each
        (0, [5, 6, 7], GATE, dict(max_tokens=14, ignore_eos=True)),
        (0, [8, 9, 10, 11], ZH, dict(max_tokens=12, ignore_eos=True, temperature=0.8, seed=5)),
        (1, [12, 13], MIX, dict(max_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.9, seed=6)),
    ]
    prompt, fusion, params = HOSTILE[hostile]
    normal = [_streamed(_request(p, f, **kw)) for _, p, f, kw in cases]
    bad_in_running_batch = _streamed(_request(prompt, fusion, **params))  # joins rows that are decoding
    bad_with_newcomer = _streamed(_request(prompt, fusion, **params))  # prefilled together with a normal row
    schedule = {0: normal[:2], 1: [normal[2], bad_with_newcomer], 3: [bad_in_running_batch]}
    engine = Engine(model, tok, max_batch_size=8, max_model_len=256)
    _drive(engine, schedule)
    for bad in (bad_in_running_batch, bad_with_newcomer):
        assert bad.out["reason"] == "error" and bad.out["text"] == ""
    assert len(engine._batch) == 0 and engine.metrics.registry.get_sample_value("loraflow_batch_size") == 0
    for (_, p, f, kw), batched in zip(cases, normal):
        alone = _streamed(_request(p, f, **kw))
        _drive(Engine(model, tok, max_model_len=256), {0: [alone]})
        assert batched.out == alone.out and batched.deltas == alone.deltas
        assert batched.out["reason"] == "length"


@pytest.mark.parametrize("make_tokenizer", [llama_byte_fallback_tokenizer, unigram_cleanup_tokenizer],
                         ids=["llama-byte-fallback", "unigram-cleanup"])
def test_streamed_text_equals_the_decode_of_all_tokens_for_non_prefix_stable_tokenizers(make_tokenizer, tmp_path):
    """A random model over a SentencePiece-style vocabulary writes byte tokens, cut characters and
    spaced punctuation; each request's deltas must add up to generate_texts' text (the decode of all
    its tokens), and a stop string taken from that text must cut it there."""
    model, tok = load_model(save_tiny_setup(tmp_path, chat_template=False, tokenizer=make_tokenizer()))
    prompts = ["hello world", "don't stop", "naïve café", "the cat"]
    with fusion_alone(model, MIX):
        reference = generate_texts(model, tok, prompts, max_new_tokens=40, batch_size=1)
    assert any("\ufffd" in g.text or any(ord(c) > 127 for c in g.text) for g in reference)  # bytes were written
    requests = [_streamed(_request(tok(p)["input_ids"], MIX, max_tokens=40)) for p in prompts]
    _drive(Engine(model, tok, max_model_len=256), {0: requests})
    for request, expected in zip(requests, reference):
        assert request.out["text"] == "".join(request.deltas) == expected.text == tok.decode(
            expected.token_ids, skip_special_tokens=True).rstrip("\ufffd")
    long = max(reference, key=lambda g: len(g.text))
    stop = long.text[len(long.text) // 2:][:2]
    stopped = _streamed(_request(tok(prompts[reference.index(long)])["input_ids"], MIX, max_tokens=40, stop=(stop,)))
    _drive(Engine(model, tok, max_model_len=256), {0: [stopped]})
    assert stopped.out["text"] == "".join(stopped.deltas) == long.text[:long.text.index(stop)]
    assert stopped.out["reason"] == "stop"


def test_held_back_text_is_the_longest_tail_that_may_grow_into_a_stop_string():
    """What may still become a stop string is held back: checked against the definition (try every prefix)
    on random texts over a small alphabet, where borders and overlaps are common; a 1,024-character stop
    string is handled too (the matcher is linear in its length)."""
    import random

    from loraflow.serve.engine import _safe_length

    def by_definition(text, stops):
        end = len(text.rstrip("\ufffd"))
        holds = [k for s in stops for k in range(1, len(s)) if k <= end and text[:end].endswith(s[:k])]
        return end - max(holds, default=0)

    rng = random.Random(0)
    for _ in range(5000):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 9))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 14))) + "\ufffd" * rng.randint(0, 1)
        assert _safe_length(text, stops) == by_definition(text, stops), (text, stops)
    stop = "ab" * 511 + "c"
    assert _safe_length("x" + "ab" * 600, [stop]) == 1 + 2 * 600 - 1022


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_keep_decoding(model_tok):
    """A prompt longer than `prefill_chunk` runs a chunk per step and the running row decodes a token between
    its chunks (one long prefill would stall it); the long request's greedy text and prompt log-probabilities
    equal the same request prefilled whole."""
    model, tok = model_tok
    long_prompt = [(i * 7) % 250 + 3 for i in range(21)]

    def long_request():
        r = _request(long_prompt, MIX, max_tokens=6, ignore_eos=True)
        r.prompt_logprobs = 2
        return r

    whole = Engine(model, tok, max_model_len=256, prefill_chunk=64)
    alone = long_request()
    whole.submit(alone)
    while not alone._done:
        whole.step()

    engine = Engine(model, tok, max_model_len=256, prefill_chunk=4)
    running = _request([5, 6], MIX, max_tokens=40, ignore_eos=True)
    engine.submit(running)
    engine.step()
    chunked = long_request()
    engine.submit(chunked)
    before = running.out["tokens"]
    while chunked.out["tokens"] == 0:
        engine.step()
    assert running.out["tokens"] - before >= 21 // 4 - 1  # a token per chunk step, not one for the whole prompt
    while not chunked._done:
        engine.step()
    assert chunked.out["text"] == alone.out["text"] and chunked.out["reason"] == alone.out["reason"]
    got, want = chunked.out["prompt_logprobs"], alone.out["prompt_logprobs"]
    assert len(got) == len(want) == 21 and got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert g.token == w.token and abs(g.logprob - w.logprob) < 1e-4
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
