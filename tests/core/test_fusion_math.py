"""The pure fusion functions against the LoRA-Flow formula written out adapter by adapter."""

import torch

from loraflow.core import fusion_math as fm


def _adapters(k=3, d_in=6, d_out=5, ranks=(2, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, d_in, generator=g) for r in ranks[:k]]
    B = [torch.randn(d_out, r, generator=g) for r in ranks[:k]]
    s = [0.5 + i for i in range(k)]
    column_map = torch.zeros(k, sum(ranks[:k]))
    start = 0
    for i, r in enumerate(ranks[:k]):
        column_map[i, start:start + r] = s[i]
        start += r
    a_t = torch.cat(A).t().contiguous()
    b_t = torch.cat(B, dim=1).t().contiguous()
    return A, B, s, column_map, a_t, b_t


def test_fused_linear_equals_sum_over_adapters_per_token():
    A, B, s, cmap, a_t, b_t = _adapters()
    x = torch.randn(2, 4, 6)
    base = torch.randn(2, 4, 5)
    w = torch.randn(2, 4, 3)
    out = fm.fused_linear(x, base, a_t, b_t, w, cmap)
    expected = base.clone()
    for b in range(2):
        for t in range(4):
            for i in range(3):
                expected[b, t] += w[b, t, i] * s[i] * (B[i] @ (A[i] @ x[b, t]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_add_scaled_lora_from_a_folded_base_output_equals_the_sum_over_adapters():
    A, B, s, cmap, a_t, b_t = _adapters()
    w0 = torch.randn(5, 6)
    x, w = torch.randn(7, 6), torch.randn(7, 3)
    folded = x @ torch.cat([w0, a_t.t()]).t()  # [W0 x | A x], as one matmul over the folded weight
    out = fm.add_scaled_lora(folded[:, :5], folded[:, 5:], fm.column_scales(w, cmap), b_t)
    expected = x @ w0.t()
    for n in range(7):
        for i in range(3):
            expected[n] += w[n, i] * s[i] * (B[i] @ (A[i] @ x[n]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compiled_gate_and_column_scales_equal_eager():
    """Under torch.compile the gate logits and column scales are multiply-sums, not matmuls: same values."""
    _, _, _, cmap, _, _ = _adapters()
    g = torch.Generator().manual_seed(3)
    hidden, static, select = torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g), torch.rand(4, 2)
    gw, gb, temp = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, generator=g), torch.tensor([1.0, 0.7])

    def both(h):
        w = fm.mixed_weights(h, static, select, gw, gb, temp)
        return w, fm.column_scales(w, cmap)

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(hidden), both(hidden)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gate_weights_is_softmax_plus_bias_after():
    W, bias, T = torch.randn(2, 8), torch.tensor([-0.5, 0.7]), 1.1
    h = torch.randn(3, 8)
    got = fm.gate_weights(h, W, bias, T)
    logits = h @ W.t() / T
    expected = logits.exp() / logits.exp().sum(-1, keepdim=True) + bias
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got.sum(-1), torch.ones(3))  # the bias breaks the simplex, as in the paper


def test_mixed_weights_routes_rows_to_their_gate_or_constants():
    G, k, d = 2, 3, 8
    Wg, bg, T = torch.randn(G, k, d), torch.randn(G, k), torch.tensor([1.0, 1.1])
    h = torch.randn(4, 5, d)
    static = torch.tensor([[0, 0, 0], [0, 0, 0], [0.2, 0.3, 0.5], [0, 1, 0]], dtype=torch.float32)[:, None]
    select = torch.tensor([[1, 0], [0, 1], [0, 0], [0, 0]], dtype=torch.float32)[:, None]
    w = fm.mixed_weights(h, static, select, Wg, bg, T)
    assert w.shape == (4, 5, k)
    for g in range(G):
        logits = h[g] @ Wg[g].t() / T[g]
        torch.testing.assert_close(w[g], torch.softmax(logits, -1) + bg[g])
    torch.testing.assert_close(w[2], torch.tensor([0.2, 0.3, 0.5]).expand(5, k))
    torch.testing.assert_close(w[3], torch.tensor([0.0, 1.0, 0.0]).expand(5, k))


def test_static_mix_as_one_lora_of_summed_rank():
    A, B, s, cmap, a_t, b_t = _adapters()
    c = [0.3 * s[0], -0.7 * s[1], 2.0 * s[2]]
    a, b = fm.stack_static_lora(A, B, c)
    assert a.shape == (6, 6) and b.shape == (5, 6)
    expected = sum(ci * Bi @ Ai for ci, Ai, Bi in zip(c, A, B))
    torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-5)
