"""Per-call fusion state: per-row fusion in one batch, several named gates, and threads that run
different fusions on one model at the same time."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from conftest import add_reference_lora_flow, two_adapters_and_a_second_gate

from loraflow import LoraFlowModel
from loraflow.common.errors import LoraFlowError
from loraflow.core.fusion_spec import FusionSpec

# Measured: a row computed inside the mixed batch of 5 equals the same row alone bit for bit here
# (fp32, CPU, 1 thread: max difference 0 over 5 seeds); 1e-5 leaves room for BLAS kernels that
# block batched matmuls differently.
ROW_ATOL = 1e-5

GATE, GATE2 = FusionSpec("gate"), FusionSpec("gate", gate="g2")
STATIC, SINGLE, OFF = FusionSpec("static", weights=(0.7, -0.4)), FusionSpec("single", adapter="math"), FusionSpec("off")
MIXED = [GATE, GATE2, STATIC, SINGLE, OFF]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base, adapters, g2 = two_adapters_and_a_second_gate(tmp_path_factory.mktemp("rows"), num_layers=3)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=3, gate_init_std=0.5)
    model.add_gate("g2", g2)
    return base, adapters, model


def _ids(seed: int, shape=(5, 7)) -> torch.Tensor:
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(seed))


def _alone(model, spec, ids):
    with model.fusion(spec), torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_batch_equals_each_row_alone(setup):
    _, _, model = setup
    ids = _ids(0)
    with model.fusion_rows(MIXED), torch.no_grad():
        mixed = model(input_ids=ids).logits
        weights = model.last_fusion_weights  # (L, B, T, k): gate rows per token, static rows constant
    for i, spec in enumerate(MIXED):
        alone = _alone(model, spec, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=ROW_ATOL, rtol=0)
    # the rows really differ from each other (otherwise the test would be vacuous)
    for i in range(len(MIXED)):
        for j in range(i):
            assert (_alone(model, MIXED[i], ids[:1]) - _alone(model, MIXED[j], ids[:1])).abs().max() > 1e-3
    assert weights.shape == (3, 5, 7, 2)
    assert weights[:, 0, :, 0].std() > 1e-3 and not torch.allclose(weights[:, 0], weights[:, 1])
    torch.testing.assert_close(weights[:, 2], torch.tensor([0.7, -0.4]).expand(3, 7, 2))
    torch.testing.assert_close(weights[:, 3], torch.tensor([0.0, 1.0]).expand(3, 7, 2))
    assert torch.equal(weights[:, 4], torch.zeros(3, 7, 2))
    assert model.fusion_mode == "gate"  # the default is left alone


def test_mixed_batch_greedy_generation_equals_each_row_alone(setup, tokenizer):
    _, _, model = setup
    ids = _ids(1, (5, 6))
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    with model.fusion_rows(MIXED):
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    outs = []
    for i, spec in enumerate(MIXED):
        with model.fusion(spec):
            outs.append(model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw))
    assert [o[0].tolist() for o in outs] == mixed.tolist()
    assert len({tuple(o[0, 6:].tolist()) for o in outs}) >= 3  # the fusions lead to different tokens


def _reference_rows(base, adapter_dirs, row_weights, ids):
    """LoRA-Flow with per-row weights written out: layer pre-hooks compute w (B, T, k) per row with
    `row_weights(layer, x)`, Linear forward hooks add sum_i w_i * scale_i * B_i A_i x."""
    model = copy.deepcopy(base)
    add_reference_lora_flow(model, adapter_dirs, lambda idx, x: row_weights(idx, x.float()))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_per_row_fusion_matches_reference_formula(setup):
    base, adapters, model = setup
    banks = [model.gates, model.extra_gates["g2"]]
    params = [[(g.weight.detach(), g.bias.detach()) for g in bank.layers] for bank in banks]
    constants = {2: torch.tensor([0.7, -0.4]), 3: torch.tensor([0.0, 1.0]), 4: torch.zeros(2)}

    def row_weights(layer, x):  # x (B, T, d)
        rows = []
        for r in range(x.shape[0]):
            if r < 2:
                w, b = params[r][layer]
                rows.append(torch.softmax(x[r] @ w.T, dim=-1) + b)  # temperature 1
            else:
                rows.append(constants[r].expand(x.shape[1], 2))
        return torch.stack(rows)

    ids = _ids(2)
    with model.fusion_rows(MIXED), torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, _reference_rows(base, list(adapters.values()), row_weights, ids),
                               atol=1e-5, rtol=0)


def test_threads_running_different_fusions_each_get_what_they_get_alone(setup):
    _, _, model = setup
    specs = [GATE, STATIC, GATE2, OFF]
    inputs = [_ids(10 + i, (2, 9)) for i in range(len(specs))]
    expected = [_alone(model, s, x) for s, x in zip(specs, inputs)]
    expected_w = []
    for s, x in zip(specs, inputs):
        with model.fusion(s), torch.no_grad():
            model(input_ids=x)
            expected_w.append(model.last_fusion_weights)
    start = threading.Barrier(len(specs))
    failures: list[str] = []
    # Hooks that sleep (releasing the GIL) before each forward starts and in the middle of it
    # make the threads interleave there on every call, not only when the scheduler happens to.
    naps = [model.model.register_forward_pre_hook(lambda *_: time.sleep(0.002)),
            model.model.model.layers[1].register_forward_pre_hook(lambda *_: time.sleep(0.002))]

    def worker(i: int) -> None:
        start.wait()
        for step in range(15):
            with model.fusion(specs[i]), torch.no_grad():
                out = model(input_ids=inputs[i]).logits
                w = model.last_fusion_weights
            if not torch.equal(out, expected[i]):
                failures.append(f"thread {i} ({specs[i]}) step {step}: logits differ")
            if (w is None) != (expected_w[i] is None) or (w is not None and not torch.equal(w, expected_w[i])):
                failures.append(f"thread {i} ({specs[i]}) step {step}: fusion weights differ")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for handle in naps:
            handle.remove()
    assert not failures, failures[:5]


def test_fusion_selection_is_per_thread(setup):
    _, _, model = setup
    ids = _ids(3, (1, 5))
    other_thread = []
    with model.fusion("off"), torch.no_grad():
        inside = model(input_ids=ids).logits
        t = threading.Thread(target=lambda: other_thread.append(model(input_ids=ids).logits))
        t.start()
        t.join()
    torch.testing.assert_close(other_thread[0], _alone(model, GATE, ids), atol=0, rtol=0)  # the default
    torch.testing.assert_close(inside, _alone(model, OFF, ids), atol=0, rtol=0)
    assert (other_thread[0] - inside).abs().max() > 1e-3


def test_named_gates_and_errors(setup, tmp_path):
    _, _, model = setup
    assert model.gate_names == ["default", "g2"]
    with pytest.raises(LoraFlowError, match="unknown gate 'nope'"):
        with model.fusion("gate:nope"):
            pass
    with pytest.raises(LoraFlowError, match="2 fusion specs for a batch of 3 rows"):
        with model.fusion_rows(["gate", "off"]), torch.no_grad():
            model(input_ids=_ids(4, (3, 4)))
    with pytest.raises(LoraFlowError, match="taken"):
        model.add_gate("g2", model.extra_gates["g2"])
    with pytest.raises(LoraFlowError, match="gate name"):
        model.add_gate("a.b", model.extra_gates["g2"])
    with pytest.raises(LoraFlowError, match="no gate_config.json|not found|missing"):
        model.add_gate("g3", tmp_path / "missing")
    # a named gate as the default fusion, and back
    ids = _ids(5, (1, 6))
    model.set_fusion("gate:g2")
    try:
        with torch.no_grad():
            by_default = model(input_ids=ids).logits
    finally:
        model.set_gate_mode()
    torch.testing.assert_close(by_default, _alone(model, GATE2, ids), atol=0, rtol=0)


def test_from_pretrained_names_its_gate(setup, tmp_path):
    base, adapters, _ = setup
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0, gate_name="zh_math")
    assert model.gate_names == ["zh_math"]
    ids = _ids(6, (1, 4))
    torch.testing.assert_close(_alone(model, FusionSpec("gate", gate="zh_math"), ids), _alone(model, GATE, ids),
                               atol=0, rtol=0)


def test_an_interrupted_forward_does_not_lock_the_model(setup):
    """Ctrl-C in the middle of a forward skips the model's end hooks (torch runs always_call hooks on
    Exception only): the next forward, in this thread or another, still runs and records its own weights."""
    _, _, model = setup
    ids = _ids(7, (1, 5))
    expected = _alone(model, GATE, ids)

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = model.model.model.layers[1].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    torch.testing.assert_close(_alone(model, GATE, ids), expected, atol=0, rtol=0)
    assert model.last_fusion_weights.shape == (3, 1, 5, 2)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():  # interrupted again, then another thread runs
        handle = model.model.model.layers[1].register_forward_pre_hook(interrupt)
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
    out = []
    t = threading.Thread(target=lambda: out.append(_alone(model, GATE, ids)), daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "another thread waits forever for the interrupted forward's lock"
    torch.testing.assert_close(out[0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("how", ["one gate", "bank config", "model"])
def test_a_gate_temperature_set_anywhere_is_the_one_every_path_reads(tmp_path, how):
    """The temperature has one home (the bank's GateConfig): set through any gate, the bank's config or the
    model, a whole-batch gate step and a mixed-rows step both use it (they compute the weights differently)."""
    base, adapters, _ = two_adapters_and_a_second_gate(tmp_path, num_layers=2)
    model = LoraFlowModel.from_pretrained(base, adapters, seed=3, gate_init_std=0.5)
    ids = _ids(1, (2, 6))
    before = _alone(model, GATE, ids[:1])
    if how == "one gate":
        model.gates.gate(0).temperature = 3.0
    elif how == "bank config":
        model.gates.config.temperature = 3.0
    else:
        model.temperature = 3.0
    assert model.temperature == 3.0 and all(g.temperature == 3.0 for g in model.gates.gates())
    alone = _alone(model, GATE, ids[:1])
    with model.fusion_rows([GATE, OFF]), torch.no_grad():
        mixed = model(input_ids=ids).logits
    assert (alone - before).abs().max() > 1e-4
    torch.testing.assert_close(mixed[:1], alone, atol=ROW_ATOL, rtol=0)
