"""Gate checkpoints: the official .pt format (real sample file), conversion, safety, and mismatches."""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from conftest import build_tiny_model, make_peft_adapter

from loraflow import LoraFlowModel
from loraflow.core.adapters import load_adapter, resolve_adapter_dir
from loraflow.core.checkpoints import convert_official_gate, load_gate_checkpoint, load_official_gate
from loraflow.cli import main
from loraflow.common.errors import LoraFlowError


@pytest.fixture
def adapters(tmp_path, tiny_llama):
    return {"zh": make_peft_adapter(tiny_llama, tmp_path / "zh", seed=1),
            "math": make_peft_adapter(tiny_llama, tmp_path / "math", seed=2)}


def test_convert_real_official_sample(shared_data, tmp_path, capsys):
    src = shared_data / "official-gate-sample" / "gate_no_bias_llama2_7b.pt"
    raw = torch.load(src, weights_only=True)  # independent read of the file
    assert main(["convert-gate", "--official", str(src), "--adapters", "zh,math", "--out", str(tmp_path / "g"),
                 "--temperature", "1.1"]) == 0
    assert "32 layers" in capsys.readouterr().out
    config, state = load_gate_checkpoint(tmp_path / "g")
    assert (config.num_layers, config.hidden_size, config.adapter_names) == (32, 4096, ["zh", "math"])
    assert config.temperature == 1.1
    for i in range(32):
        assert torch.equal(state[f"layers.{i}.weight"], raw[f"encoder.layers.{i}.lora_fusion_gate.weight"].float())
        assert torch.equal(state[f"layers.{i}.bias"], torch.zeros(1, 2))  # the no-bias variant: b = 0
    assert sum(v.numel() for v in state.values()) == 262_208


def test_official_gate_with_bias_loads_bias(tmp_path):
    sd = {"encoder.layers.0.lora_fusion_gate.weight": torch.randn(2, 8).half(),
          "encoder.layers.0.weight_bias": torch.tensor([[-0.5, 0.5]]).half()}
    torch.save(sd, tmp_path / "g.pt")
    n, k, d, state = load_official_gate(tmp_path / "g.pt")
    assert (n, k, d) == (1, 2, 8)
    assert state["layers.0.bias"].tolist() == [[-0.5, 0.5]]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/loraflow-pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"encoder.layers.0.lora_fusion_gate.weight": _Evil()}, f)
    if os.path.exists("/tmp/loraflow-pwned"):
        os.remove("/tmp/loraflow-pwned")
    rc = main(["convert-gate", "--official", str(path), "--adapters", "a,b", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert not os.path.exists("/tmp/loraflow-pwned")
    assert not (tmp_path / "out").exists()


def test_adapter_bin_pickle_that_runs_code_is_refused(tmp_path, tiny_llama):
    d = make_peft_adapter(tiny_llama, tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(LoraFlowError, match="refused"):
        LoraFlowModel.from_pretrained(tiny_llama, {"a": d})


def test_adapter_bin_with_plain_tensors_loads(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    d = make_peft_adapter(tiny_llama, tmp_path / "a")
    sd = load_file(str(d / "adapter_model.safetensors"))
    ref = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), {"a": d})
    (d / "adapter_model.safetensors").unlink()
    torch.save(sd, d / "adapter_model.bin")
    model = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), {"a": d})
    ids = torch.arange(3, 12).view(1, -1)
    with torch.no_grad(), model.only_adapter("a"), ref.only_adapter("a"):
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def _error(fn):
    with pytest.raises(LoraFlowError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_adapter_from_another_base_is_rejected(tmp_path, tiny_llama):
    other = build_tiny_model("llama")
    other.config.hidden_size = 48
    import transformers as tf

    wide = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320))
    d = make_peft_adapter(wide, tmp_path / "wide")
    msg = _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {"wide": d}))
    assert "wide" in msg and "another base" in msg


def test_gate_mismatches_are_named(tmp_path, tiny_llama, adapters):
    model = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters)
    model.save_gate(tmp_path / "gate")
    # wrong adapter order
    msg = _error(lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), dict(reversed(adapters.items())),
                                                       gate=tmp_path / "gate"))
    assert "order" in msg
    # wrong k
    msg = _error(lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), {"zh": adapters["zh"]},
                                                       gate=tmp_path / "gate"))
    assert "zh,math" in msg
    # wrong layer count / hidden size (official file)
    torch.save({f"encoder.layers.{i}.lora_fusion_gate.weight": torch.zeros(2, 16) for i in range(3)},
               tmp_path / "bad.pt")
    msg = _error(lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=tmp_path / "bad.pt"))
    assert "3 layers" in msg and "hidden size is 16" in msg
    # a gate with k=3 for two adapters
    torch.save({f"encoder.layers.{i}.lora_fusion_gate.weight": torch.zeros(3, 32) for i in range(2)},
               tmp_path / "k3.pt")
    msg = _error(lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=tmp_path / "k3.pt"))
    assert "3 adapters" in msg


