"""generate_texts: sampling settings, per-example progress."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from loraflow.common.errors import LoraFlowError
from loraflow.core.generation import Sampling, generate_texts


@pytest.fixture(scope="module")
def lm(tokenizer=None):
    from conftest import build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked enough that greedy and sampling differ visibly
    return model, tok


PROMPTS = ["hello world", "the answer is", "hola mundo, la respuesta es 5"]


def test_top_k_1_sampling_is_greedy_and_seeded_sampling_repeats(lm):
    model, tok = lm
    greedy = [g.token_ids for g in generate_texts(model, tok, PROMPTS, max_new_tokens=6, batch_size=2)]
    torch.manual_seed(0)
    top1 = generate_texts(model, tok, PROMPTS, max_new_tokens=6, batch_size=2,
                          sampling=Sampling(do_sample=True, temperature=0.7, top_k=1))
    assert [g.token_ids for g in top1] == greedy
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append([g.token_ids for g in generate_texts(model, tok, PROMPTS, max_new_tokens=6, batch_size=2,
                                                          sampling=Sampling(do_sample=True, temperature=5.0))])
    assert draws[0] == draws[1] and draws[0] != draws[2] and draws[0] != greedy


@pytest.mark.parametrize("kwargs, flag", [
    ({"temperature": 0}, "--sampling-temperature"), ({"temperature": float("nan")}, "--sampling-temperature"),
    ({"top_p": 0}, "--top-p"), ({"top_p": 1.5}, "--top-p"), ({"top_k": -1}, "--top-k"), ({"top_k": 2.5}, "--top-k"),
])
def test_bad_sampling_settings_are_named(kwargs, flag):
    with pytest.raises(LoraFlowError, match=flag):
        Sampling(do_sample=True, **kwargs)


def test_progress_counts_every_example_once(lm):
    model, tok = lm
    seen = []
    outs = generate_texts(model, tok, PROMPTS * 2, max_new_tokens=5, batch_size=4, progress=seen.append)
    assert sum(seen) == len(outs) == 6 and all(n >= 1 for n in seen)


def test_progress_moves_when_a_row_finishes_not_at_batch_end(lm):
    from conftest import build_tokenizer

    model, tok = lm
    first = generate_texts(model, tok, PROMPTS, max_new_tokens=4, batch_size=3)
    stop_id = first[0].token_ids[0]
    others = [g.token_ids for g in first[1:]]
    if any(stop_id in ids for ids in others):
        pytest.skip("the tiny model's first token of row 0 also ends another row")
    tok2 = build_tokenizer()
    tok2.eos_token = tok2.convert_ids_to_tokens(stop_id)  # row 0 now ends after its first step
    seen = []
    outs = generate_texts(model, tok2, PROMPTS, max_new_tokens=4, batch_size=3, progress=seen.append)
    assert outs[0].token_ids == [] and seen == [1, 2]


def test_a_character_cut_by_max_new_tokens_leaves_no_replacement_char(lm):
    from conftest import build_tokenizer

    model, _ = lm
    tok = build_tokenizer()
    ids = tok("猫", add_special_tokens=False)["input_ids"]  # not in its training text: split into bytes
    assert "\ufffd" in tok.decode(ids[:1])  # byte-level BPE: the first token is part of a character

    class Echo(torch.nn.Module):  # "generates" exactly the first byte token of 猫
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, torch.tensor([[ids[0]]] * input_ids.shape[0])], dim=1)

    out = generate_texts(Echo(), tok, ["q"], max_new_tokens=1)[0]
    assert out.token_ids == ids[:1] and out.text == ""
