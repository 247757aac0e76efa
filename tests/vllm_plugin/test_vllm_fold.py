"""The adapters' A folded into the base linear's weight (`StackedLora.fold_into`): one matrix multiply gives
[W0 x | A x], and the delta added from it equals the LoRA-Flow formula written out here, for column- and
row-parallel layouts (row-parallel: every rank's partial output summed, as the linear's all-reduce does)."""

from __future__ import annotations

from vllm_support import require_vllm

require_vllm()

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from vllm.model_executor.layers.linear import UnquantizedLinearMethod  # noqa: E402

from loraflow.vllm.model import _stacked  # noqa: E402
from loraflow.vllm.slicing import LoraPiece, column_shard, row_shard, shard_column, shard_row  # noqa: E402

IN, OUT, RANKS, SCALES = 24, 16, (2, 3), (0.5, 1.5)


def _linear(weight: torch.Tensor, quantized: bool = False) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    linear.weight.data, linear.bias.data = weight.clone(), torch.linspace(-1, 1, weight.shape[0])
    linear.quant_method = object() if quantized else UnquantizedLinearMethod()
    return linear


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(OUT, IN, generator=g)
    pieces = [LoraPiece(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), s)
              for r, s in zip(RANKS, SCALES)]
    x, w = torch.randn(5, IN, generator=g), torch.randn(5, 2, generator=g)
    bias = torch.linspace(-1, 1, OUT)
    want = x @ w0.T + bias + sum(w[:, i:i + 1] * p.scale * (x @ p.a.T @ p.b.T) for i, p in enumerate(pieces))
    return w0, pieces, x, w, want


def _scales(stacked, w):
    return w @ stacked.column_map


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_parallel_fold_equals_the_formula(tp_size):
    w0, pieces, x, w, want = _case(0)
    for rank in range(tp_size):
        s = column_shard(OUT, rank, tp_size)
        stacked = _stacked([[shard_column(p, s) for p in pieces]], [s.size], IN, 2, torch.float32, "cpu")
        linear = _linear(s.take(w0, 0))
        linear.bias.data = s.take(torch.linspace(-1, 1, OUT), 0).clone()
        assert stacked.fold_into(linear) and linear.weight.shape == (s.size + sum(RANKS), IN)
        assert stacked.fold_into(linear) and linear.weight.shape == (s.size + sum(RANKS), IN)  # once only
        got = stacked(x, linear(x), _scales(stacked, w))
        torch.testing.assert_close(got, s.take(want, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_row_parallel_fold_sums_partials_like_the_all_reduce(tp_size):
    w0, pieces, x, w, want = _case(1)
    total, last = 0, None
    for rank in range(tp_size):
        s = row_shard(IN, rank, tp_size)
        last = _stacked([[shard_row(p, s) for p in pieces]], [OUT], s.size, 2, torch.float32, "cpu", reduce=True)
        linear = _linear(s.take(w0, 1))
        if rank:  # vLLM adds a row-parallel bias on rank 0 only
            linear.bias.data.zero_()
        assert last.fold_into(linear) and not last.reduce
        total = total + linear(s.take(x, 1))  # [partial W0 x | partial A x]: the all-reduce sums both
    torch.testing.assert_close(last(None, total, _scales(last, w)), want, rtol=1e-5, atol=1e-5)


def test_a_quantized_linear_is_left_alone():
    w0, pieces, x, w, want = _case(2)
    stacked = _stacked([pieces], [OUT], IN, 2, torch.float32, "cpu")
    linear = _linear(w0, quantized=True)
    assert not stacked.fold_into(linear)
    assert torch.equal(linear.weight, w0) and stacked.a_t is not None and stacked.base_out == 0
    torch.testing.assert_close(stacked(x, linear(x), _scales(stacked, w)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_every_load_derives_the_fold_again_from_a(tp_size):
    """A reload (vLLM's reload_weights, a weight sync) must not leave A's rows stale or garbage: before a load
    the linear gets the checkpoint's shapes back (its loaders expect them), after it A is folded afresh, and
    the result is the formula with the new base weights."""
    w0, pieces, x, w, _ = _case(2)
    new_w0 = torch.randn(w0.shape, generator=torch.Generator().manual_seed(9))
    bias = torch.linspace(-1, 1, OUT)
    want = x @ new_w0.T + bias + sum(w[:, i:i + 1] * p.scale * (x @ p.a.T @ p.b.T) for i, p in enumerate(pieces))
    for rank in range(tp_size):
        s = column_shard(OUT, rank, tp_size)
        stacked = _stacked([[shard_column(p, s) for p in pieces]], [s.size], IN, 2, torch.float32, "cpu")
        linear = _linear(s.take(w0, 0))
        linear.bias.data = s.take(bias, 0).clone()
        assert stacked.fold_into(linear)
        linear.weight.data[s.size:] = float("nan")  # what a discarded buffer (sleep level 2) leaves there
        stacked.unfold_from(linear)
        assert linear.weight.shape == (s.size, IN) and linear.bias.shape == (s.size,)
        linear.weight.data.copy_(s.take(new_w0, 0))  # the loader writes the checkpoint's shape
        assert stacked.fold_into(linear) and linear.weight.shape == (s.size + sum(RANKS), IN)
        torch.testing.assert_close(stacked(x, linear(x), _scales(stacked, w)), s.take(want, 1), rtol=1e-5, atol=1e-5)
        linear.weight.data[s.size:] = float("nan")  # folding again without a load re-derives A's rows too
        assert stacked.fold_into(linear)
        torch.testing.assert_close(stacked(x, linear(x), _scales(stacked, w)), s.take(want, 1), rtol=1e-5, atol=1e-5)
