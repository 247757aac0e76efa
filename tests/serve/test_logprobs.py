"""Log-probabilities, echo, batches of prompts, n > 1 and penalties, as evaluation harnesses use them.

The reference is a plain forward of the same fused model over the whole sequence inside the
model's own `fusion(spec)` context (no cache, no padding, no batching), log-softmax in fp32; the
penalties' reference is OpenAI's formula written here, applied in a greedy loop of full forwards.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serve_helpers import fusion_alone, load_model, save_tiny_setup

from loraflow.core.fusion_spec import FusionSpec
from loraflow.serve import ServeConfig, Server

TOL = 1e-4  # fp32; batched rows measured within 3e-7 of their own forward (test_engine)
FUSIONS = {"zh-math": FusionSpec("gate", gate="zh-math"), "zh": FusionSpec("single", adapter="zh"),
           "tiny": FusionSpec("off"), "mix": FusionSpec("static", weights=(0.7, 0.5))}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return save_tiny_setup(tmp_path_factory.mktemp("serve_logprobs"))


@pytest.fixture(scope="module")
def reference(setup):
    return load_model(setup)


@pytest.fixture(scope="module")
def url(setup):
    config = ServeConfig(max_model_len=4096, served_model_name="tiny", seed=0)
    server = Server.from_pretrained(setup["base"], setup["adapters"], gates=setup["gates"],
                                    fusions={"mix": "static:0.7,0.5"}, config=config, device="cpu")
    with server.running() as address:
        yield address


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _ok(url: str, path: str, body: dict) -> dict:
    status, out = _post(url, path, body)
    assert status == 200, out
    return out


@torch.no_grad()
def _logprobs(model, spec, seq) -> torch.Tensor:
    """(len(seq), vocab) log-probs of the next token after each position: the reference."""
    with fusion_alone(model, spec):
        return torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)


def _text(tok, token: int) -> str:
    return tok.decode([token])


def _check_entries(tok, ref: torch.Tensor, seq: list[int], start: int, lp: dict, top: int) -> None:
    """lp's entries for seq[start:] against the reference; lp["tokens"][i] is seq[start + i]."""
    worst = 0.0
    for i, token in enumerate(seq[start:]):
        row = ref[start + i - 1]  # the distribution that predicted this token
        assert lp["tokens"][i] == _text(tok, token)
        worst = max(worst, abs(lp["token_logprobs"][i] - row[token].item()))
        values, ids = row.topk(top)
        expected = {_text(tok, t): v for t, v in zip(ids.tolist(), values.tolist())}
        got = lp["top_logprobs"][i]
        assert set(got) == set(expected) | {_text(tok, token)}  # the top N and the chosen token
        worst = max([worst] + [abs(got[k] - v) for k, v in expected.items()])
    assert worst <= TOL, f"log-probs differ from the fused model's own forward by {worst:.2e}"


@contextlib.contextmanager
def _busy(url: str):
    """A long streamed request decoding meanwhile, so what runs inside shares its batch."""
    body = {"model": "zh", "prompt": "x", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as stream:
        stream.readline()  # it is decoding
        yield


def _echo(model: str, prompt, **kw) -> dict:
    return {"model": model, "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0, **kw}


def test_echo_scores_token_id_prompts_batched_under_each_fusion(url, reference):
    """lm-evaluation-harness's log-likelihood request: token ids, a batch of prompts, echo, logprobs,
    max_tokens 0; every model at once in one batch."""
    model, tok = reference
    asks = [(name, _echo(name, PROMPTS)) for name in FUSIONS]
    with _busy(url), ThreadPoolExecutor(len(asks)) as pool:
        outs = list(pool.map(lambda a: _ok(url, "/v1/completions", a[1]), asks))
    for (name, _), out in zip(asks, outs):
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert out["usage"] == {"prompt_tokens": sum(map(len, PROMPTS)), "completion_tokens": 0,
                                "total_tokens": sum(map(len, PROMPTS))}
        for prompt, choice in zip(PROMPTS, out["choices"]):
            lp = choice["logprobs"]
            assert choice["text"] == tok.decode(prompt) and choice["finish_reason"] == "length"
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["tokens"][0] == _text(tok, prompt[0]) and len(lp["tokens"]) == len(prompt)
            assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(prompt))]
            lp = {k: v[1:] for k, v in lp.items()}
            _check_entries(tok, _logprobs(model, FUSIONS[name], prompt), prompt, 1, lp, top=2)


