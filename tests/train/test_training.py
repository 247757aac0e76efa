"""Gate and LoRA training on tiny models: learning, frozen weights, checkpoints, resume, processes."""

from __future__ import annotations

import copy
import json
import pytest
import torch
from conftest import build_toy_lora_pair, run_cli

from loraflow import LoraFlowModel
from loraflow.cli import main
from loraflow.data.formats import PromptTemplate, encode_examples, load_examples
from loraflow.common.errors import LoraFlowError
from loraflow.train.training import TrainConfig, train_gate, train_lora

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
    assert len(losses) == 20 and sum(losses[-4:]) < sum(losses[:4])
    dev = [e["dev_loss"] for e in log["epochs"]]
    assert dev[-1] < dev[0]
    # How far the gate moved from where it started (task only) toward the adapter the data needs
    # (lang only), measured on the dev set with static weights as reference points. Seen: 0.43.
    from loraflow.evaluation.baselines import fewshot_loss_fn

    encoded = encode_examples(load_examples(toy["dev"]), toy["tokenizer"], PLAIN, 64)
    static = fewshot_loss_fn(LoraFlowModel.from_pretrained(copy.deepcopy(toy["base"]), toy["adapters"]), encoded,
                             toy["tokenizer"].pad_token_id)
    task_only, lang_only = static([0.0, 1.0]), static([1.0, 0.0])
    assert lang_only < task_only - 1.0  # the toy makes the need for 'lang' unmistakable
    assert (task_only - log["best"]["value"]) / (task_only - lang_only) > 0.25
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
    """9 examples in steps of 4: the last step has one example, so process 2 has none (it must not hang)."""
    d = saved_base
    rows = [{"prompt": f"question {i}", "completion": f"answer {i} is {i * 3}"} for i in range(9)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
            "--train", str(d / "train.jsonl"), "--template", "plain", "--epochs", "2", "--batch-size", "4",
            "--lr", "1e-2", "--max-length", "64", "--no-progress"]
    run_cli([*args, "--out", str(d / "one")])
    run_cli([*args, "--out", str(d / "two")], processes=2)
    log1 = json.loads((d / "one" / "train_log.json").read_text())
    log2 = json.loads((d / "two" / "train_log.json").read_text())
    assert log2["world_size"] == 2 and len(log2["steps"]) == 6
    assert [s["loss"] for s in log2["steps"]] == pytest.approx([s["loss"] for s in log1["steps"]], abs=1e-5)
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


# ----------------------------------------------------------------------------- reliability (#9, #10.5)
def _tiny_run(d, out, *, epochs=1, resume=False, force=False, on_epoch_end=None, **cfg):
    rows = [{"prompt": f"q{i}", "completion": f"a {i}"} for i in range(6)]
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(**{"epochs": epochs, "lr": 1e-2, "batch_size": 2, "max_length": 32, "progress": False, **cfg})
    return train_gate(str(d / "base"), {"zh": d / "zh", "math": d / "math"}, d / "t.jsonl", out, config=config,
                      template=PLAIN, resume=resume, force=force, on_epoch_end=on_epoch_end)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_or_foreign_directory_is_never_overwritten(saved_base):
    d = saved_base
    _tiny_run(d, d / "run")
    before = _files(d / "run")
    with pytest.raises(LoraFlowError, match="previous training run.*--resume.*--force"):
        _tiny_run(d, d / "run")
    assert _files(d / "run") == before
    foreign = d / "mine"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("mine")
    with pytest.raises(LoraFlowError, match="not written by loraflow"):
        _tiny_run(d, foreign)
    assert _files(foreign) == {"paper.tex": b"mine"}
    (d / "afile").write_text("x")
    with pytest.raises(LoraFlowError, match="is a file"):
        _tiny_run(d, d / "afile")
    with pytest.raises(LoraFlowError, match="no checkpoint to resume"):
        _tiny_run(d, d / "fresh", resume=True)
    result = _tiny_run(d, d / "run", force=True)  # starting over is explicit
    assert result.log.get("resumed_from_epoch") is None


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", 0.0), ("lr", float("inf")),
                                         ("warmup_ratio", float("nan")), ("max_grad_norm", float("nan")),
                                         ("weight_decay", -0.1), ("epochs", 0), ("batch_size", -1), ("max_steps", 0),
                                         ("betas", (0.9, float("nan"))), ("eps", 0.0), ("epochs", 2.5)])
