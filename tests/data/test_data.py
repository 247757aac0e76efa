"""Data loading, prompt templates and tokenisation (loraflow.data.formats)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import build_tokenizer
from loraflow.data.formats import (
    IGNORE_INDEX,
    Example,
    PromptTemplate,
    collate,
    encode_example,
    encode_examples,
    encode_prompt,
    load_examples,
)
from loraflow.data.protocol import OFFICIAL_SYSTEM_PROMPTS, official_system_prompt
from loraflow.common.errors import LoraFlowError

LANGS = ("zh", "ru", "es")
CUE = "让我们一步一步地思考。"


def raw_rows(path):
    """The file's JSON objects, read independently of loraflow."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    """Starts sequences with <s> by itself, as Llama's tokenizer (the Llama-2 format's BOS is kept)."""
    return build_tokenizer(add_bos=True)


# ---------------------------------------------------------------- official files


@pytest.mark.parametrize("lang", LANGS)
def test_official_math_train(shared_data, lang):
    path = shared_data / "train" / f"{lang}_math_train.jsonl"
    raw = raw_rows(path)
    exs = load_examples(path)
    assert len(exs) == len(raw) == 200
    assert {e.meta["format"] for e in exs} == {"math_train"}
    for i in (0, 57, 199):
        assert exs[i].prompt == raw[i]["query"]
        assert exs[i].response == raw[i]["response"]
        assert exs[i].answer is None and exs[i].history == () and exs[i].system is None
        assert exs[i].meta["id"] == raw[i]["id"]
        assert exs[i].meta["source"] == f"{path}:{i + 1}"


@pytest.mark.parametrize("lang", LANGS)
def test_official_code_train(shared_data, lang):
    path = shared_data / "train" / f"{lang}_code_train.jsonl"
    raw = raw_rows(path)
    exs = load_examples(path)
    assert len(exs) == len(raw) == 200
    for i in (0, 101, 199):
        q, a = raw[i]["data"]
        assert (exs[i].prompt, exs[i].response, exs[i].history) == (q, a, ())
        assert exs[i].meta["id"] == raw[i]["id"] and exs[i].meta["format"] == "code_train"


@pytest.mark.parametrize("lang", LANGS)
def test_official_math_dev(shared_data, lang):
    path = shared_data / "dev" / f"{lang}_math_dev.jsonl"
    raw = raw_rows(path)
    exs = load_examples(path)
    assert len(exs) == len(raw) == 100
    for i in (0, 42, 99):
        assert exs[i].prompt == raw[i]["question"]
        assert exs[i].response == raw[i]["answer"]  # the full translated solution
        gold = raw[i]["original_response"].rsplit("The answer is:", 1)[1].strip()
        assert exs[i].answer == gold
    assert all(e.answer for e in exs)
    if lang == "zh":  # spot value, read off the file by hand
        assert exs[0].answer == "3" and exs[0].prompt.startswith("方程 $x^2 + 15x - 54=0$")


@pytest.mark.parametrize("lang", LANGS)
def test_official_code_dev(shared_data, lang):
    path = shared_data / "dev" / f"{lang}_code_dev.jsonl"
    raw = raw_rows(path)
    exs = load_examples(path)
    assert len(exs) == len(raw) == 20  # the code dev sets hold 20 MBPP problems, not 100
    for i in (0, 19):
        assert exs[i].prompt == raw[i]["text"]
        assert exs[i].response == raw[i]["code"]
        assert exs[i].meta["test_list"] == raw[i]["test_list"]
        assert exs[i].meta["task_id"] == raw[i]["task_id"]
        assert exs[i].answer is None


def test_mgsm_style_file_has_short_gold_answer(shared_data):
    exs = load_examples(shared_data / "test" / "zh_math_test.jsonl")
    assert len(exs) == 250
    assert exs[0].answer == exs[0].response == "18"


def test_official_system_prompts_match_json(shared_data):
    with open(shared_data / "system_prompts.json", encoding="utf-8") as f:
        official = json.load(f)
    assert OFFICIAL_SYSTEM_PROMPTS == official
    for key, text in official.items():
        lang, task = key.split("_")
        assert official_system_prompt(lang, task) == text
    with pytest.raises(LoraFlowError, match="fr"):
        official_system_prompt("fr", "math")


# ---------------------------------------------------------------- generic formats and errors


def test_prompt_completion_format(tmp_path):
    path = write_lines(tmp_path / "pc.jsonl", [
        json.dumps({"prompt": "2+2?", "completion": "4", "answer": 4, "id": "a"}),
        "",
        json.dumps({"prompt": "hi", "completion": "hello", "system": "Be brief."}),
    ])
    exs = load_examples(path)
    assert [(e.prompt, e.response, e.answer, e.system) for e in exs] == [
        ("2+2?", "4", "4", None), ("hi", "hello", None, "Be brief."),
    ]
    assert exs[0].meta["id"] == "a" and exs[1].meta["source"] == f"{path}:3"  # empty line 2 skipped


def test_messages_format(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]}), json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]})])
    first, second = load_examples(path)
    assert (first.prompt, first.response, first.system, first.history) == ("u2", "a2", "SYS", (("u1", "a1"),))
    assert (second.prompt, second.response, second.system, second.history) == ("q", "r", None, ())
    # multi-turn llama2 rendering: Meta's format, the example's system prompt overrides the template's
    assert PromptTemplate(system="other").render(first) == (
        "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]a2 </s>"
    )


