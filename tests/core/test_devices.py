"""Devices, dtypes, threads and quiet output: `auto` everywhere, bad values named before any work."""

from __future__ import annotations

import pytest
import torch

from loraflow.common.errors import LoraFlowError
from loraflow.core.devices import RuntimeOptions, quiet_libraries, resolve_device, resolve_dtype, set_threads


def test_auto_device_and_dtype_follow_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    assert resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(LoraFlowError, match="CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda") is torch.float32
    with pytest.raises(LoraFlowError, match="has 1 CUDA device"):
        resolve_device("cuda:3")


def test_bad_device_dtype_threads_are_named():
    with pytest.raises(LoraFlowError, match="--device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(LoraFlowError, match="--dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16 and resolve_dtype(None, "cpu") is None
    for bad in (0, -2, 1.5, True):
        with pytest.raises(LoraFlowError, match="--threads"):
            set_threads(bad)
        with pytest.raises(ValueError, match="threads"):
            RuntimeOptions(threads=bad)


def test_threads_are_set():
    before = torch.get_num_threads()
    try:
        RuntimeOptions(threads=2).apply()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        quiet_libraries(verbose=False)


def test_quiet_hides_transformers_bars_and_verbose_brings_them_back():
    import warnings

    from transformers.utils import logging as hf_logging

    try:
        quiet_libraries(verbose=False)
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet_libraries(verbose=False)  # filters are inserted in front of the default
            warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.models.x")
        assert not caught
        quiet_libraries(verbose=True)
        assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()


def test_gate_temperature_flag_and_deprecated_alias(capsys):
    from loraflow.cli.args import build
    from loraflow.cli.main import build_parser
    from loraflow.core.config import ModelOptions

    parser = build_parser()
    args = parser.parse_args(["generate", "--base", "b", "--prompt", "q", "--gate-temperature", "1.1"])
    assert build(ModelOptions, args).temperature == 1.1
    args = parser.parse_args(["generate", "--base", "b", "--prompt", "q", "--temperature", "1.3"])
    with pytest.warns(FutureWarning, match="--gate-temperature"):
        assert build(ModelOptions, args).temperature == 1.3
    args = parser.parse_args(["generate", "--base", "b", "--prompt", "q"])
    opts = build(ModelOptions, args)
    assert (opts.device, opts.dtype) == ("auto", "auto")
    args = parser.parse_args(["generate", "--base", "d", "--gguf-file", "m.gguf", "--prompt", "q"])
    assert build(ModelOptions, args).base_path.replace("\\", "/") == "d/m.gguf"
