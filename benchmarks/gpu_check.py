"""The compiled engine's CUDA paths, checked and timed on a GPU (issue #18): run by hand where one is lent.

    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick     # the same code paths on a CPU, for a smoke run

0. The base model alone compiled in the same mode (is a failure ours or the stack's?).
1. CUDA graphs: `model.compile(mode="reduce-overhead")` (inductor + CUDA graphs) on a two-layer random
   Llama with two PEFT adapters and two gates, StaticCache: prefill and decode logits equal eager
   (fp32, 1e-4) for every fusion mode and two mixed-fusion batches; switching fusion never recompiles
   (dynamo's frame counter, `error_on_recompile`); inductor skipped no CUDA graph.
2. bf16: the same model in bf16, eager single-adapter logits against PEFT's own bf16 model (the
   reference), and compiled against eager, both measured against the fp32 reference's gap.
3. Speed: a SmolLM2-135M-shaped random Llama (30 layers, hidden 576; random weights, nothing read from
   disk) in bf16: prefill and decode steps of the base model and of loraflow k=2 (dynamic gate), eager
   and compiled with CUDA graphs, interleaved rounds, CUDA events. Ratios are to the base measured in
   the same rounds.

Every section records its error instead of stopping the run, and the JSON is rewritten after each; a
crash (a segfault) still ends the process, so on an untried stack run `--sections` one per process.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least  # noqa: E402
from smollm2 import make_adapters  # noqa: E402

FUSIONS = ["gate", "avg", "off", "gate:g2", "single:a1", "static:0.7,-0.4"]
ROWS = [["gate", "static:0.7,-0.4"], ["off", "gate:g2"]]
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def llama(shape: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    with torch.no_grad():  # weights of a trained model's scale, so logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model.eval()


def adapters(base, workdir: Path, k: int, seed: int) -> dict[str, Path]:
    """k PEFT LoRA directories as the SmolLM2 benchmark makes them, with deltas big enough to matter on a tiny model."""
    return {f"a{i}": path for i, path in enumerate(make_adapters(base, workdir, k, seed, strength=0.5))}


def loraflow(base, paths: dict, workdir: Path, seed: int, device: str, dtype):
    from loraflow import LoraFlowModel

    other = LoraFlowModel.from_pretrained(copy.deepcopy(base), paths, seed=seed + 100, gate_init_std=0.5)
    other.save_gate(workdir / "g2")
    model = LoraFlowModel.from_pretrained(copy.deepcopy(base), paths, seed=seed, gate_init_std=0.5)
    model.add_gate("g2", workdir / "g2")
    return model.to(device=device, dtype=dtype).eval()


def prefill_and_decode(model, ids, steps: int = 2):
    """Logits (cloned: CUDA graph outputs are overwritten by the next replay) of a prefill and greedy steps."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    n, out = ids.shape[1], []
    with torch.no_grad():
        torch.compiler.cudagraph_mark_step_begin()
        out.append(model(input_ids=ids, past_key_values=cache, use_cache=True,
                         cache_position=torch.arange(n, device=ids.device)).logits.clone())
        for i in range(steps):
            nxt = out[-1][:, -1:].argmax(-1)
            torch.compiler.cudagraph_mark_step_begin()
            out.append(model(input_ids=nxt, past_key_values=cache, use_cache=True,
                             cache_position=torch.tensor([n + i], device=ids.device)).logits.clone())
    return out


def run_fusion(model, fusion, ids):
    ctx = model.fusion_rows(fusion) if isinstance(fusion, list) else model.fusion(fusion)
    with ctx:
        return prefill_and_decode(model, ids)


