"""Where LoRA-Flow's decode time goes: per-step timings of fusion modes and a per-op breakdown.

    python benchmarks/profile_decode.py --workdir /tmp/lfbench   # reuses inference.py's model if present

For one decode step (one new token per sequence, KV cache of `--prompt-len` tokens) it times,
in one process and interleaved so that machine drift hits all alike:

* base: the plain transformers model;
* loraflow k, mode "off": fused layers and hooks present, adapters off (the cost of the wrapping);
* loraflow k, mode "static": the LoRA matmuls without gates;
* loraflow k, mode "gate": the full dynamic fusion;
* PEFT LoRA with 1 adapter, for reference;

then runs torch.profiler over decode steps of the base model and loraflow (gate mode) and prints
the aten ops that loraflow adds. A diagnostic
helper for the report, not a benchmark of record; not run in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ModelSpec, build_assets, set_threads  # noqa: E402


def decode_step_fn(model, batch: int, prompt_len: int, vocab: int, seed: int):
    """A closure that runs one cached decode forward over a prefilled cache of `prompt_len` tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.ones(batch, prompt_len + 1, dtype=torch.long)

    def step():
        with torch.inference_mode():
            model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to the prompt: every step sees the same cache length

    return step


def time_fn(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="benchmark model directory (built if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 8])
    p.add_argument("--no-profiler", action="store_true")
    args = p.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow import LoraFlowModel

    set_threads(args.threads)
    spec = ModelSpec.quick() if args.quick else ModelSpec()
    assets = build_assets(args.workdir, spec, max(args.ks), args.seed)
    base = AutoModelForCausalLM.from_pretrained(assets["base"]).eval()
    flows = {k: LoraFlowModel.from_pretrained(
        assets["base"], {f"a{i}": assets["adapters"][i] for i in range(k)}, seed=args.seed, gate_init_std=0.02).eval()
        for k in args.ks}
    peft1 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["base"]), assets["adapters"][0]).eval()

    def with_mode(model, mode):
        def setter():
            if mode == "off":
                model.set_adapters_off()
            elif mode == "static":
                model.set_static_weights([1.0 / model.gate_config.k] * model.gate_config.k)
            else:
                model.set_gate_mode()
        return setter

    report = {}
    for batch in args.batch_sizes:
        variants = {"base": (base, None), "peft1": (peft1, None)}
        for k, m in flows.items():
            for mode in ("off", "static", "gate"):
                variants[f"loraflow{k}-{mode}"] = (m, with_mode(m, mode))
        fns = {}
        for name, (m, setter) in variants.items():
            if setter:
                setter()
            fns[name] = (decode_step_fn(m, batch, args.prompt_len, spec.vocab_size, args.seed), setter)
        samples = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, (step, setter) in fns.items():
                if setter:
                    setter()
                samples[name].append(time_fn(step, args.steps))
        res = {name: statistics.median(v) for name, v in samples.items()}
        report[batch] = res
        print(f"\nbatch {batch}: median decode step (ms) over {args.rounds} interleaved rounds of {args.steps} steps")
        for name, t in res.items():
            print(f"  {name:20s} {t * 1e3:8.2f} ms   {res['base'] / t:5.2f}x base speed   "
                  f"+{(t - res['base']) * 1e3:6.2f} ms")

    if not args.no_profiler:
        from torch.profiler import ProfilerActivity, profile

        for batch in args.batch_sizes:
            for name, m in [("base", base), (f"loraflow{args.ks[0]}-gate", flows[args.ks[0]])]:
                if name != "base":
                    m.set_gate_mode()
                step = decode_step_fn(m, batch, args.prompt_len, spec.vocab_size, args.seed)
                step()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        step()
                print(f"\n== torch.profiler, {name}, batch {batch}, 5 decode steps ==")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))

    Path(args.workdir / "profile_decode.json").write_text(json.dumps({str(b): r for b, r in report.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