def test_generated_tokens_carry_their_logprobs_and_echo_puts_the_prompt_first(url, reference):
    model, tok = reference
    prompt = "hello world"
    asks = [{"model": "zh-math", "prompt": prompt, "max_tokens": 6, "logprobs": 3, "temperature": 0, "ignore_eos": True},
            _echo("zh-math", prompt, max_tokens=6, logprobs=3, ignore_eos=True)]
    with _busy(url), ThreadPoolExecutor(2) as pool:  # next to a row of another fusion
        plain, echoed = pool.map(lambda a: _ok(url, "/v1/completions", a), asks)
    ids = tok(prompt)["input_ids"]
    lp = plain["choices"][0]["logprobs"]
    generated, seq = [], list(ids)
    for _ in range(6):  # greedy under the reference: the tokens the server must have chosen
        nxt = int(_logprobs(model, FUSIONS["zh-math"], seq)[-1].argmax())
        generated.append(nxt)
        seq.append(nxt)
    ref = _logprobs(model, FUSIONS["zh-math"], seq)
    _check_entries(tok, ref, seq, len(ids), lp, top=3)
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"], lp["top_logprobs"]))  # greedy
    assert plain["choices"][0]["text"] == tok.decode(generated) and lp["text_offset"][0] == 0
    e = echoed["choices"][0]
    assert e["text"] == prompt + plain["choices"][0]["text"]
    assert e["logprobs"]["token_logprobs"][0] is None and len(e["logprobs"]["tokens"]) == len(ids) + 6
    assert e["logprobs"]["tokens"][len(ids):] == lp["tokens"]
    _check_entries(tok, ref, seq, 1, {k: v[1:] for k, v in e["logprobs"].items()}, top=3)


def test_chat_logprobs_and_top_logprobs(url, reference):
    model, tok = reference
    messages = [{"role": "user", "content": "hello world"}]
    out = _ok(url, "/v1/chat/completions", {"model": "mix", "messages": messages, "max_tokens": 5, "temperature": 0,
                                            "logprobs": True, "top_logprobs": 2, "ignore_eos": True})
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(c["top_logprobs"]) == 2 for c in content)
    seq = list(prompt)
    for c in content:  # rebuild the greedy tokens from their texts' reference ranks
        row = _logprobs(model, FUSIONS["mix"], seq)[-1]
        token = int(row.argmax())
        assert c["token"] == _text(tok, token) and c["bytes"] == list(c["token"].encode())
        assert abs(c["logprob"] - row[token].item()) <= TOL
        values, ids = row.topk(2)
        assert [t["token"] for t in c["top_logprobs"]] == [_text(tok, i) for i in ids.tolist()]
        assert max(abs(t["logprob"] - v) for t, v in zip(c["top_logprobs"], values.tolist())) <= TOL
        seq.append(token)
    plain = _ok(url, "/v1/chat/completions", {"model": "mix", "messages": messages, "max_tokens": 5, "temperature": 0,
                                              "ignore_eos": True})
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == out["choices"][0]["message"]["content"]