def max_gap(a: list, b: list) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def check_cuda_graphs(device: str, seed: int, dtype_name: str, workdir: Path, mode: str) -> dict:
    """Compiled with mode="reduce-overhead" equals eager for every fusion, with no recompilation."""
    import torch
    from torch._dynamo.utils import counters

    dtype = getattr(torch, dtype_name)
    torch._dynamo.reset()
    counters.clear()
    base = llama(TINY, seed)
    paths = adapters(base, workdir, 2, seed)
    model = loraflow(base, paths, workdir, seed, device, dtype)
    ids = torch.randint(3, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(seed)).to(device)
    eager = {str(f): run_fusion(model, f, ids) for f in FUSIONS + ROWS}
    model.compile(mode=mode, dynamic=False)
    start = time.perf_counter()
    run_fusion(model, FUSIONS[0], ids)
    compile_s = time.perf_counter() - start
    frames = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = {str(f): run_fusion(model, f, ids) for f in FUSIONS + ROWS}
        again = {str(f): run_fusion(model, f, ids) for f in FUSIONS + ROWS}  # replays of captured graphs
    gaps = {name: max(max_gap(compiled[name], eager[name]), max_gap(again[name], eager[name])) for name in eager}
    distinct = min(max_gap(eager[a], eager[b]) for a, b in [("gate", "avg"), ("gate", "gate:g2"), ("avg", "off")])
    return {"dtype": dtype_name, "compile_s": round(compile_s, 1), "graphs": frames,
            "graphs_after_fusion_changes": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
            "max_gap_to_eager": max(gaps.values()), "gaps": gaps, "fusions_differ_by_at_least": distinct}


def check_base_graphs(device: str, seed: int, mode: str) -> dict:
    """The base model alone compiled in `mode`: whether a failure there is the fusion's or the stack's."""
    import torch

    from loraflow.core.model import compile_forward

    torch._dynamo.reset()
    model = llama(TINY, seed).to(device)
    ids = torch.randint(3, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(seed)).to(device)
    eager = prefill_and_decode(model, ids)
    compile_forward(model, mode=mode, dynamic=False)
    runs = [prefill_and_decode(model, ids) for _ in range(3)]
    return {"max_gap_to_eager": max(max_gap(r, eager) for r in runs)}


def check_bf16_against_peft(device: str, seed: int, workdir: Path) -> dict:
    """One adapter alone in bf16: loraflow's logits against PEFT's bf16 model, scaled by the fp32 gap."""
    import torch
    from peft import PeftModel

    from loraflow import LoraFlowModel

    base = llama(TINY, seed)
    paths = adapters(base, workdir, 2, seed)
    ids = torch.randint(3, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(seed)).to(device)
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["a0"])).to(device=device, dtype=dtype).eval()
        ours = LoraFlowModel.from_pretrained(copy.deepcopy(base), paths, seed=seed).to(device=device, dtype=dtype).eval()
        with torch.no_grad(), ours.fusion("single:a0"):
            result[str(dtype)] = (peft(input_ids=ids).logits.float(), ours(input_ids=ids).logits.float())
    ref = result["torch.float32"][0]
    return {"fp32_gap_to_peft": (result["torch.float32"][1] - ref).abs().max().item(),
            "bf16_gap_to_peft_bf16": (result["torch.bfloat16"][1] - result["torch.bfloat16"][0]).abs().max().item(),
            "peft_bf16_gap_to_fp32": (result["torch.bfloat16"][0] - ref).abs().max().item(),
            "ours_bf16_gap_to_fp32": (result["torch.bfloat16"][1] - ref).abs().max().item(),
            "logit_scale": ref.abs().max().item()}


def timed_steps(model, ids, steps: int) -> tuple[float, list[float]]:
    """Milliseconds of a prefill and of each greedy decode step on a fresh StaticCache (CUDA events on a GPU)."""
    import torch
    from transformers import StaticCache

    cuda = ids.device.type == "cuda"
    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 1)

    def timed(fn):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return out, start.elapsed_time(end)
        t = time.perf_counter()
        out = fn()
        return out, 1000 * (time.perf_counter() - t)

    with torch.no_grad():
        torch.compiler.cudagraph_mark_step_begin()
        out, prefill = timed(lambda: model(input_ids=ids, past_key_values=cache, use_cache=True,
                                           cache_position=torch.arange(n, device=ids.device)))
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(steps):
            position = torch.tensor([n + i], device=ids.device)
            torch.compiler.cudagraph_mark_step_begin()
            out, ms = timed(lambda: model(input_ids=nxt, past_key_values=cache, use_cache=True,
                                          cache_position=position))
            times.append(ms)
            nxt = out.logits[:, -1:].argmax(-1).clone()
    return prefill, times


