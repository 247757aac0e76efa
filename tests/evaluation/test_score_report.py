"""`loraflow score` results are rows of `loraflow report` without extra flags, and `report` compares
prompt templates as they render (a record from before template format 2 reads as it rendered then)."""

from __future__ import annotations

import json

import pytest

from loraflow.cli import main
from loraflow.common.errors import LoraFlowError
from loraflow.data.formats import PromptTemplate
from loraflow.evaluation.report import build_table, gather_results


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_results_show_up_in_report_as_rows_named_after_their_predictions(tmp_path, capsys):
    data = _jsonl(tmp_path / "zh_math_test.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(4)])
    outputs = {"gpt-4o": ["The answer is: 0", "The answer is: 1", "The answer is: 2", "The answer is: 9"],
               "vllm-run": ["The answer is: 0", "no idea", "no idea", "no idea"]}
    results = tmp_path / "results"
    for stem, texts in outputs.items():
        pred = _jsonl(tmp_path / f"{stem}.jsonl", [{"output": t} for t in texts])
        assert main(["score", "--task", "math", "--lang", "zh", "--data", str(data), "--predictions", str(pred),
                     "--out", str(results / f"{stem}.json")]) == 0
    recorded = json.loads((results / "gpt-4o.json").read_text(encoding="utf-8"))
    assert (recorded["method"], recorded["data"]) == ("predictions:gpt-4o", str(data))
    capsys.readouterr()

    assert main(["report", str(results)]) == 0
    out, err = capsys.readouterr()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines() if "predictions:" in line}
    assert rows == {"predictions:gpt-4o": "75.0", "predictions:vllm-run": "25.0"}
    assert "skipped" not in err

    # --method still names the row
    pred = tmp_path / "gpt-4o.jsonl"
    assert main(["score", "--task", "math", "--lang", "zh", "--data", str(data), "--predictions", str(pred),
                 "--out", str(results / "named.json"), "--method", "loraflow"]) == 0
    table = build_table(gather_results([results])[0])
    assert table.rows == ["LoRA-Flow", "predictions:gpt-4o", "predictions:vllm-run"]


def _result(path, template: dict, score=(1, 2)):
    path.write_text(json.dumps({"task": "math", "lang": "zh", "method": "loraflow", "score": score[0] / score[1],
                                "correct": score[0], "total": score[1], "template": template}), encoding="utf-8")
    return path


def test_report_reads_template_records_as_they_rendered(tmp_path):
    old_plain = {"kind": "plain", "system": None, "cue": "", "name": "plain"}  # format 1: question + newline
    same = [_result(tmp_path / "old.json", old_plain),
            _result(tmp_path / "new.json", PromptTemplate.from_preset("plain-nl").to_record(), (2, 2))]
    cell = build_table(gather_results(same)[0]).get("LoRA-Flow", "math", "zh")
    assert (cell.n, cell.mean) == (2, 75.0)

    differ = [same[0], _result(tmp_path / "verbatim.json", PromptTemplate.from_preset("plain").to_record())]
    with pytest.raises(LoraFlowError, match="different prompt templates"):
        build_table(gather_results(differ)[0])
