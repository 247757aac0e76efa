"""`loraflow convert-gate`."""

from __future__ import annotations

import argparse

from loraflow.cli.args import add_options, build
from loraflow.core.config import ConvertGateOptions


def add_convert_gate(sub) -> None:
    p = sub.add_parser(
        "convert-gate",
        help="convert an official LoRA-Flow .pt gate into a loraflow gate directory",
        description=(
            "Read an official gate file (torch.save'd dict of 'encoder.layers.N.lora_fusion_gate.weight' and "
            "optional 'weight_bias'; loaded with weights_only=True, so pickles that run code are refused) and "
            "write a loraflow gate directory recording adapter names, layer count and hidden size."
        ),
        epilog="example:\n  loraflow convert-gate --official zh_math.pt --adapters zh,math --out gates/zh_math",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, ConvertGateOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraflow.core.checkpoints import convert_official_gate, load_gate_checkpoint

    opts = build(ConvertGateOptions, args)
    out = convert_official_gate(opts.official, opts.adapter_names, opts.out, temperature=opts.temperature,
                                base_model=opts.base_model, force=opts.force)
    config, _ = load_gate_checkpoint(out)
    print(f"wrote {out}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"adapters {','.join(config.adapter_names)}, temperature {config.temperature}")
    return 0
