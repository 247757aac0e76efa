"""Parity of the fused engine against independent references: PEFT itself, and the LoRA-Flow
formula written out here with hooks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCH_TARGETS, build_tiny_model, make_peft_adapter
from torch import nn

from loraflow import LoraFlowModel

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"]
ATOL = 1e-5


def _adapters(base, tmp_path, arch, specs):
    """specs: list of (name, kwargs for make_peft_adapter)."""
    return {name: make_peft_adapter(base, tmp_path / name, arch=arch, seed=i + 1, **kw)
            for i, (name, kw) in enumerate(specs)}


def _peft_logits(base, adapters: dict, weights: dict, ids, mask=None):
    """PEFT with several active adapters, each LoraLayer's scale multiplied by that adapter's weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = list(adapters)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(str(adapters[name]), adapter_name=name)
    pm.base_model.set_adapter(names)
    for module in pm.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                module.set_scale(name, weights[name])
    pm.eval()
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask).logits


def _ids(seed=0, shape=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, shape, generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_hot_gate_equals_peft_single_adapter(arch, tmp_path):
    base = build_tiny_model(arch)
    adapters = _adapters(base, tmp_path, arch, [("lang", dict(r=4, alpha=8)), ("task", dict(r=8, alpha=16))])
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0)
    ids = _ids()
    for target, onehot in [("lang", (1.0, 0.0)), ("task", (0.0, 1.0))]:
        # W = 0 and b = onehot - 1/k makes the *gate* output exactly one-hot for every token.
        with torch.no_grad():
            for g in model.gates.gates():
                g.weight.zero_()
                g.bias.copy_(torch.tensor([onehot]) - 0.5)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
        ref = _peft_logits(base, {target: adapters[target]}, {target: 1.0}, ids)
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
        # ... and the static single-adapter mode gives the same.
        with model.only_adapter(target), torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=ATOL, rtol=0)
    # the adapters really change the output (otherwise parity would be vacuous)
    with model.adapters_disabled(), torch.no_grad():
        plain = model(input_ids=ids).logits
    with torch.no_grad():
        plain_ref = base(input_ids=ids).logits
    torch.testing.assert_close(plain, plain_ref, atol=ATOL, rtol=0)
    assert (ref - plain_ref).abs().max() > 1e-2


@pytest.mark.parametrize("rows", [1, 2])  # one row takes the batched-matmul path, more rows the 2-D one
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_constant_weights_equal_peft_combined_adapters(arch, rows, tmp_path):
    base = build_tiny_model(arch)
    targets = ARCH_TARGETS[arch]
    specs = [
        ("zh", dict(r=4, alpha=8)),
        ("math", dict(r=8, alpha=4, targets=targets[:2])),  # different rank, alpha and target modules
        ("code", dict(r=2, alpha=2, use_rslora=True)),
    ]
    adapters = _adapters(base, tmp_path, arch, specs)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters)
    weights = {"zh": 0.7, "math": -0.4, "code": 1.3}
    ids = _ids(1, shape=(rows, 9))
    with model.static_weights(weights), torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, _peft_logits(base, adapters, weights, ids), atol=ATOL, rtol=0)
    assert model.fusion_mode == "gate"  # context manager restored the mode


