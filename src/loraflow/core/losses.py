"""Losses shared by gate training, LoRA training and the LoRAHub search: next-token
cross-entropy summed over response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraflow.data.formats import IGNORE_INDEX


def response_token_count(item: dict) -> int:
    """Number of tokens that carry loss once labels are shifted for next-token prediction."""
    return sum(1 for t in item["labels"][1:] if t != IGNORE_INDEX)


def summed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over response tokens (labels != -100)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
