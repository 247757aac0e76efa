"""The real server on a free localhost port, driven by the official `openai` client.

Every client call has a timeout; every wait is a bounded loop. The reference for greedy output is
the library's own `generate_texts` (transformers' `generate`) on a separately loaded model.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import fusion_alone, load_model, save_tiny_setup

from loraflow.core.fusion_spec import FusionSpec
from loraflow.core.generation import generate_texts
from loraflow.serve import ServeConfig, Server

openai = pytest.importorskip("openai")

MAX_LEN = 8192  # beyond the tiny model's 256 trained positions (RoPE extends), so a long request outlasts any test
LONG = dict(max_tokens=MAX_LEN - 100, extra_body={"ignore_eos": True})  # a request that runs until dropped
FUSIONS = {"zh-math": FusionSpec("gate", gate="zh-math"), "g2": FusionSpec("gate", gate="g2"),
           "zh": FusionSpec("single", adapter="zh"), "math": FusionSpec("single", adapter="math"),
           "tiny": FusionSpec("off"), "mix": FusionSpec("static", weights=(0.7, 0.5))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return save_tiny_setup(tmp_path_factory.mktemp("serve_http"))


@pytest.fixture(scope="module")
def reference(setup):
    return load_model(setup)


def _server(setup, **config) -> Server:
    config = ServeConfig(**{"max_model_len": MAX_LEN, "served_model_name": "tiny", "seed": 0, **config})
    return Server.from_pretrained(setup["base"], setup["adapters"], gates=setup["gates"],
                                  fusions={"mix": "static:0.7,0.5"}, config=config, device="cpu")


@pytest.fixture(scope="module")
def server(setup):
    srv = _server(setup)
    with srv.running() as url:
        srv.url = url
        yield srv


def _client(url: str, timeout: float = 60.0):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture
def client(server):
    return _client(server.url)


def _metric(url: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _post(url: str, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


# --------------------------------------------------------------------------- happy paths
def test_models_lists_every_served_fusion(client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["zh-math", "g2", "zh", "math", "tiny", "mix"]
    assert {k: m.model_extra["fusion"] for k, m in models.items()} == {
        "zh-math": "gate:zh-math", "g2": "gate:g2", "zh": "single:zh", "math": "single:math", "tiny": "off",
        "mix": "static:0.7,0.5"}
    assert client.models.retrieve("g2").model_extra["fusion"] == "gate:g2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("model", ["zh-math", "g2", "zh", "tiny", "mix"])
def test_greedy_chat_equals_the_library_generation(client, reference, model):
    ref_model, tok = reference
    reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=12, seed=3)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    with fusion_alone(ref_model, FUSIONS[model]):
        expected = generate_texts(ref_model, tok, [prompt], max_new_tokens=12)[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert reply.usage.completion_tokens == len(expected.token_ids) + (reply.choices[0].finish_reason == "stop")
    assert reply.choices[0].finish_reason == ("length" if len(expected.token_ids) == 12 else "stop")


def test_streaming_concatenates_to_the_same_text(client):
    whole = client.chat.completions.create(model="mix", messages=MESSAGES, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model="mix", messages=MESSAGES, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    plain = client.completions.create(model="zh", prompt="the answer is", temperature=0, max_tokens=10)
    streamed = list(client.completions.create(model="zh", prompt="the answer is", temperature=0, max_tokens=10,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert plain.usage.completion_tokens <= 10  # /v1/completions defaults to OpenAI's 16, asked 10


def test_stream_ends_with_done(server):
    body = json.dumps({"model": "zh", "prompt": "hi", "max_tokens": 3, "stream": True, "temperature": 0}).encode()
    req = urllib.request.Request(f"{server.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_seeded_sampling_is_reproducible(client):
    ask = dict(model="mix", prompt="hola", max_tokens=12, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **ask).choices[0].text
    b = client.completions.create(seed=7, **ask).choices[0].text
    c = client.completions.create(seed=8, **ask).choices[0].text
    assert a == b and a != c


def test_request_fusion_field_overrides_the_model(client):
    ask = dict(messages=MESSAGES, temperature=0, max_tokens=12)
    by_field = client.chat.completions.create(model="tiny", extra_body={"fusion": {"adapter": "math"}}, **ask)
    by_name = client.chat.completions.create(model="math", **ask)
    weights = client.chat.completions.create(model="tiny", extra_body={"fusion": {"weights": {"zh": 0.7, "math": 0.5}}},
                                             **ask)
    preset = client.chat.completions.create(model="mix", **ask)
    off = client.chat.completions.create(model="mix", extra_body={"fusion": "off"}, **ask)
    base = client.chat.completions.create(model="tiny", **ask)
    gate_field = client.chat.completions.create(model="zh", extra_body={"fusion": {"gate": "g2"}}, **ask)
    gate_name = client.chat.completions.create(model="g2", **ask)
    assert gate_field.choices[0].message.content == gate_name.choices[0].message.content
    assert by_field.choices[0].message.content == by_name.choices[0].message.content
    assert weights.choices[0].message.content == preset.choices[0].message.content
    assert off.choices[0].message.content == base.choices[0].message.content
    assert base.choices[0].message.content != preset.choices[0].message.content  # the fusions differ at all


def test_mixed_fusions_in_one_batch_equal_each_request_alone(server, client):
    asks = [dict(model=m, messages=[{"role": "user", "content": f"q{i} hello"}], temperature=0, max_tokens=16)
            for i, m in enumerate(["zh-math", "zh", "math", "tiny", "g2", "mix", "zh-math"])]
    asks.append(dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16,
                     extra_body={"fusion": {"weights": {"zh": 0.2, "math": 0.9}}}))
    asks.append(dict(model="zh", messages=MESSAGES, temperature=0, max_tokens=16, extra_body={"fusion": {"gate": "g2"}}))
    alone = [client.chat.completions.create(**a).choices[0].message.content for a in asks]
    # A long request keeps the batch occupied, so every request below decodes next to other fusions.
    with client.completions.create(model="math", prompt="x", stream=True, **LONG) as blocker:
        next(iter(blocker))
        with ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(lambda a: client.chat.completions.create(**a).choices[0].message.content, asks))
    assert together == alone
    assert _metric(server.url, "loraflow_decode_batch_size_sum") > _metric(server.url, "loraflow_decode_batch_size_count")


def test_hostile_requests_fail_alone_streaming_and_not(server, client, monkeypatch):
    """Requests whose logits turn non-finite join a running batch: each ends with its own error, the
    others' text (whole and streamed) is what they give alone, and the server keeps serving."""
    import loraflow.serve.registry as registry

    with pytest.raises(openai.BadRequestError, match="finite number in"):  # refused before it reaches the model
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"fusion": "static:1e30,0"})
    monkeypatch.setattr(registry, "MAX_WEIGHT", 1e31)  # now it does reach the model
    asks = [dict(model=m, prompt=f"q{i} hello", temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
            for i, m in enumerate(["zh-math", "zh", "mix", "tiny"])]
    alone = [client.completions.create(**a).choices[0].text for a in asks]
    hostile = dict(model="tiny", prompt="boom", max_tokens=8, extra_body={"fusion": "static:1e30,0"})

    def normal(i):
        if i % 2:
            return client.completions.create(**asks[i]).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **asks[i]))

    def bad(stream: bool) -> str:
        try:
            if stream:
                list(client.completions.create(stream=True, **hostile))
            else:
                client.completions.create(**hostile)
        except openai.APIError as e:
            return str(e)
        return "no error"

    with client.completions.create(model="math", prompt="x", stream=True, **LONG) as blocker:
        next(iter(blocker))
        with ThreadPoolExecutor(8) as pool:
            errors = [pool.submit(bad, s) for s in (False, True, False, True)]
            together = list(pool.map(normal, range(len(asks))))
    assert together == alone
    assert all("not finite" in e.result() for e in errors), [e.result() for e in errors]
    assert client.completions.create(**asks[0]).choices[0].text == alone[0]


