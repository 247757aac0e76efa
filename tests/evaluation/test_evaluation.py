"""`loraflow eval` end to end on a tiny model: every method, math and code, audit files, processes."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from loraflow.cli import main


@pytest.fixture
def math_test(tmp_path):
    rows = [{"question": f"小明有{i}个苹果，又买了{i + 1}个。他现在有几个？", "answer": str(2 * i + 1)} for i in range(4)]
    path = tmp_path / "zh_math_test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _eval(d, method, out, *extra):
    return main(["eval", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
                 "--method", method, "--task", "math", "--lang", "zh", "--data", str(d / "zh_math_test.jsonl"),
                 "--out", str(out), "--max-new-tokens", "6", "--no-progress", *extra])


@pytest.mark.parametrize("method", ["base", "single:zh", "avg", "static:0.3,0.7", "loraflow", "lorahub"])
def test_eval_every_method_writes_auditable_result(saved_base, math_test, method, capsys):
    d = saved_base
    extra = []
    if method == "loraflow":
        from loraflow import LoraFlowModel

        LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh", "math": d / "math"}, seed=0).save_gate(d / "g")
        extra = ["--gate", str(d / "g")]
    if method == "lorahub":
        (d / "few.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "response": "a"}) + "\n" for i in range(4)))
        extra = ["--train", str(d / "few.jsonl"), "--lorahub-budget", "4"]
    out = d / "res" / "RESULT.json"
    assert _eval(d, method, out, *extra) == 0
    res = json.loads(out.read_text())
    assert res["method"] == method and res["task"] == "math" and res["lang"] == "zh"
    assert res["total"] == 4 and res["score"] == res["correct"] / 4
    assert len(res["examples"]) == 4 and "versions" in res and res["seed"] == 0
    preds = [json.loads(x) for x in (d / "res" / res["predictions"]).read_text().splitlines()]
    assert len(preds) == 4 and all("output" in p for p in preds)
    assert preds[0]["prompt"].startswith("[INST] <<SYS>>\n你是中文人工智能助手")
    if method == "avg":
        assert res["static_weights"] == [0.5, 0.5]
    if method == "lorahub":
        assert len(res["lorahub"]["history"]) == 4 and res["static_weights"] == res["lorahub"]["weights"]
    # the saved outputs re-score to the same numbers with `loraflow score`
    assert main(["score", "--task", "math", "--data", str(math_test), "--predictions",
                 str(d / "res" / res["predictions"]), "--out", str(d / "rescored.json")]) == 0
    assert json.loads((d / "rescored.json").read_text())["correct"] == res["correct"]


def test_methods_differ_and_single_equals_static_onehot(saved_base, math_test):
    d = saved_base
    outs = {}
    for method in ["base", "single:math", "static:0,1"]:
        assert _eval(d, method, d / f"{method.replace(':', '_')}.json", "--max-new-tokens", "8") == 0
        outs[method] = [json.loads(x)["output"] for x in
                        (d / f"{method.replace(':', '_')}.outputs.jsonl").read_text().splitlines()]
    assert outs["single:math"] == outs["static:0,1"]
    assert outs["single:math"] != outs["base"]


def test_code_eval_scores_by_execution(saved_base, shared_data, tmp_path):
    rows = [json.loads(x) for x in (shared_data / "test" / "es_code_test.jsonl").read_text().splitlines()[:2]]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    d = saved_base
    out = tmp_path / "code.json"
    assert main(["eval", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--method", "single:zh",
                 "--task", "code", "--lang", "es", "--data", str(path), "--out", str(out), "--max-new-tokens", "5",
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["total"] == 2 and res["correct"] == 0  # a random tiny model writes no working program
    assert {e["status"] for e in res["examples"]} <= {"failed", "error", "timeout"}
    preds = [json.loads(x) for x in (tmp_path / "code.outputs.jsonl").read_text().splitlines()]
    assert preds[0]["prompt"].startswith("[INSTCrear un script de Python para este problema:\n") is False
    assert preds[0]["prompt"].startswith("[INST]Crear un script de Python para este problema:\n")


def test_bad_method_and_missing_gate_are_clean_errors(saved_base, math_test, capsys):
    d = saved_base
    assert _eval(d, "static:1", d / "r.json") == 2
    assert "1 weights for 2 adapters" in capsys.readouterr().err
    assert _eval(d, "loraflow", d / "r.json") == 2
    assert "--gate" in capsys.readouterr().err
    assert _eval(d, "single:xx", d / "r.json") == 2
    assert not (d / "r.json").exists()


def test_two_processes_give_identical_results(saved_base, math_test):
    d = saved_base
    args = ["eval", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
            "--method", "avg", "--task", "math", "--lang", "zh", "--data", str(math_test), "--max-new-tokens", "6",
            "--batch-size", "1", "--no-progress"]
    run_cli([*args, "--out", str(d / "one.json")])
    run_cli([*args, "--out", str(d / "two.json")], processes=2)
    a, b = json.loads((d / "one.json").read_text()), json.loads((d / "two.json").read_text())
    assert b["num_processes"] == 2 and a["num_processes"] == 1
    assert a["examples"] == b["examples"] and a["score"] == b["score"]
    assert (d / "one.outputs.jsonl").read_text() == (d / "two.outputs.jsonl").read_text()


# ----------------------------------------------------------------------------- hostile inputs (#9)
@pytest.mark.parametrize("extra,needle", [
    (["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["--temperature", "0"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"), (["--timeout", "nan"], "--timeout"), (["--timeout", "inf"], "--timeout"),
    (["--lorahub-budget", "0"], "--lorahub-budget"), (["--workers", "0"], "--workers"),
    (["--device", "tpu:7"], "tpu:7"), (["--device", "cuda:0"], "cuda"), (["--isolation", "none"], None),
])
def test_bad_options_fail_before_any_work(saved_base, math_test, extra, needle, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = saved_base
    out = d / "res" / "r.json"
    if needle is None:  # a valid option, for contrast: the same command succeeds
        assert _eval(d, "avg", out, *extra) == 0
        return
    assert _eval(d, "avg", out, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (d / "res").exists()


def test_outputs_are_checked_before_generation_and_inputs_never_overwritten(saved_base, math_test, capsys,
                                                                            monkeypatch):
    import loraflow.evaluation.harness as harness

    def no_model(*a, **k):
        raise AssertionError("the model was built before the output path was checked")

    monkeypatch.setattr(harness, "_build_model", no_model)
    d = saved_base
    before = math_test.read_bytes()
    (d / "afile").write_text("x")
    for out, needle in [(math_test, "input of this run"), (d / "zh_math_test.outputs.jsonl", None),
                        (d / "afile" / "r.json", "is a file"), ("/proc/self/r.json", "/proc"),
                        (d, "is a directory")]:
        if needle is None:  # RESULT.outputs.jsonl of --out would be the test set
            math_test.rename(d / "zh_math_test.outputs.jsonl")
            rc = main(["eval", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--method", "base",
                       "--task", "math", "--lang", "zh", "--data", str(d / "zh_math_test.outputs.jsonl"),
                       "--out", str(d / "zh_math_test.json"), "--no-progress"])
            (d / "zh_math_test.outputs.jsonl").rename(math_test)
            needle = "input of this run"
        else:
            rc = _eval(d, "avg", out)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert math_test.read_bytes() == before


def test_eval_accepts_a_training_output_directory_as_gate(saved_base, math_test):
    from loraflow import LoraFlowModel

    d = saved_base
    LoraFlowModel.from_pretrained(str(d / "base"), {"zh": d / "zh", "math": d / "math"}, seed=0).save_gate(
        d / "run" / "best")
    assert _eval(d, "loraflow", d / "r.json", "--gate", str(d / "run")) == 0
    assert json.loads((d / "r.json").read_text())["gate"] == str(d / "run" / "best")
