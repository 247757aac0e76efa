"""`torch.compile(fullgraph=True)` over a LoraFlowModel with a static KV cache: every fusion mode and
mixed-fusion batches give the eager logits, and switching fusion between calls never recompiles."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model, make_peft_adapter, two_adapters_and_a_second_gate

from loraflow import LoraFlowModel

# fp32 on CPU: a compiled graph (aot_eager) runs the same kernels in another order; measured
# differences to eager are below 1e-6. The issue asks for 1e-4.
ATOL = 1e-4
FUSIONS = ["gate", "avg", "off", "gate:g2", "single:math", "static:0.7,-0.4"]
ROWS = [["gate", "static:0.7,-0.4"], ["off", "gate:g2"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base, adapters, g2 = two_adapters_and_a_second_gate(tmp_path_factory.mktemp("compile"))

    def build():
        model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=3, gate_init_std=0.5)
        model.add_gate("g2", g2)
        return model

    return build


def _ids(seed: int, shape=(2, 5)) -> torch.Tensor:
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(seed))


def _prefill_and_decode(model, ids, steps=2):
    """Logits of a prefill on a fresh StaticCache, then `steps` greedy one-token steps."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=16)
    n = ids.shape[1]
    out = [model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(n)).logits]
    for i in range(steps):
        nxt = out[-1][:, -1:].argmax(-1)
        out.append(model(input_ids=nxt, past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([n + i])).logits)
    return out


def _run(model, fusion, ids):
    ctx = model.fusion_rows(fusion) if isinstance(fusion, list) else model.fusion(fusion)
    with ctx, torch.no_grad():
        logits = _prefill_and_decode(model, ids)
        return logits, model.last_fusion_weights


@pytest.mark.parametrize("default", ["gate", "avg"])
def test_compiled_model_equals_eager_for_every_fusion_without_recompiling(setup, default):
    """`default` avg: a static fusion merged into the base weights, which every other fusion subtracts."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = setup()
    model.set_fusion(default)
    assert model.merged == (default == "avg")
    ids = _ids(0)
    eager = {str(f): _run(model, f, ids) for f in FUSIONS + ROWS}
    counter = CompileCounterWithBackend("aot_eager")
    model.compile(backend=counter, dynamic=False)
    first = _run(model, FUSIONS[0], ids)  # compiles the prefill and the decode graphs
    compiled_frames = counter.frame_count
    assert 1 <= compiled_frames <= 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        results = {str(f): _run(model, f, ids) for f in FUSIONS + ROWS}
    assert counter.frame_count == compiled_frames  # fusion is data: no recompilation
    for name, (logits, weights) in results.items():
        want, want_w = eager[name]
        for got, ref in zip(logits, want):
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=name)
        assert (weights is None) == (want_w is None), name
        if weights is not None:
            torch.testing.assert_close(weights, want_w, atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(first[0][0], eager["gate"][0][0], atol=ATOL, rtol=0)
    # the fusions really differ (else equal logits would prove nothing)
    gaps = [(results[a][0][0] - results[b][0][0]).abs().max().item()
            for a, b in [("gate", "avg"), ("gate", "gate:g2"), ("avg", "off"), ("off", "single:math")]]
    assert min(gaps) > 1e-3, gaps


def test_torch_compile_of_the_model_itself_with_fullgraph(setup):
    """The plain `torch.compile(model, fullgraph=True)` works too: the model's own hooks fill the metadata
    outside the graph, and switching fusion does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = setup()
    ids = _ids(1, (1, 4))
    with torch.no_grad():
        eager = {f: model(input_ids=ids).logits for f in ["gate"]}
        for f in FUSIONS:
            with model.fusion(f):
                eager[f] = model(input_ids=ids).logits
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=False)
    with torch.no_grad():
        compiled(input_ids=ids)
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            for f in FUSIONS:
                with model.fusion(f):
                    torch.testing.assert_close(compiled(input_ids=ids).logits, eager[f], atol=ATOL, rtol=0)
    assert counter.frame_count == frames == 1


def test_compiled_generate_with_a_static_cache_equals_eager(setup):
    torch._dynamo.reset()
    model = setup()
    ids = _ids(2, (2, 5))
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
              attention_mask=torch.ones_like(ids), cache_implementation="static")
    with model.fusion_rows(["gate", "single:zh"]):
        eager = model.generate(input_ids=ids, **kw)
    model.compile(backend="eager")
    assert model.compiled
    with model.fusion_rows(["gate", "single:zh"]):
        compiled = model.generate(input_ids=ids, **kw)
    assert compiled.tolist() == eager.tolist()


def test_compiling_only_the_inner_model_is_refused_with_a_clear_error(setup):
    """A graph over the transformers model alone would run without the fusion metadata being filled."""
    torch._dynamo.reset()
    model = setup()
    inner = torch.compile(model.model.model, fullgraph=True, backend="eager")  # the decoder stack alone
    with pytest.raises(Exception, match="without filling its fusion metadata"), torch.no_grad():
        inner(input_ids=_ids(3, (1, 3)))


@pytest.mark.slow
def test_inductor_compiled_forward_equals_eager(setup):
    """One real compiler run (inductor, CPU): the generated kernels give the eager logits. Inductor builds
    C++ kernels: 26 s on a 2-core machine with its caches off, 82 s while the machine was busy."""
    torch._dynamo.reset()
    model = setup()
    ids = _ids(4, (2, 4))
    with model.fusion_rows(["gate", "static:0.7,-0.4"]), torch.no_grad():
        eager = model(input_ids=ids).logits
    model.compile(dynamic=False)
    with model.fusion_rows(["gate", "static:0.7,-0.4"]), torch.no_grad():
        compiled = model(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)


def test_compile_flag_for_generate_and_eval_not_for_training(capsys):
    from loraflow.cli.args import build
    from loraflow.cli.main import build_parser
    from loraflow.core.config import ModelOptions

    parser = build_parser()
    for verb in (["generate", "--prompt", "q"], ["eval", "--method", "base", "--task", "math", "--data", "d",
                                                  "--out", "o"]):
        assert build(ModelOptions, parser.parse_args([*verb, "--base", "b", "--compile"])).compile
        assert not build(ModelOptions, parser.parse_args([*verb, "--base", "b"])).compile
    with pytest.raises(SystemExit):
        parser.parse_args(["train-gate", "--base", "b", "--train", "t", "--out", "o", "--compile"])
    assert "unrecognized arguments: --compile" in capsys.readouterr().err


def test_module_level_gates_compile_without_recompiling(tmp_path):
    """One gate per adapted module: the compiled graph computes weights per module, for every fusion."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    base = build_tiny_model("llama", num_layers=2)
    adapters = {"zh": make_peft_adapter(base, tmp_path / "zh", seed=1),
                "math": make_peft_adapter(base, tmp_path / "math", seed=2, r=8)}
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, granularity="module", seed=0,
                                          gate_init_std=0.5)
    ids = _ids(5, (2, 4))
    fusions = ["gate", "avg", "off", ["gate", "single:zh"]]
    eager = [_run(model, f, ids) for f in fusions]
    counter = CompileCounterWithBackend("eager")
    model.compile(backend=counter, dynamic=False)
    _run(model, "gate", ids)
    frames = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        for f, (want, want_w) in zip(fusions, eager):
            got, got_w = _run(model, f, ids)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
            assert (got_w is None) == (want_w is None)
    assert counter.frame_count == frames
    assert (eager[0][0][0] - eager[2][0][0]).abs().max() > 1e-3
