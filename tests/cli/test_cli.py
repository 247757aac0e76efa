"""The CLI as a user runs it: generate on a saved tiny model, fast start, clean errors."""

from __future__ import annotations

import subprocess
import sys



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


def test_help_starts_fast_without_torch():
    code = ("import sys, time; t=time.time(); from loraflow.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "print(time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 1.0
    subprocess.run([sys.executable, "-m", "loraflow.cli", "--help"], capture_output=True, check=True)


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
