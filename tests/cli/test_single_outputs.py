"""Issue 16 item 8 through the commands: single output files (eval and score results, report tables, inspect
PNG/CSV) are replaced only when loraflow wrote them, unless --force; a refusal is one line, exit 2, before work."""

from __future__ import annotations

import json

from loraflow.cli import main

FOREIGN = b"my own notes, not a loraflow output\n"


def _refused(capsys, path):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: exists and was not written by loraflow" in err, err
    assert path.read_bytes() == FOREIGN


def test_score_result(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "pred.jsonl").write_text(json.dumps({"output": "The answer is 2"}) + "\n")
    out = tmp_path / "result.json"
    score = ["score", "--task", "math", "--data", str(tmp_path / "test.jsonl"), "--predictions",
             str(tmp_path / "pred.jsonl"), "--out", str(out)]
    out.write_bytes(FOREIGN)
    assert main(score) == 2
    _refused(capsys, out)
    assert main([*score, "--force"]) == 0
    assert json.loads(out.read_text())["score"] == 1.0
    (tmp_path / "pred.jsonl").write_text(json.dumps({"output": "The answer is 3"}) + "\n")
    assert main(score) == 0  # our own earlier result is replaced by a re-run
    assert json.loads(out.read_text())["score"] == 0.0


def test_report_tables(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "base.json").write_text(json.dumps({"method": "base", "task": "math", "lang": "zh", "score": 0.5,
                                                   "correct": 1, "total": 2}))
    out = tmp_path / "report"
    out.mkdir()
    (out / "table.csv").write_bytes(FOREIGN)
    assert main(["report", str(results), "--out-dir", str(out)]) == 2
    _refused(capsys, out / "table.csv")
    assert sorted(p.name for p in out.iterdir()) == ["table.csv"]  # refused before anything was written
    assert main(["report", str(results), "--out-dir", str(out), "--force"]) == 0
    assert main(["report", str(results), "--out-dir", str(out)]) == 0  # all three are ours now
    assert (out / "table.csv").read_bytes() != FOREIGN


def test_eval_result_is_checked_before_the_model_loads(saved_base, capsys):
    d = saved_base
    (d / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    out = d / "r.json"
    out.write_bytes(FOREIGN)
    rc = main(["eval", "--base", str(d / "missing-base"), "--adapter", f"zh={d / 'zh'}", "--method", "base",
               "--task", "math", "--lang", "zh", "--data", str(d / "test.jsonl"), "--out", str(out), "--no-progress"])
    assert rc == 2  # the base does not exist: the refusal came first
    _refused(capsys, out)


def test_inspect_png_and_csv(saved_base, capsys):
    d = saved_base
    png, csv = d / "w.png", d / "w.csv"
    args = ["inspect", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--adapter", f"math={d / 'math'}",
            "--prompt", "hello", "--template", "plain", "--max-new-tokens", "2", "--out", str(png), "--csv", str(csv)]
    csv.write_bytes(FOREIGN)
    assert main(args) == 2
    _refused(capsys, csv)
    assert not png.exists()
    assert main([*args, "--force"]) == 0
    first = png.read_bytes()
    assert first.startswith(b"\x89PNG") and csv.read_bytes() != FOREIGN
    assert main(args) == 0  # a re-run replaces its own PNG and CSV
    png.write_bytes(FOREIGN)
    capsys.readouterr()
    assert main(args) == 2
    _refused(capsys, png)
