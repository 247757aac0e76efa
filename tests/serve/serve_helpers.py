"""Shared builders for the serve tests: a tiny base with a chat template, two LoRAs, fusion contexts."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_tiny_model, build_tokenizer, make_peft_adapter

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def save_tiny_setup(root: Path, *, chat_template: bool = True, tokenizer=None) -> dict:
    """A tiny Llama (with tokenizer, the suite's byte-level BPE by default) in root/base and PEFT adapters
    root/zh, root/math; returns the paths."""
    tokenizer = tokenizer or build_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    make_peft_adapter(model, root / "zh", seed=1)
    make_peft_adapter(model, root / "math", seed=2, r=8)
    adapters = {"zh": root / "zh", "math": root / "math"}
    gates = {}
    for name, seed in (("zh-math", 3), ("g2", 4)):  # random gates whose weights vary from token to token
        from loraflow.core.model import LoraFlowModel

        LoraFlowModel.from_pretrained(root / "base", adapters, seed=seed, gate_init_std=0.5).save_gate(root / name)
        gates[name] = root / name
    return {"base": root / "base", "adapters": adapters, "gates": gates}


def load_model(setup: dict):
    """The same model a server loads from `setup`: both gates by name, the first the default."""
    from loraflow.core.model import LoraFlowModel, load_tokenizer

    (first, path), *rest = setup["gates"].items()
    model = LoraFlowModel.from_pretrained(setup["base"], setup["adapters"], path, gate_name=first, seed=0)
    for name, path in rest:
        model.add_gate(name, path)
    return model.eval(), load_tokenizer(setup["base"])


def fusion_alone(model, spec):
    """Run the whole model with one fusion (the reference a batched row must match)."""
    return model.fusion(spec)


# words, spaced punctuation for the cleanup, characters outside ASCII
CORPUS = ["hello world, the cat sat on the mat.", "don't stop : it 's here !", "naïve café über",
          "the quick brown fox jumps over the lazy dog ?", "what 's up , doc ? I ' m here ."] * 5


def llama_byte_fallback_tokenizer():
    """transformers' LlamaTokenizer (BPE, byte fallback, SentencePiece's leading-space strip) trained on CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    vocab = dict(trained["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges)


def unigram_cleanup_tokenizer():
    """A Unigram with byte fallback whose decode cleans up tokenization spaces (" ." -> ".")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    pieces += [(c, -5.0) for c in sorted(set("".join(CORPUS)) - {" "})] + [("▁", -3.0)]
    pieces += [("▁" + w, -2.0) for w in ("the", "hello", "world", "'s", "n't", "n", "'", ".", ",", "?", "!", "'m", "don")]
    uni = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    uni.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=True)