def _write_official_gate(path, n_layers, k, hidden, seed, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(n_layers):
        sd[f"encoder.layers.{i}.lora_fusion_gate.weight"] = (torch.randn(k, hidden, generator=g) * 0.3).half()
        if with_bias:
            sd[f"encoder.layers.{i}.weight_bias"] = (torch.randn(1, k, generator=g) * 0.3).half()
    torch.save(sd, path)
    return sd


def _reference_fused_logits(base, adapter_dirs, gate_sd, temperature, ids, layers_attr=("model", "layers")):
    """LoRA-Flow written out independently: layer pre-hooks compute w, Linear forward hooks add deltas."""
    from safetensors.torch import load_file

    model = copy.deepcopy(base)
    layers = model
    for a in layers_attr:
        layers = getattr(layers, a)
    loras = []
    for path in adapter_dirs:
        cfg = json.loads((path / "adapter_config.json").read_text())
        sd = load_file(str(path / "adapter_model.safetensors"))
        loras.append((cfg["lora_alpha"] / cfg["r"], sd))
    current = {}

    def pre(idx):
        def hook(mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).float()
            W = gate_sd[f"encoder.layers.{idx}.lora_fusion_gate.weight"].float()
            b = gate_sd.get(f"encoder.layers.{idx}.weight_bias", torch.zeros(1, W.shape[0])).float()
            current[idx] = torch.softmax(x @ W.T / temperature, dim=-1) + b
        return hook

    def post(idx, full_name):
        def hook(mod, inputs, out):
            x = inputs[0]
            delta = 0
            for i, (scale, sd) in enumerate(loras):
                key = f"base_model.model.{full_name}.lora_A.weight"
                if key in sd:
                    A, B = sd[key], sd[key.replace("lora_A", "lora_B")]
                    delta = delta + current[idx][..., i:i + 1] * scale * (x @ A.T @ B.T)
            return out + delta
        return hook

    prefix = ".".join(layers_attr)
    for idx, layer in enumerate(layers):
        layer.register_forward_pre_hook(pre(idx), with_kwargs=True)
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                mod.register_forward_hook(post(idx, f"{prefix}.{idx}.{name}"))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_official_gate_matches_reference_formula(with_bias, rows, tmp_path):
    base = build_tiny_model("llama", num_layers=3)
    adapters = _adapters(base, tmp_path, "llama", [("zh", dict(r=4, alpha=8)), ("math", dict(r=8, alpha=16))])
    gate_file = tmp_path / "zh_math.pt"
    gate_sd = _write_official_gate(gate_file, 3, 2, 32, seed=5, with_bias=with_bias)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, gate=gate_file, temperature=1.1)
    ids = _ids(2, shape=(rows, 9))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    ref = _reference_fused_logits(base, list(adapters.values()), gate_sd, 1.1, ids)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # the gate weights really vary per token (otherwise this would test a static mix)
    w = model.last_fusion_weights
    assert w.shape == (3, rows, 9, 2)
    assert w[..., 0].std() > 1e-3


def test_model_level_gate_shares_one_gate_across_layers(tmp_path):
    base = build_tiny_model("llama", num_layers=3)
    adapters = _adapters(base, tmp_path, "llama", [("a", {}), ("b", {})])
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, granularity="model", seed=0)
    assert model.num_gate_parameters() == 2 * 32 + 2
    with torch.no_grad():
        model.gates.shared.weight.normal_(0, 0.3)
    ids = _ids(3)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    W, b = model.gates.shared.weight.detach(), model.gates.shared.bias.detach()
    gate_sd = {}
    for i in range(3):
        gate_sd[f"encoder.layers.{i}.lora_fusion_gate.weight"] = W
        gate_sd[f"encoder.layers.{i}.weight_bias"] = b
    torch.testing.assert_close(ours, _reference_fused_logits(base, list(adapters.values()), gate_sd, 1.0, ids),
                               atol=ATOL, rtol=0)


def test_module_level_gates_have_one_gate_per_adapted_module(tmp_path):
    base = build_tiny_model("llama", num_layers=2)
    adapters = _adapters(base, tmp_path, "llama", [("a", {}), ("b", {})])
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, granularity="module", seed=0)
    assert model.num_gate_parameters() == 2 * 7 * (2 * 32 + 2)
    with torch.no_grad():
        for g in model.gates.gates():
            g.weight.normal_(0, 0.3)
        out = model(input_ids=_ids()).logits
    assert torch.isfinite(out).all()
    # each module's gate changes only its own module: perturbing q_proj's gate changes the output
    with torch.no_grad():
        model.gates.gate(0, "self_attn.q_proj").bias.add_(1.0)
        out2 = model(input_ids=_ids()).logits
    assert (out2 - out).abs().max() > 1e-4


