"""`loraflow demo --quick` end to end: the paper's whole table through the real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CELLS = [f"{lang}_{task}" for lang in ("han", "cyr", "lat") for task in ("math", "code")]
STEMS = ["avg", "base", "loraflow", "lorahub", "pooled", "single_lang", "single_task"]


@pytest.mark.slow
def test_quick_demo_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([sys.executable, "-m", "loraflow.cli", "demo", "--quick", "--out", str(out), "--seed", "0"],
                           capture_output=True, text=True, env=env, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    # the paper-shaped table, once: six rows, both tasks' three languages and averages, the pooled-gate row
    header = ("| Method | Math (MGSM-style) Han (as Zh) | Cyrillic (as Ru) | Latin (as Es) | Avg | "
              "Code (HumanEval-style) Han (as Zh) | Cyrillic (as Ru) | Latin (as Es) | Avg |")
    assert first.stdout.count(header) == 1, first.stdout[-3000:]
    for row in ["Base", "Single LoRA (language)", "Single LoRA (task)", "Avg fusion", "LoRAHub", "LoRA-Flow"]:
        assert first.stdout.count(f"| {row} |") == 2, row  # ours, and the paper's printed after it
    assert first.stdout.count("| LoRA-Flow, one gate over all 5 LoRAs |") == 1
    assert first.stdout.index(header) < first.stdout.index("Published: LoRA-Flow paper")
    assert "Loading weights" not in first.stdout + first.stderr  # no library loading bars between the steps
    assert all(f"[{step}] done in" in first.stdout for step in ("world", "pretrain base model", "report"))
    for path in ["base/config.json", "base/tokenizer.json", "loras/han/last/adapter_config.json",
                 "loras/code/last/adapter_model.safetensors", "gates/lat_code/best/gate_config.json",
                 "gates/pooled/best/gate_config.json", "report/table.md", "report/table.png",
                 "fusion_weights_math.png", "fusion_weights_code.png", "fusion_weights_code.csv", "summary.json"]:
        assert (out / path).is_file(), path
    for cell in CELLS:
        results = sorted(p.stem for p in (out / "results" / cell).glob("*.json"))
        assert results == STEMS, cell
        for stem in results:
            res = json.loads((out / "results" / cell / f"{stem}.json").read_text())
            assert res["seed"] == 0 and 0 <= res["score"] <= 1 and res["lang"] == cell.split("_")[0]
            outputs = (out / "results" / cell / res["predictions"]).read_text().splitlines()
            assert len(outputs) == res["total"] > 0
            if cell.endswith("code"):  # every answer was run in the sandbox
                assert sum(res["status_counts"].values()) == res["total"]
    pooled = json.loads((out / "gates" / "pooled" / "best" / "gate_config.json").read_text())
    assert pooled["adapter_names"] == ["han", "cyr", "lat", "math", "code"]
    assert json.loads((out / "gates" / "cyr_math" / "best" / "gate_config.json").read_text())["adapter_names"] == \
        ["cyr", "math"]
    # a second run reuses every finished step
    again = subprocess.run([sys.executable, "-m", "loraflow.cli", "demo", "--quick", "--out", str(out), "--seed", "0"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("reusing") == 1 + 1 + 5 + 7 + 6 * 7 + 1 + 2
    assert json.loads((out / "summary.json").read_text())["scores"] == {
        f"{cell}/{stem}": json.loads((out / "results" / cell / f"{stem}.json").read_text())["score"]
        for cell in CELLS for stem in STEMS}
