"""Rules the test suite itself keeps: official data is required under CI, and tests run on one CPU thread."""

from __future__ import annotations

import os

import pytest

import conftest


def test_missing_official_data_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "missing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI=true this is a failure"):
        conftest.shared_data_dir()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        conftest.shared_data_dir()


def test_torch_runs_on_one_thread():
    import torch

    assert os.environ["OMP_NUM_THREADS"] == "1"
    torch.set_num_threads(4)  # a test that changes it ...


def test_thread_count_is_restored_for_the_next_test():
    import torch

    assert torch.get_num_threads() == 1  # ... does not leak into the next one