def test_llama2_7b_gate_parameter_count_matches_paper():
    from loraflow.core.gate import GateBank, GateConfig

    bank = GateBank(GateConfig(adapter_names=["zh", "math"], hidden_size=4096, num_layers=32))
    assert sum(p.numel() for p in bank.parameters()) == 262_208


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_generation_equals_recomputation(arch, tmp_path, tokenizer):
    base = build_tiny_model(arch, vocab_size=len(tokenizer))
    adapters = _adapters(base, tmp_path, arch, [("zh", {}), ("math", dict(r=8))])
    model = LoraFlowModel.from_pretrained(base, adapters, seed=0, gate_init_std=0.5)
    tokenizer.padding_side = "left"
    prompts = ["hello world, the answer", "你好"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # the batch really is left-padded
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    cached = model.generate(**enc, use_cache=True, **kw)
    recomputed = model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    # left padding does not change a prompt's continuation
    for i, p in enumerate(prompts):
        alone = model.generate(**tokenizer([p], return_tensors="pt"), use_cache=True, **kw)
        assert alone[0, -12:].tolist() == cached[i, -12:].tolist()


def test_gate_is_evaluated_for_every_new_token(tmp_path, tokenizer):
    base = build_tiny_model("llama", vocab_size=len(tokenizer))
    adapters = _adapters(base, tmp_path, "llama", [("zh", {}), ("math", {})])
    model = LoraFlowModel.from_pretrained(base, adapters, seed=0, gate_init_std=0.5)
    enc = tokenizer(["hello world"], return_tensors="pt")
    n_prompt = enc["input_ids"].shape[1]
    with model.record_fusion_weights() as frames:
        model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=None,
                       pad_token_id=tokenizer.pad_token_id)
    assert [f.shape[2] for f in frames] == [n_prompt, 1, 1, 1, 1]
    steps = torch.cat(frames, dim=2)
    assert steps.shape == (2, 1, n_prompt + 4, 2)
    assert len({round(x, 6) for x in steps[0, 0, :, 0].tolist()}) > 1  # weights differ across tokens


def test_gate_save_load_round_trip_is_bit_exact(tmp_path):
    base = build_tiny_model("llama")
    adapters = _adapters(base, tmp_path, "llama", [("zh", {}), ("math", {})])
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=3, gate_init_std=0.3,
                                          temperature=1.1)
    model.save_gate(tmp_path / "gate")
    again = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, gate=tmp_path / "gate")
    assert again.temperature == 1.1
    for k, v in model.gate_state_dict().items():
        assert torch.equal(v, again.gate_state_dict()[k]), k
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    cfg = json.loads((tmp_path / "gate" / "gate_config.json").read_text())
    assert cfg["adapter_names"] == ["zh", "math"] and cfg["num_layers"] == 2 and cfg["hidden_size"] == 32
    assert cfg["granularity"] == "layer" and cfg["model_type"] == "llama"


