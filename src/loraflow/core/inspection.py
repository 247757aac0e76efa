"""Looking inside: per-layer, per-token fusion weights of a generation, as a heatmap and a CSV.

As in the paper's analysis, one panel per adapter shows layers (rows) by generated tokens
(columns), so one sees when the gate leans on the language LoRA and when on the task LoRA.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraflow.common.errors import LoraFlowError
from loraflow.common.io import atomic_path, write_text_atomic


@dataclass
class FusionTrace:
    """Fusion weights of one generation: weights[layer, token, adapter]."""

    prompt: str
    text: str
    tokens: list[str]
    token_ids: list[int]
    adapter_names: list[str]
    weights: torch.Tensor  # (num_layers, num_tokens, k)


def trace_generation(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, stop_strings=(),
                     add_special_tokens: bool = False) -> FusionTrace:
    """Generate greedily from `prompt` with the gates on and record every token's weights."""
    from loraflow.core.generation import generate_texts

    if model.fusion_mode != "gate":
        raise LoraFlowError("fusion weights exist only in gate mode (LoRA-Flow)")
    gen = generate_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1,
                         stop_strings=stop_strings, capture_weights=True, add_special_tokens=add_special_tokens)[0]
    if gen.weights is None or gen.weights.shape[1] == 0:
        raise LoraFlowError("the model generated no token for this prompt")
    tokens = [tokenizer.decode([t]) for t in gen.token_ids]
    return FusionTrace(prompt, gen.text, tokens, gen.token_ids, model.adapter_names, gen.weights.float())


def to_csv(trace: FusionTrace) -> str:
    """One row per (layer, token): layer, token_index, token, then one column per adapter."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["layer", "token_index", "token", *[f"w_{n}" for n in trace.adapter_names]])
    num_layers, num_tokens, _ = trace.weights.shape
    for layer in range(num_layers):
        for t in range(num_tokens):
            writer.writerow([layer, t, trace.tokens[t], *[f"{x:.6f}" for x in trace.weights[layer, t].tolist()]])
    return buf.getvalue()


def to_png(trace: FusionTrace, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Heatmap per adapter: layers x generated tokens, shared colour scale; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w = trace.weights.numpy()  # (L, T, k)
    num_layers, num_tokens, k = w.shape
    width = min(max(6.0, 0.32 * num_tokens + 2.5), 40.0)
    fig = Figure(figsize=(width, 1.2 + k * max(1.6, 0.28 * num_layers)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, 1, squeeze=False)[:, 0]
    vmin, vmax = float(w.min()), float(w.max())
    labels = [t.replace("\n", "\\n") for t in trace.tokens]
    image = None
    for i, ax in enumerate(axes):
        image = ax.imshow(w[:, :, i], aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                          interpolation="nearest")
        ax.set_ylabel(f"{trace.adapter_names[i]}\nlayer")
        ax.set_yticks(range(num_layers))
        ax.set_xticks(range(num_tokens))
        ax.set_xticklabels(labels if i == k - 1 else [], rotation=90, fontsize=7)
    axes[-1].set_xlabel("generated token")
    fig.colorbar(image, ax=list(axes), label="fusion weight w")
    fig.suptitle(title or "LoRA-Flow fusion weights per layer and token")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def inspect_prompt(model, tokenizer, prompt: str, out_png: str | os.PathLike, *, csv_path=None,
                   max_new_tokens: int = 64, title: str | None = None) -> FusionTrace:
    """Trace one prompt and write the heatmap (and CSV)."""
    trace = trace_generation(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
    to_png(trace, out_png, title=title)
    if csv_path:
        write_text_atomic(csv_path, to_csv(trace))
    return trace
