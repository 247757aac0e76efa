"""Served names and the request `fusion` field: what each name runs, and every malformed form refused."""

from __future__ import annotations

import math

import pytest

from loraflow.common.errors import LoraFlowError
from loraflow.core.fusion_spec import FusionSpec
from loraflow.serve.registry import ServedModels, UnknownModel


@pytest.fixture
def served() -> ServedModels:
    return ServedModels.build(base_name="tiny", adapter_names=["zh", "math"], gate_names=["zh-math", "g2"],
                              presets={"mix": "avg", "zh70": "static:0.7,0.3"})


def test_every_gate_adapter_base_and_preset_is_served(served):
    assert {m.name: m.fusion for m in served} == {
        "zh-math": FusionSpec("gate", gate="zh-math"),
        "g2": FusionSpec("gate", gate="g2"),
        "zh": FusionSpec("single", adapter="zh"),
        "math": FusionSpec("single", adapter="math"),
        "tiny": FusionSpec("off"),
        "mix": FusionSpec("static", weights=(0.5, 0.5)),
        "zh70": FusionSpec("static", weights=(0.7, 0.3)),
    }


def test_request_fusion_forms(served):
    assert served.resolve("tiny", {"weights": {"zh": 0.7}}) == FusionSpec("static", weights=(0.7, 0.0))
    assert served.resolve("tiny", {"weights": [0.2, -0.4]}) == FusionSpec("static", weights=(0.2, -0.4))
    assert served.resolve("tiny", {"gate": "g2"}) == FusionSpec("gate", gate="g2")
    assert served.resolve("zh", {"adapter": "math"}) == FusionSpec("single", adapter="math")
    assert served.resolve("zh", "off") == FusionSpec("off")
    assert served.resolve("zh", "static:1,2") == FusionSpec("static", weights=(1.0, 2.0))
    assert served.resolve("zh", "static:10,-10") == FusionSpec("static", weights=(10.0, -10.0))  # the bound itself
    assert served.resolve("zh", "gate:zh-math") == FusionSpec("gate", gate="zh-math")


@pytest.mark.parametrize("fusion, words", [
    ({"weights": {"fr": 1.0}}, "unknown adapter"),
    ({"weights": {"zh": math.nan}}, "finite"),
    ({"weights": {"zh": 1e9}}, "finite number in"),
    ({"weights": {"zh": True}}, "finite number"),
    ({"weights": [1.0]}, "1 weights for 2 adapters"),
    ({"weights": "0.5"}, "expected an object"),
    ({"gate": "nope"}, "no gate named 'nope'"),
    ({"adapter": "fr"}, "no adapter named 'fr'"),
    ({"adapter": 3}, "expected a name"),
    ({"gate": "g2", "adapter": "zh"}, "exactly one"),
    ({"colour": "red"}, "unknown key"),
    ("gate", "name the gate"),
    ("static:1,nan", "finite"),
    ("static:1e30,0", r"finite number in \[-10, 10\], got 1e\+30"),  # the string form is bounded like "weights"
    ("static:0,-10.5", "finite number in"),
    ("lorahub", "search"),
    (7, "expected a fusion string"),
])
def test_bad_request_fusions_are_refused_with_the_reason(served, fusion, words):
    with pytest.raises(LoraFlowError, match=words):
        served.resolve("tiny", fusion)


def test_unknown_model_lists_the_served_ones(served):
    with pytest.raises(UnknownModel, match="served models: zh-math, g2, zh, math, tiny, mix, zh70"):
        served.resolve("gpt-4", None)


def test_one_gate_may_be_left_implicit():
    one = ServedModels.build(base_name="b", adapter_names=["a", "c"], gate_names=["only"])
    assert one.resolve("b", "gate") == FusionSpec("gate", gate="only")


@pytest.mark.parametrize("kwargs, words", [
    (dict(base_name="zh"), "zh is used more than once"),
    (dict(base_name="b", presets={"math": "avg"}), "math is used more than once"),
    (dict(base_name="b", gate_names=["zh"]), "zh is used more than once"),
    (dict(base_name="b", presets={"p": "static:1"}), "1 weights for 2 adapters"),
    (dict(base_name="b", presets={"p": "gate:missing"}), "no gate named 'missing'"),
    (dict(base_name="b", presets={"p": "static:11,0"}), "--fusion p=static:11,0: each weight must be a finite number"),
    (dict(base_name="my model"), "without spaces"),
])
def test_bad_served_names_and_presets_fail_at_startup(kwargs, words):
    with pytest.raises(LoraFlowError, match=words):
        ServedModels.build(adapter_names=["zh", "math"], **kwargs)
