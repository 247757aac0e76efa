"""Top-k gates (issue #26, item 1): per token and layer the k largest gate logits are kept, the softmax runs
over them, the kept adapters get their bias and the others weigh 0; `top_k` = k is the paper's dense gate.
Checked against the formula written out here, on every execution path, and through the gate file."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model, make_peft_adapter

from loraflow import LoraFlowModel
from loraflow.common.errors import LoraFlowError
from loraflow.core.fusion_math import gate_weights, mixed_weights


def _reference(hidden, weight, bias, temperature, top_k):
    """Token by token: sort the logits, keep the top_k, softmax over those, add their biases."""
    logits = (hidden @ weight.T / temperature).reshape(-1, weight.shape[0])
    out = torch.zeros_like(logits)
    for t, row in enumerate(logits):
        kept = row.argsort(descending=True)[:top_k]
        out[t, kept] = torch.softmax(row[kept], dim=0) + bias.reshape(-1)[kept]
    return out.reshape(*hidden.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_the_formula_keeps_each_tokens_top_k(top_k):
    g = torch.Generator().manual_seed(top_k)
    hidden, weight, bias = torch.randn(2, 5, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, generator=g)
    got = gate_weights(hidden, weight, bias, 1.3, top_k)
    torch.testing.assert_close(got, _reference(hidden, weight, bias, 1.3, top_k), atol=1e-6, rtol=0)
    assert ((got != 0).sum(-1) == top_k).all()  # exactly k adapters weigh anything (random biases are non-zero)
    # the per-row path of mixed batches: two gates, each with its own k, routed per token
    weights, biases = torch.stack([weight, weight.flip(0)]), torch.stack([bias, bias.flip(0)])
    select = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 2)
    mixed = mixed_weights(hidden, torch.zeros(4), select, weights, biases, torch.tensor([1.3, 1.3]),
                          torch.tensor([top_k, 2]))
    torch.testing.assert_close(mixed[0], got[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], _reference(hidden[1], weight.flip(0), bias.flip(0), 1.3, 2), atol=1e-6, rtol=0)


def test_top_k_of_all_adapters_is_the_dense_gate():
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(3, 7, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(5, generator=g)
    dense = torch.softmax(hidden @ weight.T, dim=-1) + bias
    torch.testing.assert_close(gate_weights(hidden, weight, bias, 1.0, 5), dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(gate_weights(hidden, weight, bias), dense, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topk")
    base = build_tiny_model("llama", num_layers=2)
    adapters = {n: make_peft_adapter(base, tmp / n, seed=i + 1) for i, n in enumerate(("a", "b", "c"))}
    return base, adapters, tmp


def _model(three, **kwargs):
    base, adapters, _ = three
    return LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=3, gate_init_std=0.5, **kwargs)


def _ids():
    return torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))


def test_a_model_with_a_top_k_gate_follows_the_formula_and_saves_it(three, tmp_path):
    model = _model(three, gate_top_k=2)
    with torch.no_grad():
        logits = model(input_ids=_ids()).logits
        weights = model.last_fusion_weights  # (L, B, T, k)
    assert weights.shape[-1] == 3 and ((weights != 0).sum(-1) == 2).all()
    # against the formula on each layer's input, which the gate reads
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: captured.append(a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True) for layer in model.model.model.layers]
    with torch.no_grad():
        model(input_ids=_ids())
    for h in hooks:
        h.remove()
    for i, hidden in enumerate(captured):
        gate = model.gates.gate(i)
        want = _reference(hidden, gate.weight, gate.bias, 1.0, 2)
        torch.testing.assert_close(weights[i], want, atol=1e-5, rtol=0)
    # mixed rows (the per-row path) give each row what it gets alone
    with model.fusion_rows(["gate", "off"]), torch.no_grad():
        mixed = model(input_ids=_ids()).logits
    torch.testing.assert_close(mixed[:1], logits[:1], atol=1e-5, rtol=0)
    # the gate file records k; loaded again it gives the same logits; dense gates load as before
    model.save_gate(tmp_path / "g")
    again = _model(three, gate=tmp_path / "g")
    assert again.gates.config.top_k == 2
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=_ids()).logits, logits, atol=1e-6, rtol=0)
    dense = _model(three)
    dense.save_gate(tmp_path / "dense")
    assert _model(three, gate=tmp_path / "dense").gates.config.top_k is None


def test_a_bad_top_k_is_one_line(three):
    with pytest.raises(LoraFlowError, match="top_k: must be a whole number from 1 to k = 3, got 4"):
        _model(three, gate_top_k=4)


def test_train_gate_top_k_trains_the_kept_weights(three, tmp_path):
    """`train-gate --top-k 2` over three adapters: gradients reach the gates through the kept weights, and the
    saved gate keeps its k."""
    from conftest import build_tokenizer

    from loraflow.common.io import write_jsonl_atomic
    from loraflow.data.formats import PromptTemplate
    from loraflow.train.config import GateTrainConfig
    from loraflow.train.training import train_gate

    base, adapters, tmp = three
    rows = [{"prompt": f"q{i} hello", "completion": f"world {i % 3}"} for i in range(16)]
    write_jsonl_atomic(tmp_path / "train.jsonl", rows)
    cfg = GateTrainConfig(epochs=2, lr=1e-1, batch_size=4, max_length=32, progress=False, top_k=2)
    result = train_gate(copy.deepcopy(base), adapters, tmp_path / "train.jsonl", tmp_path / "run", config=cfg,
                        template=PromptTemplate(kind="plain"), tokenizer=build_tokenizer(), top_k=cfg.top_k)
    trained = _model(three, gate=result.last_dir)
    fresh = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=cfg.seed, gate_top_k=2)  # its start
    assert trained.gates.config.top_k == 2
    moved = max((a - b).abs().max().item() for a, b in zip(trained.gate_parameters(), fresh.gate_parameters()))
    assert moved > 1e-3
    with pytest.raises(LoraFlowError, match="--top-k 5: must be from 1 to the number of adapters"):
        train_gate(copy.deepcopy(base), adapters, tmp_path / "train.jsonl", tmp_path / "run2", config=cfg,
                   template=PromptTemplate(kind="plain"), tokenizer=build_tokenizer(), top_k=5)


def test_the_compiled_model_keeps_the_same_top_k(three):
    model = _model(three, gate_top_k=1)
    with torch.no_grad():
        eager = model(input_ids=_ids()).logits
    torch._dynamo.reset()
    model.compile(backend="aot_eager", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, eager, atol=1e-5, rtol=0)
    dense = _model(three)
    with torch.no_grad():
        assert (dense(input_ids=_ids()).logits - eager).abs().max() > 1e-3  # top-1 really differs from dense


def test_a_gate_file_never_runs_with_another_k(three, tmp_path):
    """A bank's k is fixed when it is built: loading a top-2 gate into a dense model, a dense one into a top-2
    model, or asking for another k than the file's, is one line, not a silently different gate."""
    top2 = _model(three, gate_top_k=2).save_gate(tmp_path / "top2")
    dense = _model(three).save_gate(tmp_path / "dense")
    with pytest.raises(LoraFlowError, match="trained with top-k 2, but top-k 3 was asked for"):
        _model(three).load_gate(top2)
    with pytest.raises(LoraFlowError, match="trained with top-k 3, but top-k 2 was asked for"):
        _model(three, gate_top_k=2).load_gate(dense)
    with pytest.raises(LoraFlowError, match="trained with top-k 2, but top-k 1 was asked for"):
        _model(three, gate=top2, gate_top_k=1)
    assert _model(three, gate=top2, gate_top_k=2).gates.config.top_k == 2
    _model(three, gate_top_k=2).load_gate(top2)
