"""Folding for compiled graphs: `LoraFlowModel.compile()` puts each input group's base weights and its
stacked A into one buffer ([W_q; W_k; W_v; A]), of which the base weights become views, so the graph
gets every member's base output and the A projection from one matrix multiply. The base weights keep
their values bit for bit through merges, moves and detaching, and the folded graph equals eager mode."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from conftest import build_tiny_model, make_peft_adapter

from loraflow import LoraFlowModel

MATMULS = {operator.matmul, torch.nn.functional.linear, torch.matmul, torch.mm, torch.addmm, torch.bmm, torch.baddbmm,
           torch.Tensor.matmul, torch.Tensor.addmm_, torch.Tensor.baddbmm_}


@pytest.fixture()
def pair(tmp_path):
    """(base, a model over a copy of it) with two adapters: 'zh' on every projection, 'math' on q/v only."""
    base = build_tiny_model("llama", num_layers=2)
    adapters = {"zh": make_peft_adapter(base, tmp_path / "zh", seed=1),
                "math": make_peft_adapter(base, tmp_path / "math", seed=2, r=8, targets=["q_proj", "v_proj"])}
    return base, LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=3, gate_init_std=0.5)


def _linears(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n and p.dim() == 2}


def _ids(shape=(2, 5)) -> torch.Tensor:
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(0))


def _assert_same_bits(model, want: dict[str, torch.Tensor]) -> None:
    got = {n: p for n, p in model.named_parameters() if n in want}
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _assert_views(owner) -> None:
    """Each member's base weight is a view of its rows of the owner's buffer; A's copy comes last."""
    buffer, start = owner.folded_weight, 0
    for m in owner.fold_members:
        weight = m.base_layer.weight
        assert weight.data_ptr() == buffer[start].data_ptr() and weight.shape == (m.out_features, m.in_features)
        assert weight.dtype == buffer.dtype
        start += m.out_features
    assert torch.equal(buffer[start:], owner.group.lora_A)  # every member's A, member by member


def test_compile_folds_each_input_groups_base_weights_and_a_into_one_buffer(pair):
    base, model = pair
    before = _linears(model.model)
    model.compile(backend="eager")
    fused = model._attachment.fused
    owners = [m for m in fused if m.folded]
    # llama: q/k/v share their input, gate/up theirs; o and down alone: 4 groups a layer
    assert [[f.module_key for f in m.fold_members] for m in owners[:4]] == [
        ["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.o_proj"],
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]
    assert len(owners) == 4 * 2
    for m in owners:
        _assert_views(m)
        assert m.group.lora_A.shape[0] == sum(f.lora_B_t.shape[0] for f in m.fold_members)
    _assert_same_bits(model.model, before)
    assert not any("folded" in k for k in model.model.state_dict())  # never saved


