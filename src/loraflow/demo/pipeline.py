"""`loraflow demo`: the whole paper, in miniature, on a CPU in minutes, with no downloads.

A seeded synthetic bilingual world (`demo_world`) stands in for the paper's data: a tiny Llama is
pretrained on it from scratch (`demo_base`), then every later step runs through the same `loraflow`
commands a user runs, printed as it goes: `train-lora` (language LoRA on general foreign text, task
LoRA on base-language math), `train-gate` (200 foreign math problems), `eval` for every method on
250 held-out foreign problems, `report` for the table and `inspect` for a fusion-weight heatmap.
Finished steps are reused on a re-run unless `--force`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraflow.common.errors import LoraFlowError

LANG = "xx"  # the foreign language's code in results and the table
METHODS = [  # (method, file stem, extra eval arguments)
    ("base", "base", []),
    ("single:lang", "single_lang", ["--adapter-role", "language"]),
    ("single:task", "single_task", ["--adapter-role", "task"]),
    ("avg", "avg", []),
    ("lorahub", "lorahub", []),
    ("loraflow", "loraflow", []),
]


@dataclass
class DemoConfig:
    """Sizes and steps of one demo run (the full run and `--quick` differ only here)."""

    world: dict = field(default_factory=dict)  # WorldConfig overrides
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 1000
    pretrain_batch: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_epochs: int = 3
    lora_lr: float = 5e-3
    lora_batch: int = 16
    gate_epochs: int = 15
    gate_lr: float = 3e-2
    gate_batch: int = 8
    max_new_tokens: int = 32
    eval_batch: int = 125
    lorahub_budget: int = 40


FULL = DemoConfig()
QUICK = DemoConfig(
    world={"n_pretrain_base_stories": 500, "n_pretrain_base_general": 1000, "n_pretrain_facts": 700,
           "n_pretrain_foreign_stories": 500, "n_pretrain_foreign_general": 1300, "n_pretrain_foreign_math": 200,
           "n_language": 600, "n_task": 600},
    pretrain_steps=450, lora_epochs=2, gate_epochs=10, lorahub_budget=10,
)


class _Steps:
    """Prints each step, times it, and skips steps whose output already exists."""

    def __init__(self, out: Path, force: bool, log: Callable[[str], None]) -> None:
        self.out, self.force, self.log = out, force, log
        self.timings: dict[str, float] = {}

    def run(self, name: str, done: Path, fn: Callable[[], None]) -> None:
        if done.exists() and not self.force:
            self.log(f"[{name}] reusing {done}")
            return
        if done.exists():
            shutil.rmtree(done) if done.is_dir() else done.unlink()
        start = time.time()
        self.log(f"[{name}] ...")
        fn()
        self.timings[name] = round(time.time() - start, 1)
        self.log(f"[{name}] done in {self.timings[name]:.0f}s")


def _cli(args: list[str], log: Callable[[str], None]) -> None:
    """Run a loraflow command in this process, exactly as a user would type it."""
    from loraflow.cli import main

    log("  $ loraflow " + " ".join(shlex.quote(a) for a in args))
    rc = main(args)
    if rc != 0:
        raise LoraFlowError(f"step failed: loraflow {args[0]} exited with {rc}")


def run_demo(out_dir: str | os.PathLike = "loraflow-demo", *, seed: int = 0, quick: bool = False,
             force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo under `out_dir`; return the table and the paths of the artifacts."""
    import torch

    from loraflow.demo import base as demo_base, world as demo_world

    cfg = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "demo_config.json"
    wanted = {"seed": seed, "quick": quick, "config": asdict(cfg)}
    if marker.is_file() and json.loads(marker.read_text()) != wanted and not force:
        raise LoraFlowError(f"{out} holds a demo run with other settings; use --force or another --out")
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    torch.manual_seed(seed)
    steps = _Steps(out, force, log)
    data, base = out / "data", out / "base"
    progress = [] if sys.stderr.isatty() else ["--no-progress"]

    def make_world() -> None:
        world = demo_world.build_world(seed, demo_world.WorldConfig(**cfg.world))
        tmp = out / ".data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        world.write(tmp)
        os.replace(tmp, data)

    steps.run("world", data, make_world)

    def make_base() -> None:
        texts = [json.loads(x)["text"] for x in (data / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()]
        tmp = out / ".base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = demo_base.train_tokenizer(texts, cfg.vocab_size, tmp)
        demo_base.pretrain_base(texts, tok, tmp, seed=seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                                steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch,
                                seq_len=cfg.pretrain_seq_len, lr=cfg.pretrain_lr, progress=not progress)
        os.replace(tmp, base)

    steps.run("pretrain base model", base, make_base)

    common = ["--template", "plain", "--seed", str(seed), *progress]
    for name, split in [("lang", "language_train"), ("task", "task_train")]:
        target = out / f"lora-{name}"
        steps.run(f"train {name} LoRA", target / "last", lambda target=target, split=split: _cli([
            "train-lora", "--base", str(base), "--train", str(data / f"{split}.jsonl"), "--out", str(target),
            "--rank", str(cfg.lora_rank), "--alpha", str(cfg.lora_alpha), "--dropout", "0.05",
            "--epochs", str(cfg.lora_epochs), "--lr", str(cfg.lora_lr), "--batch-size", str(cfg.lora_batch),
            "--max-length", "256", "--select-by", "last", *common], log))

    adapters = ["--adapter", f"lang={out / 'lora-lang' / 'last'}", "--adapter", f"task={out / 'lora-task' / 'last'}"]
    gate = out / "gate"
    steps.run("train gate", gate / "best", lambda: _cli([
        "train-gate", "--base", str(base), *adapters, "--train", str(data / "gate_train.jsonl"),
        "--dev", str(data / "gate_dev.jsonl"), "--out", str(gate), "--epochs", str(cfg.gate_epochs),
        "--lr", str(cfg.gate_lr), "--batch-size", str(cfg.gate_batch), "--max-length", "256", *common], log))

    results = out / "results"
    for method, stem, extra in METHODS:
        target = results / f"{stem}.json"
        more = {"lorahub": ["--train", str(data / "gate_train.jsonl"), "--lorahub-budget", str(cfg.lorahub_budget)],
                "loraflow": ["--gate", str(gate / "best")]}.get(method, [])
        steps.run(f"eval {method}", target, lambda method=method, target=target, extra=extra, more=more: _cli([
            "eval", "--base", str(base), *adapters, "--method", method, "--task", "math", "--lang", LANG,
            "--data", str(data / "test.jsonl"), "--out", str(target), "--max-new-tokens", str(cfg.max_new_tokens),
            "--batch-size", str(cfg.eval_batch), *extra, *more, *common], log))

    report = out / "report"
    steps.run("report", report / "table.md", lambda: _cli([
        "report", str(results), "--out-dir", str(report), "--title", f"LoRA-Flow demo (seed {seed})",
        "--task-name", "math=Foreign math"], lambda s: log(s)))

    first = json.loads((data / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    heat = out / "fusion_weights.png"
    steps.run("heatmap", heat, lambda: _cli([
        "inspect", "--base", str(base), *adapters, "--gate", str(gate / "best"), "--prompt",
        f"{first['question']}\n", "--out", str(heat), "--csv", str(out / "fusion_weights.csv"),
        "--max-new-tokens", str(cfg.max_new_tokens), "--title", "Fusion weights on a held-out test problem"], log))

    table = (report / "table.md").read_text(encoding="utf-8")
    summary = {"out_dir": str(out), "seed": seed, "quick": quick, "table": table,
               "scores": {stem: json.loads((results / f"{stem}.json").read_text())["score"] for _, stem, _ in METHODS},
               "timings_s": steps.timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
