"""Tensor-parallel layouts of vLLM's Llama linears, and k adapters stacked per linear: pure functions.

vLLM fuses q/k/v into one `QKVParallelLinear` (output [q | k | v]) and gate/up into one
`MergedColumnParallelLinear` ([gate | up]); o/down are `RowParallelLinear`. Under tensor parallelism a
column-parallel rank holds a row block of each slice of W (k/v by `tp_rank // num_kv_head_replicas` when
there are fewer kv heads than ranks), so its LoRA delta uses B's matching rows and all of A; a
row-parallel rank holds a column block of W and sees only that block of the input, so it uses A's matching
columns and all of B, and its partial delta is summed across ranks like the base output.

Each adapted vLLM linear gets ONE stacked LoRA: A^T (in, R), B^T (R, out) and a column map (k, R)
(`column_map[i, j]` = adapter i's scale on rank column j, else 0), so that `fusion_math.fused_linear`
computes sum_i w_i s_i B_i A_i x for all its slices at once (B^T is block-structured: a slice's columns
only feed that slice's outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """The block [start, start + size) of one dimension that a rank holds."""

    start: int
    size: int

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.start, self.size)


def column_shard(full: int, tp_rank: int, tp_size: int, replicas: int = 1) -> Shard:
    """The rows of a column-parallel slice of `full` outputs held by `tp_rank`.

    `replicas` ranks share one block (vLLM replicates kv heads when tp_size > num_kv_heads).
    """
    if tp_size % replicas or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor-parallel layout: rank {tp_rank} of {tp_size}, {replicas} replicas")
    blocks = tp_size // replicas
    if full % blocks:
        raise ValueError(f"{full} outputs do not split into {blocks} tensor-parallel blocks")
    size = full // blocks
    return Shard((tp_rank // replicas) * size, size)


def row_shard(full: int, tp_rank: int, tp_size: int) -> Shard:
    """The input columns of a row-parallel linear held by `tp_rank`."""
    return column_shard(full, tp_rank, tp_size)


def qkv_shards(num_heads: int, num_kv_heads: int, head_dim: int, tp_rank: int,
               tp_size: int) -> tuple[Shard, Shard, Shard]:
    """The q, k and v row blocks a rank holds in vLLM's QKVParallelLinear (kv heads replicated when
    tp_size >= num_kv_heads, as vLLM does)."""
    replicas = max(1, tp_size // num_kv_heads)
    q = column_shard(num_heads * head_dim, tp_rank, tp_size)
    kv = column_shard(num_kv_heads * head_dim, tp_rank, tp_size, replicas)
    return q, kv, kv


@dataclass
class LoraPiece:
    """One adapter's LoRA on one slice of a linear, already sliced for this rank: delta = scale * B A x."""

    a: torch.Tensor  # (r, in_local)
    b: torch.Tensor  # (out_local, r)
    scale: float


def shard_column(piece: LoraPiece, shard: Shard) -> LoraPiece:
    """A column-parallel rank's part: B's rows of its block, all of A."""
    return LoraPiece(piece.a, shard.take(piece.b, 0), piece.scale)


def shard_row(piece: LoraPiece, shard: Shard) -> LoraPiece:
    """A row-parallel rank's part: A's columns of its input block, all of B."""
    return LoraPiece(shard.take(piece.a, 1), piece.b, piece.scale)


def stack_slices(slices: Sequence[Sequence[LoraPiece | None]], out_sizes: Sequence[int], in_features: int,
                 num_adapters: int, dtype: torch.dtype = torch.float32,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack the LoRAs of one linear's output slices into (A^T (in, R), B^T (R, out), column_map (k, R)).

    Args:
        slices: per output slice (q, k, v / gate, up / the one slice of o or down), per adapter, its
            LoraPiece for this rank or None when that adapter does not adapt that slice.
        out_sizes: each slice's local output size (the linear's output is their concatenation).
        in_features: the linear's local input size.

    Returns:
        The stacked tensors, or None when no adapter touches this linear.
    """
    if len(slices) != len(out_sizes):
        raise ValueError(f"{len(slices)} slices but {len(out_sizes)} output sizes")
    pieces = [(p, i, piece) for p, per_adapter in enumerate(slices) for i, piece in enumerate(per_adapter)
              if piece is not None]
    if not pieces:
        return None
    offsets = [sum(out_sizes[:p]) for p in range(len(out_sizes))]
    rank_total = sum(piece.a.shape[0] for _, _, piece in pieces)
    a_t = torch.zeros(in_features, rank_total, dtype=dtype)
    b_t = torch.zeros(rank_total, sum(out_sizes), dtype=dtype)
    column_map = torch.zeros(num_adapters, rank_total, dtype=torch.float32)
    col = 0
    for p, i, piece in pieces:
        r = piece.a.shape[0]
        if piece.a.shape[1] != in_features or piece.b.shape != (out_sizes[p], r):
            raise ValueError(f"adapter {i}, slice {p}: A {tuple(piece.a.shape)} / B {tuple(piece.b.shape)} do not "
                             f"fit a linear of {in_features} inputs and a slice of {out_sizes[p]} outputs")
        a_t[:, col:col + r] = piece.a.t().to(dtype)
        b_t[col:col + r, offsets[p]:offsets[p] + out_sizes[p]] = piece.b.t().to(dtype)
        column_map[i, col:col + r] = float(piece.scale)
        col += r
    return a_t, b_t, column_map