def test_missing_and_corrupt_files(tmp_path, tiny_llama, adapters):
    assert "not found" in _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {"x": tmp_path / "nope"}))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    assert "corrupt JSON" in _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {"x": bad}))
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (bad / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    assert "corrupt or truncated safetensors" in _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {"x": bad}))
    assert "k >= 1" in _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {}))
    gate = tmp_path / "gate"
    LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters).save_gate(gate)
    (gate / "gate.safetensors").write_bytes(b"\x00" * 3)
    assert "gate.safetensors" in _error(
        lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=gate))


def test_dora_adapters_are_refused(tmp_path, tiny_llama):
    d = make_peft_adapter(tiny_llama, tmp_path / "dora", use_dora=True)
    assert "DoRA" in _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {"d": d}))


def test_unknown_architecture(tmp_path, adapters):
    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "hidden_size": 32})()
            self.proj = torch.nn.Linear(32, 32)

    assert "unknown architecture" in _error(lambda: LoraFlowModel.from_pretrained(NoLayers(), adapters))


def test_failed_save_leaves_previous_gate_intact(tmp_path, tiny_llama, adapters, monkeypatch):
    model = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, seed=0)
    model.save_gate(tmp_path / "gate")
    before = (tmp_path / "gate" / "gate.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with torch.no_grad():
        model.gates.layers[0].weight.add_(1)
    with pytest.raises(OSError):
        model.save_gate(tmp_path / "gate")
    assert (tmp_path / "gate" / "gate.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".gate")) == []


# ----------------------------------------------------------------------------- hostile inputs (#9)
def _official(tmp_path, name="g.pt", k=2, d=32, layers=2):
    torch.save({f"encoder.layers.{i}.lora_fusion_gate.weight": torch.randn(k, d) for i in range(layers)},
               tmp_path / name)
    return tmp_path / name


def test_convert_gate_never_replaces_what_is_not_ours(tmp_path):
    src = _official(tmp_path)
    mydir = tmp_path / "mydir"
    mydir.mkdir()
    (mydir / "notes.txt").write_text("mine")
    rc = main(["convert-gate", "--official", str(src), "--adapters", "a,b", "--out", str(mydir)])
    assert rc == 2 and (mydir / "notes.txt").read_text() == "mine" and len(list(mydir.iterdir())) == 1
    regular = tmp_path / "file.txt"
    regular.write_text("a file")
    assert "is a file" in _error(lambda: convert_official_gate(src, ["a", "b"], regular))
    assert regular.read_text() == "a file"
    assert "input of this run" in _error(lambda: convert_official_gate(src, ["a", "b"], tmp_path))
    out = convert_official_gate(src, ["a", "b"], tmp_path / "g")
    convert_official_gate(src, ["a", "b"], out, temperature=1.1)  # our own output: replaced
    assert load_gate_checkpoint(out)[0].temperature == 1.1
    convert_official_gate(src, ["a", "b"], mydir, force=True)
    assert not (mydir / "notes.txt").exists()


def test_save_gate_refuses_a_regular_file(tmp_path, tiny_llama, adapters):
    model = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters)
    target = tmp_path / "gate.out"
    target.write_text("precious")
    assert "is a file" in _error(lambda: model.save_gate(target))
    assert target.read_text() == "precious"


@pytest.mark.parametrize("temperature", [float("nan"), 0.0, -1.0, float("inf")])
def test_convert_gate_temperature_must_be_finite_and_positive(tmp_path, temperature):
    src = _official(tmp_path)
    assert "temperature" in _error(lambda: convert_official_gate(src, ["a", "b"], tmp_path / "g",
                                                                 temperature=temperature))
    assert not (tmp_path / "g").exists()


def test_messages_for_unreadable_weights_say_what_happened(tmp_path):
    rand = tmp_path / "rand.bin"
    rand.write_bytes(bytes(range(256)) * 40)
    msg = _error(lambda: load_official_gate(rand))
    assert "corrupt" in msg and "run code" not in msg
    good = _official(tmp_path)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    assert "truncated" in _error(lambda: load_official_gate(truncated))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"encoder.layers.0.lora_fusion_gate.weight": _Evil()}, f, protocol=2)
    msg = _error(lambda: load_official_gate(evil))
    assert "run code" in msg and "system" in msg
    for path in (rand, truncated, evil):
        with pytest.raises(LoraFlowError) as e:
            load_official_gate(path)
        assert "weights_only" not in str(e.value) and "False" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_is_not_called_corrupt(tmp_path):
    src = _official(tmp_path)
    src.chmod(0)
    msg = _error(lambda: load_official_gate(src))
    assert "permission denied" in msg and "corrupt" not in msg


