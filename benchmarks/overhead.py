"""Per-token overhead as machine instructions: a noise-free measure of what the adapter path adds.

    python benchmarks/overhead.py                # about 8 min; needs valgrind
    python benchmarks/overhead.py --write        # and put the table into BENCHMARKS.md

On a small CPU model decode time is mostly fixed per-operation cost (the Python call, PyTorch's
dispatch, allocating the output), not arithmetic, and wall-clock timings of a shared machine
move by several percent from run to run. Instruction counts do not: each configuration runs
in its own process under valgrind's callgrind, with counting switched on for exactly `--steps`
cached decode steps after a warm-up (`callgrind_control -i on/off`), so the count covers the
model's forwards and nothing else, and repeats to within a fraction of a percent.

The model is a random Llama-shaped decoder with SmolLM2-135M's depth (30 layers) but tiny widths
(hidden 64), so that the count is the per-operation work every layer pays whatever its width;
the adapters are those of `benchmarks/smollm2.py` ("a0" rank 8 on all seven projections, "a1"
rank 16 on q/v, more rank-8 ones for k > 2). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT, at_least, machine_info, thread_env, write_section  # noqa: E402

CONFIGS = ["base", "peft1", "peft2", "loraflow2:off", "loraflow2", "loraflow8", "loraflow2:avg"]
LABELS = {"base": "base model", "peft1": "PEFT LoRA, 1 adapter", "peft2": "PEFT LoRA, 2 adapters active",
          "loraflow2:off": "loraflow k=2, fusion off (the wrapping alone)",
          "loraflow2": "loraflow k=2, dynamic gate", "loraflow8": "loraflow k=8, dynamic gate",
          "loraflow2:avg": "loraflow k=2, static avg (merged)"}


def tiny_base(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def worker(args: argparse.Namespace) -> None:
    """Build one configuration and count the instructions of `args.steps` decode steps."""
    import smollm2
    import torch

    torch.set_num_threads(1)
    smollm2.load_base = lambda: tiny_base(args.layers)
    name, _, fusion = args.worker.partition(":")
    paths = [Path(args.adapters) / f"a{i}" for i in range(8)]
    model = smollm2.build([name], paths, args.seed)[name]
    if fusion:
        model.set_fusion(fusion)
    ids = torch.randint(3, 200, (1, 32), generator=torch.Generator().manual_seed(args.seed))
    pid = str(os.getpid())
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            model(input_ids=nxt, past_key_values=cache, use_cache=True)
        subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=True)
        for _ in range(args.steps):
            model(input_ids=nxt, past_key_values=cache, use_cache=True)
        subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, check=True)


def count(config: str, adapters: Path, args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, __file__, "--worker", config, "--adapters", str(adapters), "--layers",
               str(args.layers), "--steps", str(args.steps), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(1))
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{config}: valgrind run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def render(counts: dict[str, int], args: argparse.Namespace, info: dict) -> str:
    base = counts["base"] / args.steps
    lines = ["## Per-token overhead in instructions", "",
             f"Produced by `python benchmarks/overhead.py` (valgrind callgrind; {args.steps} cached decode steps "
             f"of a batch of one row after a 32-token prompt; random Llama-shaped model with {args.layers} layers "
             "and hidden 64, so the count is the per-operation work, not arithmetic; 1 thread).", "",
             f"- versions: {info['versions']}", f"- date: {info['date']}; {info['code']}", "",
             "| configuration | instructions per decode step | vs base | added per layer |",
             "|---|---:|---:|---:|"]
    for config, n in counts.items():
        step = n / args.steps
        lines.append(f"| {LABELS.get(config, config)} | {step / 1e6:,.2f} M | {step / base:.3f}x | "
                     f"{(step - base) / args.layers / 1e3:,.0f} k |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--layers", type=at_least(1), default=30)
    p.add_argument("--steps", type=at_least(1), default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"put the table into {DEFAULT_OUT.name}")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (apt install valgrind)")
    import smollm2

    with tempfile.TemporaryDirectory(prefix="loraflow-overhead-") as tmp:
        smollm2.make_adapters(tiny_base(args.layers), Path(tmp), 8, args.seed)
        counts = {}
        for config in ["base"] + [c for c in args.configs if c != "base"]:
            counts[config] = count(config, Path(tmp), args)
            print(f"{config}: {counts[config] / args.steps / 1e6:.2f} M instructions per step", flush=True)
    text = render(counts, args, machine_info(1, args.seed))
    print(text)
    print(json.dumps(counts))
    if args.write:
        write_section(DEFAULT_OUT, "overhead", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
