"""`loraflow demo`: the paper's whole table, in miniature, on a CPU in minutes, with no downloads.

A seeded synthetic world (`demo_world`: English and three generated languages in three scripts, math and
code) stands in for the paper's data: a tiny Llama is pretrained on it from scratch (`demo_base`), then
every later step calls the library function behind a `loraflow` command and prints that command, so a
user can re-run or change any step: `train-lora` (five LoRAs: one per language on general foreign text,
math and code on English problems), `train-gate` (one gate per language-task cell on its 200 few-shot
problems, and one gate over all five LoRAs on the six sets pooled), `eval` for every method on every
cell's held-out problems (code answers run in the sandbox, as HumanEval's), `report` for the table and
`inspect` for a math and a code fusion-weight heatmap. A step's output is reused on a re-run only if the
step finished (a completion marker in `.done/`), unless `--force`.
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
from loraflow.evaluation.sandbox import ISOLATION_HELP, ISOLATIONS

TASKS = ("math", "code")
TASK_NAMES = {"math": "Math (MGSM-style)", "code": "Code (HumanEval-style)"}
METHODS = [  # (method, file stem, the single adapter's role in the paper's table)
    ("base", "base", None),
    ("single:lang", "single_lang", "language"),
    ("single:task", "single_task", "task"),
    ("avg", "avg", None),
    ("lorahub", "lorahub", None),
    ("loraflow", "loraflow", None),
]
POOLED = ("pooled", "LoRA-Flow, one gate over all 5 LoRAs")  # (file stem, row label)
HEATMAP_LANG = "lat"  # the heatmaps' language: matplotlib's default font has its letters (not the ideographs)


@dataclass
class DemoConfig:
    """Sizes and steps of one demo run (the full run and `--quick` differ only here)."""

    world: dict = field(default_factory=dict)  # WorldConfig overrides
    vocab_size: int = 1536
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 1000
    pretrain_batch: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_epochs: int = 2
    lora_lr: float = 5e-3
    lora_batch: int = 16
    gate_epochs: int = 15
    gate_lr: float = 3e-2
    gate_batch: int = 8
    pooled_gate_epochs: int = 2  # on the six cells' few-shot sets pooled (6 x 200 examples)
    max_new_tokens: dict = field(default_factory=lambda: {"math": 40, "code": 80})
    eval_batch: int = 125
    lorahub_budget: int = 40


FULL = DemoConfig()
QUICK = DemoConfig(  # every step on a smaller world and shorter training: for CI, not for its numbers
    world={"n_pretrain_base_stories": 300, "n_pretrain_base_general": 500, "n_pretrain_facts": 300,
           "n_pretrain_code": 300, "n_pretrain_foreign_stories": 150, "n_pretrain_foreign_general": 300,
           "n_pretrain_foreign_math": 40, "n_language": 300, "n_task": 300, "n_gate_dev": 10, "n_test_math": 40,
           "n_test_code": 30},
    pretrain_steps=200, lora_epochs=1, gate_epochs=1, pooled_gate_epochs=1, lorahub_budget=4,
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
    quick: bool = option(False, "a smaller, faster run (about 2 min on 2 cores; used by CI)")
    force: bool = option(False, "redo every step instead of reusing finished ones")
    seed: int = option(0, "seeds the world, the base model, training and evaluation")
    isolation: str = option("bwrap", ISOLATION_HELP, choices=ISOLATIONS)


def _print_score(label: str, result: dict | None, log: Callable[[str], None]) -> None:
    if result:
        log(f"  {label}: {result['correct']}/{result['total']} = {100 * result['score']:.1f}%")


def _pool(paths: list[Path]) -> list[dict]:
    """The cells' few-shot (or dev) files as one list of prompt/completion rows (their formats differ per task)."""
    from loraflow.data.formats import load_examples

    pooled = []
    for path in paths:
        for ex in load_examples(path):
            row = {"prompt": ex.prompt, "completion": ex.response}
            if ex.answer is not None:
                row["answer"] = ex.answer
            pooled.append(row)
    return pooled


