"""Plain user errors through the CLI: one line, exit 2, nothing written, before the model loads."""

from __future__ import annotations

import json

import pytest
import torch

from loraflow.cli import main


def _gen(d, *extra):
    return main(["generate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--max-new-tokens", "2",
                 *extra])


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    return err


def test_generate_input_errors(saved_base, capsys):
    d = saved_base
    assert _gen(d, "--prompt", "") == 2
    _one_line_error(capsys, "empty prompt")
    bad = d / "prompts.txt"
    bad.write_bytes(b"fine\nnot \xff utf-8\n")
    assert _gen(d, "--prompts-file", str(bad)) == 2
    _one_line_error(capsys, f"{bad}:2: not valid UTF-8")
    for flags, needle in [(["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
                          (["--max-new-tokens", "0"], "--max-new-tokens"), (["--device", "tpu:7"], "tpu:7"),
                          (["--gate-temperature", "nan"], "--gate-temperature"),
                          (["--temperature", "nan"], "--temperature")]:  # the deprecated alias names itself
        assert _gen(d, "--prompt", "x", *flags) == 2
        _one_line_error(capsys, needle)


def test_cuda_without_cuda_is_a_clean_error(saved_base, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gen(saved_base, "--prompt", "x", "--device", "cuda:0") == 2
    _one_line_error(capsys, "CUDA is not available")


def test_inspect_checks_its_outputs_before_generating(saved_base, capsys):
    d = saved_base
    (d / "afile").write_text("x")
    for out, needle in [(d / "afile" / "w.png", "is a file"), (d, "is a directory"), ("/proc/w.png", "/proc")]:
        rc = main(["inspect", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--prompt", "x",
                   "--out", str(out)])
        assert rc == 2
        _one_line_error(capsys, needle)
    rc = main(["inspect", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--prompt", "", "--out",
               str(d / "w.png")])
    assert rc == 2
    _one_line_error(capsys, "empty")


def test_train_gate_force_and_resume_flags(saved_base, capsys):
    d = saved_base
    (d / "t.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a {i}"}) + "\n"
                                       for i in range(4)))
    args = ["train-gate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--train", str(d / "t.jsonl"),
            "--out", str(d / "run"), "--epochs", "1", "--batch-size", "2", "--template", "plain", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    before = (d / "run" / "last" / "gate.safetensors").read_bytes()
    assert main(args) == 2
    _one_line_error(capsys, "--resume")
    assert (d / "run" / "last" / "gate.safetensors").read_bytes() == before
    assert main([*args, "--force", "--max-steps", "1"]) == 0
    capsys.readouterr()
    log = json.loads((d / "run" / "train_log.json").read_text())
    assert len(log["steps"]) == 1 and log["config"]["max_steps"] == 1
    for flags, needle in [(["--lr", "nan"], "--lr"), (["--temperature", "0"], "--temperature"),
                          (["--max-steps", "0"], "--max-steps"), (["--warmup-ratio", "nan"], "--warmup-ratio")]:
        assert main([*args, "--force", *flags]) == 2
        _one_line_error(capsys, needle)


@pytest.mark.parametrize("flags,needle", [(["--rank", "0"], "--rank"), (["--dropout", "1.5"], "--dropout"),
                                          (["--alpha", "nan"], "--alpha"),
                                          (["--target-modules", "q_proj,nope"], "nope")])
def test_train_lora_option_errors(saved_base, capsys, flags, needle):
    d = saved_base
    (d / "t.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    rc = main(["train-lora", "--base", str(d / "base"), "--train", str(d / "t.jsonl"), "--out", str(d / "lora"),
               "--no-progress", *flags])
    assert rc == 2
    if needle == "nope":  # checked against the loaded model: transformers' loading bar comes first
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error:") == 1 and needle in err.splitlines()[-1]
    else:
        _one_line_error(capsys, needle)
    assert not (d / "lora" / "last").exists()
