"""A batch of sequences that decode together, each row with its own fusion and its own length.

Rows are right-aligned in one transformers `DynamicCache`: row i's n_i cached tokens occupy the last
n_i columns and the columns before them are padding that the attention mask hides. That makes every
operation the server needs a plain tensor operation on the cache:

    add rows     prefill the newcomers as their own left-padded batch, then left-pad whichever of the
                 two caches is narrower and concatenate along the batch axis; a long prompt is
                 prefilled a chunk at a time in a cache of its own (`PartialPrefill`) and joins once
                 complete, so the running rows decode between its chunks;
    decode       one token per row: input (B, 1), positions = each row's length, mask (B, W + 1);
    drop rows    select the remaining rows and cut the padding columns that no row needs any more.

Each forward runs inside `model.fusion_rows(specs)`, so every row is mixed with its own fusion.

On a compiled model (`model.compile(dynamic=True)`) batch sizes and widths are symbolic, so the graphs
stay few. Dynamo still specializes sizes 1 and, with duck sizing, a size equal to another one (a prompt as
wide as the number of adapters); so duck sizing is off for these forwards, a prefill is at least 2
columns wide (one more hidden padding column) and `keep` leaves the cache contiguous. What is left: one
graph for each of prefill, prefill scoring every position, and decode, at batch 1 and at more (with
inductor also per memory layout of the cache tensors, which its graphs choose).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.fx.experimental._config as shapes_config

from loraflow.common.errors import LoraFlowError
from loraflow.core.fusion_spec import FusionSpec


def check_cache_support(model) -> None:
    """Refuse models whose cache is not per-token key/value tensors (recurrent or linear-attention layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    odd = sorted({type(layer).__name__ for layer in DynamicCache(config=model.config).layers
                  if not isinstance(layer, DynamicLayer)})
    if odd:
        raise LoraFlowError(
            f"{type(model).__name__}: serving needs a key/value cache per token; this model's cache has {', '.join(odd)}"
        )


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend n zero columns along the sequence axis of a (B, H, T, D) tensor."""
    if n == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
    return torch.cat([pad, t], dim=2)


class PartialPrefill:
    """A prompt being prefilled a chunk at a time (`DecodeBatch.prefill_chunk`), in a cache of its own."""

    def __init__(self, prompt: Sequence[int], fusion: FusionSpec) -> None:
        from transformers import DynamicCache

        if len(prompt) < 2:
            raise ValueError("a chunked prefill needs a prompt of at least 2 tokens")
        self.prompt, self.fusion, self.done, self.cache = list(prompt), fusion, 0, DynamicCache()

    @property
    def complete(self) -> bool:
        return self.done == len(self.prompt)


class DecodeBatch:
    """The running batch: a KV cache, each row's cached length and each row's fusion.

    Row order is insertion order; `keep` preserves the relative order of the rows it keeps.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.cache = None  # transformers.DynamicCache, built by the first prefill
        self.lengths: list[int] = []  # cached tokens per row
        self.fusions: list[FusionSpec] = []
        self._device = next(model.parameters()).device
        forward = getattr(model, "model", model).forward  # LoraFlowModel.forward passes **kwargs through
        params = inspect.signature(forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Columns in the cache (the longest row plus nothing: padding is trimmed eagerly)."""
        return 0 if self.cache is None else self.cache.get_seq_length()

    @property
    def _min_width(self) -> int:
        """Columns the cache keeps at least: 2 on a compiled model (a width of 1 would be a graph of its own)."""
        return 2 if getattr(self.model, "compiled", False) else 1

    # ----------------------------------------------------------------- forwards
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], fusions: Sequence[FusionSpec], *,
                every_position: bool = False):
        """Run the prompts as one left-padded batch, add them as new rows at the end.

        Returns:
            (n, vocab) float32 logits of each prompt's last position; with `every_position`, the pair
            (last, (n, W, vocab) logits of every position), prompts right-aligned in the W columns.
        """
        from transformers import DynamicCache

        if not prompts or len(prompts) != len(fusions):
            raise ValueError("prefill needs one fusion per prompt and at least one prompt")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("empty prompt")
        width = max(*lengths, self._min_width)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        every = self._forward(ids, mask, positions, cache, list(fusions), every_position=every_position)
        self._append(cache, lengths, list(fusions))
        return (every[:, -1, :], every) if every_position else every

    @torch.no_grad()
    def prefill_chunk(self, part: PartialPrefill, size: int, *, every_position: bool = False):
        """Run the next `size` (at least 2) tokens of `part`'s prompt; once the whole prompt has run, add it
        as a new row at the end, as `prefill` does.

        Returns:
            the (1, vocab) float32 logits of the prompt's last position once complete, else None; with
            `every_position`, the pair (that or None, (1, n, vocab) logits of this chunk's n positions).
        """
        start, size = part.done, max(size, 2)
        left = len(part.prompt) - start
        end = start + (left if left <= size + 1 else size)  # never a 1-token tail
        ids = torch.as_tensor(part.prompt[start:end], dtype=torch.long).view(1, -1)
        mask = torch.ones(1, end, dtype=torch.long)
        positions = torch.arange(start, end, dtype=torch.long).view(1, -1)
        logits = self._forward(ids, mask, positions, part.cache, [part.fusion], every_position=every_position)
        part.done = end
        last = None
        if part.complete:
            self._append(part.cache, [len(part.prompt)], [part.fusion])
            last = logits[:, -1, :] if every_position else logits
        return (last, logits) if every_position else last

    @torch.no_grad()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row; returns (B, vocab) float32 logits for the next token."""
        if len(tokens) != len(self):
            raise ValueError(f"decode got {len(tokens)} tokens for {len(self)} rows")
        width = self.width
        ids = torch.as_tensor(list(tokens), dtype=torch.long).view(-1, 1)
        lengths = torch.as_tensor(self.lengths, dtype=torch.long)
        columns = torch.arange(width + 1)
        mask = (columns.view(1, -1) >= (width - lengths).view(-1, 1)).long()  # (B, W+1): right-aligned rows
        logits = self._forward(ids, mask, lengths.view(-1, 1), self.cache, self.fusions)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _forward(self, ids, mask, positions, cache, fusions, every_position: bool = False) -> torch.Tensor:
        extra = {**self._extra, "logits_to_keep": 0} if every_position and self._extra else self._extra
        # no duck sizing: a prompt as wide as k (the adapters) must not share k's symbol, pinned by the gates
        with self.model.fusion_rows(fusions), shapes_config.patch(use_duck_shape=False):
            out = self.model(
                input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                position_ids=positions.to(self._device), use_cache=True, **{self._cache_kw: cache}, **extra,
            )
        return out.logits.float() if every_position else out.logits[:, -1, :].float()

    # ----------------------------------------------------------------- rows
    def _append(self, cache, lengths: list[int], fusions: list[FusionSpec]) -> None:
        if self.cache is None or not self.lengths:
            self.cache, self.lengths, self.fusions = cache, lengths, fusions
            return
        old_w, new_w = self.width, cache.get_seq_length()
        width = max(old_w, new_w)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width - old_w), _pad_left(theirs.keys, width - new_w)])
            mine.values = torch.cat([_pad_left(mine.values, width - old_w), _pad_left(theirs.values, width - new_w)])
        self.lengths = self.lengths + lengths
        self.fusions = self.fusions + fusions

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices into the current rows), then cut padding no remaining row needs."""
        rows = list(rows)
        if rows == list(range(len(self))):
            return
        if not rows:
            self.cache, self.lengths, self.fusions = None, [], []
            return
        lengths = [self.lengths[i] for i in rows]
        cut = self.width - max(*lengths, self._min_width)
        index = torch.as_tensor(rows, dtype=torch.long, device=self._device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, cut:, :].index_select(0, index)  # contiguous, as every other cache
            layer.values = layer.values[:, :, cut:, :].index_select(0, index)
        self.lengths = lengths
        self.fusions = [self.fusions[i] for i in rows]