def test_internal_errors_and_version_reveal_no_paths_or_internals(server, setup, monkeypatch):
    """A 500 says that the server's log has the details, not the exception's text (which can hold file paths
    and internals); /version names versions and settings, never the model's files."""
    secret = f"{setup['base']}/weights.bin is gone"

    def broken(*args, **kwargs):
        raise OSError(secret)

    monkeypatch.setattr(server.engine, "submit", broken)
    status, out = _post(server.url, "/v1/completions", json.dumps({"model": "zh", "prompt": "hi"}).encode())
    assert status == 500 and out["error"]["type"] == "server_error", out
    assert secret not in json.dumps(out) and "server's log" in out["error"]["message"]
    monkeypatch.undo()
    with urllib.request.urlopen(f"{server.url}/version", timeout=10) as r:
        text = r.read().decode()
    paths = [setup["base"], *setup["adapters"].values(), *setup["gates"].values()]
    assert str(setup["base"].parent) not in text and not any(str(p) in text for p in paths), text


def test_health_and_metrics(server, client):
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(f"{server.url}/version", timeout=10) as r:
        info = json.loads(r.read())
    assert info["versions"]["loraflow"] and info["versions"]["torch"] != "not installed"
    assert info["config"]["seed"] == 0 and info["max_model_len"] == MAX_LEN and info["models"]["g2"] == "gate:g2"
    before = _metric(server.url, "loraflow_generation_tokens_total")
    done = client.completions.create(model="zh", prompt="hi", max_tokens=5, temperature=0)
    assert _metric(server.url, "loraflow_generation_tokens_total") == before + done.usage.completion_tokens
    assert _metric(server.url, "loraflow_requests_total", '{endpoint="/v1/completions",status="200"}') >= 1
    assert _metric(server.url, "loraflow_queue_length") == 0
    assert _metric(server.url, "loraflow_prompt_tokens_total") > 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=3), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(n=129), "n"),
    (dict(stop=list("abcdefghijklmnopq")), "at most 16"),
    (dict(stop=[""]), "non-empty"),
    (dict(stop=["ok", "x" * 1025]), "at most 1024 characters"),
    (dict(seed=2**70), "seed"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(top_logprobs=2), "top_logprobs: needs logprobs: true"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logit_bias={"5": 1}), "logit_bias"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "content"),
    (dict(extra_body={"fusion": {"weights": {"fr": 1}}}), "unknown adapter"),
    (dict(extra_body={"fusion": "static:1,2,3"}), "3 weights for 2 adapters"),
    (dict(max_tokens=MAX_LEN), "maximum context length"),
])
def test_invalid_requests_get_400_with_the_reason(client, kwargs, words):
    ask = {"model": "zh", "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError, match=words) as err:
        client.chat.completions.create(**ask)
    assert err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist; served models: zh-math, g2, zh, math, tiny, mix") as err:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"


def test_prompt_longer_than_the_model_is_400(client):
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {MAX_LEN}") as err:
        client.completions.create(model="zh", prompt=[5] * MAX_LEN)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=r"token ids must be in \[0, "):
        client.completions.create(model="zh", prompt=[5, 10**6])


