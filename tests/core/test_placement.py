"""Models spread over devices: offloaded (meta-device) layers are refused instead of losing LoRA weights."""

from __future__ import annotations

import pytest
from conftest import build_tiny_model, make_peft_adapter

from loraflow import LoraFlowModel
from loraflow.common.errors import LoraFlowError


def test_offloaded_meta_layer_is_refused(tmp_path):
    base = build_tiny_model("llama")
    adapter = make_peft_adapter(base, tmp_path / "zh", seed=1)
    base.model.layers[1].mlp.to("meta")  # what CPU/disk offload leaves in the module tree
    with pytest.raises(LoraFlowError, match=r"model\.layers\.1\.mlp\.\w+_proj is offloaded \(its weights are on the meta"):
        LoraFlowModel.from_pretrained(base, {"zh": adapter})

