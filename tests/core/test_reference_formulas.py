"""More of the engine against references written here: module-level gates (the formula, and a
save/load round trip) and bf16 against an fp32 reference within a stated tolerance."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import add_reference_lora_flow, build_tiny_model, make_peft_adapter
from torch import nn

from loraflow import LoraFlowModel


def _ids(seed=0, shape=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, shape, generator=g)


def _adapters(base, tmp_path):
    return {"a": make_peft_adapter(base, tmp_path / "a", seed=1, r=4, alpha=8),
            "b": make_peft_adapter(base, tmp_path / "b", seed=2, r=8, alpha=16)}


def _reference_module_level(base, adapter_dirs, gate_params, temperature, ids):
    """LoRA-Flow with one gate per adapted module, written out: a layer pre-hook keeps the layer's input x;
    each adapted Linear adds sum_i w_i * (alpha_i / r_i) * B_i A_i u, with w = softmax(W_m x / T) + b_m."""
    from safetensors.torch import load_file

    model = copy.deepcopy(base)
    loras = []
    for path in adapter_dirs:
        cfg = json.loads((path / "adapter_config.json").read_text())
        loras.append((cfg["lora_alpha"] / cfg["r"], load_file(str(path / "adapter_model.safetensors"))))
    layer_input = {}

    def pre(idx):
        def hook(mod, args, kwargs):
            layer_input[idx] = (args[0] if args else kwargs["hidden_states"]).float()
        return hook

    def post(idx, key):
        W, b = gate_params[(idx, key)]

        def hook(mod, inputs, out):
            w = torch.softmax(layer_input[idx] @ W.T / temperature, dim=-1) + b  # (B, T, k)
            u = inputs[0]
            delta = 0
            for i, (scale, sd) in enumerate(loras):
                name = f"base_model.model.model.layers.{idx}.{key}.lora_A.weight"
                A, B = sd[name], sd[name.replace("lora_A", "lora_B")]
                delta = delta + w[..., i:i + 1] * scale * (u @ A.T @ B.T)
            return out + delta
        return hook

    for idx, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(pre(idx), with_kwargs=True)
        for key, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and (idx, key) in gate_params:
                mod.register_forward_hook(post(idx, key))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_module_level_gates_match_the_formula_and_survive_save_and_load(tmp_path):
    base = build_tiny_model("llama", num_layers=2)
    adapters = _adapters(base, tmp_path)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, granularity="module", seed=0,
                                          temperature=1.3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for gate in model.gates.gates():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.3)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.3)
    keys = [k for layer in model.gate_config.module_keys for k in layer]
    assert len(keys) == 2 * 7  # q, k, v, o, gate, up, down in each of two layers
    params = {(i, k): (model.gates.gate(i, k).weight.detach().clone(), model.gates.gate(i, k).bias.detach().clone())
              for i, layer in enumerate(model.gate_config.module_keys) for k in layer}
    ids = _ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    ref = _reference_module_level(base, list(adapters.values()), params, 1.3, ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the per-module weights really differ between modules of one layer (else this is a layer gate)
    q, v = params[(0, "self_attn.q_proj")], params[(0, "self_attn.v_proj")]
    assert not torch.equal(q[0], v[0])

    saved = model.save_gate(tmp_path / "module_gate")
    loaded = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, gate=saved)
    assert loaded.gate_config.granularity == "module" and loaded.temperature == 1.3
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ours)


def test_bf16_matches_an_fp32_reference_within_a_stated_tolerance(tmp_path):
    """bf16 keeps about 3 significant digits; through 2 layers the logits may differ from fp32 by at
    most 2% of the fp32 logit range (seen: 0.4%), while the adapters move them by far more (seen: 76%)."""
    base = build_tiny_model("llama", num_layers=2)
    adapters = _adapters(base, tmp_path)
    fp32 = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0)
    with torch.no_grad():
        for gate in fp32.gates.gates():
            gate.weight.normal_(0, 0.3)
    fp32.save_gate(tmp_path / "gate")
    bf16 = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, gate=tmp_path / "gate",
                                         torch_dtype=torch.bfloat16)
    bf16.model.to(torch.bfloat16)
    ids = _ids(1)
    with torch.no_grad():
        ref = fp32(input_ids=ids).logits
        w_ref = fp32.last_fusion_weights
        low = bf16(input_ids=ids).logits
        w_low = bf16.last_fusion_weights
        with fp32.adapters_disabled():
            no_adapters = fp32(input_ids=ids).logits
    assert low.dtype == torch.bfloat16 and bf16.gates.layers[0].weight.dtype == torch.float32
    tolerance = 0.02 * (ref.max() - ref.min()).item()
    error = (low.float() - ref).abs().max().item()
    adapter_effect = (ref - no_adapters).abs().max().item()
    assert error <= tolerance, (error, tolerance)
    assert adapter_effect > 5 * tolerance, (adapter_effect, tolerance)  # the check can see a lost adapter
    torch.testing.assert_close(w_low.float(), w_ref, atol=5e-3, rtol=0)  # fp32 gates on bf16 hidden states


def test_model_to_bf16_keeps_scales_exact_in_fp32(tmp_path):
    """`model.to(bfloat16)` after loading: the adapters' alpha / r column scales stay fp32 (1/3 is not a bf16
    number), so the fused path still multiplies exactly alpha / r, as PEFT's fp32 scaling does."""
    from loraflow.core.fused_linear import LoraInputGroup

    base = build_tiny_model("llama", num_layers=1)
    adapters = {"a": make_peft_adapter(base, tmp_path / "a", seed=1, r=3, alpha=1)}
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0)
    model.model.to(torch.bfloat16)
    groups = [m for m in model.model.modules() if isinstance(m, LoraInputGroup)]
    third = torch.tensor(1 / 3, dtype=torch.float32)
    assert torch.tensor(1 / 3, dtype=torch.bfloat16).float() != third  # bf16 would round it
    for g in groups:
        assert g.column_map.dtype == torch.float32
        assert torch.equal(g.column_map[g.column_map != 0], third.expand(int((g.column_map != 0).sum())))
    assert all(g.lora_A_t.dtype == torch.bfloat16 for g in groups)
    with torch.no_grad():
        out = model(input_ids=_ids(1)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def _with_dropout(path, p):
    import json

    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora_dropout"] = p
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_lora_dropout_draws_an_independent_mask_per_adapter(tmp_path, p):
    """Two copies of one adapter mixed with static weights +1 and -1 cancel exactly when both see the same
    input; PEFT gives each adapter its own dropout module, so in training their masks differ and they do not
    cancel. p=0 is the control: exact cancellation, so the check can tell the two apart."""
    base = build_tiny_model("llama", num_layers=2)
    a = _with_dropout(make_peft_adapter(base, tmp_path / "a", seed=3), p)
    b = _with_dropout(make_peft_adapter(base, tmp_path / "b", seed=3), p)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), {"a": a, "b": b}, seed=0)
    model.set_static_weights([1.0, -1.0])
    model.train()
    ids = _ids(4)
    torch.manual_seed(0)
    with torch.no_grad():
        mixed = model(input_ids=ids).logits
        with model.adapters_disabled():
            plain = model(input_ids=ids).logits
    gap = (mixed - plain).abs().max().item()
    if p == 0:
        assert gap < 1e-5, gap
    else:
        assert gap > 1e-2, gap  # a shared mask would cancel to ~0 as in the control


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gate_gradients_equal_the_formula_written_out(tmp_path, checkpointing):
    """d loss / d (W_l, b_l) of every layer gate, against autograd through the LoRA-Flow formula written out
    with hooks on the plain base model (w = softmax(W_l x / T) + b_l, each Linear adds sum_i w_i s_i B_i A_i u);
    with activation checkpointing too (the layers' forward recomputed in backward)."""
    base = build_tiny_model("llama", num_layers=2)
    adapters = _adapters(base, tmp_path)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0, gate_init_std=0.3,
                                          temperature=1.3)
    model.train()
    if checkpointing:
        from loraflow.train.training import _enable_checkpointing

        _enable_checkpointing(model.model)
    ids = _ids(5)
    model(input_ids=ids, labels=ids).loss.backward()
    ours = {i: (g.weight.grad.clone(), g.bias.grad.clone()) for i, g in enumerate(model.gates.layers)}

    ref = copy.deepcopy(base)
    params = {i: (g.weight.detach().clone().requires_grad_(True), g.bias.detach().clone().requires_grad_(True))
              for i, g in enumerate(model.gates.layers)}
    def gate_of(idx, x):
        W, b = params[idx]
        return torch.softmax(x @ W.T / 1.3, dim=-1) + b

    add_reference_lora_flow(ref, list(adapters.values()), gate_of)
    ref(input_ids=ids, labels=ids).loss.backward()
    for idx, (W, b) in params.items():
        assert W.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
        torch.testing.assert_close(ours[idx][0], W.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ours[idx][1], b.grad.view_as(ours[idx][1]), atol=1e-6, rtol=1e-4)