def speed(device: str, seed: int, workdir: Path, shape: dict, batches: list[int], rounds: int, steps: int,
          prompt_len: int, deadline: float, mode: str) -> dict:
    """Base and loraflow k=2 (dynamic gate), eager and compiled (CUDA graphs), bf16, interleaved rounds."""
    import torch

    from loraflow import LoraFlowModel
    from loraflow.core.model import compile_forward

    base = llama(shape, seed)
    paths = adapters(base, workdir, 2, seed)
    models = {"base eager": copy.deepcopy(base).to(device=device, dtype=torch.bfloat16),
              "k2 eager": LoraFlowModel.from_pretrained(copy.deepcopy(base), paths, seed=seed, gate_init_std=0.02)
              .to(device=device, dtype=torch.bfloat16).eval()}
    models["base compiled"] = copy.deepcopy(models["base eager"])
    compile_forward(models["base compiled"], mode=mode, dynamic=False)
    models["k2 compiled"] = LoraFlowModel.from_pretrained(
        copy.deepcopy(base), paths, seed=seed, gate_init_std=0.02).to(device=device, dtype=torch.bfloat16).eval()
    models["k2 compiled"].compile(mode=mode, dynamic=False)
    g = torch.Generator().manual_seed(seed)
    prompts = {b: torch.randint(3, shape["vocab_size"], (b, prompt_len), generator=g).to(device) for b in batches}
    compile_s = {}
    for name, m in models.items():  # warm-up: compiles and captures; timed apart
        for b in batches:
            t = time.perf_counter()
            timed_steps(m, prompts[b], 3)
            compile_s[f"{name} b={b}"] = round(time.perf_counter() - t, 1)
    samples = {(name, b): ([], []) for name in models for b in batches}
    done = 0
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        for b in batches:
            for name, m in models.items():
                pre, dec = timed_steps(m, prompts[b], steps)
                samples[(name, b)][0].append(pre)
                samples[(name, b)][1].extend(dec)
        done += 1
    rows = {}
    for b in batches:
        bp = statistics.median(samples[("base compiled", b)][0])
        bd = statistics.median(samples[("base compiled", b)][1])
        ed = statistics.median(samples[("base eager", b)][1])
        for name in models:
            p, d = statistics.median(samples[(name, b)][0]), statistics.median(samples[(name, b)][1])
            rows[f"{name} b={b}"] = {"prefill_ms": round(p, 3), "decode_ms": round(d, 4),
                                     "prefill_vs_compiled_base": round(bp / p, 3),
                                     "decode_vs_compiled_base": round(bd / d, 3),
                                     "decode_vs_eager_base": round(ed / d, 3)}
    return {"rounds": done, "steps": steps, "prompt_len": prompt_len, "dtype": "bfloat16", "compile_s": compile_s,
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--steps", type=at_least(1), default=20)
    p.add_argument("--prompt-len", type=at_least(1), default=64)
    p.add_argument("--budget-s", type=at_least(1), default=420, help="stop timing rounds after this many seconds")
    p.add_argument("--quick", action="store_true", help="the speed section on the tiny model, batch 1")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--sections", nargs="+", default=["base", "cuda_graphs", "bf16", "speed"],
                   choices=["base", "cuda_graphs", "bf16", "speed"])
    p.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = p.parse_args(argv)

    import torch

    import loraflow

    deadline = time.monotonic() + args.budget_s
    report: dict = {"torch": torch.__version__, "loraflow": loraflow.__version__, "seed": args.seed,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
    try:
        import transformers
        report["transformers"] = transformers.__version__
    except ImportError:
        pass

    def section(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001 - a failed section is recorded and the others still run
            report[name] = {"error": traceback.format_exc(limit=-6)}
        report[name]["seconds"] = round(time.perf_counter() - t, 1)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(name, json.dumps(report[name], default=str)[:2000], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        report["mode"] = args.mode
        for i, dtype in enumerate(("float32", "bfloat16") if "cuda_graphs" in args.sections else ()):
            section(f"compiled_{dtype}", lambda d=dtype, i=i: check_cuda_graphs(
                args.device, args.seed, d, Path(tmp) / f"c{i}", args.mode))
        if "base" in args.sections:
            section("base_compiled", lambda: check_base_graphs(args.device, args.seed, args.mode))
        if "bf16" in args.sections:
            section("bf16_vs_peft", lambda: check_bf16_against_peft(args.device, args.seed, Path(tmp) / "p"))
        shape, batches = (TINY, [1]) if args.quick else (SMOLLM2, [1, 8])
        if "speed" in args.sections:
            section("speed", lambda: speed(args.device, args.seed, Path(tmp) / "s", shape, batches, args.rounds,
                                           args.steps, args.prompt_len, deadline, args.mode))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
