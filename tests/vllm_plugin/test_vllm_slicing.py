"""Tensor-parallel slicing of the stacked adapters, checked against the unsharded LoRA-Flow formula written
out here (sum_i w_i s_i B_i A_i x per projection), for every rank of TP=1, 2, 4 and 8 (kv heads replicated
at TP=8). Only TP=1 runs inside vLLM on CPU; these make the other layouts right by construction."""

from __future__ import annotations

import pytest
import torch

from loraflow.core.fusion_math import fused_linear
from loraflow.vllm.slicing import (LoraPiece, column_shard, qkv_shards, row_shard, shard_column, shard_row,
                                   stack_slices)

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER = 8, 4, 4, 32, 48


def _adapters(g, outs_ins: dict[str, tuple[int, int]], ranks=(2, 3)) -> list[dict[str, LoraPiece]]:
    """Two adapters of different ranks; the second leaves k_proj and up_proj alone."""
    found = []
    for i, r in enumerate(ranks):
        found.append({name: LoraPiece(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g),
                                      0.5 + i) for name, (n_out, n_in) in outs_ins.items()
                      if not (i == 1 and name in ("k_proj", "up_proj"))})
    return found


def _full_delta(adapters, name, x, w):
    """sum_i w_i * s_i * B_i A_i x for one projection, unsharded."""
    out = 0
    for i, ad in enumerate(adapters):
        if name in ad:
            p = ad[name]
            out = out + w[:, i:i + 1] * p.scale * (x @ p.a.t() @ p.b.t())
    return out


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_column_parallel_qkv_and_gate_up_equal_the_unsharded_formula(tp_size):
    g = torch.Generator().manual_seed(0)
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    adapters = _adapters(g, {"q_proj": (q_out, HIDDEN), "k_proj": (kv_out, HIDDEN), "v_proj": (kv_out, HIDDEN),
                             "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN)})
    x, w = torch.randn(5, HIDDEN, generator=g), torch.randn(5, 2, generator=g)
    full = {n: _full_delta(adapters, n, x, w) for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
    for rank in range(tp_size):
        shards = qkv_shards(HEADS, KV_HEADS, HEAD_DIM, rank, tp_size)
        slices = [[ad.get(n) and shard_column(ad[n], s) for ad in adapters]
                  for n, s in zip(("q_proj", "k_proj", "v_proj"), shards)]
        a_t, b_t, cmap = stack_slices(slices, [s.size for s in shards], HIDDEN, 2)
        got = fused_linear(x, torch.zeros(5, sum(s.size for s in shards)), a_t, b_t, w, cmap)
        want = torch.cat([s.take(full[n], 1) for n, s in zip(("q_proj", "k_proj", "v_proj"), shards)], dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        up = column_shard(INTER, rank, tp_size)
        slices = [[ad.get(n) and shard_column(ad[n], up) for ad in adapters] for n in ("gate_proj", "up_proj")]
        a_t, b_t, cmap = stack_slices(slices, [up.size, up.size], HIDDEN, 2)
        got = fused_linear(x, torch.zeros(5, 2 * up.size), a_t, b_t, w, cmap)
        want = torch.cat([up.take(full["gate_proj"], 1), up.take(full["up_proj"], 1)], dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_row_parallel_partial_deltas_sum_to_the_unsharded_formula(tp_size):
    g = torch.Generator().manual_seed(1)
    adapters = _adapters(g, {"o_proj": (HIDDEN, HEADS * HEAD_DIM), "down_proj": (HIDDEN, INTER)})
    w = torch.randn(4, 2, generator=g)
    for name, n_in in (("o_proj", HEADS * HEAD_DIM), ("down_proj", INTER)):
        x = torch.randn(4, n_in, generator=g)
        total = 0
        for rank in range(tp_size):
            s = row_shard(n_in, rank, tp_size)
            a_t, b_t, cmap = stack_slices([[ad.get(name) and shard_row(ad[name], s) for ad in adapters]], [HIDDEN],
                                          s.size, 2)
            total = total + fused_linear(s.take(x, 1), torch.zeros(4, HIDDEN), a_t, b_t, w, cmap)  # all-reduce
        torch.testing.assert_close(total, _full_delta(adapters, name, x, w), rtol=1e-5, atol=1e-5)


def test_kv_heads_replicated_when_ranks_outnumber_them():
    q, k, v = qkv_shards(HEADS, KV_HEADS, HEAD_DIM, tp_rank=5, tp_size=8)  # 2 ranks share each kv head
    assert (q.start, q.size) == (5 * HEAD_DIM, HEAD_DIM)
    assert (k.start, k.size) == (2 * HEAD_DIM, HEAD_DIM) and v == k


def test_untouched_linear_gets_no_adapter_and_bad_shapes_are_refused():
    assert stack_slices([[None, None]], [4], 8, 2) is None
    with pytest.raises(ValueError, match="do not fit"):
        stack_slices([[LoraPiece(torch.ones(2, 8), torch.ones(5, 2), 1.0)]], [4], 8, 1)
    with pytest.raises(ValueError, match="tensor-parallel"):
        column_shard(10, 0, 4)
