"""Inference speed and memory of LoRA-Flow against the base model, PEFT LoRA and PEFT X-LoRA.

    python benchmarks/inference.py               # full run (several minutes), writes BENCHMARKS.md
    python benchmarks/inference.py --quick       # smoke run on a small model, prints only

Every configuration runs in its own fresh interpreter, so the peak RSS (ru_maxrss) is that
configuration's own. Each worker loads its model from the same saved directory, then for every
batch size B runs a warm-up and then `--repeats` greedy `generate(max_new_tokens=N,
min_new_tokens=N)` calls (KV cache on) on a (B, prompt_len) batch of random token ids. A logits
processor timestamps every step, so one call gives both numbers:

* prefill: from the call to the first logits (the prompt forward that fills the KV cache, plus
  generate's own set-up); tokens/s = B * prompt_len / t_prefill.
* decode: from the first to the last logits, i.e. the N - 1 one-token forwards;
  tokens/s = B * (N - 1) / t_decode.

Both are medians over all repeats of all `--rounds`: the whole list of configurations runs
`--rounds` times in turn (each time in fresh processes), so slow drift of a shared machine hits
every configuration alike. The base model runs first and, by default, once more at the very end
as a drift check. Memory is the largest over the rounds.

X-LoRA in PEFT forces
`use_cache=False` in `generate` and runs two forwards per step (a scaling pass and the real pass),
so each of its decode steps re-reads the whole sequence; it is measured with fewer new tokens
(`--xlora-new-tokens`), which flatters it (shorter sequences), and the report says so.

Not run in CI. Needs only the repository's virtual environment; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_OUT,
    ModelSpec,
    build_assets_in_subprocess,
    current_rss_bytes,
    machine_info,
    mib,
    page_in,
    peak_rss_bytes,
    phase_peak_bytes,
    reset_phase_peak,
    run_worker,
    set_threads,
    write_section,
)

SECTION = "inference"
LORAFLOW_KS = (2, 4, 8)


def configurations(ks: tuple[int, ...]) -> list[tuple[str, str]]:
    """(key, label) of every measured configuration, in report order."""
    rows = [("base", "base model"), ("peft1", "PEFT LoRA, 1 adapter"), ("peft2", "PEFT LoRA, 2 adapters active"),
            ("xlora2", "PEFT X-LoRA, 2 adapters")]
    rows += [(f"loraflow{k}", f"loraflow, dynamic gate, k={k}") for k in ks]
    return rows


# ----------------------------------------------------------------------------- worker (one configuration)
def load_configuration(key: str, assets: dict, seed: int):
    """Build one configuration from the saved base model and adapters; returns (model, hidden_size)."""
    from transformers import AutoModelForCausalLM

    base, paths = assets["base"], assets["adapters"]
    if key in ("base", "base_again"):
        return AutoModelForCausalLM.from_pretrained(base).eval()
    if key in ("peft1", "peft2"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), paths[0], adapter_name="a0")
        if key == "peft2":
            model.load_adapter(paths[1], adapter_name="a1")
            model.base_model.set_adapter(["a0", "a1"])  # both adapters active: their deltas add up
        return model.eval()
    if key == "xlora2":
        from peft import XLoraConfig, get_peft_model

        # X-LoRA refuses a model config with use_cache=True. PEFT 0.21 loads the experts under the
        # names "0", "1", ... but then activates the *given* names, so they must be "0", "1", ...
        # (other names fail with KeyError in disable_adapter_layers).
        model = AutoModelForCausalLM.from_pretrained(base, use_cache=False)
        hidden = model.config.hidden_size
        config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden, adapters={"0": paths[0], "1": paths[1]})
        return get_peft_model(model, config).eval()
    if key.startswith("loraflow"):
        from loraflow import LoraFlowModel

        k = int(key[len("loraflow"):])
        adapters = {f"a{i}": paths[i] for i in range(k)}
        # gate_init_std large enough that the gates really vary per token
        return LoraFlowModel.from_pretrained(base, adapters, seed=seed, gate_init_std=0.02).eval()
    raise ValueError(f"unknown configuration {key!r}")


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready.

    The first call comes right after the prefill forward, each later one after one decode forward,
    so prefill and decode times come out of the same `generate` call.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model, ids, new_tokens: int) -> tuple[float, float]:
    """Greedy generate exactly `new_tokens` tokens; returns (prefill seconds, decode seconds).

    Decode seconds cover the `new_tokens - 1` forwards after the prefill.
    """
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([clock]))
    if out.shape[1] != ids.shape[1] + new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens in {len(clock.times)} steps, "
                           f"expected {new_tokens}")
    return clock.times[0] - start, clock.times[-1] - clock.times[0]


def worker(args: argparse.Namespace) -> dict:
    """Measure one configuration; returns a JSON-serialisable dict."""
    import torch

    set_threads(args.threads)
    assets = json.loads(Path(args.assets).read_text())
    start = time.perf_counter()
    model = load_configuration(args.worker, assets, args.seed)
    load_s = time.perf_counter() - start
    rss_mapped = current_rss_bytes()
    page_in(model)
    result = {"key": args.worker, "load_s": load_s, "rss_mapped": rss_mapped,
              "rss_loaded": current_rss_bytes(), "peak_loaded": peak_rss_bytes(), "batches": {}}
    result["phase_peak_supported"] = reset_phase_peak()  # from here VmHWM is the peak while generating
    is_xlora = args.worker.startswith("xlora")
    new_tokens = args.xlora_new_tokens if is_xlora else args.new_tokens
    repeats = args.xlora_repeats if is_xlora else args.repeats
    result.update(new_tokens=new_tokens, repeats=repeats)
    gen = torch.Generator().manual_seed(args.seed)
    for batch in args.batch_sizes:
        ids = torch.randint(3, assets["vocab_size"], (batch, args.prompt_len), generator=gen)
        timed_generate(model, ids, min(4, new_tokens))  # warm-up: allocator, kernels, lazy init
        runs = [timed_generate(model, ids, new_tokens) for _ in range(repeats)]
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        result["batches"][str(batch)] = {
            "prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs],
            "prefill_tok_s": batch * args.prompt_len / prefill,
            "decode_tok_s": batch * (new_tokens - 1) / decode,
            "peak_after": peak_rss_bytes(),
        }
    result["peak"] = peak_rss_bytes()
    result["generate_peak"] = phase_peak_bytes()
    return result


def combine_rounds(rounds: list[dict], args) -> dict:
    """One result per configuration: speeds from the median over every repeat of every round, memory
    the largest over the rounds."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return rounds[0]
    out = dict(good[0], rounds=len(good))
    for field in ("rss_loaded", "peak", "generate_peak", "peak_loaded"):
        out[field] = max(r[field] for r in good)
    out["batches"] = {}
    for b in good[0]["batches"]:
        prefill = [t for r in good for t in r["batches"][b]["prefill_s"]]
        decode = [t for r in good for t in r["batches"][b]["decode_s"]]
        batch = int(b)
        out["batches"][b] = {
            "prefill_s": prefill, "decode_s": decode,
            "prefill_tok_s": batch * args.prompt_len / statistics.median(prefill),
            "decode_tok_s": batch * (out["new_tokens"] - 1) / statistics.median(decode),
            "decode_spread": (max(decode) - min(decode)) / statistics.median(decode),
        }
    return out


