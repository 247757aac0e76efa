"""Batched generation (greedy, or sampling when asked) with left padding, stop strings, per-example
progress and optional fusion-weight capture.

Shared by the `generate` command, evaluation and inspection, so all of them decode the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loraflow.common.errors import LoraFlowError
from loraflow.data.protocol import truncate_at_stop

if TYPE_CHECKING:  # pragma: no cover
    from loraflow.data.formats import PromptTemplate


@dataclass(frozen=True)
class Sampling:
    """Decoding: greedy by default (the paper's protocol); `do_sample` draws with these settings.

    Attributes:
        do_sample: sample instead of greedy decoding (seed torch first for reproducible draws).
        temperature: the sampling temperature (> 0), not the gate's softmax temperature.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens (0 = no limit).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise LoraFlowError(f"--sampling-temperature {t!r}: expected a finite number > 0")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise LoraFlowError(f"--top-p {p!r}: expected a number in (0, 1]")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise LoraFlowError(f"--top-k {k!r}: expected a whole number >= 0 (0 = no limit)")

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "num_beams": 1}
        return {"do_sample": True, "num_beams": 1, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "top_k": int(self.top_k)}


GREEDY = Sampling()


@dataclass
class Generation:
    """One prompt's completion; `weights` is (num_layers, new_tokens, k) when captured."""

    prompt: str
    text: str
    token_ids: list[int]
    weights: torch.Tensor | None = None


def _new_token_ids(row: torch.Tensor, eos_ids: set[int]) -> list[int]:
    out = []
    for t in row.tolist():
        if t in eos_ids:
            break
        out.append(t)
    return out


def _progress_criteria(prompt_len: int, done_ids: set[int], on_finished: Callable[[int], None]):
    """A stopping criterion that never stops: it reports rows as they finish (first EOS/pad token),
    so progress moves per example, not per batch."""
    from transformers import StoppingCriteria

    class _Progress(StoppingCriteria):
        def __init__(self) -> None:
            self.finished: set[int] = set()

        def __call__(self, input_ids, scores, **kwargs):  # (B, T) -> (B,) all False
            last = input_ids[:, -1].tolist() if input_ids.shape[1] > prompt_len else []
            new = [i for i, t in enumerate(last) if t in done_ids and i not in self.finished]
            if new:
                self.finished.update(new)
                on_finished(len(new))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return _Progress()


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    stop_strings: Sequence[str] = (),
    capture_weights: bool = False,
    add_special_tokens: bool = False,
    sampling: Sampling = GREEDY,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Decode every prompt (left-padded batches); cut each output at the stop strings.

    Args:
        model: a LoraFlowModel or any transformers causal LM.
        tokenizer: its tokenizer; prompts are tokenized as given (with `add_special_tokens`, see
            `loraflow.data.templates.render_prompt`).
        capture_weights: also return each output token's fusion weights (LoraFlowModel in gate mode).
        sampling: greedy (default) or sampling settings.
        progress: called with the number of prompts that finished, as each one finishes.
    """
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise LoraFlowError(f"stop strings must be non-empty text, got {list(stop_strings)!r}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    device = next(model.parameters()).device
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=add_special_tokens, return_token_type_ids=False).to(device)
        prompt_len = enc["input_ids"].shape[1]
        kwargs = dict(
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(eos_ids) or None, **sampling.generate_kwargs(),
        )
        tracker = None
        if progress is not None:
            tracker = _progress_criteria(prompt_len, eos_ids | {tokenizer.pad_token_id}, progress)
            kwargs["stopping_criteria"] = [tracker]
        if stop_strings:
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
        frames = None
        if capture_weights:
            with model.record_fusion_weights() as frames:
                out = model.generate(**enc, **kwargs)
        else:
            out = model.generate(**enc, **kwargs)
        new = out[:, prompt_len:]
        per_token = None
        if frames:
            # frame 0 is the prefill (all prompt tokens); each later frame is one new token.
            # The weights that produced output token j were computed at input position prompt_len-1+j.
            allw = torch.cat(frames, dim=2)  # (L, B, prompt_len + steps - 1, k)
            per_token = allw[:, :, prompt_len - 1:, :]
        for i, prompt in enumerate(batch):
            ids = _new_token_ids(new[i], eos_ids)
            # a character cut by max_new_tokens decodes as U+FFFD: it is no text, leave it out
            text = truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd"), stop_strings)
            w = per_token[:, i, : len(ids), :].cpu() if per_token is not None else None
            results.append(Generation(prompt=prompt, text=text, token_ids=ids, weights=w))
        if tracker is not None and len(tracker.finished) < len(batch):
            progress(len(batch) - len(tracker.finished))  # rows that ran to max_new_tokens
    return results


def gate_template(gate) -> "PromptTemplate | None":
    """The prompt template a loraflow gate directory was trained with (None: not recorded, or an
    official `.pt` gate)."""
    import json
    from pathlib import Path

    from loraflow.core.checkpoints import CONFIG_NAME
    from loraflow.data.formats import PromptTemplate

    if gate is None or not (Path(gate) / CONFIG_NAME).is_file():
        return None
    try:
        raw = json.loads((Path(gate) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the gate loader reports a corrupt file with its own message
    record = ((raw.get("extra") or {}).get("training") or {}).get("template")
    if not isinstance(record, dict):
        return None
    try:
        return PromptTemplate.from_record(record)
    except (TypeError, ValueError) as e:
        raise LoraFlowError(f"{Path(gate) / CONFIG_NAME}: invalid recorded template ({e})") from None


def choose_template(requested, gate, *, default: str) -> tuple:
    """(template, note): `requested` when given, else the one the gate was trained with, else `default`.

    The note says which was used and why, for the command to print; it is None when the user chose.
    """
    if requested is not None:
        return requested, None
    recorded = gate_template(gate)
    if recorded is not None:
        shown = recorded.name or recorded.kind
        return recorded, f"using the template the gate was trained with: {shown} (--template to override)"
    return default, f"using the {default} template (the gate records none; --template to choose)"
