"""`loraflow demo --quick` end to end: every step of the paper through the real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([sys.executable, "-m", "loraflow.cli", "demo", "--quick", "--out", str(out), "--seed", "0"],
                           capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    for row in ["Base", "Single LoRA (language)", "Single LoRA (task)", "Avg fusion", "LoRAHub", "LoRA-Flow"]:
        assert f"| {row} |" in first.stdout, row
    for path in ["base/config.json", "base/tokenizer.json", "lora-lang/last/adapter_config.json",
                 "lora-task/last/adapter_model.safetensors", "gate/best/gate_config.json", "report/table.md",
                 "report/table.png", "fusion_weights.png", "fusion_weights.csv", "summary.json"]:
        assert (out / path).is_file(), path
    results = sorted(p.name for p in (out / "results").glob("*.json"))
    assert results == ["avg.json", "base.json", "loraflow.json", "lorahub.json", "single_lang.json", "single_task.json"]
    for name in results:
        res = json.loads((out / "results" / name).read_text())
        assert res["total"] == 250 and res["seed"] == 0 and 0 <= res["score"] <= 1
        outputs = (out / "results" / res["predictions"]).read_text().splitlines()
        assert len(outputs) == 250
    gate = json.loads((out / "gate" / "best" / "gate_config.json").read_text())
    assert gate["adapter_names"] == ["lang", "task"]
    # a second run reuses every finished step
    again = subprocess.run([sys.executable, "-m", "loraflow.cli", "demo", "--quick", "--out", str(out), "--seed", "0"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("reusing") >= 10
    assert json.loads((out / "summary.json").read_text())["scores"] == \
        {n[:-5]: json.loads((out / "results" / n).read_text())["score"] for n in results}
