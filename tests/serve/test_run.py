"""`loraflow serve` in its own process: it prints where it listens and what it serves, answers, and
a Ctrl-C (SIGINT) shuts it down cleanly with exit code 0, even with a stream open. Bad flags fail
fast with one line naming the flag, before any model is loaded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
from serve_helpers import save_tiny_setup

def start(args: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """Start a server process; return it, its URL and the lines it printed up to the last model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                found.append(m.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(1200):  # up to 120 s for imports and loading
        if found and any("model 'mix'" in x for x in lines) or proc.poll() is not None:
            break
        threading.Event().wait(0.1)
    if not found:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines)[-3000:])
    return proc, found[0], lines


@pytest.mark.slow
def test_ctrl_c_stops_a_running_server_cleanly(tmp_path):
    setup = save_tiny_setup(tmp_path)
    args = [sys.executable, "-m", "loraflow.cli", "serve", "--base", str(setup["base"]),
            "--adapter", f"zh={setup['adapters']['zh']}", "--adapter", f"math={setup['adapters']['math']}",
            "--gate", f"flow={setup['gates']['zh-math']}", "--fusion", "mix=avg", "--port", "0",
            "--max-model-len", "8192", "--device", "cpu"]
    proc, url, lines = start(args)
    try:
        printed = "".join(lines)
        for name, fusion in [("flow", "gate:flow"), ("zh", "single:zh"), ("base", "off"), ("mix", "static:0.5,0.5")]:
            assert f"model '{name}'" in printed and fusion in printed
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["flow", "zh", "math", "base", "mix"]
        body = json.dumps({"model": "flow", "prompt": "hi", "stream": True, "max_tokens": 8000,
                           "ignore_eos": True}).encode()
        stream = urllib.request.urlopen(urllib.request.Request(
            f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}), timeout=30)
        assert stream.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = stream.read().decode()
        assert "shutting down" in rest and rest.rstrip().endswith("data: [DONE]")
        assert "loraflow serve: stopped" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("flags, words", [
    (["--adapter", "zh"], "--adapter: 'zh' is not NAME=PATH"),
    (["--adapter", "zh=a", "--adapter", "zh=b"], "--adapter: the name zh is given twice"),
    (["--adapter", "zh=a", "--gate", "g"], "--gate: 'g' is not NAME=PATH"),
    (["--adapter", "zh=a", "--fusion", "mix=static:1,2"], "2 weights for 1 adapters"),
    (["--adapter", "zh=a", "--fusion", "zh=avg"], "zh is used more than once"),
    (["--adapter", "zh=a", "--port", "70000"], "--port: must be in 0..65535"),
    (["--adapter", "zh=a", "--max-batch-size", "0"], "--max-batch-size: must be a whole number >= 1"),
    (["--adapter", "zh=a", "--gate", "g=/nonexistent/gate"], "not found"),
    ([], "--adapter: give at least one"),
    (["--adapter", "zh=a", "--compile", "--engine", "vllm"], "--compile is for the default engine"),
])
def test_bad_flags_fail_in_one_line_before_loading(tmp_path, capsys, flags, words):
    from loraflow.cli import main

    rc = main(["serve", "--base", str(tmp_path / "base"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and words in err, err


def test_serve_help_loads_no_heavy_library():
    code = ("import sys\nfrom loraflow.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint([m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("[]"), done.stdout[-500:] + done.stderr[-500:]
    assert "--gate NAME=PATH" in done.stdout and "--served-model-name" in done.stdout