@pytest.mark.parametrize("line, problem", [
    ('{"query": "q", "response": "r"', "malformed JSON"),
    ('{"query": "q"}', "missing key 'response'"),
    ('{"query": "q", "response": 3}', "'response' must be a string"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
    good = json.dumps({"query": "q", "response": "r"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", good, line, good])
    with pytest.raises(LoraFlowError) as err:
        load_examples(path)
    assert f"{path}:4: " in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("row, problem", [
    ({"data": ["only a question"]}, "'data' must be a list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "must alternate"),
    ({"question": "q", "answer": "a", "original_response": "no final line"}, "The answer is"),
    ({"foo": 1}, "cannot detect the data format"),
])
def test_bad_rows_per_format(tmp_path, row, problem):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(row)])
    with pytest.raises(LoraFlowError, match=re.escape(f"{path}:1: ")) as err:
        load_examples(path)
    assert problem in str(err.value)


def test_explicit_format_and_unknown_format(tmp_path, shared_data):
    path = shared_data / "train" / "zh_math_train.jsonl"
    with pytest.raises(LoraFlowError, match=re.escape(f"{path}:1: missing key 'text'")):
        load_examples(path, fmt="mbpp")
    assert len(load_examples(path, fmt="math_train")) == 200
    with pytest.raises(LoraFlowError, match="unknown data format"):
        load_examples(path, fmt="alpaca")
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(LoraFlowError, match="no examples"):
        load_examples(empty)
    with pytest.raises(LoraFlowError, match="file not found"):
        load_examples(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- templates


EX = Example(prompt="What is 2+3?", response="The answer is: 5")


def test_llama2_template_strings():
    assert PromptTemplate().render(EX) == "<s>[INST] What is 2+3? [/INST]The answer is: 5 </s>"
    assert PromptTemplate().render(EX, with_response=False) == "<s>[INST] What is 2+3? [/INST]"
    assert PromptTemplate(system="Be helpful.").render(EX) == (
        "<s>[INST] <<SYS>>\nBe helpful.\n<</SYS>>\n\nWhat is 2+3? [/INST]The answer is: 5 </s>"
    )
    assert PromptTemplate(cue=CUE).render(EX) == (
        "<s>[INST] What is 2+3? [/INST]让我们一步一步地思考。The answer is: 5 </s>"
    )
    # presets: released script = no system prompt + cue; paper = official system prompt, no cue
    assert PromptTemplate.released() == PromptTemplate(kind="llama2", system=None, cue=CUE, name="released")
    assert PromptTemplate.from_record({**vars(PromptTemplate.released()), "extra": 1}) == PromptTemplate.released()
    assert PromptTemplate.released().render(EX, with_response=False) == (
        "<s>[INST] What is 2+3? [/INST]让我们一步一步地思考。"
    )
    assert PromptTemplate.paper("es", "code").render(EX, with_response=False) == (
        "<s>[INST] <<SYS>>\nCrear un script de Python para este problema\n<</SYS>>\n\nWhat is 2+3? [/INST]"
    )
    assert PromptTemplate.from_preset("paper", lang="zh", task="math").system.startswith("你是中文人工智能助手")
    assert PromptTemplate.from_preset("official", lang="zh", task="math") == PromptTemplate.paper("zh", "math")
    assert PromptTemplate(kind="plain").render(EX) == "What is 2+3?The answer is: 5</s>"  # verbatim
    assert PromptTemplate(kind="plain-nl").render(EX) == "What is 2+3?\nThe answer is: 5</s>"


@pytest.mark.parametrize("kwargs, name", [
    ({"kind": "alpaca"}, "kind"), ({"system": ""}, "system"), ({"system": 3}, "system"), ({"cue": None}, "cue"),
])
def test_template_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PromptTemplate(**kwargs)
    with pytest.raises(LoraFlowError, match="needs lang and task"):
        PromptTemplate.from_preset("paper")


# ---------------------------------------------------------------- tokenisation


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("template", [PromptTemplate(), PromptTemplate.released(), PromptTemplate.paper("zh", "math")])
def test_labels_mask_exactly_the_prompt(tok, template):
    item = encode_example(EX, tok, template, max_length=4096)
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) == len(labels) == len(item["attention_mask"]) and set(item["attention_mask"]) == {1}
    n_prompt = len(encode_prompt(EX, tok, template))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and IGNORE_INDEX not in labels[n_prompt:]
    assert decode(tok, labels[n_prompt:]) == "The answer is: 5 </s>"
    assert decode(tok, ids[:n_prompt]) == template.render(EX, with_response=False)
    # one BOS (first), one EOS (last): the literal <s>/</s> are not tokenised a second time
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    # same ids as tokenising the literal reference string (this tokenizer maps <s>, </s> to specials)
    assert ids == tok(template.render(EX), add_special_tokens=False)["input_ids"]


def test_plain_template_tokens(tok):
    item = encode_example(EX, tok, PromptTemplate(kind="plain-nl"), max_length=64)
    ids, labels = item["input_ids"], item["labels"]
    assert tok.bos_token_id not in ids and ids[-1] == tok.eos_token_id
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert decode(tok, kept) == "The answer is: 5</s>"
    assert decode(tok, ids[: len(ids) - len(kept)]) == "What is 2+3?\n"


def test_truncation_keeps_prompt(tok):
    template = PromptTemplate()
    full = encode_example(EX, tok, template, max_length=4096)
    n_prompt = len(encode_prompt(EX, tok, template))
    assert len(full["input_ids"]) > n_prompt + 3
    cut = encode_example(EX, tok, template, max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"] == [IGNORE_INDEX] * n_prompt + full["input_ids"][n_prompt : n_prompt + 3]
    # the prompt alone too long: cut, warned, counted, no label left
    with pytest.warns(UserWarning, match="prompt alone"):
        over = encode_example(EX, tok, template, max_length=n_prompt - 2)
    assert over["input_ids"] == full["input_ids"][: n_prompt - 2] and set(over["labels"]) == {IGNORE_INDEX}
    ds = encode_examples([EX, Example("q", "r"), EX], tok, template, max_length=n_prompt + 3)
    assert (len(ds), ds.num_truncated, ds.num_prompt_overflow) == (3, 2, 0)
    ds = encode_examples([EX], tok, template, max_length=n_prompt)
    assert (ds.num_truncated, ds.num_prompt_overflow) == (1, 1)
    with pytest.raises(ValueError, match="max_length"):
        encode_example(EX, tok, template, max_length=0)


def test_markers_use_the_tokenizers_own_bos_eos():
    """With BOS/EOS spelled otherwise (as Llama-3's), no literal `<s>`/`</s>` may reach the ids."""
    other = build_tokenizer()
    other.add_special_tokens({"bos_token": "<|begin|>", "eos_token": "<|end|>"})
    other._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", other.bos_token_id)])
    old = {other.convert_tokens_to_ids("<s>"), other.convert_tokens_to_ids("</s>")}
    ids = encode_example(EX, other, PromptTemplate.released(), max_length=256)["input_ids"]
    assert ids[0] == other.bos_token_id and ids[-1] == other.eos_token_id
    assert not old & set(ids) and "<s>" not in decode(other, ids) and "</s>" not in decode(other, ids)
    assert PromptTemplate().render(EX, other) == "<|begin|>[INST] What is 2+3? [/INST]The answer is: 5 <|end|>"


def test_bos_only_for_tokenizers_that_start_with_it(tok):
    """GPT-2/Qwen/SmolLM2-style tokenizers add no BOS: the Llama-2 format's <s> is left out for them
    (SmolLM2's bos_token is <|im_start|>, which must not open a Llama-2 prompt)."""
    no_auto = build_tokenizer()  # has bos_token <s> but does not add it
    ids = encode_example(EX, no_auto, PromptTemplate(), max_length=64)["input_ids"]
    assert no_auto.bos_token_id not in ids
    assert ids == tok(PromptTemplate().render(EX)[len("<s>"):], add_special_tokens=False)["input_ids"]
    assert PromptTemplate().render(EX, no_auto) == "[INST] What is 2+3? [/INST]The answer is: 5 </s>"
    no_bos = build_tokenizer()
    no_bos.bos_token = None
    assert encode_example(EX, no_bos, PromptTemplate(), max_length=64)["input_ids"] == ids
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(LoraFlowError, match="EOS"):
        encode_example(EX, no_eos, PromptTemplate(kind="plain"), max_length=64)


def test_collate_pads_right_and_left():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": [8], "labels": [8], "attention_mask": [1]},
    ]
    right = collate(batch, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate(batch, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert str(right["input_ids"].dtype) == "torch.int64"
    with pytest.raises(ValueError, match="padding_side"):
        collate(batch, pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_id"):
        collate(batch, pad_id=None)


# ---------------------------------------------------------------- chat template path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def test_chat_template_path():
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ex = Example(prompt="hi there", response="hello world", system="SYS", history=(("a", "b"),))
    template = PromptTemplate(kind="chat", system="ignored: the example has its own")
    assert template.render(ex, tok, with_response=False) == (
        "<|system|>\nSYS\n<|user|>\na\n<|assistant|>\nb</s>\n<|user|>\nhi there\n<|assistant|>\n"
    )
    item = encode_example(ex, tok, template, max_length=256)
    kept = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert decode(tok, kept) == "hello world</s>\n"  # the template's own end of turn, no extra EOS
    assert item["input_ids"].count(tok.eos_token_id) == 2  # one per assistant turn
    n_prompt = len(item["input_ids"]) - len(kept)
    assert item["input_ids"][:n_prompt] == encode_prompt(ex, tok, template)
    # template system prompt used when the example has none; cue goes after the generation prompt
    cue = PromptTemplate(kind="chat", system="S2", cue="Step by step. ")
    assert cue.render(Example("q", "r"), tok) == "<|system|>\nS2\n<|user|>\nq\n<|assistant|>\nStep by step. r</s>\n"


def test_chat_template_missing_or_unusable(tok):
    with pytest.raises(LoraFlowError, match="no chat template"):
        encode_example(EX, tok, PromptTemplate(kind="chat"), max_length=64)
    odd = build_tokenizer()  # renders the generation prompt differently from the full conversation
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(LoraFlowError, match="prefix"):
        encode_example(EX, odd, PromptTemplate(kind="chat"), max_length=64)


def test_import_is_cheap():
    import subprocess

    code = "import sys, loraflow.data.formats; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
