"""Batched greedy generation with left padding, stop strings and optional fusion-weight capture.

Shared by the `generate` command, evaluation and inspection, so all of them decode the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loraflow.data.protocol import truncate_at_stop


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
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy-decode every prompt (left-padded batches); cut each output at the stop strings.

    Args:
        model: a LoraFlowModel or any transformers causal LM.
        tokenizer: its tokenizer; prompts are tokenized as given (with `add_special_tokens`).
        capture_weights: also return each output token's fusion weights (LoraFlowModel in gate mode).
        progress: called with the number of prompts finished after each batch.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    device = next(model.parameters()).device
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=add_special_tokens).to(device)
        kwargs = dict(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(eos_ids) or None,
        )
        if stop_strings:
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
        frames = None
        if capture_weights:
            with model.record_fusion_weights() as frames:
                out = model.generate(**enc, **kwargs)
        else:
            out = model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        new = out[:, prompt_len:]
        per_token = None
        if frames:
            # frame 0 is the prefill (all prompt tokens); each later frame is one new token.
            # The weights that produced output token j were computed at input position prompt_len-1+j.
            allw = torch.cat(frames, dim=2)  # (L, B, prompt_len + steps - 1, k)
            per_token = allw[:, :, prompt_len - 1:, :]
        for i, prompt in enumerate(batch):
            ids = _new_token_ids(new[i], eos_ids)
            text = truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)
            w = per_token[:, i, : len(ids), :].cpu() if per_token is not None else None
            results.append(Generation(prompt=prompt, text=text, token_ids=ids, weights=w))
        if progress is not None:
            progress(len(batch))
    return results