def test_train_config_refuses_non_finite_and_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("kwargs,needle", [({"r": 0}, "--rank"), ({"alpha": float("nan")}, "--alpha"),
                                           ({"alpha": -1.0}, "--alpha"), ({"dropout": 1.5}, "--dropout"),
                                           ({"dropout": float("nan")}, "--dropout"),
                                           ({"target_modules": ["q_proj", "nope_proj"]}, "nope_proj")])
def test_train_lora_refuses_bad_options_before_training(saved_base, kwargs, needle):
    d = saved_base
    (d / "l.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(LoraFlowError, match=needle):
        train_lora(str(d / "base"), d / "l.jsonl", d / "lora", config=TrainConfig(epochs=1, progress=False),
                   template=PLAIN, **kwargs)
    assert not (d / "lora" / "last").exists()


def test_max_steps_and_the_learning_rate_really_used(saved_base):
    """The log records the rate each step ran at (step 1 of a warm-up runs at 0), and the schedule ends at max_steps."""
    import math

    d = saved_base
    result = _tiny_run(d, d / "run", epochs=5, max_steps=5, warmup_ratio=0.4, lr=1e-2)
    steps = result.log["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and [s["epoch"] for s in steps] == [1, 1, 1, 2, 2]
    warmup, total = 2, 5  # int(0.4 * 5)

    def expected(i):  # transformers' cosine schedule with linear warm-up, written out
        if i < warmup:
            return 1e-2 * i / warmup
        return 1e-2 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup)))

    assert [s["lr"] for s in steps] == pytest.approx([expected(i) for i in range(5)], abs=1e-12)
    assert steps[0]["lr"] == 0.0
    assert [e["epoch"] for e in result.log["epochs"]] == [1, 2]  # the partial epoch ends with a checkpoint
    assert json.loads((d / "run" / "last" / "train_log.json").read_text())["steps"] == steps


