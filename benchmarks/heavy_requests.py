"""Fairness of `loraflow serve` (the default engine) under heavy, legal requests (issue #27, item 3).

An ordinary request (a chat question, 32 greedy tokens, the LoRA-Flow gate) is timed alone, then sent
together with four heavy requests that the server accepts:

    stops     64 tokens with 4 stop strings of the longest length allowed (1,024 characters each)
    echo      /v1/completions with echo and logprobs 5 on a 1,500-word prompt (every prompt position scored)
    n8        n = 8 choices of 64 tokens
    long      a chat question of 2,000 words (a long prefill)

Reported: the ordinary request's latency alone and beside the heavy ones (median over --rounds), their
ratio (the issue's target: within 5x), and the server's resident memory before, right after and 10 s after
the heavy requests. SmolLM2-135M-Instruct (fp32) with two random rank-16 LoRAs and a fresh gate; the server
runs as `loraflow serve` in its own process with torch's default threads. Run by hand, from the main venv:

    python benchmarks/heavy_requests.py                  # --rounds 3
    python benchmarks/heavy_requests.py --rounds 1       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, machine_info  # noqa: E402
from serve_engines import _free_port, build_assets, running  # noqa: E402

WORDS = "the river apple market green school seven coin table window garden light".split()


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=at_least(1), default=3, help="rounds alone and beside the heavy ones (default: 3)")
    p.add_argument("--prefill-chunk", type=at_least(2), default=None,
                   help="the server's --prefill-chunk (default: the server's own)")
    p.add_argument("--seed", type=int, default=0, help="seeds the heavy prompts' words (default: 0)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _server_pid(port: int) -> int:
    """The process listening on `port` (the server: `running` started it in a group of its own)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(port).encode() in cmd:
            return int(proc.name)
    raise SystemExit(f"error: no server process for port {port}")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def ordinary(client) -> float:
    start = time.perf_counter()
    reply = client.chat.completions.create(model="flow", max_tokens=32, temperature=0, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "Name three colours of apples."}])
    assert reply.usage.completion_tokens == 32, reply.usage
    return time.perf_counter() - start


def heavy(client, kind: str, rng: random.Random) -> None:
    if kind == "stops":
        client.completions.create(model="flow", prompt="Once upon a time", max_tokens=64, temperature=0,
                                  stop=["".join(rng.choice("xyzw") for _ in range(1024)) for _ in range(4)],
                                  extra_body={"ignore_eos": True})
    elif kind == "echo":
        client.completions.create(model="flow", prompt=_text(rng, 1500), max_tokens=1, echo=True, logprobs=5,
                                  temperature=0)
    elif kind == "n8":
        client.completions.create(model="flow", prompt="Tell me a story.", n=8, max_tokens=64, temperature=0.8,
                                  seed=1, extra_body={"ignore_eos": True})
    else:
        client.chat.completions.create(model="flow", max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": _text(rng, 2000) + " Summarise."}])


def beside_heavy(client, rng: random.Random) -> float:
    """The ordinary request's latency, sent right after the four heavy ones (all in flight together)."""
    threads = [threading.Thread(target=heavy, args=(client, kind, random.Random(rng.random())), daemon=True)
               for kind in ("stops", "echo", "n8", "long")]
    for t in threads:
        t.start()
    time.sleep(0.2)  # the heavy requests are admitted first, as in the measurement
    latency = ordinary(client)
    for t in threads:
        t.join(1800)
    return latency


def main(argv: list[str] | None = None) -> int:
    import openai

    args = _args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="loraflow-heavy-") as tmp:
        work = Path(tmp)
        assets = build_assets(work)
        port = _free_port()
        cmd = [sys.executable, "-m", "loraflow.cli", "serve", "--base", str(assets["base"]),
               *[x for name, path in assets["adapters"].items() for x in ("--adapter", f"{name}={path}")],
               "--gate", f"flow={assets['gate']}", "--device", "cpu", "--port", str(port), "--max-model-len", "8192"]
        if args.prefill_chunk:
            cmd += ["--prefill-chunk", str(args.prefill_chunk)]
        with running(cmd, dict(os.environ), work / "server.log", 600) as url:
            pid = _server_pid(port)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=1800)
            ordinary(client)  # warm-up
            rss = {"start_mib": _rss_mib(pid)}
            alone = [ordinary(client) for _ in range(args.rounds)]
            beside = [beside_heavy(client, rng) for _ in range(args.rounds)]
            rss["after_heavy_mib"] = _rss_mib(pid)
            time.sleep(10)
            rss["settled_mib"] = _rss_mib(pid)
    result = {"alone_s": alone, "beside_heavy_s": beside, "ratio": statistics.median(beside) / statistics.median(alone),
              "rss": rss, "machine": machine_info(os.cpu_count() or 1, args.seed), "config": vars(args) | {"json": str(args.json)}}
    print(f"ordinary request alone: {statistics.median(alone):.2f} s (median of {args.rounds}); beside the four heavy "
          f"requests: {statistics.median(beside):.2f} s = {result['ratio']:.1f}x (target <= 5x)")
    print(f"server RSS: {rss['start_mib']:.0f} MiB before, {rss['after_heavy_mib']:.0f} MiB right after, "
          f"{rss['settled_mib']:.0f} MiB 10 s later")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
