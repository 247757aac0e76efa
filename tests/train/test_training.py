"""Gate and LoRA training on tiny models: learning, frozen weights, checkpoints, resume, processes."""

from __future__ import annotations

import copy
import json
import pytest
import torch
from conftest import build_toy_lora_pair, run_cli

from loraflow import LoraFlowModel
from loraflow.cli import main
from loraflow.data.formats import PromptTemplate
from loraflow.train.training import TrainConfig, train_gate

PLAIN = PromptTemplate(kind="plain")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_lora_pair(tmp_path_factory.mktemp("toy"))


def _train(toy, out, **cfg):
    cfg = {"epochs": 3, "lr": 5e-2, "batch_size": 4, "max_length": 64, "progress": False, **cfg}
    return train_gate(copy.deepcopy(toy["base"]), toy["adapters"], toy["train"], out, dev_path=toy["dev"],
                      config=TrainConfig(**cfg), template=PLAIN, tokenizer=toy["tokenizer"])


def test_gate_learns_toy_mixture_and_only_gates_change(toy, tmp_path):
    base = copy.deepcopy(toy["base"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = train_gate(base, toy["adapters"], toy["train"], tmp_path / "run", dev_path=toy["dev"],
                        config=TrainConfig(epochs=5, lr=1e-1, batch_size=4, max_length=64, progress=False),
                        template=PLAIN, tokenizer=toy["tokenizer"])
    log = result.log
    assert result.trainable_parameters == 2 * (2 * 32 + 2)
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == 20 and sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4
    dev = [e["dev_loss"] for e in log["epochs"]]
    assert dev[-1] < dev[0]
    # base weights untouched (same tensors the fused layers wrap), LoRA weights equal the files on disk
    from safetensors.torch import load_file

    for name, value in base.state_dict().items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(value, before[original]), name
    lang = load_file(str(toy["adapters"]["lang"] / "adapter_model.safetensors"))
    fused_q = base.model.layers[0].self_attn.q_proj
    assert torch.equal(fused_q.lora_A[:4], lang["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    # the trained gate has learned to bring in 'lang' (a fresh gate gives it weight ~0)
    trained = LoraFlowModel.from_pretrained(copy.deepcopy(toy["base"]), toy["adapters"], gate=result.best_dir)
    with torch.no_grad():
        trained(**toy["tokenizer"](["q1 hello\nworld"], return_tensors="pt"))
    w = trained.last_fusion_weights.mean(dim=(0, 1, 2))
    assert w[0] > 0.15
    assert log["best"]["criterion"] == "dev_loss"
    assert (result.best_dir / "gate_config.json").is_file() and (result.last_dir / "trainer_state.pt").is_file()


def test_resume_equals_uninterrupted_training(toy, tmp_path):
    straight = _train(toy, tmp_path / "straight")

    def crash(epoch):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_gate(copy.deepcopy(toy["base"]), toy["adapters"], toy["train"], tmp_path / "resumed",
                   dev_path=toy["dev"], config=TrainConfig(epochs=3, lr=5e-2, batch_size=4, max_length=64,
                                                           progress=False),
                   template=PLAIN, tokenizer=toy["tokenizer"], on_epoch_end=crash)
    assert (tmp_path / "resumed" / "last" / "gate.safetensors").is_file()  # the complete epoch-1 checkpoint
    resumed = train_gate(
        copy.deepcopy(toy["base"]), toy["adapters"], toy["train"], tmp_path / "resumed", dev_path=toy["dev"],
        config=TrainConfig(epochs=3, lr=5e-2, batch_size=4, max_length=64, progress=False),
        template=PLAIN, tokenizer=toy["tokenizer"], resume=True)
    from safetensors.torch import load_file

    a = load_file(str(straight.last_dir / "gate.safetensors"))
    b = load_file(str(resumed.last_dir / "gate.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [s["loss"] for s in straight.log["steps"]] == pytest.approx([s["loss"] for s in resumed.log["steps"]],
                                                                       abs=1e-5)


def test_gradient_accumulation_does_not_change_the_result(toy, tmp_path):
    one = _train(toy, tmp_path / "one", epochs=1)
    acc = _train(toy, tmp_path / "acc", epochs=1, grad_accum=2)
    from safetensors.torch import load_file

    a, b = load_file(str(one.last_dir / "gate.safetensors")), load_file(str(acc.last_dir / "gate.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_two_gloo_processes_equal_one(saved_base, tmp_path):
    d = saved_base
    rows = [{"prompt": f"question {i}", "completion": f"answer {i} is {i * 3}"} for i in range(8)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
            "--train", str(d / "train.jsonl"), "--template", "plain", "--epochs", "2", "--batch-size", "4",
            "--lr", "1e-2", "--max-length", "64", "--no-progress"]
    run_cli([*args, "--out", str(d / "one")])
    run_cli([*args, "--out", str(d / "two")], processes=2)
    log2 = json.loads((d / "two" / "train_log.json").read_text())
    assert log2["world_size"] == 2
    from safetensors.torch import load_file

    a, b = load_file(str(d / "one" / "last" / "gate.safetensors")), load_file(str(d / "two" / "last" / "gate.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_train_lora_output_loads_in_peft_and_loraflow(saved_base, tmp_path):
    d = saved_base
    rows = [{"prompt": f"say {i}", "completion": f"number {i}"} for i in range(8)]
    (d / "lora.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["train-lora", "--base", str(d / "base"), "--train", str(d / "lora.jsonl"), "--out", str(d / "lora"),
               "--rank", "4", "--alpha", "8", "--epochs", "3", "--lr", "1e-2", "--batch-size", "4",
               "--template", "plain", "--max-length", "32", "--no-progress"])
    assert rc == 0
    log = json.loads((d / "lora" / "train_log.json").read_text())
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"]
    assert log["trainable_parameters"] == 2 * 4 * sum(i + o for i, o in
                                                      [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 15).view(1, -1)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), d / "lora" / "best")
    ours = LoraFlowModel.from_pretrained(str(d / "base"), {"new": d / "lora" / "best", "zh": d / "zh"})
    with torch.no_grad(), ours.only_adapter("new"):
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_malformed_training_file_names_file_and_line(saved_base, capsys):
    d = saved_base
    (d / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    rc = main(["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--train",
               str(d / "bad.jsonl"), "--out", str(d / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2" in err and err.count("\n") == 1
    assert not (d / "out").exists()
    rc = main(["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--train",
               str(d / "bad.jsonl"), "--out", str(d / "out"), "--epochs", "0"])
    assert rc == 2 and "--epochs" in capsys.readouterr().err


def test_select_by_dev_accuracy_records_accuracy_each_epoch(saved_base, capsys):
    d = saved_base
    rows = [{"query": f"q{i}", "response": f"x The answer is: {i}"} for i in range(4)]
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    rc = main(["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
               "--train", str(d / "t.jsonl"), "--dev", str(d / "dev.jsonl"), "--out", str(d / "g"), "--epochs", "2",
               "--batch-size", "2", "--template", "plain", "--select-by", "dev_accuracy", "--dev-max-new-tokens", "4",
               "--no-progress"])
    assert rc == 0
    log = json.loads((d / "g" / "train_log.json").read_text())
    assert [sorted(e) for e in log["epochs"]] == [["dev_accuracy", "dev_loss", "epoch"]] * 2
    assert all(0.0 <= e["dev_accuracy"] <= 1.0 for e in log["epochs"])
    assert log["best"]["criterion"] == "dev_accuracy"
    rc = main(["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--train", str(d / "t.jsonl"),
               "--out", str(d / "g2"), "--select-by", "dev_accuracy", "--no-progress"])
    assert rc == 2 and "dev set with answers" in capsys.readouterr().err


def test_bf16_autocast_with_checkpointing_trains_fp32_gates(saved_base):
    from safetensors.torch import load_file

    d = saved_base
    (d / "t.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a {i}"}) + "\n" for i in range(8)))
    rc = main(["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
               "--train", str(d / "t.jsonl"), "--out", str(d / "g"), "--template", "plain", "--epochs", "2",
               "--batch-size", "4", "--lr", "1e-2", "--mixed-precision", "bf16", "--gradient-checkpointing",
               "--no-progress"])
    assert rc == 0
    log = json.loads((d / "g" / "train_log.json").read_text())
    assert log["config"]["mixed_precision"] == "bf16" and all(s["loss"] == s["loss"] for s in log["steps"])
    gate = load_file(str(d / "g" / "last" / "gate.safetensors"))
    assert all(v.dtype == torch.float32 for v in gate.values())
    assert not torch.equal(gate["layers.0.bias"], torch.tensor([[-0.5, 0.5]]))  # it trained
