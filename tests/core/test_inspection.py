"""`loraflow inspect`: the heatmap and CSV hold the weights the gates really produced."""

from __future__ import annotations

import csv
import io

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
               "--gate", str(d / "gate"), "--prompt", "hello world", "--template", "plain", "--max-new-tokens", "5",
               "--out", str(tmp_path / "w.png"), "--csv", str(tmp_path / "w.csv")])
    assert rc == 0
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "w.csv").open()))
    assert len(rows) == 2 * 5 and rows[0].keys() >= {"layer", "token_index", "token", "w_zh", "w_math"}
    # Independent check: a full forward over prompt + generated tokens gives, at the position that
    # produced each generated token, the same gate weights.
    # the plain template's prompt is the question verbatim, without special tokens
    trace = trace_generation(model, tokenizer, "hello world", max_new_tokens=5)
    enc = tokenizer(["hello world"], return_tensors="pt", add_special_tokens=False)
    n = enc["input_ids"].shape[1]
    assert len(trace.token_ids) == 5
    full = torch.cat([enc["input_ids"], torch.tensor([trace.token_ids])], dim=1)
    with torch.no_grad():
        model(input_ids=full)
    w = model.last_fusion_weights[:, 0, n - 1:n - 1 + 5]  # (L, 5, k)
    got = torch.tensor([[float(r["w_zh"]), float(r["w_math"])] for r in rows]).view(2, 5, 2)
    torch.testing.assert_close(got, w, atol=1e-5, rtol=0)
    assert got[..., 0].std() > 1e-3  # the weights vary, so the comparison means something


def test_readable_tokens_for_byte_level_bpe_chinese(tokenizer):
    """Byte-level BPE splits Chinese characters over tokens; no label may be U+FFFD, and the labels
    of the tokens that complete text spell the text back."""
    from loraflow.core.inspection import readable_tokens

    text = "让我们一步一步地思考。\n答案是 42"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    singles = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in s for s in singles)  # the problem: decoding tokens one by one
    labels = readable_tokens(tokenizer, ids)
    assert len(labels) == len(ids) and all(labels) and not any("\ufffd" in x for x in labels)
    assert "\\n" in labels and "\n" not in "".join(labels)
    # each token's label is the text it completes (partial tokens repeat their character)
    dedup = [x for i, x in enumerate(labels) if i + 1 == len(labels) or labels[i + 1] != x or len(x) > 1]
    assert "".join(dedup).replace("\\n", "\n").replace("␣", " ") == text
    # a character cut off at the end is marked, not garbled
    cut = readable_tokens(tokenizer, ids[:1])
    assert cut == ["…"] or "\ufffd" not in cut[0]


def test_csv_round_trips_and_png_labels_are_drawable(tokenizer, tmp_path):
    from loraflow.core.inspection import FusionTrace, display_label, drawable, readable_tokens, to_csv, to_png

    ids = tokenizer("答案\n是 \t42", add_special_tokens=False)["input_ids"]
    tokens = readable_tokens(tokenizer, ids)
    trace = FusionTrace("p", "t", tokens, ids, ["zh", "math"], torch.rand(2, len(ids), 2))
    text = to_csv(trace)
    assert text.count("\n") == 1 + 2 * len(ids)  # one line per row: no raw newline inside a field
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["token"] for r in rows[: len(ids)]] == tokens
    assert [int(r["token_id"]) for r in rows[: len(ids)]] == ids
    assert display_label(" ") == "␣" and display_label("a\tb") == "a\\tb"
    assert drawable("答a", {ord("a")}) == "U+7B54a"
    to_png(trace, tmp_path / "w.png", title="t")
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"
