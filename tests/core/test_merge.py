"""Static fusions merged into the base weights: equal to the unmerged engine, and exactly reversible."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model, make_peft_adapter

from loraflow import LoraFlowModel
from loraflow.core.fusion_spec import FusionSpec

# Measured (fp32, CPU): merged vs unmerged logits differ by at most 2.3e-7 (W + B diag(s) A rounded
# once vs the low-rank path added per token); per-call fusions on a merged model, which subtract the
# merged weights, by at most 2.5e-7. The tolerance, 1e-5, is 40x that.
MERGE_ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    base = build_tiny_model(arch, num_layers=2)
    adapters = {"zh": make_peft_adapter(base, tmp / "zh", arch=arch, seed=1),
                "math": make_peft_adapter(base, tmp / "math", arch=arch, seed=2, r=8)}
    merged = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0, gate_init_std=0.5)
    plain = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=0, gate_init_std=0.5)
    plain.merge_static = False
    return merged, plain


def _ids(seed=0, shape=(3, 8)):
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(seed))


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("spec", ["single:zh", "avg", "static:0.7,-0.4"])
def test_merged_static_mode_equals_unmerged(pair, spec):
    merged, plain = pair
    ids = _ids()
    for m in (merged, plain):
        m.set_fusion(spec)
    try:
        assert merged.merged and not plain.merged
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, plain(input_ids=ids).logits,
                                       atol=MERGE_ATOL, rtol=0)
            # other fusions per call (and per row) on the merged model subtract the merged weights
            for other in ["gate", "off", "single:math"]:
                with merged.fusion(other), plain.fusion(other):
                    torch.testing.assert_close(merged(input_ids=ids).logits, plain(input_ids=ids).logits,
                                               atol=MERGE_ATOL, rtol=0)
            rows = [FusionSpec("gate"), FusionSpec("off"), FusionSpec("static", weights=(0.2, 0.3))]
            with merged.fusion_rows(rows), plain.fusion_rows(rows):
                torch.testing.assert_close(merged(input_ids=ids).logits, plain(input_ids=ids).logits,
                                           atol=MERGE_ATOL, rtol=0)
    finally:
        for m in (merged, plain):
            m.set_gate_mode()


def test_mode_change_restores_base_weights_bit_for_bit(pair):
    merged, _ = pair
    before = _base_weights(merged)
    merged.set_static_weights([0.3, 0.9])
    during = _base_weights(merged)
    changed = [n for n in before if not torch.equal(before[n], during[n])]
    assert changed and all("weight" in n for n in changed)  # the adapted weights really were merged
    merged.set_single_adapter("math")  # static -> another static: re-merged from the originals
    merged.set_gate_mode()
    assert not merged.merged
    after = _base_weights(merged)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # training mode runs unmerged (LoRA dropout, gradients), eval merges again
    merged.set_fusion("avg")
    merged.train()
    assert not merged.merged and all(torch.equal(before[n], p) for n, p in _base_weights(merged).items())
    merged.eval()
    assert merged.merged
    with merged.adapters_disabled():
        assert not merged.merged
    assert merged.merged
    merged.set_gate_mode()
    assert all(torch.equal(before[n], p) for n, p in _base_weights(merged).items())


def test_detach_restores_unmerged_base(tmp_path):
    base = build_tiny_model("llama")
    ref = copy.deepcopy(base)
    model = LoraFlowModel.from_pretrained(base, {"zh": make_peft_adapter(base, tmp_path / "zh", seed=1)})
    model.set_single_adapter("zh")
    assert model.merged
    restored = model.detach_adapters()
    for (n, p), (_, q) in zip(restored.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_quantized_base_weights_are_never_merged(tmp_path):
    """Adding B A into int8 (or packed 4-bit) weights would corrupt them: a static default then runs
    unmerged, and an explicit merge is refused with a message naming the layer type."""
    from loraflow.common.errors import LoraFlowError
    from loraflow.core.attach import merge
    from loraflow.core.fused_linear import FusedLoraLinear

    base = build_tiny_model("llama")
    model = LoraFlowModel.from_pretrained(base, {"zh": make_peft_adapter(base, tmp_path / "zh", seed=1)})
    fused = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    quantized = torch.nn.Parameter(fused.base_layer.weight.detach().to(torch.int8), requires_grad=False)
    fused.base_layer.weight = quantized
    model.set_single_adapter("zh")
    assert not model.merged and fused.base_layer.weight is quantized
    plan = model._engine.default
    with pytest.raises(LoraFlowError, match=r"cannot merge .* quantized base weights \(Linear \(torch.int8\)"):
        merge(model._attachment, model._engine, plan)
    assert fused.base_layer.weight is quantized and not model.merged
