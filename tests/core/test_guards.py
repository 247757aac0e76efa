"""`LoraFlowModel.compile(guards="tensors")`: dynamo re-checks every tensor, the training flags and the
model's graph key before each call, not the thousands of facts about its modules; what users change
after compiling (dtype, gates, a second compile) still retraces, and results equal eager mode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import two_adapters_and_a_second_gate

import loraflow.core.guards as guards
from loraflow import LoraFlowModel
from loraflow.common.errors import LoraFlowError

ATOL = 1e-4  # fp32, the same bound as tests/core/test_compile.py


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    base, adapters, g2 = two_adapters_and_a_second_gate(tmp_path_factory.mktemp("guards"))
    return lambda: (LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=3, gate_init_std=0.5), g2)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(seed))


def _logits(model, fusion: str = "gate") -> torch.Tensor:
    with model.fusion(fusion), torch.no_grad():
        return model(input_ids=_ids()).logits


def test_compile_keeps_tensor_guards_training_flags_and_the_graph_key(build, monkeypatch):
    seen, keep_tensor_guards = [], guards.keep_tensor_guards

    def recording(entries, **kwargs):
        keep = keep_tensor_guards(entries, **kwargs)
        seen.extend(zip(entries, keep))
        return keep

    monkeypatch.setattr(guards, "keep_tensor_guards", recording)
    torch._dynamo.reset()
    model, _ = build()
    model.compile(backend="eager", dynamic=False)
    _logits(model)
    kept = [e for e, k in seen if k]
    dropped = [e for e, k in seen if not k]
    assert all(k for e, k in seen if e.guard_type == "TENSOR_MATCH")
    assert sum(e.guard_type == "TENSOR_MATCH" for e in kept) >= 2 * 7 + 2  # (base or folded) weights, B, gates
    # kept for its value, the key object itself, not for how dynamo happens to name the guard
    assert [e.name.endswith(".graph_key") for e in kept if e.has_value and e.value is model._engine.graph_key] == [True]
    assert not any(e.name.endswith(".graph_key") for e in dropped)
    assert any(e.name.endswith(".training") for e in kept)
    assert all(e.orig_guard.source.is_unspecialized_nn_module() for e in dropped)
    assert len(kept) < 0.3 * len(seen), (len(kept), len(seen))  # most guards are facts about modules


def test_every_guard_with_guards_all_and_a_clear_error_for_another_value(build):
    assert guards.compile_kwargs("all", {"mode": "max-autotune"}) == {"mode": "max-autotune"}
    kwargs = guards.compile_kwargs("tensors", {"mode": "max-autotune-no-cudagraphs", "dynamic": False})
    from torch._inductor import list_mode_options

    # torch refuses `mode` beside `options`: the mode's own options are passed instead
    options = dict(kwargs.pop("options"))
    keep = options.pop("guard_filter_fn")
    assert kwargs == {"dynamic": False} and options == list_mode_options("max-autotune-no-cudagraphs")
    assert keep.func is guards.keep_tensor_guards
    model, _ = build()
    with pytest.raises(LoraFlowError, match="guards='none'"):
        model.compile(guards="none")


def test_a_dtype_change_and_a_new_gate_retrace_and_equal_eager(build):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, g2 = build()
    counter = CompileCounterWithBackend("eager")
    model.compile(backend=counter, dynamic=False)
    _logits(model)
    frames = counter.frame_count

    model.model.to(torch.float64)
    got = _logits(model)
    assert got.dtype == torch.float64 and counter.frame_count > frames
    torch.testing.assert_close(got, _eager(model), atol=ATOL, rtol=0)
    model.model.to(torch.float32)

    model.add_gate("g2", g2)
    frames = counter.frame_count
    got = _logits(model, "gate:g2")
    assert counter.frame_count > frames
    torch.testing.assert_close(got, _eager(model, "gate:g2"), atol=ATOL, rtol=0)
    assert (got - _eager(model, "gate")).abs().max() > 1e-3  # the new gate is really in use


def test_compile_again_picks_up_a_hook_added_by_hand(build):
    """Facts about modules are not guarded: a hook registered after compile() needs compile() again."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _ = build()
    counter = CompileCounterWithBackend("eager")
    model.compile(backend=counter, dynamic=False)
    plain = _logits(model)
    layer = model.model.model.layers[1]
    layer.mlp.register_forward_hook(lambda mod, args, out: out * 0.5)
    model.compile(backend=counter, dynamic=False)
    got = _logits(model)
    torch.testing.assert_close(got, _eager(model), atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 1e-3


def _eager(model: LoraFlowModel, fusion: str = "gate") -> torch.Tensor:
    """`_logits` of the same model in eager mode."""
    compiled = model.model.__dict__.pop("forward")
    try:
        return _logits(model, fusion)
    finally:
        model.model.__dict__["forward"] = compiled
