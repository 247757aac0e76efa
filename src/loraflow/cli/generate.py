"""`loraflow generate` and `loraflow inspect`: text and fusion weights from a fused model."""

from __future__ import annotations

import argparse

from loraflow.cli.args import add_options, build
from loraflow.core.config import GenerateOptions, InspectOptions, ModelOptions
from loraflow.core.devices import RuntimeOptions
from loraflow.data.config import PromptChoice


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with k LoRAs fused by a gate",
        description=(
            "Generation with LoRA-Flow: the base model plus k LoRA adapters mixed per token by the gate. "
            "Each --prompt is a question; the prompt template (by default the one the gate was trained with) "
            "turns it into the model's prompt. Greedy unless --do-sample."
        ),
        epilog=(
            "examples:\n  loraflow generate --base llama-2-7b --adapter zh=lora-zh --adapter math=lora-math \\\n"
            "      --gate zh_math.pt --gate-temperature 1.1 --template official --lang zh --task math \\\n"
            "      --prompt '...' --show-weights\n"
            "  loraflow generate --base SmolLM2-135M-Instruct.Q4_1.gguf --adapter zh=lora/zh --adapter math=lora/math \\\n"
            "      --gate gates/zh_math/best --prompt '...' --do-sample --top-p 0.9 --seed 1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, ModelOptions)
    add_options(p, PromptChoice)
    add_options(p, GenerateOptions)
    add_options(p, RuntimeOptions)
    p.set_defaults(func=run_generate)


def read_prompts(opts: GenerateOptions) -> list[str]:
    """The prompts of --prompt, or of --prompts-file (text: one per line; .jsonl: a 'prompt' field)."""
    from pathlib import Path

    from loraflow.common.errors import LoraFlowError

    if opts.prompt:
        return opts.prompt
    path = Path(opts.prompts_file)
    if not path.is_file():
        raise LoraFlowError(f"{path}: prompts file not found")
    if path.suffix == ".jsonl":
        from loraflow.common.io import read_jsonl

        rows = read_jsonl(path)
        missing = [i for i, r in enumerate(rows, 1) if not isinstance(r.get("prompt"), str)]
        if missing:
            raise LoraFlowError(f"{path}: line {missing[0]} has no string 'prompt'")
        return [r["prompt"] for r in rows]
    from loraflow.common.io import read_text_lines

    return [x for x in read_text_lines(path, what="prompts file") if x.strip()]


def render_questions(questions: list[str], choice: PromptChoice, gate, tokenizer, verb: str) -> tuple[list[str], bool]:
    """The prompts for `questions` under the chosen (or the gate's recorded) template; says which."""
    import sys

    from loraflow.core.generation import choose_template
    from loraflow.data.templates import format_warning, render_prompt

    default = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    template, note = choose_template(choice.template, gate, default=default)
    for line in (note, format_warning(template, tokenizer)):
        if line:
            print(f"loraflow {verb}: {line}", file=sys.stderr)
    rendered = [render_prompt(template, tokenizer, q, choice.system, lang=choice.lang, task=choice.task)
                for q in questions]
    return [r.text for r in rendered], rendered[0].add_special_tokens


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from loraflow.common.errors import LoraFlowError
    from loraflow.core.fusion_spec import parse_fusion
    from loraflow.core.generation import generate_texts
    from loraflow.core.inspection import readable_tokens

    build(RuntimeOptions, args).apply()
    model_opts, choice, opts = build(ModelOptions, args), build(PromptChoice, args), build(GenerateOptions, args)
    torch.manual_seed(opts.seed)
    questions = read_prompts(opts)
    if not questions or any(not p.strip() for p in questions):
        raise LoraFlowError("--prompt: empty prompt" if opts.prompt else f"{opts.prompts_file}: no prompts")
    model, tokenizer = model_opts.load(seed=opts.seed)
    prompts, add_special = render_questions(questions, choice, model_opts.gate, tokenizer, "generate")
    model.set_fusion(parse_fusion(opts.mode, model.adapter_names, option="--mode"))
    capture = opts.show_weights and model.fusion_mode == "gate"
    with tqdm(total=len(prompts), desc="generate", unit="prompt", dynamic_ncols=True, leave=False) as bar:
        outs = generate_texts(model, tokenizer, prompts, max_new_tokens=opts.max_new_tokens,
                              batch_size=opts.batch_size, stop_strings=opts.stop, capture_weights=capture,
                              add_special_tokens=add_special, sampling=opts.sampling(), progress=bar.update)
    names = model.adapter_names
    for i, g in enumerate(outs):
        if len(outs) > 1:
            print(f"=== prompt {i + 1}")
        print(g.text)
        if capture and g.weights is not None:
            print("\n" + "token".ljust(16) + "".join(n[:10].rjust(11) for n in names))
            mean = g.weights.mean(0)  # (tokens, k)
            for piece, w in zip(readable_tokens(tokenizer, g.token_ids), mean.tolist()):
                print(piece[:15].ljust(16) + "".join(f"{x:11.3f}" for x in w))
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="draw the per-layer, per-token fusion weights of a generation (heatmap PNG and CSV)",
        description=(
            "Generate greedily from a question (through the prompt template, by default the gate's) with the "
            "gates on and draw, for each adapter, a heatmap of its fusion weight by layer (rows) and generated "
            "token (columns), as in the paper's analysis. Token labels are readable text for any tokenizer."
        ),
        epilog=(
            "example:\n  loraflow inspect --base B --adapter zh=lora/zh --adapter math=lora/math --gate gates/zh_math \\\n"
            "      --prompt '...' --out weights.png --csv weights.csv"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, ModelOptions)
    add_options(p, PromptChoice)
    add_options(p, InspectOptions)
    add_options(p, RuntimeOptions)
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from loraflow.common.extras import require
    from loraflow.common.io import check_output_file
    from loraflow.core.inspection import inspect_prompt

    build(RuntimeOptions, args).apply()
    model_opts, choice, opts = build(ModelOptions, args), build(PromptChoice, args), build(InspectOptions, args)
    require("matplotlib", what="the fusion-weight heatmap")
    check_output_file(opts.out, what="heatmap file", force=opts.force)  # before the model loads and generates
    if opts.csv:
        check_output_file(opts.csv, inputs=[opts.out], what="CSV file", force=opts.force)
    torch.manual_seed(opts.seed)
    model, tokenizer = model_opts.load(seed=opts.seed)
    (prompt,), add_special = render_questions([opts.prompt], choice, model_opts.gate, tokenizer, "inspect")
    trace = inspect_prompt(model, tokenizer, prompt, opts.out, csv_path=opts.csv, max_new_tokens=opts.max_new_tokens,
                           title=opts.title, add_special_tokens=add_special, force=opts.force)
    mean = trace.weights.mean(dim=(0, 1)).tolist()
    summary = ", ".join(f"{n} {w:.3f}" for n, w in zip(trace.adapter_names, mean))
    print(trace.text)
    print(f"{len(trace.tokens)} tokens x {trace.weights.shape[0]} layers; mean weights: {summary}")
    print(f"wrote {opts.out}" + (f" and {opts.csv}" if opts.csv else ""))
    return 0
