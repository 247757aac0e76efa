"""`loraflow serve --engine vllm` end to end, through the official OpenAI client: served names and the
`fusion` field give the transformers engine's greedy tokens and log-probabilities, in the checkpoint's dtype
by default, long and prefix-cached prompts and concurrent mixed requests included; unknown models and bad fusions get OpenAI-shaped 404/400."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from vllm_support import NEW_TOKENS, helper, prepared, reference, require_vllm, tiny_fusion  # noqa: F401

require_vllm()

TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    from pathlib import Path

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def server(tiny_fusion, tmp_path_factory):
    port = _free_port()
    model_dir = tmp_path_factory.mktemp("served") / "vllm-model"
    a, g = tiny_fusion["adapters"], tiny_fusion["gates"]
    cmd = [sys.executable, "-m", "loraflow.cli", "serve", "--engine", "vllm", "--base", str(tiny_fusion["base"]),
           "--adapter", f"zh={a['zh']}", "--adapter", f"math={a['math']}", "--gate", f"zh-math={g['zh-math']}",
           "--gate", f"other={g['other']}", "--fusion", "mix=static:0.7,-0.3", "--served-model-name", "plain",
           "--max-model-len", "512", "--port", str(port),  # no --dtype: the checkpoint's (float32), as by default
           "--vllm-args", "--enforce-eager --max-num-batched-tokens 512", "--vllm-model-dir", str(model_dir)]
    proc = subprocess.Popen(cmd, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, f"loraflow serve --engine vllm exited with {proc.returncode}"
        assert time.monotonic() < deadline, "server did not start in 600 s"
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    yield url
    assert _processes_mentioning(str(model_dir)), "vLLM's server should be running under the proxy"
    from pathlib import Path

    for pid in _processes_mentioning(str(model_dir)):  # reachable only through the proxy: no TCP port
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"vllm.entrypoints.openai.api_server" in args:
            assert b"--uds" in args and b"--port" not in args and b"--api-key" not in args, args
    proc.terminate()  # SIGTERM, as a service manager would: vLLM's server and engine must go with it
    proc.wait(timeout=90)
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(model_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _processes_mentioning(str(model_dir))
    for pid in left:  # do not leave them running even when the check fails
        os.kill(pid, 9)
    assert not left, f"vLLM processes left running after SIGTERM: {left}"


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="-")


def _complete(client, model, prompt, extra_body):
    out = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
                                    extra_body={**extra_body, "return_tokens_as_token_ids": True})  # vLLM's field
    choice = out.choices[0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    return out.model, tokens, choice.logprobs.token_logprobs


def _check(client, reference, model, want_fusion, prompt, extra_body):
    """A completion of served `model` (plus `extra_body`) equals the transformers engine under `want_fusion`."""
    name, tokens, logprobs = _complete(client, model, prompt, extra_body)
    ref_tokens, ref_logprobs = reference(prompt, want_fusion)
    assert name == model
    assert tokens == ref_tokens, f"{model} {extra_body}: tokens {tokens} != transformers engine {ref_tokens}"
    worst = max(abs(x - y) for x, y in zip(logprobs, ref_logprobs))
    assert worst < TOL, f"{model} {extra_body}: log-probs differ by {worst:.2e}"


PROMPT = [5, 17, 42, 99, 7, 123, 64, 3, 250, 11]
CASES = [("zh-math", "gate:zh-math", {}), ("other", "gate:other", {}), ("zh", "single:zh", {}),
         ("math", "single:math", {}), ("plain", "off", {}), ("mix", "static:0.7,-0.3", {}),
         ("plain", "single:math", {"fusion": {"adapter": "math"}}), ("zh", "avg", {"fusion": "avg"}),
         ("plain", "gate:other", {"fusion": {"gate": "other"}})]


@pytest.mark.slow
def test_served_names_and_fusion_field_equal_the_transformers_engine(client, reference):
    for model, fusion, extra in CASES:
        _check(client, reference, model, fusion, PROMPT, extra)


@pytest.mark.slow
def test_long_prompts_match_in_the_checkpoints_dtype_first_and_cached(client, reference):
    """Served without --dtype, vLLM loads the float32 checkpoint in float32 as the default engine does (its own
    `auto` is bfloat16 on CPU): a long prompt matches, on its full prefill and again from the prefix cache."""
    long = [(i * 37) % 290 + 3 for i in range(400)]
    for _ in range(2):
        _check(client, reference, "zh-math", "gate:zh-math", long, {})
        _check(client, reference, "mix", "static:0.7,-0.3", long, {})


@pytest.mark.slow
def test_concurrent_mixed_requests(client, reference):
    prompts = [[(i * 7 + j * 13) % 290 + 3 for j in range(9)] for i in range(len(CASES))]
    with ThreadPoolExecutor(len(CASES)) as pool:
        list(pool.map(lambda c: _check(client, reference, c[0][0], c[0][1], c[1], c[0][2]), zip(CASES, prompts)))


@pytest.mark.slow
def test_errors_are_openai_shaped(server):
    import httpx

    r = httpx.post(f"{server}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "served models" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", json={"model": "zh", "prompt": "x", "fusion": "gate:missing"})
    assert r.status_code == 400 and "no gate named 'missing'" in r.json()["error"]["message"]
    models = {m["id"]: m["fusion"] for m in httpx.get(f"{server}/v1/models").json()["data"]}
    assert models == {"zh-math": "gate:zh-math", "other": "gate:other", "zh": "single:zh", "math": "single:math",
                      "plain": "off", "mix": "static:0.7,-0.3"}
    assert httpx.get(f"{server}/v1/models/mix").json()["fusion"] == "static:0.7,-0.3"
    assert httpx.get(f"{server}/v1/models/nope").status_code == 404
    assert httpx.get(f"{server}/health").status_code == 200  # vLLM's own, passed through


@pytest.mark.slow
def test_streaming_names_the_served_model(client):
    chunks = list(client.completions.create(model="zh-math", prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert chunks and all(c.model == "zh-math" for c in chunks)