def _graph_matmuls(model, ids) -> int:
    """Matrix multiplies in the one graph dynamo captures for a forward of `ids`."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(input_ids=ids)
    assert len(graphs) == 1
    return sum(node.op in ("call_function", "call_method") and
               (node.target in MATMULS or node.target in ("matmul", "addmm_", "baddbmm_"))
               for node in graphs[0].graph.nodes)


def test_the_folded_graph_runs_one_matrix_multiply_per_input_group(pair):
    """The A projections and the separate q/k/v and gate/up products are gone: what the fold is for."""
    _, model = pair
    ids = _ids((1, 3))
    plain = _graph_matmuls(model, ids)
    from loraflow.core.attach import fold
    assert fold(model._attachment) == 8
    # per layer, 7 base linears and 4 A projections become 4 matmuls (one per input group)
    assert _graph_matmuls(model, ids) == plain - 7 * 2


def test_folded_compiled_logits_equal_the_unfolded_eager_ones_in_every_fusion(pair):
    _, model = pair
    ids = _ids()
    fusions = ["gate", "avg", "off", "single:math", "static:0.7,-0.4"]
    with torch.no_grad():
        eager = {}
        for f in fusions:
            with model.fusion(f):
                eager[f] = model(input_ids=ids).logits
        with model.fusion_rows(["gate", "single:zh"]):
            eager["rows"] = model(input_ids=ids).logits
    torch._dynamo.reset()
    model.compile(backend="aot_eager", dynamic=False)
    with torch.no_grad():
        for f in fusions:
            with model.fusion(f):
                torch.testing.assert_close(model(input_ids=ids).logits, eager[f], atol=1e-5, rtol=0, msg=f)
        with model.fusion_rows(["gate", "single:zh"]):
            torch.testing.assert_close(model(input_ids=ids).logits, eager["rows"], atol=1e-5, rtol=0)
    assert (eager["gate"] - eager["off"]).abs().max() > 1e-3


def test_merge_and_unmerge_on_a_folded_model_restore_the_base_weights_bit_for_bit(pair):
    _, model = pair
    before = _linears(model.model)
    model.compile(backend="eager")
    model.set_fusion("avg")  # merged into the base weights
    assert model.merged
    q = model._attachment.fused[[m.module_key for m in model._attachment.fused].index("self_attn.q_proj")]
    assert q.folded and q.base_layer.weight.data_ptr() == q.folded_weight.data_ptr()
    scales = 0.5 * q.scaling  # avg of k=2: each column's adapter weight 0.5 times its alpha / r
    name = [n for n, p in model.model.named_parameters() if p is q.base_layer.weight][0]
    want = before[name] + (q.lora_B * scales) @ q.lora_A
    torch.testing.assert_close(q.folded_weight[: q.out_features], want, atol=1e-6, rtol=0)
    model.set_gate_mode()  # unmerged
    assert not model.merged
    _assert_same_bits(model.model, before)
    for m in model._attachment.fused:
        if m.folded:
            _assert_views(m)


def test_moving_a_folded_model_keeps_the_weights_views_of_the_moved_buffer(pair):
    _, model = pair
    before = _linears(model.model)
    model.compile(backend="eager")
    model.to(torch.float64)
    for m in model._attachment.fused:
        if m.folded:
            assert m.folded_weight.dtype == torch.float64
            _assert_views(m)
    _assert_same_bits(model.model, {n: t.double() for n, t in before.items()})


def test_detaching_a_folded_model_gives_back_weights_with_storage_of_their_own(pair):
    base, model = pair
    model.compile(backend="eager")
    model.set_fusion("avg")
    restored = model.detach_adapters()
    for name, p in restored.named_parameters():
        assert torch.equal(p, dict(base.named_parameters())[name]), name
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name  # not a view of a fold


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox", "gpt2"])
def test_folded_graphs_of_other_architectures_equal_eager(arch, tmp_path):
    """Qwen2: q/k/v biases (added after the folded matmul); GPT-NeoX: one fused qkv linear with a bias;
    GPT-2: Conv1D layers, which are left unfolded."""
    base = build_tiny_model(arch, num_layers=2)
    adapters = {"x": make_peft_adapter(base, tmp_path / "x", seed=1, arch=arch),
                "y": make_peft_adapter(base, tmp_path / "y", seed=2, r=8, arch=arch)}
    model = LoraFlowModel.from_pretrained(base, adapters, seed=3, gate_init_std=0.5)
    ids = _ids()
    with torch.no_grad(), model.fusion_rows(["gate", "static:0.7,-0.4"]):
        eager = model(input_ids=ids).logits
    torch._dynamo.reset()
    model.compile(backend="aot_eager", dynamic=False)
    folded = [m for m in model._attachment.fused if m.folded]
    assert (len(folded) == 0) if arch == "gpt2" else (len(folded) >= 2 * 2)
    if arch != "gpt2":
        assert any(m.base_layer.bias is not None for m in folded)
    with torch.no_grad(), model.fusion_rows(["gate", "static:0.7,-0.4"]):
        torch.testing.assert_close(model(input_ids=ids).logits, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("change", ["weight.data", "load_state_dict(assign=True)", "A in place", "A.data",
                                    "load_state_dict"])
def test_the_compiled_graph_follows_weights_changed_after_compile(pair, change):
    """The fold is derived: however W0 or A is changed after `compile()`, the compiled model's next logits
    equal eager mode's on the changed weights (a stale fold would keep the old ones)."""
    _, model = pair
    ids = _ids()
    model.compile(backend="aot_eager", dynamic=False)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    linear = model.model.model.layers[0].self_attn.q_proj
    group = linear.group
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if change == "weight.data":
            linear.base_layer.weight.data = torch.randn(linear.base_layer.weight.shape, generator=g)
        elif change == "load_state_dict(assign=True)":
            linear.base_layer.load_state_dict({"weight": torch.randn(linear.base_layer.weight.shape, generator=g)},
                                              assign=True)
        elif change == "A in place":
            group.lora_A_t.mul_(3.0)
        elif change == "A.data":
            group.lora_A_t.data = group.lora_A_t.data * 3.0
        else:
            state = {k: v * 1.5 if k.endswith("q_proj.base_layer.weight") else v
                     for k, v in model.model.state_dict().items()}
            model.model.load_state_dict(state)
        compiled = model(input_ids=ids).logits
    from loraflow.core.attach import unfold
    unfold(model._attachment)
    model.model.__dict__.pop("forward")  # eager again, on the same (changed) weights
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    assert (eager - before).abs().max() > 1e-3  # the change matters
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
