"""Peak memory of LoRA-Flow gate training against plain inference and against LoRA training.

    python benchmarks/train_memory.py            # benchmark model, writes BENCHMARKS.md
    python benchmarks/train_memory.py --quick    # small model, prints only

Same random Llama-shaped benchmark model as `inference.py`, k = 2 PEFT adapters (rank 16, all seven
projections), a generated prompt/completion JSONL whose examples nearly fill `--max-length`.
Every configuration runs in its own fresh interpreter:

* base forward: the base model, one forward over the first batch, no autograd.
* loraflow forward (plain inference): LoraFlowModel (k = 2, dynamic gate), the same forward.
* gate training: `loraflow.train.training.train_gate` over the whole file (`--examples`, batch
  `--batch-size`, one epoch, progress off): every step backpropagates through all layers to the gates.
* the same with `gradient_checkpointing=True` (activations recomputed in the backward pass).
* LoRA training step: `loraflow.train.training.train_lora` (PEFT, rank 16, the seven projections) on the
  first batch only, i.e. exactly one optimizer step.

Each worker loads the base model first; its RSS then is the phase's starting point. Memory is the
process peak (ru_maxrss, includes loading) and the peak of the measured phase (VmHWM reset right
after loading the base model through `/proc/self/clear_refs`). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
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

SECTION = "train-memory"
CONFIGURATIONS = [
    ("base_forward", "base model, forward (no grad)"),
    ("loraflow_forward", "loraflow k=2, forward (no grad): plain inference"),
    ("gate_train", "loraflow k=2, gate training (train_gate)"),
    ("gate_train_ckpt", "loraflow k=2, gate training, gradient checkpointing"),
    ("lora_train_step", "PEFT LoRA r=16, one training step (train_lora)"),
]


# ----------------------------------------------------------------------------- data
def make_data(workdir: Path, examples: int, max_length: int, vocab_size: int, seed: int) -> dict:
    """A byte-level BPE tokenizer and a prompt/completion JSONL of made-up words.

    The words are whole tokens of the tokenizer (it is trained on them), so an example of n words is
    about n tokens; prompt and completion are each ~43% of max_length.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(400)})
    n = max(4, int(max_length * 0.43))
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(n)),
             "completion": " ".join(rng.choice(words) for _ in range(n))} for _ in range(examples)]
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    one_batch = workdir / "one_batch.jsonl"

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 4000), special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["prompt"] + "\n" + r["completion"] for r in rows] + [" ".join(words)] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok_dir = workdir / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    return {"train": str(data), "one_batch": str(one_batch), "tokenizer": str(tok_dir)}