def test_streamed_logprobs_equal_the_whole_response(url):
    ask = {"model": "zh", "prompt": [5, 6, 7], "max_tokens": 8, "logprobs": 1, "temperature": 0, "echo": True,
           "ignore_eos": True}
    whole = _ok(url, "/v1/completions", ask)["choices"][0]
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps({**ask, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(e[6:]) for e in r.read().decode().split("\n\n") if e and e != "data: [DONE]"]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for e in events:
        choice = e["choices"][0]
        text += choice["text"]
        for k, v in (choice["logprobs"] or {}).items():
            merged[k] += v
    assert text == whole["text"]
    assert merged == whole["logprobs"]


def test_n_samples_per_prompt(url):
    ask = {"model": "mix", "prompt": ["hola", "hello"], "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 11,
           "ignore_eos": True}
    out = _ok(url, "/v1/completions", ask)
    assert [c["index"] for c in out["choices"]] == list(range(6))
    texts = [c["text"] for c in out["choices"]]
    assert len(set(texts[:3])) > 1  # the samples of one prompt differ
    assert texts == [c["text"] for c in _ok(url, "/v1/completions", ask)["choices"]]  # seeded: reproducible
    alone = _ok(url, "/v1/completions", {**ask, "prompt": "hello", "n": 1, "seed": 12})  # sample 1 of prompt 2
    assert alone["choices"][0]["text"] == texts[4]
    assert out["usage"]["completion_tokens"] == 6 * 8
    greedy = _ok(url, "/v1/chat/completions", {"model": "mix", "messages": [{"role": "user", "content": "hi"}],
                                               "n": 2, "temperature": 0, "max_tokens": 6})
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (1.2, 0.0), (-0.5, 0.7)])
def test_penalties_follow_openais_formula(url, reference, presence, frequency):
    model, tok = reference
    prompt = [5, 6, 7]
    out = _ok(url, "/v1/completions", {"model": "zh", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                       "presence_penalty": presence, "frequency_penalty": frequency,
                                       "ignore_eos": True, "logprobs": 0})
    seq, generated = list(prompt), []
    for _ in range(12):
        with torch.no_grad(), fusion_alone(model, FUSIONS["zh"]):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        for t in set(generated):
            logits[t] -= frequency * generated.count(t) + presence
        generated.append(int(logits.argmax()))
        seq.append(generated[-1])
    assert out["choices"][0]["logprobs"]["tokens"] == [_text(tok, t) for t in generated]
    unpenalised = _ok(url, "/v1/completions", {"model": "zh", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                               "ignore_eos": True})
    assert unpenalised["choices"][0]["text"] != out["choices"][0]["text"]  # the penalty changed something


@pytest.mark.parametrize("body, words", [
    ({"max_tokens": 0}, "max_tokens: 0 only with echo"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": [[5], []]}, "prompt: empty"),
    ({"prompt": [[5, 10**6]]}, "token ids must be in"),
    ({"best_of": 3}, "best_of"),
    ({"n": 60, "prompt": ["a", "b"]}, "queues at most"),
])
def test_bad_completion_requests_get_400(url, body, words):
    status, out = _post(url, "/v1/completions", {"model": "zh", "prompt": "hi", **body})
    assert status == 400 and words in out["error"]["message"], out


def test_streamed_chat_with_n_and_logprobs_equals_the_whole_response(url):
    ask = {"model": "zh-math", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "n": 2,
           "temperature": 0.9, "seed": 3, "logprobs": True, "top_logprobs": 1, "ignore_eos": True}
    whole = _ok(url, "/v1/chat/completions", ask)["choices"]
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps({**ask, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(e[6:]) for e in r.read().decode().split("\n\n") if e and e != "data: [DONE]"]
    text, content, finish = ["", ""], [[], []], [None, None]
    for e in events:
        (choice,) = e["choices"]
        text[choice["index"]] += choice["delta"].get("content", "")
        content[choice["index"]] += (choice["logprobs"] or {}).get("content", [])
        finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
    assert text == [c["message"]["content"] for c in whole]
    assert [[t["token"] for t in c] for c in content] == [[t["token"] for t in c["logprobs"]["content"]] for c in whole]
    assert all(abs(a["logprob"] - b["logprob"]) <= TOL for i in range(2)
               for a, b in zip(content[i], whole[i]["logprobs"]["content"]))
    assert finish == ["length", "length"] and len(content[0]) == 6