# ----------------------------------------------------------------------------- report
def _argv() -> str:
    """The options of this run that affect the results (not --workdir, --json or --out locations)."""
    shown, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--workdir", "--json", "--out"):
            skip = True
        elif not a.startswith(("--workdir=", "--json=", "--out=")):
            shown.append(a)
    return "".join(f" {a}" for a in shown)


def _ratio(x: float, ref: float | None) -> str:
    return f"{x / ref:.2f}x" if ref else "n/a"


def render(results: dict[str, dict], labels: list[tuple[str, str]], args, assets: dict, spec: ModelSpec,
           info: dict, wall_s: float) -> str:
    base = results.get("base", {})
    lines = [
        "## Inference speed and memory",
        "",
        f"Produced by `python benchmarks/inference.py{_argv()}` "
        f"(seed {args.seed}, {args.threads} thread(s), median of {args.rounds} round(s) x {args.repeats} repeat(s); total wall time "
        f"{wall_s / 60:.1f} min). Model: {spec.describe()}; random weights built from the config and "
        f"saved once; every configuration loads it in its own subprocess. Threads are fixed per worker "
        f"(`--threads`): on a shared machine, oversubscribed threads distort timings far more than one thread.",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        f"Each measurement: greedy `generate` of {args.new_tokens} new tokens (min = max, KV cache) on a batch of "
        f"random {args.prompt_len}-token prompts, timed per step by a logits processor. Prefill tok/s = batch x "
        f"{args.prompt_len} / time to the first logits; decode tok/s = batch x ({args.new_tokens} - 1) / time from the "
        "first to the last logits. Ratios (in brackets) are to the base model's first run (tokens/s: higher "
        "is better; memory: lower is better). RSS after load is measured after reading every weight once "
        "(transformers 5 memory-maps the safetensors, so right after `from_pretrained` the weights are not yet "
        "resident); peak RSS is ru_maxrss of the configuration's own process (reached while generating at "
        "the largest batch: weights + KV cache + activations).",
        "",
    ]
    header = "| configuration |"
    sep = "|---|"
    for b in args.batch_sizes:
        header += f" prefill tok/s b={b} | decode tok/s b={b} |"
        sep += "---:|---:|"
    header += " RSS after load MiB | peak RSS MiB |"
    sep += "---:|---:|"
    lines += [header, sep]
    for key, label in labels:
        r = results.get(key)
        if r is None or "error" in r:
            lines.append(f"| {label} | " + " | ".join(["failed"] * (2 * len(args.batch_sizes) + 2)) + " |")
            continue
        row = f"| {label}{' (*)' if key.startswith('xlora') else ''} |"
        for b in map(str, args.batch_sizes):
            m, ref = r["batches"][b], base.get("batches", {}).get(b, {})
            row += f" {m['prefill_tok_s']:,.0f} ({_ratio(m['prefill_tok_s'], ref.get('prefill_tok_s'))}) |"
            row += f" {m['decode_tok_s']:,.1f} ({_ratio(m['decode_tok_s'], ref.get('decode_tok_s'))}) |"
        row += f" {mib(r['rss_loaded'])} ({_ratio(r['rss_loaded'], base.get('rss_loaded'))}) |"
        row += f" {mib(r['peak'])} ({_ratio(r['peak'], base.get('peak'))}) |"
        lines.append(row)
    xl = results.get("xlora2", {})
    lines += ["",
              f"(*) X-LoRA (PEFT {info['versions'].split('peft ')[-1]}) cannot decode with a KV cache: its "
              "`generate` forces `use_cache=False` and every step runs a scaling pass and the real pass over the "
              "whole sequence. Its decode rate is measured with "
              f"{xl.get('new_tokens', args.xlora_new_tokens)} new tokens and {args.xlora_repeats} repeat(s) "
              "(fewer tokens means shorter sequences, so this flatters X-LoRA). Its experts must be named "
              "\"0\", \"1\", ... in `XLoraConfig.adapters` (other names raise KeyError in PEFT 0.21)."]
    errors = [f"- {key}: {r['error'].splitlines()[-1]}" for key, r in results.items() if "error" in r]
    if errors:
        lines += ["", "Failed configurations:", *errors]
    lines += ["", *memory_budget(results, assets, args)]
    lines += ["", *targets_summary(results, args)]
    return "\n".join(lines)