def test_resume_after_a_kill_between_the_two_renames(saved_base):
    """The fallback swap renames last -> old, then new -> last; a kill in between leaves no last/."""
    import os
    import subprocess
    import sys

    d = saved_base

    def stop(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _tiny_run(d, d / "run", epochs=2, on_epoch_end=stop)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(d / "run" / "last", d / "run" / f".last.tmp-{dead.pid}-x")  # the complete copy, hidden
    (d / "run" / f".best.tmp-{dead.pid}-y").mkdir()  # and a save that never finished
    assert not (d / "run" / "last").exists()
    resumed = _tiny_run(d, d / "run", epochs=2, resume=True)
    assert resumed.log["resumed_from_epoch"] == 1 and len(resumed.log["epochs"]) == 2
    assert sorted(p.name for p in (d / "run").iterdir()) == ["best", "last", "train_log.json"]


def test_corrupt_resume_state_is_a_clean_error(saved_base):
    d = saved_base
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(d, d / "run", epochs=2, on_epoch_end=_interrupt)
    state = d / "run" / "last" / "trainer_state.pt"
    whole = state.read_bytes()
    state.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(LoraFlowError, match="trainer_state.pt: corrupt, truncated"):
        _tiny_run(d, d / "run", epochs=2, resume=True)
    state.write_bytes(whole)
    (d / "run" / "last" / "gate.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(LoraFlowError, match="gate.safetensors"):
        _tiny_run(d, d / "run", epochs=2, resume=True)


def _interrupt(epoch):
    raise KeyboardInterrupt


def _fit_setup(d):
    from loraflow.core.model import load_tokenizer
    from loraflow.train.training import Trainable

    tokenizer = load_tokenizer(str(d / "base"))
    rows = [{"prompt": f"q{i}", "completion": f"a {i}"} for i in range(4)]
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = encode_examples(load_examples(d / "t.jsonl"), tokenizer, PLAIN, 32)
    model = LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh", "math": d / "math"}, seed=0)
    model.freeze_all_but_gates()
    trainable = Trainable(model, model.gate_parameters(), lambda p: model.save_gate(p), model.load_gate)
    return model, trainable, data, tokenizer.pad_token_id


def test_a_nan_loss_stops_training_without_saving_it(saved_base, tmp_path):
    from safetensors.torch import load_file

    from loraflow.train.training import fit

    model, trainable, data, pad = _fit_setup(saved_base)

    def diverge(epoch):  # from epoch 2 on, the logits are NaN, as in a diverging run
        with torch.no_grad():
            model.model.lm_head.weight.fill_(float("nan"))

    with pytest.raises(LoraFlowError, match="loss became nan at step 3 "):
        fit(trainable, data, None, TrainConfig(epochs=2, lr=1e-2, batch_size=2, progress=False), tmp_path / "run",
            pad_id=pad, on_epoch_end=diverge)
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run" / "last" / "gate.safetensors")).values())
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["epochs"][-1]["epoch"] == 1


def test_best_epoch_selection_keeps_the_best_epoch(saved_base, tmp_path):
    """dev accuracy 0.2, 0.9, 0.5: best/ must hold the epoch-2 weights, last/ the epoch-3 ones."""
    from safetensors.torch import load_file

    from loraflow.train.training import fit

    model, trainable, data, pad = _fit_setup(saved_base)
    snapshots = []
    scripted = iter([0.2, 0.9, 0.5])
    cfg = TrainConfig(epochs=3, lr=5e-2, batch_size=2, progress=False, select_by="dev_accuracy")
    log = fit(trainable, data, None, cfg, tmp_path / "run", pad_id=pad,
              dev_accuracy=lambda m: next(scripted),
              on_epoch_end=lambda e: snapshots.append(load_file(str(tmp_path / "run" / "last" / "gate.safetensors"))))
    assert log["best"] == {"epoch": 2, "criterion": "dev_accuracy", "value": 0.9}
    best = load_file(str(tmp_path / "run" / "best" / "gate.safetensors"))
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    assert not all(torch.equal(best[k], snapshots[2][k]) for k in best)  # the epochs really differ


def _with_overflow_on_first_step(parameter):
    """Make the first backward's gradient of `parameter` inf, as an fp16 overflow of the scaled loss does."""
    calls = []

    def hook(grad):
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == 1 else grad

    parameter.register_hook(hook)


def test_fp16_gradient_overflow_skips_the_step_and_training_goes_on(saved_base, tmp_path):
    """Issue 16: under fp16 loss scaling an overflow is a skipped step (GradScaler), not a stop.

    Accelerate has no fp16 scaler on the CPU, so the run gets a real torch GradScaler, as it has on a GPU.
    """
    from loraflow.train.training import fit, make_accelerator

    model, trainable, data, pad = _fit_setup(saved_base)
    cfg = TrainConfig(epochs=3, lr=5e-2, batch_size=4, progress=False, mixed_precision="fp16", warmup_ratio=0.0)
    accelerator = make_accelerator(cfg)
    accelerator.native_amp = True  # unscale in clip_grad_norm_, as on a GPU
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _with_overflow_on_first_step(trainable.parameters[0])
    start = [p.detach().clone() for p in trainable.parameters]
    snapshots = []
    log = fit(trainable, data, None, cfg, tmp_path / "run", pad_id=pad, accelerator=accelerator,
              on_epoch_end=lambda e: snapshots.append([p.detach().clone() for p in trainable.parameters]))
    steps = log["steps"]
    assert [s.get("skipped") is not None for s in steps] == [True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(start, snapshots[0]))  # the skipped step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # the next ones train
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert accelerator.scaler.get_scale() == 2.0**9  # the scaler backed off once
    assert steps[1]["lr"] == steps[0]["lr"] == 5e-2  # the schedule waited for the first real step
    assert len(log["epochs"]) == 3


def test_an_inf_gradient_without_loss_scaling_stops_training(saved_base, tmp_path):
    from loraflow.train.training import fit

    model, trainable, data, pad = _fit_setup(saved_base)
    _with_overflow_on_first_step(trainable.parameters[0])
    with pytest.raises(LoraFlowError, match="gradient norm became (inf|nan) at step 1 "):
        fit(trainable, data, None, TrainConfig(epochs=1, lr=1e-2, batch_size=4, progress=False), tmp_path / "run",
            pad_id=pad)
    assert not (tmp_path / "run" / "last").exists()
