"""LoRAHub search and Avg fusion over the fused engine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import build_toy_lora_pair

from loraflow import LoraFlowModel
from loraflow.evaluation.baselines import average_weights, fewshot_loss_fn, lorahub_search
from loraflow.data.formats import encode_examples, load_examples


def test_average_weights():
    assert average_weights(2) == [0.5, 0.5]
    assert average_weights(4) == [0.25] * 4


def test_lorahub_search_finds_known_optimum_within_bounds():
    target = np.array([0.8, -0.3])
    result = lorahub_search(lambda w: float(np.sum((np.array(w) - target) ** 2)), 2, budget=40, l1=0.0, seed=0)
    assert len(result.history) == 40
    assert result.history[0]["weights"] == [0.0, 0.0]  # LoRAHub starts from zero weights
    assert np.abs(np.array(result.weights) - target).max() < 0.15
    # bounds hold even when the optimum lies outside them
    outside = lorahub_search(lambda w: float(np.sum((np.array(w) - 3.0) ** 2)), 2, budget=30, l1=0.0, seed=0)
    assert all(-1.5 <= x <= 1.5 for h in outside.history for x in h["weights"])
    assert min(outside.weights) > 1.2


def test_lorahub_l1_penalty_is_mean_abs_weight():
    result = lorahub_search(lambda w: 1.0, 3, budget=5, l1=0.05, seed=1)
    for h in result.history:
        assert h["objective"] == pytest.approx(1.0 + 0.05 * np.mean(np.abs(h["weights"])))


def test_lorahub_finds_the_useful_adapter_on_toy_fewshot_set(tmp_path):
    toy = build_toy_lora_pair(tmp_path)
    model = LoraFlowModel.from_pretrained(copy.deepcopy(toy["base"]), toy["adapters"])
    data = list(encode_examples(load_examples(toy["train"]), toy["tokenizer"], toy["template"], 64))
    loss = fewshot_loss_fn(model, data, pad_id=0)
    result = lorahub_search(loss, 2, budget=40, seed=0)
    w_lang, w_task = result.weights
    assert w_lang > 0.5 and w_lang > abs(w_task)
    assert result.loss < loss([0.5, 0.5]) < loss([0.0, 0.0])
    assert model.fusion_mode == "gate"  # the search restored the model's mode


@pytest.mark.parametrize("kwargs,needle", [({"budget": 0}, "lorahub_budget"), ({"bound": float("nan")}, "lorahub_bound"),
                                           ({"l1": float("nan")}, "lorahub_l1"), ({"bound": 0.0}, "lorahub_bound")])
def test_lorahub_search_refuses_bad_settings(kwargs, needle):
    from loraflow.common.errors import LoraFlowError

    with pytest.raises(LoraFlowError, match=needle):
        lorahub_search(lambda w: 0.0, 2, **kwargs)


def test_lorahub_search_steers_away_from_non_finite_losses():
    """Weights whose loss is NaN (a diverging mix) count as the worst, never as the best."""
    def loss(w):
        return float("nan") if w[0] > 0.2 else float((w[0] - 0.2) ** 2 + w[1] ** 2)

    result = lorahub_search(loss, 2, budget=30, l1=0.0, seed=0)
    assert result.weights[0] <= 0.2 and result.loss is not None and np.isfinite(result.loss)
    assert any(h["loss"] is None for h in result.history)  # NaN was seen and recorded as unknown


def _reference_loss(base, adapters: dict, weights, batch) -> float:
    """The LoRA-Flow static formula written out: W + sum_i w_i * (alpha_i / r_i) * B_i @ A_i, then HF's own loss."""
    import json

    import torch
    from safetensors.torch import load_file

    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for w, path in zip(weights, adapters.values()):
            cfg = json.loads((path / "adapter_config.json").read_text())
            state = load_file(str(path / "adapter_model.safetensors"))
            for key, a in state.items():
                if ".lora_A." not in key:
                    continue
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = state[key.replace("lora_A", "lora_B")]
                modules[name].weight += w * cfg["lora_alpha"] / cfg["r"] * (b @ a)
        return merged(**batch).loss.item()


@pytest.mark.parametrize("default", ["gate", "static"])
def test_lorahub_search_never_merges_and_its_losses_match_the_formula(saved_base, tokenizer, monkeypatch, default):
    """Issue 16: each candidate is evaluated without merging into the base weights (0 merges over the
    whole search, base weights untouched at every evaluation), its recorded loss is the static-fusion
    formula's, and the user's default fusion (gate, or a merged static) is as before afterwards."""
    import torch
    from transformers import AutoModelForCausalLM

    import loraflow.core.attach as attach_module
    from loraflow.data.formats import PromptTemplate, collate

    adapters = {"zh": saved_base / "zh", "math": saved_base / "math"}
    base = AutoModelForCausalLM.from_pretrained(saved_base / "base").eval()
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters).eval()
    if default == "static":
        model.set_static_weights([0.3, 0.7])
        assert model.merged
    fused = [m for m in model.modules() if hasattr(m, "base_layer")]
    before = [m.base_layer.weight.detach().clone() for m in fused]

    merges = []
    real_merge = attach_module.merge
    spy = lambda *a, **kw: (merges.append(1), real_merge(*a, **kw))[1]  # noqa: E731
    monkeypatch.setattr(attach_module, "merge", spy)
    import loraflow.core.model as model_module
    if hasattr(model_module, "merge"):
        monkeypatch.setattr(model_module, "merge", spy)

    rows = [{"prompt": f"question {i}", "completion": f"answer number {i} is here"} for i in range(6)]
    from loraflow.data.formats import Example, encode_examples
    data = encode_examples([Example(prompt=r["prompt"], response=r["completion"]) for r in rows], tokenizer,
                           PromptTemplate(kind="plain"), 64)
    inner = fewshot_loss_fn(model, data, pad_id=0, batch_size=4)

    def loss(w):
        value = inner(w)
        assert all(torch.equal(m.base_layer.weight, b) for m, b in zip(fused, before))  # not merged meanwhile
        return value

    result = lorahub_search(loss, 2, budget=8, seed=0)
    assert merges == []
    batch = collate(list(data), 0)
    for h in result.history:
        assert h["loss"] == pytest.approx(_reference_loss(base, adapters, h["weights"], batch), rel=1e-4)
    # the same search on the formula's losses (what merging each candidate computed) finds the same weights
    reference = lorahub_search(lambda w: _reference_loss(base, adapters, w, batch), 2, budget=8, seed=0)
    assert result.weights == pytest.approx(reference.weights)
    assert model.fusion_mode == ("gate" if default == "gate" else "static")
    assert model.merged == (default == "static")
