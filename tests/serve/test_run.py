"""`Server.run()` in its own process: it prints where it listens and what it serves, answers, and
a Ctrl-C (SIGINT) shuts it down cleanly with exit code 0, even with a stream open."""

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

SCRIPT = """
import sys
from loraflow.serve import ServeConfig, Server
base, zh, math, gate = sys.argv[1:5]
Server.from_pretrained(base, {"zh": zh, "math": math}, gates={"flow": gate}, fusions={"mix": "avg"},
                       config=ServeConfig(port=0, max_model_len=8192), device="cpu").run()
"""


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
    args = [sys.executable, "-c", SCRIPT, str(setup["base"]), str(setup["adapters"]["zh"]),
            str(setup["adapters"]["math"]), str(setup["gates"]["zh-math"])]
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
