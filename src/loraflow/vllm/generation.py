"""Greedy generation through vLLM (in this process) for `loraflow eval --engine vllm`.

The prompts are tokenized by loraflow's tokenizer exactly as the default engine does, and each output is
decoded and cut at the stop strings the same way, so equal greedy tokens give equal texts and scores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from loraflow.common.errors import LoraFlowError
from loraflow.vllm.versions import INSTALL_HINT


def require_vllm():
    """vLLM, or a one-line LoraFlowError saying what to install."""
    from loraflow.vllm.versions import check_vllm_install

    check_vllm_install()  # before importing it: a broken mix fails there with a less helpful message
    try:
        import vllm
    except ImportError:
        raise LoraFlowError(f"--engine vllm needs vLLM in this Python, which does not have it: {INSTALL_HINT}") from None
    return vllm


def generate_with_vllm(base: str | os.PathLike, adapters: Sequence[tuple[str, str]], fusion: str,
                       prompts: Sequence[str], tokenizer, *, gate: str | os.PathLike | None = None,
                       temperature: float | None = None, max_new_tokens: int, stop_strings: Sequence[str] = (),
                       add_special_tokens: bool = False, dtype: str | None = None,
                       llm_kwargs: Mapping | None = None) -> list[str]:
    """Each prompt's greedy completion under `fusion` (e.g. `gate`, `single:zh`, `static:0.5,0.5`, `off`).

    Args:
        base: a transformers model directory (safetensors) of a supported architecture.
        adapters: (name, PEFT dir) pairs in gate order; gate: the gate for fusion `gate` (served as `gate`).
        temperature: the gate's softmax temperature (default: its own).
        dtype: float32, bfloat16, float16, auto (as `--dtype`), or None for the checkpoint's (see `vllm_dtype`).
        llm_kwargs: more `vllm.LLM` arguments (e.g. tensor_parallel_size, gpu_memory_utilization).
    """
    vllm = require_vllm()
    from loraflow.data.protocol import truncate_at_stop
    from loraflow.vllm.prepare import prepare_model_dir, vllm_dtype
    from loraflow.vllm.requests import VllmFusions

    gates = {"gate": gate} if gate is not None else {}
    temperatures = {"gate": temperature} if gate is not None and temperature is not None else None
    with tempfile.TemporaryDirectory(prefix="loraflow-vllm-eval-") as tmp:
        model_dir = prepare_model_dir(Path(tmp) / "model", base, list(adapters), gates, temperatures=temperatures)
        fusions = VllmFusions.from_model_dir(model_dir)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop_strings) or None,
                                     skip_special_tokens=True)
        encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
        requests = [fusions.request(ids, fusion, params) for ids in encoded]
        llm = vllm.LLM(model=str(model_dir), dtype=vllm_dtype(dtype, model_dir), seed=0, **dict(llm_kwargs or {}))
        try:
            outs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
        finally:
            del llm
    if len(outs) != len(prompts):
        raise LoraFlowError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    texts = []
    for out in outs:
        ids = []
        for t in out.outputs[0].token_ids:  # up to the first end-of-sequence token, as the default engine
            if t in eos_ids:
                break
            ids.append(t)
        texts.append(truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd"), stop_strings))
    return texts
