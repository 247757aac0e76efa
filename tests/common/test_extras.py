"""Lean installs: the engine imports without any extra, and whatever needs one says which, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraflow.common.errors import LoraFlowError
from loraflow.common.extras import EXTRA_OF, require

# Makes the extras' packages look uninstalled in a fresh interpreter: every import finder is wrapped so that
# it does not find them, so `import fastapi` raises ModuleNotFoundError and importlib.util.find_spec (what
# transformers' availability checks call) returns None, as when the package is absent.
HIDE_EXTRAS = f"""
import sys
HIDDEN = {sorted(EXTRA_OF)!r}

class Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target) if hasattr(self.inner, "find_spec") else None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
for name in [m for m in sys.modules if m.split(".")[0] in HIDDEN]:
    del sys.modules[name]
"""


def run_hidden(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_EXTRAS + code], capture_output=True, text=True, timeout=300)


def test_the_engine_imports_without_extras():
    done = run_hidden(
        "import importlib, importlib.util\n"
        "assert importlib.util.find_spec('fastapi') is None\n"
        "try:\n    import matplotlib\nexcept ModuleNotFoundError:\n    pass\nelse:\n    raise SystemExit('not hidden')\n"
        "import loraflow\n"
        "from loraflow import LoraFlowModel, PromptTemplate, render_prompt, train_gate, train_lora, evaluate\n"
        "from loraflow import score_file, write_report, generate_texts, inspect_prompt, ServeConfig\n"
        "for m in ('loraflow.evaluation.baselines', 'loraflow.evaluation.report', 'loraflow.demo.pipeline',\n"
        "          'loraflow.cli.main'):\n"
        "    importlib.import_module(m)\n"
        "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in HIDDEN))\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok []"


def test_commands_without_their_extra_say_what_to_install_in_one_line(tmp_path):
    missing = "nowhere"  # the extra is checked before any path or model
    commands = [
        ["serve", "--base", missing, "--adapter", f"zh={missing}"],
        ["inspect", "--base", missing, "--adapter", f"zh={missing}", "--prompt", "hi", "--out", str(tmp_path / "w.png")],
        ["eval", "--base", missing, "--adapter", f"zh={missing}", "--adapter", f"math={missing}", "--method", "lorahub",
         "--train", missing, "--task", "math", "--data", missing, "--out", str(tmp_path / "r.json")],
        ["report", missing, "--out-dir", str(tmp_path / "report")],
        ["demo", "--out", str(tmp_path / "demo")],
    ]
    done = run_hidden(
        "from loraflow.cli.main import main\n"
        f"print([main(c) for c in {commands!r}])\n"
        "try:\n    from loraflow import Server\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    codes, library = done.stdout.splitlines()
    assert codes == "[2, 2, 2, 2, 2]"
    assert done.stderr.splitlines() == [
        "loraflow serve: error: serving needs the serve extra (No module named 'fastapi'): pip install 'loraflow[serve]'",
        "loraflow inspect: error: the fusion-weight heatmap needs the eval extra (No module named 'matplotlib'): "
        "pip install 'loraflow[eval]'",
        "loraflow eval: error: --method lorahub needs the eval extra (No module named 'nevergrad'): "
        "pip install 'loraflow[eval]'",
        "loraflow report: error: the report's bar chart (table.png) needs the eval extra (No module named "
        "'matplotlib'): pip install 'loraflow[eval]'",
        "loraflow demo: error: the demo needs the demo extra (No module named 'nevergrad'): pip install 'loraflow[demo]'",
    ]
    assert library == ("LoraFlowError serving needs the serve extra (No module named 'fastapi'): "
                       "pip install 'loraflow[serve]'")
    assert not (tmp_path / "report").exists() and not (tmp_path / "demo").exists()


def test_help_lists_every_command_without_extras():
    done = run_hidden("import sys; sys.argv = ['loraflow', '--help']; from loraflow.cli.main import main; main()")
    assert done.returncode == 0 and "serve" in done.stdout and "report" in done.stdout, done.stderr[-2000:]


def test_require_names_the_extra_of_the_first_missing_module(monkeypatch):
    import json

    assert require("json", what="x") is json
    monkeypatch.setitem(sys.modules, "nevergrad", None)  # import of nevergrad halted: as if not installed
    with pytest.raises(LoraFlowError) as e:
        require("json", "nevergrad", what="the LoRAHub baseline")
    msg = str(e.value)
    assert msg.startswith("the LoRAHub baseline needs the eval extra (") and msg.endswith("pip install 'loraflow[eval]'")
    assert "\n" not in msg
    with pytest.raises(LoraFlowError, match=r"the demo needs the demo extra .*loraflow\[demo\]"):
        require("nevergrad", what="the demo", extra="demo")


def test_library_entry_points_check_their_extra_before_working(monkeypatch, tmp_path):
    from loraflow.evaluation.baselines import lorahub_search
    from loraflow.evaluation.report import write_report

    result = tmp_path / "r.json"
    result.write_text('{"task": "math", "method": "base", "score": 0.5, "correct": 1, "total": 2}')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LoraFlowError, match=r"report's bar chart .*pip install 'loraflow\[eval\]'"):
        write_report([result], out_dir=tmp_path / "report")
    assert not (tmp_path / "report").exists()  # nothing half-written
    assert "| Base |" in write_report([result]).markdown  # the table itself needs no extra
    monkeypatch.setitem(sys.modules, "nevergrad", None)
    with pytest.raises(LoraFlowError, match=r"LoRAHub baseline needs the eval extra"):
        lorahub_search(lambda w: 0.0, 2, budget=1)
