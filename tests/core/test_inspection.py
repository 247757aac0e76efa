"""`loraflow inspect`: the heatmap and CSV hold the weights the gates really produced."""

from __future__ import annotations

import csv

import torch

from loraflow import LoraFlowModel
from loraflow.cli import main
from loraflow.core.inspection import trace_generation


def test_inspect_writes_png_and_csv_matching_recomputed_weights(saved_base, tokenizer, tmp_path, capsys):
    d = saved_base
    model = LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh", "math": d / "math"}, seed=0,
                                          gate_init_std=0.5)
    model.save_gate(d / "gate")
    rc = main(["inspect", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
               "--gate", str(d / "gate"), "--prompt", "hello world", "--max-new-tokens", "5",
               "--out", str(tmp_path / "w.png"), "--csv", str(tmp_path / "w.csv")])
    assert rc == 0
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "w.csv").open()))
    assert len(rows) == 2 * 5 and rows[0].keys() >= {"layer", "token_index", "token", "w_zh", "w_math"}
    # Independent check: a full forward over prompt + generated tokens gives, at the position that
    # produced each generated token, the same gate weights.
    trace = trace_generation(model, tokenizer, "hello world", max_new_tokens=5)
    enc = tokenizer(["hello world"], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    assert len(trace.token_ids) == 5
    full = torch.cat([enc["input_ids"], torch.tensor([trace.token_ids])], dim=1)
    with torch.no_grad():
        model(input_ids=full)
    w = model.last_fusion_weights[:, 0, n - 1:n - 1 + 5]  # (L, 5, k)
    got = torch.tensor([[float(r["w_zh"]), float(r["w_math"])] for r in rows]).view(2, 5, 2)
    torch.testing.assert_close(got, w, atol=1e-5, rtol=0)
    assert got[..., 0].std() > 1e-3  # the weights vary, so the comparison means something