def test_non_finite_weights_are_refused(tmp_path, tiny_llama, adapters):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan.pt"
    torch.save({"encoder.layers.0.lora_fusion_gate.weight": torch.tensor([[float("nan"), 0.0]])}, bad)
    assert "non-finite" in _error(lambda: load_official_gate(bad))
    gate = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters).save_gate(tmp_path / "gate")
    sd = load_file(str(gate / "gate.safetensors"))
    sd["layers.1.bias"][0, 0] = float("inf")
    save_file(sd, str(gate / "gate.safetensors"))
    assert "layers.1.bias" in _error(lambda: load_gate_checkpoint(gate))
    cfg = json.loads((gate / "gate_config.json").read_text())
    (gate / "gate_config.json").write_text(json.dumps(cfg).replace('"temperature": 1.0', '"temperature": NaN'))
    assert "gate_config.json" in (msg := _error(lambda: load_gate_checkpoint(gate))) and "NaN" in msg
    (gate / "gate_config.json").write_text(json.dumps({**cfg, "temperature": -1}))
    assert "temperature" in _error(lambda: load_gate_checkpoint(gate))
    ad = adapters["zh"]
    sd = load_file(str(ad / "adapter_model.safetensors"))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, str(ad / "adapter_model.safetensors"))
    msg = _error(lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters))
    assert "non-finite" in msg and key in msg


@pytest.mark.parametrize("change,needle", [
    ({"lora_alpha": "16"}, "lora_alpha"), ({"r": 0}, "r: must be >= 1"), ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern"), ({"lora_dropout": 1.5}, "lora_dropout"),
])
def test_bad_adapter_config_values(tmp_path, tiny_llama, change, needle):
    d = make_peft_adapter(tiny_llama, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(change)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    msg = _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {"a": d}))
    assert needle in msg and "adapter_config.json" in msg


def test_adapter_with_modules_to_save_is_refused(tmp_path, tiny_llama):
    """PEFT would also swap in its trained lm_head copy; fusing that per token is undefined, so refuse."""
    d = make_peft_adapter(tiny_llama, tmp_path / "head", modules_to_save=["lm_head"])
    msg = _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, {"h": d}))
    assert "modules_to_save" in msg and "lm_head" in msg


def test_gate_and_adapter_paths_resolve_like_a_user_means_them(tmp_path, tiny_llama, adapters):
    model = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, seed=3)
    gate = model.save_gate(tmp_path / "gate")
    expected = model.gate_state_dict()
    # the weights file itself, or the config file, name the directory
    for form in (gate / "gate.safetensors", gate / "gate_config.json"):
        loaded = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=form)
        assert all(torch.equal(loaded.gate_state_dict()[k], v) for k, v in expected.items())
    # an official gate under another suffix
    official = _official(tmp_path, name="gate.ckpt")
    LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=official)
    # a training output directory: its best/ (then last/)
    run = tmp_path / "run"
    model.save_gate(run / "best")
    loaded = LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=run)
    assert all(torch.equal(loaded.gate_state_dict()[k], v) for k, v in expected.items())
    assert resolve_adapter_dir(adapters["zh"] / "adapter_config.json") == adapters["zh"]
    lora_run = tmp_path / "lora_run"
    (lora_run / "best").mkdir(parents=True)
    for f in adapters["zh"].iterdir():
        (lora_run / "best" / f.name).write_bytes(f.read_bytes())
    assert resolve_adapter_dir(lora_run) == lora_run / "best"
    # a directory that holds gates further down: the message says which would work
    parent = tmp_path / "gates"
    model.save_gate(parent / "zh_math")
    msg = _error(lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=parent))
    assert "gate_config.json: missing" in msg and str(parent / "zh_math") in msg
    msg = _error(lambda: load_adapter("x", tmp_path))
    assert "adapter_config.json: missing" in msg and str(adapters["zh"]) in msg


def test_base_model_problems_are_one_line_errors(saved_base):
    d = saved_base
    weights = d / "base" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    msg = _error(lambda: LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh"}))
    assert "truncated" in msg and str(d / "base") in msg
    from safetensors.torch import load_file, save_file

    weights.write_bytes(whole)
    sd = load_file(str(weights))
    key = next(iter(sd))
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(weights), metadata={"format": "pt"})
    assert "non-finite" in _error(lambda: LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh"}))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_is_never_silently_replaced(tiny_llama, adapters, tmp_path, temperature):
    """`temperature or 1.0` turned 0 into 1.0; with a gate directory 0 and negatives gave NaN weights."""
    LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters).save_gate(tmp_path / "g")
    for gate in (None, tmp_path / "g"):
        msg = _error(lambda: LoraFlowModel.from_pretrained(copy.deepcopy(tiny_llama), adapters, gate=gate,
                                                           temperature=temperature))
        assert "temperature" in msg


def test_unavailable_devices_are_refused_before_loading(tiny_llama, adapters, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "tpu:7" in _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, adapters, device="tpu:7"))
    assert "CUDA is not available" in _error(lambda: LoraFlowModel.from_pretrained(tiny_llama, adapters,
                                                                                   device="cuda:0"))
