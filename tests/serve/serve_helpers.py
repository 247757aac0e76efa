"""Shared builders for the serve tests: a tiny base with a chat template, two LoRAs, fusion contexts."""

from __future__ import annotations

import contextlib
from pathlib import Path

from conftest import build_tiny_model, build_tokenizer, make_peft_adapter

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def save_tiny_setup(root: Path, *, chat_template: bool = True) -> dict:
    """A tiny Llama (with tokenizer) in root/base and PEFT adapters root/zh, root/math; returns the paths."""
    tokenizer = build_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    make_peft_adapter(model, root / "zh", seed=1)
    make_peft_adapter(model, root / "math", seed=2, r=8)
    return {"base": root / "base", "adapters": {"zh": root / "zh", "math": root / "math"}}


def load_model(setup: dict):
    from loraflow.core.model import LoraFlowModel, load_tokenizer

    model = LoraFlowModel.from_pretrained(setup["base"], setup["adapters"], seed=0)
    return model.eval(), load_tokenizer(setup["base"])


@contextlib.contextmanager
def fusion_alone(model, spec):
    """Run the whole model with one fusion (the reference a batched row must match)."""
    whole = getattr(model, "fusion", None)
    if whole is not None:
        with whole(spec):
            yield
        return
    if spec.kind == "static":
        ctx = model.static_weights(list(spec.weights))
    elif spec.kind == "single":
        ctx = model.only_adapter(spec.adapter)
    elif spec.kind == "off":
        ctx = model.adapters_disabled()
    else:
        raise NotImplementedError(spec)
    with ctx:
        yield


def per_row_fusion_available(model) -> bool:
    return hasattr(model, "fusion_rows")
