"""Shared builders for the serve tests: a tiny base with a chat template, two LoRAs, fusion contexts."""

from __future__ import annotations

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
    adapters = {"zh": root / "zh", "math": root / "math"}
    gates = {}
    for name, seed in (("zh-math", 3), ("g2", 4)):  # random gates whose weights vary from token to token
        from loraflow.core.model import LoraFlowModel

        LoraFlowModel.from_pretrained(root / "base", adapters, seed=seed, gate_init_std=0.5).save_gate(root / name)
        gates[name] = root / name
    return {"base": root / "base", "adapters": adapters, "gates": gates}


def load_model(setup: dict):
    """The same model a server loads from `setup`: both gates by name, the first the default."""
    from loraflow.core.model import LoraFlowModel, load_tokenizer

    (first, path), *rest = setup["gates"].items()
    model = LoraFlowModel.from_pretrained(setup["base"], setup["adapters"], path, gate_name=first, seed=0)
    for name, path in rest:
        model.add_gate(name, path)
    return model.eval(), load_tokenizer(setup["base"])


def fusion_alone(model, spec):
    """Run the whole model with one fusion (the reference a batched row must match)."""
    return model.fusion(spec)