@pytest.mark.parametrize("body, words", [
    (b'{"model": "zh", "prompt": "hi"', "malformed JSON"),
    (b'{"model": "zh", "prompt": "hi", "temperature": NaN}', "temperature"),
    (b'{"model": "zh", "prompt": "hi", "max_tokens": "many"}', "max_tokens"),
    (b'["not", "an", "object"]', "object"),
    (b'{"prompt": "hi"}', "model"),
])
def test_malformed_bodies_get_400_in_openai_shape(server, body, words):
    status, payload = _post(server.url, "/v1/completions", body)
    assert status == 400
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert words in payload["error"]["message"]


def test_unknown_route_is_an_openai_404(server):
    status, payload = _post(server.url, "/v1/embeddings", b"{}")
    assert status == 404 and payload["error"]["type"] == "not_found_error"


def test_chat_without_a_template_is_a_clear_400(setup):
    model, tok = load_model(setup)
    tok.chat_template = None
    from loraflow.serve import ServedModels

    served = ServedModels.build(base_name="tiny", adapter_names=model.adapter_names)
    srv = Server(model, tok, served, ServeConfig(max_model_len=MAX_LEN))
    with srv.running() as url:
        client = _client(url)
        with pytest.raises(openai.BadRequestError, match="has no chat template; use /v1/completions"):
            client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason


def test_the_server_keeps_serving_after_errors(client):
    for bad in (dict(model="nope"), dict(model="zh", temperature=-1), dict(model="zh", max_tokens=10**6)):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(messages=MESSAGES, **bad)
    assert client.chat.completions.create(model="zh", messages=MESSAGES, max_tokens=3).choices[0].finish_reason


# --------------------------------------------------------------------------- load and disconnects
def test_overload_is_429_and_a_dropped_stream_frees_its_slot(setup):
    srv = _server(setup, max_batch_size=1, max_queue=1)
    with srv.running() as url:
        client = _client(url)
        stream = client.completions.create(model="zh", prompt="a", stream=True, **LONG)
        next(iter(stream))  # the long request holds the only row
        waiting = ThreadPoolExecutor(1).submit(
            client.completions.create, model="math", prompt="b", max_tokens=4, temperature=0)
        _wait_for(lambda: _metric(url, "loraflow_queue_length") == 1, "the second request to queue")
        with pytest.raises(openai.RateLimitError, match="busy") as err:
            client.completions.create(model="zh", prompt="c", max_tokens=2)
        assert err.value.status_code == 429
        stream.close()  # the client goes away: its row must be freed for the waiting request
        assert waiting.result(timeout=60).choices[0].finish_reason in ("stop", "length")
        assert client.completions.create(model="zh", prompt="c", max_tokens=2).choices[0].finish_reason
        # the dropped request never ran to its max_tokens
        assert _metric(url, "loraflow_generation_tokens_total") < LONG["max_tokens"]


def test_a_client_that_times_out_frees_its_row(server):
    before = _metric(server.url, "loraflow_generation_tokens_total")
    impatient = _client(server.url, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="zh", prompt="slow", **LONG)
    _wait_for(lambda: _metric(server.url, "loraflow_batch_size") == 0, "the abandoned row to leave")
    assert _metric(server.url, "loraflow_generation_tokens_total") - before < LONG["max_tokens"]


def test_shutdown_ends_open_streams_and_stops_the_engine(setup):
    srv = _server(setup)
    with srv.running() as url:
        client = _client(url)
        stream = client.completions.create(model="zh", prompt="a", stream=True, **LONG)
        first = next(iter(stream))
        received: list = [first]
        failure: list = []

        def read_rest():
            try:
                received.extend(stream)
            except openai.APIError as e:
                failure.append(e)

        reader = threading.Thread(target=read_rest)
        reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert failure and "shutting down" in str(failure[0])
    assert not srv.engine.running
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
