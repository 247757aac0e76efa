"""`loraflow demo`: the whole paper, in miniature, on a CPU in minutes, with no downloads.

A seeded synthetic bilingual world (`demo_world`) stands in for the paper's data: a tiny Llama is
pretrained on it from scratch (`demo_base`), then every later step calls the library function
behind a `loraflow` command and prints that command, so a user can re-run or change any step:
`train-lora` (language LoRA on general foreign text, task LoRA on base-language math), `train-gate`
(200 foreign math problems), `eval` for every method on 250 held-out foreign problems, `report`
for the table and `inspect` for a fusion-weight heatmap. A step's output is reused on a re-run only
if the step finished (a completion marker in `.done/`), unless `--force`.
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
from loraflow.common.extras import require
from loraflow.common.io import check_output_dir
from loraflow.common.options import option

LANG = "xx"  # the foreign language's code in results and the table
METHODS = [  # (method, file stem, the single adapter's role in the paper's table)
    ("base", "base", None),
    ("single:lang", "single_lang", "language"),
    ("single:task", "single_task", "task"),
    ("avg", "avg", None),
    ("lorahub", "lorahub", None),
    ("loraflow", "loraflow", None),
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
    """Prints each step and its equivalent command, times it, and reuses only finished steps."""

    def __init__(self, out: Path, force: bool, log: Callable[[str], None]) -> None:
        self.out, self.force, self.log = out, force, log
        self.timings: dict[str, float] = {}
        self.markers = out / ".done"

    def run(self, name: str, outputs: list[Path], fn: Callable[[], None], command: list[str] | None = None) -> None:
        """Run step `name` that writes `outputs` (reused when the step finished before)."""
        marker = self.markers / (name.replace(" ", "_") + ".done")
        if marker.is_file() and all(p.exists() for p in outputs) and not self.force:
            self.log(f"[{name}] reusing {outputs[0]}")
            return
        marker.unlink(missing_ok=True)
        for done in outputs:  # an unfinished (or forced) step's output: ours, inside the demo directory
            if done.is_dir():
                shutil.rmtree(done)
            elif done.exists():
                done.unlink()
        start = time.time()
        self.log(f"[{name}] ...")
        if command:
            self.log("  $ loraflow " + " ".join(shlex.quote(a) for a in command))
        fn()
        self.markers.mkdir(exist_ok=True)
        marker.write_text("".join(f"{p}\n" for p in outputs), encoding="utf-8")
        self.timings[name] = round(time.time() - start, 1)
        self.log(f"[{name}] done in {self.timings[name]:.0f}s")


@dataclass
class DemoOptions:
    """`loraflow demo`: where, with which seed, and how big."""

    out: str = option("loraflow-demo", "artifact directory")
    quick: bool = option(False, "a smaller, faster run (about 80 s on 2 cores; used by CI)")
    force: bool = option(False, "redo every step instead of reusing finished ones")
    seed: int = option(0, "seeds the world, the base model, training and evaluation")


def _print_score(method: str, result: dict | None, log: Callable[[str], None]) -> None:
    if result:
        log(f"  {method}: {result['correct']}/{result['total']} = {100 * result['score']:.1f}%")


def run_demo(out_dir: str | os.PathLike = DemoOptions.out, *, seed: int = DemoOptions.seed,
             quick: bool = DemoOptions.quick, force: bool = DemoOptions.force,
             log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo under `out_dir`; return the table and the paths of the artifacts."""
    require("nevergrad", "matplotlib", what="the demo", extra="demo")  # LoRAHub, the report chart, the heatmap
    import torch

    from loraflow.core.config import ModelOptions
    from loraflow.core.inspection import inspect_prompt
    from loraflow.data.config import PromptOptions
    from loraflow.data.templates import render_prompt
    from loraflow.demo import base as demo_base, world as demo_world
    from loraflow.evaluation.harness import EvalConfig, evaluate
    from loraflow.evaluation.report import write_report
    from loraflow.train.config import GateTrainConfig, LoraTrainConfig
    from loraflow.train.training import train_gate, train_lora

    cfg = QUICK if quick else FULL
    out = check_output_dir(out_dir, force=True, what="demo directory")
    marker = out / "demo_config.json"
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():  # even with --force, which redoes steps
        raise LoraFlowError(f"{out}: exists and is not a loraflow demo directory; refusing to write into it "
                            "(choose a new or empty --out, or a previous demo's)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoraFlowError(f"{out}: cannot create the demo directory ({e.strerror or e})") from None
    wanted = {"seed": seed, "quick": quick, "config": asdict(cfg)}
    if marker.is_file() and json.loads(marker.read_text()) != wanted and not force:
        raise LoraFlowError(f"{out} holds a demo run with other settings; use --force or another --out")
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    torch.manual_seed(seed)
    steps = _Steps(out, force, log)
    data, base = out / "data", out / "base"
    show_progress = sys.stderr.isatty()

    def make_world() -> None:
        world = demo_world.build_world(seed, demo_world.WorldConfig(**cfg.world))
        tmp = out / ".data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        world.write(tmp)
        os.replace(tmp, data)

    steps.run("world", [data], make_world)

    def make_base() -> None:
        texts = [json.loads(x)["text"] for x in (data / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()]
        tmp = out / ".base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = demo_base.train_tokenizer(texts, cfg.vocab_size, tmp)
        demo_base.pretrain_base(texts, tok, tmp, seed=seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                                steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch,
                                seq_len=cfg.pretrain_seq_len, lr=cfg.pretrain_lr, progress=show_progress)
        os.replace(tmp, base)

    steps.run("pretrain base model", [base], make_base)

    plain = PromptOptions(template="plain-nl").to_template()  # the question, a newline, the answer
    shown = ["--template", "plain-nl", "--seed", str(seed)] + ([] if show_progress else ["--no-progress"])
    for name, split in [("lang", "language_train"), ("task", "task_train")]:
        target = out / f"lora-{name}"
        lora_cfg = LoraTrainConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.05, epochs=cfg.lora_epochs,
                                   lr=cfg.lora_lr, batch_size=cfg.lora_batch, max_length=256, select_by="last",
                                   seed=seed, progress=show_progress)
        steps.run(f"train {name} LoRA", [target], lambda target=target, split=split, c=lora_cfg: train_lora(
            str(base), data / f"{split}.jsonl", target, config=c, template=plain, r=c.rank, alpha=c.alpha,
            dropout=c.dropout), command=[
            "train-lora", "--base", str(base), "--train", str(data / f"{split}.jsonl"), "--out", str(target),
            "--rank", str(cfg.lora_rank), "--alpha", str(cfg.lora_alpha), "--dropout", "0.05",
            "--epochs", str(cfg.lora_epochs), "--lr", str(cfg.lora_lr), "--batch-size", str(cfg.lora_batch),
            "--max-length", "256", "--select-by", "last", *shown])

    adapters = [("lang", str(out / "lora-lang" / "last")), ("task", str(out / "lora-task" / "last"))]
    adapter_flags = [x for name, path in adapters for x in ("--adapter", f"{name}={path}")]
    gate = out / "gate"
    gate_cfg = GateTrainConfig(epochs=cfg.gate_epochs, lr=cfg.gate_lr, batch_size=cfg.gate_batch, max_length=256,
                               seed=seed, progress=show_progress)
    steps.run("train gate", [gate], lambda: train_gate(
        str(base), adapters, data / "gate_train.jsonl", gate, dev_path=data / "gate_dev.jsonl", config=gate_cfg,
        template=plain), command=[
        "train-gate", "--base", str(base), *adapter_flags, "--train", str(data / "gate_train.jsonl"),
        "--dev", str(data / "gate_dev.jsonl"), "--out", str(gate), "--epochs", str(cfg.gate_epochs),
        "--lr", str(cfg.gate_lr), "--batch-size", str(cfg.gate_batch), "--max-length", "256", *shown])

    results = out / "results"
    eval_cfg = EvalConfig(task="math", lang=LANG, template="plain-nl", max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.eval_batch, lorahub_budget=cfg.lorahub_budget, seed=seed)
    for method, stem, role in METHODS:
        target = results / f"{stem}.json"
        train_path = data / "gate_train.jsonl" if method == "lorahub" else None
        gate_path = gate / "best" if method == "loraflow" else None
        more = (["--adapter-role", role] if role else []) \
            + (["--train", str(train_path), "--lorahub-budget", str(cfg.lorahub_budget)] if train_path else []) \
            + (["--gate", str(gate_path)] if gate_path else [])
        steps.run(f"eval {method}", [target, target.with_suffix(".outputs.jsonl")],
                  lambda method=method, target=target, role=role, train_path=train_path, gate_path=gate_path:
                  _print_score(method, evaluate(str(base), adapters, method, data / "test.jsonl", target, eval_cfg,
                                                gate=gate_path, train_path=train_path, adapter_role=role,
                                                progress=show_progress), log),
                  command=["eval", "--base", str(base), *adapter_flags, "--method", method, "--task", "math",
                           "--lang", LANG, "--data", str(data / "test.jsonl"), "--out", str(target),
                           "--max-new-tokens", str(cfg.max_new_tokens), "--batch-size", str(cfg.eval_batch), *more,
                           *shown])

    report = out / "report"
    title = f"LoRA-Flow demo (seed {seed})"
    steps.run("report", [report], lambda: log(write_report(
        [results], out_dir=report, title=title, task_names={"math": "Foreign math"}).markdown.rstrip()),
        command=["report", str(results), "--out-dir", str(report), "--title", title,
                 "--task-name", "math=Foreign math"])

    first = json.loads((data / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    heat, heat_csv = out / "fusion_weights.png", out / "fusion_weights.csv"
    heat_title = "Fusion weights on a held-out test problem"

    def heatmap() -> None:
        model, tokenizer = ModelOptions(base=str(base), adapter=[f"{n}={p}" for n, p in adapters],
                                        gate=str(gate / "best")).load(seed=seed)
        prompt = render_prompt(plain, tokenizer, first["question"]).text
        inspect_prompt(model, tokenizer, prompt, heat, csv_path=heat_csv,
                       max_new_tokens=cfg.max_new_tokens, title=heat_title)

    steps.run("heatmap", [heat, heat_csv], heatmap, command=[
        "inspect", "--base", str(base), *adapter_flags, "--gate", str(gate / "best"), "--prompt",
        first["question"], "--out", str(heat), "--csv", str(heat_csv),
        "--max-new-tokens", str(cfg.max_new_tokens), "--title", heat_title])

    table = (report / "table.md").read_text(encoding="utf-8")
    summary = {"out_dir": str(out), "seed": seed, "quick": quick, "table": table,
               "scores": {stem: json.loads((results / f"{stem}.json").read_text())["score"] for _, stem, _ in METHODS},
               "timings_s": steps.timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
