"""The bad-input probes of issue 16, item 7: each is refused with one line naming the problem, exit 2,
before any work (or, for `report`, every skipped file is named)."""

from __future__ import annotations

import json

import pytest
import torch

from loraflow import LoraFlowModel
from loraflow.cli import main
from loraflow.common.errors import LoraFlowError


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    return err


def test_demo_refuses_a_bogus_out_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "data").mkdir()  # a demo step would have replaced this
    (mine / "data" / "notes.txt").write_text("mine")
    for out, needle in [(tmp_path / "afile", "is a file"), (tmp_path / "afile" / "demo", "is a file"),
                        ("/proc/loraflow-demo", "/proc"), (mine, "not a loraflow demo directory")]:
        assert main(["demo", "--quick", "--out", str(out)]) == 2
        _one_line_error(capsys, needle)
    assert main(["demo", "--quick", "--force", "--out", str(mine)]) == 2  # --force redoes steps; it never takes over
    _one_line_error(capsys, "not a loraflow demo directory")
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(p.name for p in mine.rglob("*")) == ["data", "notes.txt"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_every_gate_temperature_setter_refuses_non_finite_or_non_positive(saved_base, value):
    d = saved_base
    model = LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh", "math": d / "math"}, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        model.temperature = value
    with pytest.raises(ValueError, match="temperature"):
        model.gates.set_temperature(value)
    gate = model.gates.gates()[0]
    with pytest.raises(ValueError, match="temperature"):
        gate.temperature = value
    assert model.temperature == 1.0 and all(g.temperature == 1.0 for g in model.gates.gates())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6]])).logits).all()
    model.temperature = 2.0  # a good value is still accepted everywhere
    assert all(g.temperature == 2.0 for g in model.gates.gates()) and model.gates.config.temperature == 2.0


def test_score_refuses_an_empty_test_set(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text("")
    (tmp_path / "pred.jsonl").write_text("")
    rc = main(["score", "--task", "math", "--data", str(tmp_path / "test.jsonl"), "--predictions",
               str(tmp_path / "pred.jsonl"), "--out", str(tmp_path / "r.json")])
    assert rc == 2
    _one_line_error(capsys, f"{tmp_path / 'test.jsonl'}: no test rows")
    assert not (tmp_path / "r.json").exists()


def test_adapter_role_needs_a_single_method(saved_base, capsys):
    d = saved_base
    (d / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    rc = main(["eval", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
               "--method", "avg", "--adapter-role", "task", "--task", "math", "--lang", "zh",
               "--data", str(d / "test.jsonl"), "--out", str(d / "r.json"), "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, "--adapter-role task")
    assert not (d / "r.json").exists()


def test_an_empty_stop_string_is_refused(saved_base, capsys):
    d = saved_base
    rc = main(["generate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--prompt", "x", "--stop", ""])
    assert rc == 2
    _one_line_error(capsys, "--stop")


def test_report_names_every_skipped_json_file(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    good = {"method": "base", "task": "math", "lang": "zh", "score": 0.5, "correct": 1, "total": 2}
    (results / "base.json").write_text(json.dumps(good))
    (results / "avg.json").write_text(json.dumps({**good, "method": "avg"})[:40])  # a truncated RESULT file
    (results / "settings.json").write_text('{"lr": 0.1}')
    assert main(["report", str(results)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(warnings) == 2
    assert any(f"{results / 'avg.json'}: malformed JSON" in w for w in warnings)
    assert any(f"{results / 'settings.json'}: not a result" in w for w in warnings)


def test_resume_refuses_a_corrupt_training_log(saved_base, capsys):
    d = saved_base
    (d / "t.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a {i}"}) + "\n"
                                       for i in range(4)))
    args = ["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--train", str(d / "t.jsonl"),
            "--out", str(d / "run"), "--batch-size", "2", "--template", "plain", "--no-progress"]
    assert main([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    for where, text in [(d / "run" / "train_log.json", '{"steps": [{"step": 1'),
                        (d / "run" / "last" / "train_log.json", '{"steps": 7}')]:
        original = where.read_text()
        where.write_text(text)
        checkpoint = (d / "run" / "last" / "gate.safetensors").read_bytes()
        assert main([*args, "--epochs", "2", "--resume"]) == 2
        _one_line_error(capsys, f"{where}: corrupt training log")
        assert where.read_text() == text and (d / "run" / "last" / "gate.safetensors").read_bytes() == checkpoint
        where.write_text(original)


@pytest.mark.parametrize("dtype", ["float17", "int8", torch.int64, 3])
def test_a_bogus_torch_dtype_is_named(saved_base, dtype):
    d = saved_base
    with pytest.raises(LoraFlowError, match=f"torch_dtype {dtype!r}"):
        LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh"}, torch_dtype=dtype)
    model = LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh"}, torch_dtype="bfloat16")
    assert next(model.model.parameters()).dtype == torch.bfloat16