# ----------------------------------------------------------------------------- worker (one configuration)
def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from loraflow.data.formats import PromptTemplate, collate, encode_examples, load_examples
    from loraflow.train.training import TrainConfig, train_gate, train_lora

    set_threads(args.threads)
    assets = json.loads(Path(args.assets).read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(assets["tokenizer"])
    template = PromptTemplate(kind="plain-nl")  # the format its measurements were made with
    examples = load_examples(assets["train"])
    items = encode_examples(examples, tokenizer, template, args.max_length)
    first = items[:args.batch_size]
    batch = collate(first, tokenizer.pad_token_id)
    adapters = {"a0": assets["adapters"][0], "a1": assets["adapters"][1]}

    base = AutoModelForCausalLM.from_pretrained(assets["base"]).eval()
    page_in(base)  # weights resident before the phase starts (transformers memory-maps them)
    result = {"key": args.worker, "rss_start": current_rss_bytes(), "tokens": list(batch["input_ids"].shape)}
    result["phase_peak_supported"] = reset_phase_peak()
    start = time.perf_counter()
    out_dir = Path(args.scratch) / args.worker
    cfg = dict(batch_size=args.batch_size, max_length=args.max_length, epochs=1, progress=False,
               select_by="last", seed=args.seed)
    if args.worker in ("base_forward", "loraflow_forward"):
        model = base
        if args.worker == "loraflow_forward":
            from loraflow import LoraFlowModel

            model = LoraFlowModel.from_pretrained(base, adapters, seed=args.seed).eval()
        with torch.inference_mode():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        result["steps"] = 0
    elif args.worker in ("gate_train", "gate_train_ckpt"):
        ckpt = args.worker == "gate_train_ckpt"
        res = train_gate(base, adapters, assets["train"], out_dir,
                         config=TrainConfig(lr=1e-3, gradient_checkpointing=ckpt, **cfg),
                         template=template, tokenizer=tokenizer)
        result["steps"] = len(res.log["steps"])
        result["trainable"] = res.trainable_parameters
    elif args.worker == "lora_train_step":
        Path(assets["one_batch"]).write_text("".join(Path(assets["train"]).read_text().splitlines(True)[:args.batch_size]))
        res = train_lora(base, assets["one_batch"], out_dir, config=TrainConfig(lr=2e-4, **cfg), template=template,
                         tokenizer=tokenizer, r=16, alpha=32, dropout=0.0)
        result["steps"] = len(res.log["steps"])
        result["trainable"] = res.trainable_parameters
    else:
        raise ValueError(f"unknown configuration {args.worker!r}")
    result.update(seconds=time.perf_counter() - start, phase_peak=phase_peak_bytes(), peak=peak_rss_bytes())
    return result


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


def render(results: dict, args, spec: ModelSpec, info: dict, wall_s: float) -> str:
    ref = results.get("loraflow_forward", {})
    shape = next((r["tokens"] for r in results.values() if "tokens" in r), None)
    lines = [
        "## Training memory",
        "",
        f"Produced by `python benchmarks/train_memory.py{_argv()}` (seed {args.seed}, "
        f"{args.threads} thread(s); total wall time {wall_s / 60:.1f} min). Model: {spec.describe()}; k = 2 "
        f"adapters. Data: {args.examples} generated prompt/completion examples, batch {args.batch_size}, "
        f"max_length {args.max_length} (a batch is {shape[0]} x {shape[1]} tokens); gate training runs one "
        f"epoch ({args.examples // args.batch_size} steps), the LoRA row one step on the first batch; the "
        "forward rows run that first batch once.",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "Each row is its own process, which loads the base model first. Phase peak: VmHWM reset after that "
        "load (what the phase adds on top of the loaded base model shows as phase peak - RSS at start). "
        "Process peak: ru_maxrss, which includes `from_pretrained`'s own transient. Ratios are to plain "
        "inference (loraflow forward).",
        "",
        "| configuration | trainable params | RSS at start MiB | phase peak MiB | phase peak - start MiB | "
        "process peak MiB | time s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in CONFIGURATIONS:
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | failed | | | | | |")
            continue
        grow = r["phase_peak"] - r["rss_start"]
        ref_grow = ref.get("phase_peak", 0) - ref.get("rss_start", 0) if ref else 0
        ratio = lambda x, y: f" ({x / y:.2f}x)" if y else ""  # noqa: E731
        lines.append(
            f"| {label} | {r.get('trainable', 0):,} | {mib(r['rss_start'])} | "
            f"{mib(r['phase_peak'])}{ratio(r['phase_peak'], ref.get('phase_peak'))} | "
            f"{mib(grow)}{ratio(grow, ref_grow)} | {mib(r['peak'])}{ratio(r['peak'], ref.get('peak'))} | "
            f"{r['seconds']:.1f} |")
    errors = [f"- {key}: {r['error'].splitlines()[-1]}" for key, r in results.items() if "error" in r]
    if errors:
        lines += ["", "Failed configurations:", *errors]
    if "outside its decoder layer's forward" in results.get("gate_train_ckpt", {}).get("error", ""):
        lines += ["", "Gate training with gradient checkpointing fails: transformers 5 checkpoints a decoder "
                  "layer's `forward`, not `__call__`, so the layer hooks that hand loraflow's gates their input "
                  "do not run when the backward pass recomputes the layer."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the adapters, the data and training")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small model, 8 examples of max_length 64; prints only unless --out is given")
    p.add_argument("--out", type=Path, default=None,
                   help=f"Markdown file whose '{SECTION}' section is replaced (default {DEFAULT_OUT.name} in the "
                        "repository root; with --quick, no file unless given)")
    p.add_argument("--examples", type=int, default=None, help="training examples (default 16; quick 8)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default 256; quick 64)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the model, adapters and data are built (reused when the spec matches); default a "
                        "temporary directory removed at the end")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.examples is None:
        args.examples = 8 if args.quick else 16
    if args.max_length is None:
        args.max_length = 64 if args.quick else 256
    if args.examples < args.batch_size or args.batch_size < 1 or args.max_length < 16:
        p.error("need --examples >= --batch-size >= 1 and --max-length >= 16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    started = time.perf_counter()
    spec = ModelSpec.quick() if args.quick else ModelSpec()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    scratch = Path(tempfile.mkdtemp(prefix="train-memory-", dir=workdir))
    try:
        print(f"building the benchmark model, 2 adapters and the data in {workdir} ...", flush=True)
        assets = build_assets_in_subprocess(workdir, spec, 2, args.seed, args.threads)
        assets.update(make_data(scratch, args.examples, args.max_length, spec.vocab_size, args.seed))
        assets_file = scratch / "assets.json"
        assets_file.write_text(json.dumps(assets))
        info = machine_info(args.threads, args.seed)
        common = ["--assets", str(assets_file), "--scratch", str(scratch), "--seed", str(args.seed), "--threads",
                  str(args.threads), "--examples", str(args.examples), "--batch-size", str(args.batch_size),
                  "--max-length", str(args.max_length)]
        results: dict[str, dict] = {}
        for key, label in CONFIGURATIONS:
            print(f"[{key}] {label} ...", end=" ", flush=True)
            r = results[key] = run_worker(Path(__file__), ["--worker", key, *common], args.threads)
            print(f"FAILED\n{r['error']}" if "error" in r else
                  f"{r['seconds']:.0f}s; phase peak {mib(r['phase_peak'])} MiB, process peak {mib(r['peak'])} MiB",
                  flush=True)
        text = render(results, args, spec, info, time.perf_counter() - started)
        print()
        print(text)
        if args.json:
            args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))
        out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
        if out is not None:
            write_section(out, SECTION, text)
            print(f"\nwrote the '{SECTION}' section of {out}")
        return 1 if any("error" in r for r in results.values()) else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
