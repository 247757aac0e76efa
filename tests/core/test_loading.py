"""load_base / load_tokenizer: GGUF bases and the errors a user sees before any heavy work."""

from __future__ import annotations

import importlib.util

import pytest

from loraflow.common.errors import LoraFlowError
from loraflow.core.model import load_base, load_tokenizer, split_gguf


def test_split_gguf_accepts_the_file_or_dir_plus_name(tmp_path):
    f = tmp_path / "m.Q4_0.gguf"
    f.write_bytes(b"GGUF")
    assert split_gguf(f) == (str(tmp_path), "m.Q4_0.gguf")
    assert split_gguf(tmp_path, "m.Q4_0.gguf") == (str(tmp_path), "m.Q4_0.gguf")
    assert split_gguf(tmp_path) == (str(tmp_path), None)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(LoraFlowError, match=r"nope\.gguf: GGUF file not found"):
        load_base(tmp_path / "nope.gguf")
    with pytest.raises(LoraFlowError, match=r"nope\.gguf: GGUF file not found"):
        load_tokenizer(tmp_path / "nope.gguf")


def test_gguf_without_the_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    for load in (load_base, load_tokenizer):
        with pytest.raises(LoraFlowError, match=r"m\.gguf: .*needs the `gguf` package \(pip install gguf\)"):
            load(f)
    with pytest.raises(LoraFlowError, match="needs the `gguf` package"):
        load_base(tmp_path, None, {"gguf_file": "m.gguf"})


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(LoraFlowError, match="no config.json"):
        load_base(tmp_path)
