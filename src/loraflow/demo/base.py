"""The demo's base model: a real BPE tokenizer and a tiny Llama trained from scratch on CPU.

Both are saved in standard Hugging Face format, so everything downstream (PEFT LoRAs, the
gates, evaluation) treats them exactly like a downloaded checkpoint:

    AutoTokenizer.from_pretrained(out_dir); AutoModelForCausalLM.from_pretrained(out_dir)

torch/transformers/tokenizers are imported inside the functions (the CLI stays fast).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.common.errors import LoraFlowError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_dir`.

    Digits are always split into single tokens (so numbers share their digit embeddings, which
    helps a tiny model with arithmetic), and so are ideographs (each becomes one token once merged). Encoding prepends `<s>`, as Llama's tokenizer does;
    `</s>` ends a document and `<pad>` pads batches (ids 2, 1, 0).

    Args:
        texts: training text, one document per item.
        vocab_size: final vocabulary size including the 256 byte tokens and 3 specials.
        out_dir: where `save_pretrained` writes; `AutoTokenizer.from_pretrained(out_dir)`
            loads it offline.

    Returns:
        The trained `PreTrainedTokenizerFast`.

    Raises:
        ValueError: `vocab_size` too small to hold the byte alphabet and specials.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must be >= 259 (bytes + 3 specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        # each ideograph on its own (text written without spaces is otherwise one "word" per sentence, which BPE
        # learns whole), as tokenizers for Chinese do; BPE then merges each one's UTF-8 bytes into a token
        pre_tokenizers.Split(Regex("[\u3400-\u4dbf\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                 pad_token=PAD, padding_side="left")
    hf.save_pretrained(out_dir)
    return hf


def pack_corpus(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, seq_len: int
                ) -> list[list[int]]:
    """Tokenize each text as `<s> text </s>`, concatenate, cut into `seq_len`-token rows.

    The incomplete tail is dropped.
    """
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def pretrain_base(
    corpus_texts: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | os.PathLike,
    *,
    seed: int,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int | None = None,
    steps: int = 600,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 3e-3,
    warmup: float = 0.05,
    weight_decay: float = 0.1,
    progress: bool = True,
) -> Path:
    """Train a tiny `LlamaForCausalLM` from scratch on `corpus_texts` and save it.

    The corpus is packed into `seq_len`-token rows (`pack_corpus`); each step takes
    `batch_size` rows in a seeded shuffled order (epochs repeat as needed). AdamW
    (betas 0.9/0.95), linear warm-up over `warmup` of the steps then cosine decay to 10% of
    `lr`, gradient clipping at 1.0. Deterministic given `seed` and the thread count.

    Args:
        corpus_texts: documents; see `demo_world.World.pretrain`.
        tokenizer: from `train_tokenizer`; saved next to the model.
        out_dir: receives `config.json`, `model.safetensors`, `generation_config.json` and the
            tokenizer files.
        seed: seeds initialisation and data order.
        hidden, layers, heads, intermediate: model shape (`intermediate` defaults to
            `hidden * 8 // 3` rounded up to a multiple of 32, as in Llama).
        steps, batch_size, seq_len, lr, warmup, weight_decay: optimisation.
        progress: show a tqdm bar with the running loss.

    Returns:
        `out_dir` as a Path.

    Raises:
        LoraFlowError: the corpus is too short for one `seq_len` row.
        ValueError: `hidden` not divisible by `heads`.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    rows = pack_corpus(corpus_texts, tokenizer, seq_len)
    if not rows:
        raise LoraFlowError(f"pretraining corpus is shorter than one sequence of {seq_len} tokens")
    data = torch.tensor(rows, dtype=torch.long)  # (N, seq_len)

    torch.manual_seed(seed)
    intermediate = intermediate or -(-hidden * 8 // 3 // 32) * 32
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=seq_len, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    n_warm = max(1, int(warmup * steps))

    def lr_at(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        t = (step - n_warm) / max(1, steps - n_warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    pos = 0
    bar = tqdm(range(steps), desc="pretrain base", disable=not progress, leave=False)
    for _ in bar:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        batch = data[order[pos:pos + batch_size]]  # (B, T)
        pos += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    out_dir = Path(out_dir)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
