"""EleutherAI's lm-evaluation-harness (the real package) against a running `loraflow serve`.

A log-likelihood (multiple-choice) task and a generation task through `local-completions`, and the
generation task through `local-chat-completions`, each with a served gate as `model`; small task
files and data written here, nothing from the hub. The harness's numbers are checked against the
fused model's own forward (log-likelihoods) and the library's greedy generation (texts).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _missing
from serve_helpers import fusion_alone, load_model, save_tiny_setup

from loraflow.core.fusion_spec import FusionSpec
from loraflow.core.generation import generate_texts
from loraflow.serve import ServeConfig, Server

pytestmark = pytest.mark.slow
GATE = FusionSpec("gate", gate="zh-math")
LOGLIK_TOL = 1e-3  # a sum of a few tokens' log-probs, each within 1e-4 (test_logprobs)


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    try:
        import lm_eval
    except ImportError:
        _missing("lm-evaluation-harness is not installed (pip install -e '.[dev]')")
    return lm_eval


@pytest.fixture(scope="module")
def served(tmp_path_factory, lm_eval):
    """A served tiny setup, its reference model, and a task folder with lf_mc and lf_gen."""
    root = tmp_path_factory.mktemp("lm_eval")
    setup = save_tiny_setup(root)
    mc = [{"question": f"q{i} the answer is", "choices": [" 42", " hello", " world"], "label": i % 3} for i in range(6)]
    gen = [{"question": f"hello world {i}", "answer": "x"} for i in range(4)]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in mc))
    (root / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen))
    tasks = root / "tasks"
    tasks.mkdir()
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "lf_mc.yaml").write_text(
        "task: lf_mc\n" + head.format(root / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    (tasks / "lf_gen.yaml").write_text(
        "task: lf_gen\n" + head.format(root / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    server = Server.from_pretrained(setup["base"], setup["adapters"], gates=setup["gates"], device="cpu",
                                    config=ServeConfig(max_model_len=1024, served_model_name="tiny"))
    with server.running() as url:
        yield {"url": url, "setup": setup, "tasks": tasks, "reference": load_model(setup)}


def _evaluate(lm_eval, served, model: str, endpoint: str, tasks: list[str], **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    args = {"model": "zh-math", "base_url": f"{served['url']}/v1/{endpoint}", "num_concurrent": 2, "max_retries": 1}
    if model == "local-completions":
        args |= {"tokenizer_backend": "huggingface", "tokenizer": str(served["setup"]["base"])}  # a local tokenizer
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(served["tasks"]), include_defaults=False),
                                   **kwargs)


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """What the harness computes, from the fused model's own forward (its _encode_pair split)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with fusion_alone(model, GATE):
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = logprobs[ctx - 1:-1]
    targets = torch.tensor(whole[ctx:])
    return float(rows.gather(1, targets.view(-1, 1)).sum()), bool((rows.argmax(-1) == targets).all())


def _greedy(model, tok, prompt: str) -> str:
    with fusion_alone(model, GATE):
        return generate_texts(model, tok, [prompt], max_new_tokens=8, stop_strings=["\n"])[0].text


def test_local_completions_loglikelihood_and_generation(lm_eval, served):
    out = _evaluate(lm_eval, served, "local-completions", "completions", ["lf_mc", "lf_gen"], batch_size=4)
    model, tok = served["reference"]
    samples = out["samples"]["lf_mc"]
    assert len(samples) == 6
    for sample in samples:
        for (context, continuation), ((got, greedy),) in zip(sample["arguments"], sample["resps"]):
            expected, expected_greedy = _loglikelihood(model, tok, context, continuation)
            assert abs(got - expected) <= LOGLIK_TOL and greedy == expected_greedy
    assert 0.0 <= out["results"]["lf_mc"]["acc,none"] <= 1.0
    gens = out["samples"]["lf_gen"]
    assert [s["resps"][0][0] for s in gens] == [_greedy(model, tok, s["arguments"][0][0]) for s in gens]


def test_local_chat_completions_generation(lm_eval, served):
    out = _evaluate(lm_eval, served, "local-chat-completions", "chat/completions", ["lf_gen"], apply_chat_template=True)
    model, tok = served["reference"]
    gens = out["samples"]["lf_gen"]
    assert len(gens) == 4
    for s in gens:
        context = s["arguments"][0][0]  # the harness's chat request: ((messages as JSON,), gen_kwargs)
        messages = json.loads(context[0] if isinstance(context, (tuple, list)) else context)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert s["resps"][0][0] == _greedy(model, tok, prompt)