def run_demo(out_dir: str | os.PathLike = DemoOptions.out, *, seed: int = DemoOptions.seed,
             quick: bool = DemoOptions.quick, force: bool = DemoOptions.force,
             isolation: str = DemoOptions.isolation, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo under `out_dir`; return the table and the paths of the artifacts."""
    require("nevergrad", "matplotlib", what="the demo", extra="demo")  # LoRAHub, the report chart, the heatmap
    import torch

    from loraflow.evaluation.sandbox import isolation_command

    cfg = QUICK if quick else FULL
    out = check_output_dir(out_dir, force=True, what="demo directory")
    marker = out / "demo_config.json"
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():  # even with --force, which redoes steps
        raise LoraFlowError(f"{out}: exists and is not a loraflow demo directory; refusing to write into it "
                            "(choose a new or empty --out, or a previous demo's)")
    isolation_command(isolation)  # the code cells run model-written programs: fail closed before any work
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoraFlowError(f"{out}: cannot create the demo directory ({e.strerror or e})") from None
    wanted = {"seed": seed, "quick": quick, "config": asdict(cfg)}
    if marker.is_file() and json.loads(marker.read_text()) != wanted and not force:
        raise LoraFlowError(f"{out} holds a demo run with other settings; use --force or another --out")
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    torch.manual_seed(seed)
    run = _Run(out, cfg, seed, isolation, _Steps(out, force, log), log, sys.stderr.isatty())
    _make_world(run)
    _make_base(run)
    _train_loras(run)
    _train_gates(run)
    _evaluate_cells(run)
    _write_report(run)
    heatmaps = _heatmaps(run)
    table = (out / "report" / "table.md").read_text(encoding="utf-8")
    scores = {f"{p.parent.name}/{p.stem}": json.loads(p.read_text())["score"]
              for p in sorted((out / "results").glob("*/*.json"))}
    summary = {"out_dir": str(out), "seed": seed, "quick": quick, "table": table, "scores": scores,
               "heatmaps": heatmaps, "timings_s": run.steps.timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class _Run:
    """What every step of one demo run shares: where things go, the sizes, the seed, how steps are run."""

    out: Path
    cfg: DemoConfig
    seed: int
    isolation: str
    steps: _Steps
    log: Callable[[str], None]
    show_progress: bool

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def base(self) -> Path:
        return self.out / "base"

    @property
    def template(self):
        """plain-nl: the question, a newline, the answer."""
        from loraflow.data.config import PromptOptions

        return PromptOptions(template="plain-nl").to_template()

    @property
    def shown(self) -> list[str]:
        """The flags every printed command ends with."""
        return ["--template", "plain-nl", "--seed", str(self.seed)] + ([] if self.show_progress else ["--no-progress"])

    def adapters(self, names) -> list[tuple[str, str]]:
        """(name, path) of the trained LoRAs `names`, in that order."""
        return [(n, str(self.out / "loras" / n / "last")) for n in names]


def _flags(adapters: list[tuple[str, str]]) -> list[str]:
    return [x for name, path in adapters for x in ("--adapter", f"{name}={path}")]


def _cells() -> list[tuple[str, str]]:
    from loraflow.demo.world import LANGUAGE_CODES

    return [(lang, task) for lang in LANGUAGE_CODES for task in TASKS]


def _make_world(run: _Run) -> None:
    """The world's files, and the pooled gate's few-shot and dev sets (the six cells' together, shuffled)."""
    import random

    from loraflow.common.io import write_jsonl_atomic
    from loraflow.demo.world import WorldConfig, build_world

    def make() -> None:
        tmp = run.out / ".data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_world(run.seed, WorldConfig(**run.cfg.world)).write(tmp)
        for split in ("train", "dev"):
            rows = _pool([tmp / split / f"{c}_{t}_{split}.jsonl" for c, t in _cells()])
            random.Random(f"pool-{run.seed}-{split}").shuffle(rows)
            write_jsonl_atomic(tmp / split / f"pooled_{split}.jsonl", rows)
        os.replace(tmp, run.data)

    run.steps.run("world", [run.data], make)


def _make_base(run: _Run) -> None:
    from loraflow.demo import base as demo_base

    cfg = run.cfg

    def make() -> None:
        lines = (run.data / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()
        texts = [json.loads(x)["text"] for x in lines]
        tmp = run.out / ".base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = demo_base.train_tokenizer(texts, cfg.vocab_size, tmp)
        demo_base.pretrain_base(texts, tok, tmp, seed=run.seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                                steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch,
                                seq_len=cfg.pretrain_seq_len, lr=cfg.pretrain_lr, progress=run.show_progress)
        os.replace(tmp, run.base)

    run.steps.run("pretrain base model", [run.base], make)


def _train_loras(run: _Run) -> None:
    """The five LoRAs: one per language on its instructions, math and code on English problems."""
    from loraflow.demo.world import LANGUAGE_CODES
    from loraflow.train.config import LoraTrainConfig
    from loraflow.train.training import train_lora

    cfg = run.cfg
    lora_cfg = LoraTrainConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.05, epochs=cfg.lora_epochs,
                               lr=cfg.lora_lr, batch_size=cfg.lora_batch, max_length=256, select_by="last",
                               seed=run.seed, progress=run.show_progress)
    sources = {**{c: run.data / f"lang_{c}_train.jsonl" for c in LANGUAGE_CODES},
               **{t: run.data / f"{t}_train.jsonl" for t in TASKS}}
    for name, train_file in sources.items():
        target = run.out / "loras" / name
        run.steps.run(f"train {name} LoRA", [target], lambda target=target, train_file=train_file: train_lora(
            str(run.base), train_file, target, config=lora_cfg, template=run.template, r=lora_cfg.rank,
            alpha=lora_cfg.alpha, dropout=lora_cfg.dropout), command=[
            "train-lora", "--base", str(run.base), "--train", str(train_file), "--out", str(target),
            "--rank", str(cfg.lora_rank), "--alpha", str(cfg.lora_alpha), "--dropout", "0.05",
            "--epochs", str(cfg.lora_epochs), "--lr", str(cfg.lora_lr), "--batch-size", str(cfg.lora_batch),
            "--max-length", "256", "--select-by", "last", *run.shown])


def _train_gates(run: _Run) -> None:
    """A gate per cell over its (language, task) LoRAs, and the pooled gate over all five."""
    from loraflow.demo.world import LANGUAGE_CODES
    from loraflow.train.config import GateTrainConfig
    from loraflow.train.training import train_gate

    cfg, data = run.cfg, run.data
    gate_sets = {f"{c}_{t}": ((c, t), f"{c}_{t}", cfg.gate_epochs) for c, t in _cells()}
    gate_sets[POOLED[0]] = ((*LANGUAGE_CODES, *TASKS), "pooled", cfg.pooled_gate_epochs)
    for name, (names, stem, epochs) in gate_sets.items():
        adapters, target = run.adapters(names), run.out / "gates" / name
        train_file, dev_file = data / "train" / f"{stem}_train.jsonl", data / "dev" / f"{stem}_dev.jsonl"
        gate_cfg = GateTrainConfig(epochs=epochs, lr=cfg.gate_lr, batch_size=cfg.gate_batch, max_length=256,
                                   seed=run.seed, progress=run.show_progress)
        run.steps.run(f"train {name} gate", [target], lambda a=adapters, target=target, t=train_file, d=dev_file,
                      c=gate_cfg: train_gate(str(run.base), a, t, target, dev_path=d, config=c, template=run.template),
                      command=["train-gate", "--base", str(run.base), *_flags(adapters), "--train", str(train_file),
                               "--dev", str(dev_file), "--out", str(target), "--epochs", str(epochs),
                               "--lr", str(cfg.gate_lr), "--batch-size", str(cfg.gate_batch), "--max-length", "256",
                               *run.shown])


def _evaluate_cells(run: _Run) -> None:
    """Every method of the paper's table, and the pooled gate, on every cell's held-out problems."""
    from loraflow.demo.world import LANGUAGE_CODES
    from loraflow.evaluation.harness import EvalConfig, evaluate

    cfg = run.cfg
    for lang, task in _cells():
        cell = f"{lang}_{task}"
        test_file, few_shot = run.data / "test" / f"{cell}_test.jsonl", run.data / "train" / f"{cell}_train.jsonl"
        eval_cfg = EvalConfig(task=task, lang=lang, template="plain-nl", max_new_tokens=cfg.max_new_tokens[task],
                              batch_size=cfg.eval_batch, lorahub_budget=cfg.lorahub_budget, seed=run.seed,
                              isolation=run.isolation)
        runs = [(method.replace(":lang", f":{lang}").replace(":task", f":{task}"), stem, role, (lang, task), cell,
                 None) for method, stem, role in METHODS]
        runs.append(("loraflow", POOLED[0], None, (*LANGUAGE_CODES, *TASKS), POOLED[0], POOLED[1]))
        for method, stem, role, names, gate_name, label in runs:
            adapters, target = run.adapters(names), run.out / "results" / cell / f"{stem}.json"
            lorahub = few_shot if method == "lorahub" else None
            gate = run.out / "gates" / gate_name / "best" if method == "loraflow" else None
            more = (["--adapter-role", role] if role else []) + (["--label", label] if label else []) \
                + (["--train", str(lorahub), "--lorahub-budget", str(cfg.lorahub_budget)] if lorahub else []) \
                + (["--gate", str(gate)] if gate else [])
            run.steps.run(f"eval {cell} {stem}", [target, target.with_suffix(".outputs.jsonl")],
                          lambda method=method, target=target, role=role, adapters=adapters, lorahub=lorahub,
                          gate=gate, label=label, eval_cfg=eval_cfg:
                          _print_score(label or method, evaluate(
                              str(run.base), adapters, method, test_file, target, eval_cfg, gate=gate,
                              train_path=lorahub, adapter_role=role, label=label, progress=run.show_progress),
                              run.log),
                          command=["eval", "--base", str(run.base), *_flags(adapters), "--method", method,
                                   "--task", task, "--lang", lang, "--data", str(test_file), "--out", str(target),
                                   "--max-new-tokens", str(cfg.max_new_tokens[task]), "--batch-size",
                                   str(cfg.eval_batch), "--isolation", run.isolation, *more, *run.shown])


def _write_report(run: _Run) -> None:
    """The paper-shaped table (and the paper's published one after it, for comparison)."""
    from loraflow.evaluation.report import write_report

    results, report = run.out / "results", run.out / "report"
    title = f"LoRA-Flow demo (seed {run.seed})"
    task_flags = [x for task, name in TASK_NAMES.items() for x in ("--task-name", f"{task}={name}")]
    run.steps.run("report", [report], lambda: write_report([results], out_dir=report, title=title,
                                                           task_names=TASK_NAMES, paper=True),
                  command=["report", str(results), "--out-dir", str(report), "--title", title, *task_flags, "--paper"])


def _heatmaps(run: _Run) -> dict[str, str]:
    """The fusion-weight heatmap of one held-out math problem and one code problem; {task: PNG path}."""
    from loraflow.core.config import ModelOptions
    from loraflow.core.inspection import inspect_prompt
    from loraflow.data.templates import render_prompt

    heatmaps = {}
    for task in TASKS:
        cell = f"{HEATMAP_LANG}_{task}"
        row = json.loads((run.data / "test" / f"{cell}_test.jsonl").read_text(encoding="utf-8").splitlines()[0])
        question = row["question" if task == "math" else "prompt"]
        heat, heat_csv = run.out / f"fusion_weights_{task}.png", run.out / f"fusion_weights_{task}.csv"
        heat_title = f"Fusion weights on a held-out {HEATMAP_LANG} {task} problem"
        adapters, gate = run.adapters((HEATMAP_LANG, task)), run.out / "gates" / cell / "best"
        max_new = run.cfg.max_new_tokens[task]
        heatmaps[task] = str(heat)

        def heatmap(adapters=adapters, gate=gate, question=question, heat=heat, heat_csv=heat_csv,
                    heat_title=heat_title, max_new=max_new) -> None:
            model, tokenizer = ModelOptions(base=str(run.base), adapter=[f"{n}={p}" for n, p in adapters],
                                            gate=str(gate)).load(seed=run.seed)
            prompt = render_prompt(run.template, tokenizer, question).text
            inspect_prompt(model, tokenizer, prompt, heat, csv_path=heat_csv, max_new_tokens=max_new,
                           title=heat_title)

        run.steps.run(f"heatmap {task}", [heat, heat_csv], heatmap, command=[
            "inspect", "--base", str(run.base), *_flags(adapters), "--gate", str(gate), "--prompt", question,
            "--out", str(heat), "--csv", str(heat_csv), "--max-new-tokens", str(max_new), "--title", heat_title])
    return heatmaps
