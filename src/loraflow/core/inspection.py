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
from loraflow.common.extras import require
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


def readable_tokens(tokenizer, token_ids: list[int]) -> list[str]:
    """A readable label per token, for any tokenizer: the text that token completes, decoded
    incrementally (byte-level BPE splits one Chinese character over several tokens, and decoding
    those alone gives U+FFFD). Tokens holding part of a character get that whole character; a
    character left incomplete at the end is shown as "…". Control characters are escaped (\\n)."""
    labels: list[str] = []
    pending: list[int] = []
    shown = ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(token_ids[: i + 1], skip_special_tokens=False)
        stable = text.rstrip(REPLACEMENT)
        if not stable.startswith(shown):  # a decoder that rewrites earlier text: fall back to this token
            new = tokenizer.decode([token_ids[i]], skip_special_tokens=False).replace(REPLACEMENT, "")
        else:
            new = stable[len(shown):]
        shown = stable if stable.startswith(shown) else shown + new
        if not new:
            pending.append(i)
            continue
        labels.extend([new] * len(pending))
        labels.append(new)
        pending = []
    labels.extend(["…"] * len(pending))
    return [display_label(t) for t in labels]


REPLACEMENT = "\ufffd"
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_label(text: str) -> str:
    """`text` on one line: newlines, tabs and other control characters escaped; an empty or
    all-whitespace token shown with visible markers (␣ for spaces)."""
    out = "".join(_ESCAPES.get(c, c if c.isprintable() or c == " " else f"\\x{ord(c):02x}") for c in text)
    return out.replace(" ", "␣") if not out.strip() else out


def trace_generation(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, stop_strings=(),
                     add_special_tokens: bool = False, progress=None) -> FusionTrace:
    """Generate greedily from `prompt` with the gates on and record every token's weights.

    `prompt` is tokenised with `add_special_tokens` (see `loraflow.data.templates.render_prompt`).
    """
    from loraflow.core.generation import generate_texts

    if model.fusion_mode != "gate":
        raise LoraFlowError("fusion weights exist only in gate mode (LoRA-Flow)")
    gen = generate_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1,
                         stop_strings=stop_strings, capture_weights=True, add_special_tokens=add_special_tokens,
                         progress=progress)[0]
    if gen.weights is None or gen.weights.shape[1] == 0:
        raise LoraFlowError("the model generated no token for this prompt")
    tokens = readable_tokens(tokenizer, gen.token_ids)
    return FusionTrace(prompt, gen.text, tokens, gen.token_ids, model.adapter_names, gen.weights.float())


def to_csv(trace: FusionTrace) -> str:
    """One row per (layer, token): layer, token_index, token_id, token (readable, one line), then one
    column per adapter. Fields are quoted by the csv module where needed; no field holds a newline."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["layer", "token_index", "token_id", "token", *[f"w_{n}" for n in trace.adapter_names]])
    num_layers, num_tokens, _ = trace.weights.shape
    for layer in range(num_layers):
        for t in range(num_tokens):
            writer.writerow([layer, t, trace.token_ids[t], trace.tokens[t],
                             *[f"{x:.6f}" for x in trace.weights[layer, t].tolist()]])
    return buf.getvalue()


def to_png(trace: FusionTrace, path: str | os.PathLike, *, title: str | None = None,
           force: bool | None = None) -> Path:
    """Heatmap per adapter: layers x generated tokens, shared colour scale; written atomically
    (`force`: see loraflow.common.io.atomic_path)."""
    require("matplotlib", what="the fusion-weight heatmap")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w = trace.weights.numpy()  # (L, T, k)
    num_layers, num_tokens, k = w.shape
    width = min(max(6.0, 0.32 * num_tokens + 2.5), 40.0)
    # constrained layout places title, panels and colour bar without a blank band under the title
    fig = Figure(figsize=(width, 0.8 + k * max(1.6, 0.28 * num_layers)), layout="constrained")
    FigureCanvasAgg(fig)
    families = _label_fonts()
    axes = fig.subplots(k, 1, squeeze=False)[:, 0]
    vmin, vmax = float(w.min()), float(w.max())
    covered = _covered(families)
    labels = [drawable(t, covered) for t in trace.tokens]
    image = None
    for i, ax in enumerate(axes):
        image = ax.imshow(w[:, :, i], aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                          interpolation="nearest")
        ax.set_ylabel(f"{trace.adapter_names[i]}\nlayer")
        ax.set_yticks(range(num_layers))
        ax.set_xticks(range(num_tokens))
        ax.set_xticklabels(labels if i == k - 1 else [], rotation=90, fontsize=7, fontfamily=families)
    axes[-1].set_xlabel("generated token")
    fig.colorbar(image, ax=list(axes), label="fusion weight w")
    fig.suptitle(title or "LoRA-Flow fusion weights per layer and token")
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# Fonts that draw CJK and Cyrillic token labels, used in this order when installed.
_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
              "SimHei", "Microsoft YaHei", "PingFang SC", "Arial Unicode MS")


def _label_fonts() -> list[str]:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return [f for f in _CJK_FONTS if f in installed] + ["DejaVu Sans"]


def _covered(families: list[str]) -> set[int]:
    """Code points the fonts `families` can draw."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    covered: set[int] = set()
    for family in families:
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        covered |= set(FT2Font(path).get_charmap())
    return covered


def drawable(label: str, covered: set[int]) -> str:
    """`label` with characters no installed font can draw written as U+XXXX (never as empty boxes)."""
    return "".join(c if ord(c) in covered else f"U+{ord(c):04X}" for c in label)


def inspect_prompt(model, tokenizer, prompt: str, out_png: str | os.PathLike, *, csv_path=None,
                   max_new_tokens: int = 64, title: str | None = None, add_special_tokens: bool = False,
                   force: bool = False) -> FusionTrace:
    """Trace one prompt (tokenised with `add_special_tokens`) and write the heatmap (and CSV).

    An existing PNG or CSV is replaced only if loraflow wrote it, or with `force` (loraflow.common.io).
    """
    from loraflow.common.io import check_output_file

    require("matplotlib", what="the fusion-weight heatmap")  # before generating
    check_output_file(out_png, what="heatmap file", force=force)
    if csv_path:
        check_output_file(csv_path, inputs=[out_png], what="CSV file", force=force)
    trace = trace_generation(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                             add_special_tokens=add_special_tokens)
    to_png(trace, out_png, title=title, force=force)
    if csv_path:
        write_text_atomic(csv_path, to_csv(trace), force=force)
    return trace
