"""Rules the test suite itself keeps: official data is required under CI, tests run on one CPU thread, and test
file names are unique."""

from __future__ import annotations

import os

import pytest

import conftest


def test_official_data_is_found_where_loraflow_data_points(monkeypatch, tmp_path):
    """A user's clone has no ../shared: the folder LORAFLOW_DATA names comes first."""
    for split in ("train", "dev", "test"):
        (tmp_path / "LoRAFlow" / "data" / split).mkdir(parents=True)
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "missing")
    monkeypatch.setenv("LORAFLOW_DATA", str(tmp_path / "LoRAFlow" / "data"))
    assert conftest.shared_data_dir() == tmp_path / "LoRAFlow" / "data"


def test_missing_official_data_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "missing")
    monkeypatch.setenv("LORAFLOW_DATA", str(tmp_path / "also-missing"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI=true this is a failure"):
        conftest.shared_data_dir()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="set LORAFLOW_DATA"):
        conftest.shared_data_dir()


def test_torch_runs_on_one_thread():
    import torch

    assert os.environ["OMP_NUM_THREADS"] == "1"
    torch.set_num_threads(4)  # a test that changes it ...


def test_thread_count_is_restored_for_the_next_test():
    import torch

    assert torch.get_num_threads() == 1  # ... does not leak into the next one


def test_test_file_names_are_unique_across_folders():
    """The folders are no packages (pytest's rootdir imports): two test files of one name break collection
    as soon as one run collects both (the vLLM environment runs tests/vllm_plugin with tests/core)."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