def test_only_gates_are_trainable_and_weights_held_once(tmp_path):
    base = build_tiny_model("llama")
    adapters = _adapters(base, tmp_path, "llama", [("zh", dict(r=4)), ("math", dict(r=8))])
    model = LoraFlowModel.from_pretrained(base, adapters)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("gates.") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (2 * 32 + 2)
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    per_layer = sum((4 + 8) * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert lora_numel == 2 * per_layer


def test_bf16_forward_runs(tmp_path):
    base = build_tiny_model("llama")
    adapters = _adapters(base, tmp_path, "llama", [("zh", {}), ("math", {})])
    model = LoraFlowModel.from_pretrained(base.to(torch.bfloat16), adapters)
    with torch.no_grad():
        out = model(input_ids=_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert model.gates.layers[0].weight.dtype == torch.float32


def test_detach_adapters_restores_the_base(tmp_path):
    base = build_tiny_model("llama")
    ref = copy.deepcopy(base)
    adapters = _adapters(base, tmp_path, "llama", [("zh", {})])
    model = LoraFlowModel.from_pretrained(base, adapters)
    restored = model.detach_adapters()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert not any("lora" in n for n, _ in restored.named_parameters())


def test_lora_dropout_is_off_at_inference(tmp_path):
    base = build_tiny_model("llama")
    adapters = {"zh": make_peft_adapter(base, tmp_path / "zh", seed=1)}
    cfg_file = adapters["zh"] / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lora_dropout"] = 0.5
    cfg_file.write_text(json.dumps(cfg))
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters)
    ids = _ids()
    with torch.no_grad(), model.only_adapter("zh"):
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, _peft_logits(base, adapters, {"zh": 1.0}, ids), atol=ATOL, rtol=0)
    model.train()
    with torch.no_grad(), model.only_adapter("zh"):
        assert not torch.equal(model(input_ids=ids).logits, first)  # and on in training


def test_gate_gradients_equal_with_activation_checkpointing(tmp_path):
    base = build_tiny_model("llama", num_layers=3)
    adapters = _adapters(base, tmp_path, "llama", [("zh", {}), ("math", dict(r=8))])
    grads = []
    for checkpointing in (False, True):
        model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0, gate_init_std=0.3)
        model.train()
        if checkpointing:
            from loraflow.train.training import _enable_checkpointing

            _enable_checkpointing(model.model)
        ids = _ids(4)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.gates.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_a_fused_layer_fed_flattened_tokens_gives_each_token_its_own_weights(rows, tmp_path):
    """Some architectures flatten (B, T, d) to (B * T, d) before a projection: each token still gets its
    own gate weights (checked against the formula on the unflattened base)."""
    base = build_tiny_model("llama", num_layers=2)
    adapters = _adapters(base, tmp_path, "llama", [("zh", dict(r=4, alpha=8)), ("math", dict(r=8, alpha=16))])
    gate_file = tmp_path / "zh_math.pt"
    gate_sd = _write_official_gate(gate_file, 2, 2, 32, seed=7)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, gate=gate_file)
    ids = _ids(3, shape=(rows, 7))
    hooks = []
    for layer in model.model.model.layers:
        o_proj = layer.self_attn.o_proj
        hooks.append(o_proj.register_forward_pre_hook(lambda m, args: (args[0].reshape(-1, args[0].shape[-1]),)))
        hooks.append(o_proj.register_forward_hook(lambda m, args, out: out.view(rows, 7, -1)))
    try:
        with torch.no_grad():
            flat = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    assert model.last_fusion_weights[..., 0].std() > 1e-3  # weights really differ per token
    ref = _reference_fused_logits(base, list(adapters.values()), gate_sd, 1.0, ids)
    torch.testing.assert_close(flat, ref, atol=ATOL, rtol=0)


def test_hooks_on_a_wrapped_base_linear_still_run(tmp_path):
    """The fused layer calls a plain base nn.Linear directly for speed, but never skips a hook on it."""
    from loraflow.core.fused_linear import FusedLoraLinear

    base = build_tiny_model("llama", num_layers=2)
    adapters = _adapters(base, tmp_path, "llama", [("zh", {})])
    model = LoraFlowModel.from_pretrained(base, adapters, seed=0)
    ids = _ids(4, shape=(1, 5))
    fused = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        calls = []
        handle = fused.base_layer.register_forward_hook(lambda m, args, out: calls.append(1) or out * 0)
        try:
            zeroed = model(input_ids=ids).logits
        finally:
            handle.remove()
        assert calls == [1] and not torch.allclose(zeroed, plain)
        seen = []
        handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
        wrapped = [m.base_layer for m in model.modules() if isinstance(m, FusedLoraLinear)]
        assert all(any(b is m for m in seen) for b in wrapped)  # a process-wide hook sees every base linear
        torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)