def memory_budget(results: dict, assets: dict, args) -> list[str]:
    """loraflow peak RSS <= base peak + the k adapters' own bytes + 10% of the base peak."""
    base = results.get("base")
    if not base or "error" in base:
        return ["Memory budget: not checked (the base run failed)."]
    lines = ["Memory budget: peak RSS (ru_maxrss) <= base peak + the adapters' own weight bytes + 10% of the "
             "base peak:", "",
             "| configuration | adapters' bytes MiB | peak RSS MiB | budget MiB | within |", "|---|---:|---:|---:|:---:|"]
    for k in args.ks:
        r = results.get(f"loraflow{k}")
        if not r or "error" in r:
            continue
        extra = sum(assets["adapter_bytes"][:k])
        budget = base["peak"] * 1.10 + extra
        lines.append(f"| loraflow k={k} | {mib(extra)} | {mib(r['peak'])} | {mib(budget)} | "
                     f"{'yes' if r['peak'] <= budget else '**no**'} |")
    return lines


def targets_summary(results: dict, args) -> list[str]:
    """Issue #11's decode targets: k=2 >= 0.93x base at batch 1 and >= 0.95x above; k=8 >= 0.88x at
    batch 1; >= 6x X-LoRA."""
    base = results.get("base")
    flows = {k: results.get(f"loraflow{k}") for k in args.ks}
    flows = {k: r for k, r in flows.items() if r and "error" not in r}
    if not base or "error" in base or not flows:
        return []
    lines = ["Decode targets (issue #11):", ""]
    for b in map(str, args.batch_sizes):
        ref = base["batches"][b]["decode_tok_s"]
        ratios = {k: r["batches"][b]["decode_tok_s"] / ref for k, r in flows.items()}
        goals = {2: 0.93 if b == "1" else 0.95} | ({8: 0.88} if b == "1" else {})
        verdicts = [f"k={k} {ratios[k]:.2f}x (target >= {g:.2f}x: {'met' if ratios[k] >= g else '**missed**'})"
                    for k, g in goals.items() if k in ratios]
        xl = results.get("xlora2")
        xl_rate = xl["batches"][b]["decode_tok_s"] if xl and "error" not in xl else None
        if xl_rate:
            fastest_needed = min(r["batches"][b]["decode_tok_s"] for r in flows.values()) / xl_rate
            verdicts.append(f"slowest k vs X-LoRA {fastest_needed:.1f}x (target >= 6x: "
                            f"{'met' if fastest_needed >= 6 else '**missed**'})")
        lines.append(f"- batch {b}: " + "; ".join(verdicts))
    return lines


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the adapters, the gates and the prompts")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (and OMP/MKL threads) in every worker (default 1: on a shared "
                        "2-core machine, 2 threads competing with another process ran up to 50x slower)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small model (2 layers, hidden 256), short prompts, 1 repeat; prints the "
                        "table and writes a file only if --out is given")
    p.add_argument("--out", type=Path, default=None,
                   help=f"Markdown file whose '{SECTION}' section is replaced (default {DEFAULT_OUT.name} in the "
                        "repository root; with --quick, no file unless given)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement and round (default 3; quick 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="run every configuration this many times, in turn, each in a fresh process, and pool the "
                        "repeats, so slow drift of a shared machine hits all configurations alike (default 2; quick 1)")
    p.add_argument("--base-again", action=argparse.BooleanOptionalAction, default=True,
                   help="run the base model again at the end to show the drift of the machine's speed (default on)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; quick 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode length (default 64; quick 8)")
    p.add_argument("--xlora-new-tokens", type=int, default=None,
                   help="decode length for X-LoRA, which has no KV cache (default 16; quick 4)")
    p.add_argument("--xlora-repeats", type=int, default=1, help="timed repeats for X-LoRA (default 1)")
    p.add_argument("--ks", type=int, nargs="+", default=list(LORAFLOW_KS), help="loraflow adapter counts")
    p.add_argument("--only", nargs="+", default=None, help="measure only these configuration keys "
                   "(base, peft1, peft2, xlora2, loraflow2, ...); base is always measured for the ratios")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the model and adapters are built (reused when the spec matches); default a "
                        "temporary directory removed at the end")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in [("repeats", 3, 1), ("rounds", 2, 1), ("prompt_len", 128, 32), ("new_tokens", 64, 8),
                              ("xlora_new_tokens", 16, 4)]:
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.repeats < 1 or args.rounds < 1 or args.new_tokens < 2 or args.xlora_new_tokens < 2 or args.prompt_len < 1:
        p.error("--repeats must be >= 1, --new-tokens and --xlora-new-tokens >= 2, --prompt-len >= 1")
    args.ks = tuple(args.ks)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    started = time.perf_counter()
    spec = ModelSpec.quick() if args.quick else ModelSpec()
    labels = configurations(args.ks)
    if args.only:
        labels = [(k, lab) for k, lab in labels if k in set(args.only) | {"base"}]
    if args.base_again:
        labels.append(("base_again", "base model, run again at the end (drift check)"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    try:
        print(f"building the benchmark model and {max(args.ks + (2,))} adapters in {workdir} ...", flush=True)
        assets = build_assets_in_subprocess(workdir, spec, max(args.ks + (2,)), args.seed, args.threads)
        assets["vocab_size"] = spec.vocab_size
        assets_file = workdir / "assets.json"
        assets_file.write_text(json.dumps(assets))
        info = machine_info(args.threads, args.seed)
        results: dict[str, dict] = {}
        common = ["--assets", str(assets_file), "--seed", str(args.seed), "--threads", str(args.threads),
                  "--repeats", str(args.repeats), "--prompt-len", str(args.prompt_len), "--new-tokens",
                  str(args.new_tokens), "--xlora-new-tokens", str(args.xlora_new_tokens), "--xlora-repeats",
                  str(args.xlora_repeats), "--batch-sizes", *map(str, args.batch_sizes)]
        runs: dict[str, list[dict]] = {key: [] for key, _ in labels}
        for round_ in range(args.rounds):
            for key, label in labels:
                if key.startswith("xlora") and round_ > 0:
                    continue  # X-LoRA is slow and far behind: one round
                if key == "base_again" and round_ != args.rounds - 1:
                    continue  # the drift check runs once, at the very end
                t0 = time.perf_counter()
                print(f"[round {round_ + 1}/{args.rounds}] [{key}] {label} ...", end=" ", flush=True)
                r = run_worker(Path(__file__), ["--worker", key, *common], args.threads)
                runs[key].append(r)
                if "error" in r:
                    print(f"FAILED\n{r['error']}", flush=True)
                else:
                    rates = ", ".join(f"b={b}: prefill {m['prefill_tok_s']:,.0f} tok/s, decode {m['decode_tok_s']:,.1f} tok/s"
                                      for b, m in r["batches"].items())
                    print(f"{time.perf_counter() - t0:.0f}s; {rates}; peak {mib(r['peak'])} MiB", flush=True)
        results = {key: combine_rounds(rs, args) for key, rs in runs.items() if rs}
        text = render(results, labels, args, assets, spec, info, time.perf_counter() - started)
        print()
        print(text)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()},
                                             "info": info, "assets": assets, "results": results}, indent=1))
        out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
        if out is not None:
            write_section(out, SECTION, text)
            print(f"\nwrote the '{SECTION}' section of {out}")
        return 1 if any("error" in r for r in results.values()) else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
