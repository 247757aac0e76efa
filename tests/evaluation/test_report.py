"""`loraflow report`: tables, renderings and CLI behaviour, on hand-written RESULT.json files.

The inputs use the paper's Table numbers (Llama-2-7B) with total = 1000, so a score of
correct/1000 is exactly correct/10 percent and every expected value below is hand-computed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import cli
from loraflow.common.errors import LoraFlowError
from loraflow.evaluation.report import build_table, gather_results, load_results, method_label, to_csv, to_markdown

SRC = Path(__file__).resolve().parents[2] / "src"

# Paper numbers (percent): method -> task -> (zh, ru, es)
PAPER = {
    "base": {"math": (4.4, 3.2, 2.4), "code": (0.0, 0.0, 2.4)},
    "single:LANG": {"math": (5.2, 3.6, 3.6), "code": (12.2, 14.0, 10.4)},
    "single:TASK": {"math": (26.8, 32.8, 41.2), "code": (18.3, 23.2, 21.9)},
    "avg": {"math": (12.8, 10.4, 18.4), "code": (17.1, 17.7, 18.3)},
    "lorahub": {"math": (20.8, 28.4, 36.8), "code": (19.5, 21.3, 20.1)},
    "loraflow": {"math": (33.2, 37.6, 42.0), "code": (20.7, 23.8, 23.2)},
}
LANGS = ("zh", "ru", "es")


def _result(task: str, lang: str | None, method: str, correct: int, total: int = 1000, **extra) -> dict:
    return {"task": task, "lang": lang, "method": method, "score": correct / total,
            "correct": correct, "total": total, "other_field": [1, 2], **extra}


def _paper_results() -> list[dict]:
    """All paper cells, written in a shuffled method order, with three seeds for LoRA-Flow zh-math
    (32.0, 33.2, 34.4 -> mean 33.2, sample std 1.2) and LoRAHub code-es missing."""
    out = []
    for method in ("loraflow", "avg", "single:TASK", "base", "lorahub", "single:LANG"):
        for task, values in PAPER[method].items():
            for lang, pct in zip(LANGS, values):
                m = method.replace("LANG", lang).replace("TASK", task)
                if (method, task, lang) == ("lorahub", "code", "es"):
                    continue
                if (method, task, lang) == ("loraflow", "math", "zh"):
                    out += [_result(task, lang, m, c, seed=s) for s, c in ((0, 320), (1, 332), (2, 344))]
                    continue
                out.append(_result(task, lang, m, round(pct * 10)))
    out.append(_result("math", "zh", "static:0.3,0.7", 200))  # an extra method, after the paper's
    return out


def _write(dir_: Path, results: list[dict]) -> list[Path]:
    dir_.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, r in enumerate(results):
        p = dir_ / f"result_{i:03d}.json"
        p.write_text(json.dumps(r), encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture
def paper_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    _write(d, _paper_results())
    return d


EXPECTED_ROWS = ["Base", "Single LoRA (language)", "Single LoRA (task)", "Avg fusion", "LoRAHub",
                 "LoRA-Flow", "Static (0.3, 0.7)"]


def test_build_table_rows_columns_and_cells(paper_dir: Path):
    table = build_table(load_results(sorted(paper_dir.glob("*.json"))))
    assert table.rows == EXPECTED_ROWS
    assert table.columns == [("math", "zh"), ("math", "ru"), ("math", "es"), ("math", "Avg"),
                             ("code", "zh"), ("code", "ru"), ("code", "es"), ("code", "Avg")]
    # Single cells.
    assert table.get("Base", "math", "ru").mean == pytest.approx(3.2)
    assert table.get("Single LoRA (task)", "code", "es").mean == pytest.approx(21.9)
    # Averages over 3 languages: (4.4+3.2+2.4)/3 = 3.333..., (20.7+23.8+23.2)/3 = 22.5666...
    base_avg = table.get("Base", "math", "Avg")
    assert base_avg.mean == pytest.approx(10.0 / 3) and base_avg.n == 3 and not base_avg.partial
    assert table.get("LoRA-Flow", "code", "Avg").mean == pytest.approx(67.7 / 3)
    # Multi-seed cell: 32.0, 33.2, 34.4 -> mean 33.2, sample std sqrt((1.44+0+1.44)/2) = 1.2.
    lf = table.get("LoRA-Flow", "math", "zh")
    assert (lf.mean, lf.n) == (pytest.approx(33.2), 3) and lf.std == pytest.approx(1.2)
    # Its average uses the cell mean: (33.2+37.6+42.0)/3 = 37.6.
    assert table.get("LoRA-Flow", "math", "Avg").mean == pytest.approx(37.6)
    # Missing cell, and a partial average over the two present languages: (19.5+21.3)/2 = 20.4.
    assert table.get("LoRAHub", "code", "es") is None
    hub_avg = table.get("LoRAHub", "code", "Avg")
    assert hub_avg.mean == pytest.approx(20.4) and hub_avg.n == 2 and hub_avg.partial
    # The extra row only has math zh; its math average is over one language.
    assert table.get("Static (0.3, 0.7)", "code", "zh") is None
    assert table.get("Static (0.3, 0.7)", "math", "Avg").mean == pytest.approx(20.0)
    assert table.notes == []


def test_markdown_matches_paper_layout(paper_dir: Path):
    md = to_markdown(build_table(gather_results([paper_dir])[0]), title="Llama-2-7B")
    lines = md.splitlines()
    assert lines[0] == "### Llama-2-7B"
    assert lines[2] == "| Method | MGSM Zh | Ru | Es | Avg | HumanEval Zh | Ru | Es | Avg |"
    assert lines[3] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[4] == "| Base | 4.4 | 3.2 | 2.4 | 3.3 | 0.0 | 0.0 | 2.4 | 0.8 |"
    assert lines[5] == "| Single LoRA (language) | 5.2 | 3.6 | 3.6 | 4.1 | 12.2 | 14.0 | 10.4 | 12.2 |"
    assert lines[6] == "| Single LoRA (task) | 26.8 | 32.8 | 41.2 | 33.6 | 18.3 | 23.2 | 21.9 | 21.1 |"
    assert lines[7] == "| Avg fusion | 12.8 | 10.4 | 18.4 | 13.9 | 17.1 | 17.7 | 18.3 | 17.7 |"
    assert lines[8] == "| LoRAHub | 20.8 | 28.4 | 36.8 | 28.7 | 19.5 | 21.3 | – | 20.4* |"
    assert lines[9] == "| LoRA-Flow | 33.2 ± 1.2 | 37.6 | 42.0 | 37.6 | 20.7 | 23.8 | 23.2 | 22.6 |"
    assert lines[10] == "| Static (0.3, 0.7) | 20.0 | – | – | 20.0* | – | – | – | – |"
    assert "sample standard deviation over 3 runs" in md
    assert "average over the languages this row has results for only" in md
    # Task display names can be overridden.
    assert "| Method | GSM Zh |" in to_markdown(build_table(gather_results([paper_dir])[0]), task_names={"math": "GSM"})


def test_csv_parses_back(paper_dir: Path):
    table = build_table(gather_results([paper_dir])[0])
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [r["method"] for r in rows] == EXPECTED_ROWS
    by = {r["method"]: r for r in rows}
    assert list(rows[0])[:7] == ["method", "math_zh", "math_zh_std", "math_zh_n", "math_ru", "math_ru_std", "math_ru_n"]
    assert "±" not in to_csv(table)
    lf = by["LoRA-Flow"]
    assert float(lf["math_zh"]) == pytest.approx(33.2) and float(lf["math_zh_std"]) == pytest.approx(1.2)
    assert lf["math_zh_n"] == "3"
    assert float(by["Base"]["math_avg"]) == pytest.approx(3.333333, abs=1e-6)  # more precision than the table
    assert by["Base"]["math_ru_std"] == ""
    assert by["LoRAHub"]["code_es"] == "" and by["LoRAHub"]["code_avg_n"] == "2"


def test_method_labels():
    r = dict(task="math", lang="zh")
    assert method_label({**r, "method": "base"}) == "Base"
    assert method_label({**r, "method": "single:ru"}) == "Single LoRA (language)"  # a language code
    assert method_label({**r, "method": "single:math"}) == "Single LoRA (task)"
    assert method_label({**r, "method": "single:my_lora"}) == "Single LoRA (my_lora)"
    assert method_label({**r, "method": "single:my_lora", "adapter_role": "task"}) == "Single LoRA (task)"
    assert method_label({**r, "method": "single:zh", "adapter_role": "task"}) == "Single LoRA (task)"
    assert method_label({**r, "method": "static:0.3,0.7"}) == "Static (0.3, 0.7)"
    assert method_label({**r, "method": "loraflow", "label": "LoRA-Flow (T=1.1)"}) == "LoRA-Flow (T=1.1)"
    assert method_label({**r, "method": "mystery"}) == "mystery"


def test_labelled_rows_and_no_language(tmp_path: Path):
    results = [
        _result("math", None, "loraflow", 300, label="LoRA-Flow (T=1.1)"),
        _result("math", None, "base", 50),
        _result("math", None, "loraflow", 330),
    ]
    table = build_table(results)
    # Paper rows first; other labels after them in first-seen order.
    assert table.rows == ["Base", "LoRA-Flow", "LoRA-Flow (T=1.1)"]
    assert table.columns == [("math", "-")]  # one "language": no Avg column
    md = to_markdown(table)
    assert md.splitlines()[0] == "| Method | MGSM |"
    assert "| LoRA-Flow (T=1.1) | 30.0 |" in md


def test_duplicate_seed_is_noted(tmp_path: Path):
    paths = _write(tmp_path, [_result("code", "zh", "avg", 171, seed=0), _result("code", "zh", "avg", 171, seed=0)])
    table = build_table(load_results(paths))
    assert table.get("Avg fusion", "code", "zh").n == 2
    assert len(table.notes) == 1 and "seed 0 appears in 2 files" in table.notes[0]


def test_load_results_errors(tmp_path: Path):
    with pytest.raises(LoraFlowError, match="nope.json: file not found"):
        load_results([tmp_path / "nope.json"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(LoraFlowError, match=r"bad\.json: malformed JSON"):
        load_results([bad])
    cases = {
        "missing key\\(s\\) correct, total": {"task": "math", "method": "base", "score": 0.1},
        "'score' must be a fraction in \\[0, 1\\]": _result("math", "zh", "base", 10) | {"score": 33.2},
        "disagrees with correct/total": _result("math", "zh", "base", 10) | {"score": 0.5},
        "'adapter_role' must be": _result("math", "zh", "single:zh", 10, adapter_role="lang"),
        "expected a JSON object": [1, 2],
    }
    for msg, obj in cases.items():
        p = tmp_path / "case.json"
        p.write_text(json.dumps(obj), encoding="utf-8")
        with pytest.raises(LoraFlowError, match=f"case.json: .*{msg}"):
            load_results([p])


def test_gather_directories_and_globs(paper_dir: Path, tmp_path: Path):
    n = len(_paper_results())
    (paper_dir / "config.json").write_text('{"lr": 0.001}', encoding="utf-8")  # JSON, not a result
    (paper_dir / "notes.json").write_text("not json at all", encoding="utf-8")
    results, skipped = gather_results([paper_dir, paper_dir / "result_000.json"])  # the file is read once
    assert (len(results), len(skipped)) == (n, 2)
    assert any("config.json: not a result" in w for w in skipped) and any("notes.json: malformed JSON" in w for w in skipped)
    results, skipped = gather_results([str(tmp_path / "**" / "result_*.json")])
    assert (len(results), skipped) == (n, [])
    with pytest.raises(LoraFlowError, match="no file matches"):
        gather_results([str(tmp_path / "*.nothing")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LoraFlowError, match="no result files found"):
        gather_results([tmp_path / "empty_dir"])
    # A directory file that looks like a result but is broken is an error, not a skip.
    (paper_dir / "broken.json").write_text(json.dumps({"method": "base", "score": 0.1}), encoding="utf-8")
    with pytest.raises(LoraFlowError, match="broken.json: not a result file"):
        gather_results([paper_dir])


def test_cli_report_writes_all_outputs(paper_dir: Path, tmp_path: Path, capsys):
    (paper_dir / "config.json").write_text('{"lr": 0.001}', encoding="utf-8")
    out = tmp_path / "out"
    rc = cli.main(["report", str(paper_dir), "--out-dir", str(out), "--title", "Llama-2-7B", "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "| LoRA-Flow | 33.2 ± 1.2 | 37.6 | 42.0 | 37.6 |" in captured.out
    assert "warning: skipped " in captured.err and "config.json: not a result" in captured.err
    # no temp files left; the ledger records the three files as loraflow's (a re-run may replace them)
    assert sorted(p.name for p in out.iterdir()) == [".loraflow-files", "table.csv", "table.md", "table.png"]
    assert (out / "table.md").read_text(encoding="utf-8") == captured.out
    assert (out / "table.csv").read_text(encoding="utf-8").startswith("method,math_zh,math_zh_std,math_zh_n,")
    png = (out / "table.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("{oops", "malformed JSON"),
        ('{"task": "math", "method": "base"}', "missing key(s) score, correct, total"),
    ],
)
def test_cli_bad_file_exits_2_with_one_line(tmp_path: Path, capsys, content, message):
    p = tmp_path / "RESULT.json"
    if content is not None:
        p.write_text(content, encoding="utf-8")
    rc = cli.main(["report", str(p)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("loraflow report: error: ")
    assert str(p) in err and message in err


def test_cli_bad_task_name_option(paper_dir: Path, capsys):
    assert cli.main(["report", str(paper_dir), "--task-name", "math"]) == 2
    assert "--task-name expects TASK=NAME" in capsys.readouterr().err


def test_import_and_help_stay_light():
    code = (
        "import sys, loraflow.cli, loraflow.evaluation.report\n"
        "try:\n"
        "    loraflow.cli.main(['report', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loraflow report" in proc.stdout and "HEAVY []" in proc.stdout


def test_directories_are_searched_recursively_and_empty_search_says_where(tmp_path: Path):
    _write(tmp_path / "results" / "zh", [_result("math", "zh", "base", 44)])
    _write(tmp_path / "results" / "ru" / "seed0", [_result("math", "ru", "base", 32)])
    (tmp_path / "results" / "notes.json").write_text("{}", encoding="utf-8")
    results, skipped = gather_results([tmp_path / "results"])
    assert sorted(r["lang"] for r in results) == ["ru", "zh"] and len(skipped) == 1
    (tmp_path / "other" / "deep").mkdir(parents=True)
    (tmp_path / "other" / "deep" / "x.json").write_text('{"lr": 1}', encoding="utf-8")
    with pytest.raises(LoraFlowError, match=r"other and its subfolders \(1 JSON file\(s\) in 1 folder\(s\)\)"):
        gather_results([tmp_path / "other"])


def test_partial_runs_are_marked(tmp_path: Path):
    full = _result("math", "zh", "base", 50, total=250, data="test/zh_math_test.jsonl", partial=False)
    limited = _result("math", "ru", "base", 5, total=10, data="test/ru_math_test.jsonl", partial=True)
    old_style = _result("math", "es", "avg", 3, total=10, config={"limit": 10, "template": "official"})
    table = build_table(load_results(_write(tmp_path, [full, limited, old_style])))
    assert not table.get("Base", "math", "zh").limited and table.get("Base", "math", "ru").limited
    assert table.get("Avg fusion", "math", "es").limited and table.get("Base", "math", "Avg").limited
    md = to_markdown(table)
    assert "| Base | 20.0 | 50.0 † |" in md and "† partial run" in md
    assert "†" not in to_markdown(build_table(load_results(_write(tmp_path / "f", [full]))))


@pytest.mark.parametrize("field, a, b, what", [
    ("template", {"kind": "chat", "name": "chat"}, {"kind": "llama2", "name": "official"}, "prompt templates"),
    ("data", "test/zh_math_test.jsonl", "test/zh_mgsm_other.jsonl", "test sets"),
])
def test_refuses_to_average_different_templates_or_test_sets(tmp_path: Path, field, a, b, what):
    runs = [_result("math", "zh", "loraflow", 80, total=250, seed=s, **{field: v}) for s, v in ((0, a), (1, b))]
    paths = _write(tmp_path, runs)
    with pytest.raises(LoraFlowError, match=f"LoRA-Flow, math zh: refusing to average runs with different {what}"):
        build_table(load_results(paths))
    same = [_result("math", "zh", "loraflow", c, total=250, seed=s, **{field: a}) for s, c in ((0, 80), (1, 90))]
    assert build_table(load_results(_write(tmp_path / "same", same))).get("LoRA-Flow", "math", "zh").n == 2


# The demo's generated languages (han, cyr, lat stand in for zh, ru, es). Scores over total = 100, chosen apart
# from every number of the paper's table: row i scores math (10+i, 20+i, 30+i), code (61+i, 71+i, 81+i).
GENERATED_ROWS = ("base", "single:LANG", "single:TASK", "avg", "lorahub", "loraflow")


def _generated_results() -> list[dict]:
    out = []
    for i, method in enumerate(GENERATED_ROWS):
        for task, first in (("code", 61), ("math", 10)):
            for lang, pct in (("lat", first + 20 + i), ("han", first + i), ("cyr", first + 10 + i)):  # shuffled
                role = {"single:LANG": "language", "single:TASK": "task"}.get(method)
                m = method.replace("LANG", lang).replace("TASK", task)
                out.append(_result(task, lang, m, pct, total=100, **({"adapter_role": role} if role else {})))
    return out


GENERATED_HEADER = ("| Method | MGSM Han (as Zh) | Cyrillic (as Ru) | Latin (as Es) | Avg "
                    "| HumanEval Han (as Zh) | Cyrillic (as Ru) | Latin (as Es) | Avg |")
PUBLISHED_LABEL = ("### Published: LoRA-Flow paper, Table 1 (Llama-2-7B; MGSM and HumanEval in zh, ru, es) "
                   "— for comparison, not produced by this run")


def test_generated_languages_have_display_names_in_order(tmp_path: Path, capsys):
    runs = tmp_path / "runs"
    _write(runs, _generated_results())
    assert cli.main(["report", str(runs), "--csv", str(tmp_path / "t.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == GENERATED_HEADER
    assert lines[2] == "| Base | 10.0 | 20.0 | 30.0 | 20.0 | 61.0 | 71.0 | 81.0 | 71.0 |"
    assert lines[7] == "| LoRA-Flow | 15.0 | 25.0 | 35.0 | 25.0 | 66.0 | 76.0 | 86.0 | 76.0 |"
    # The CSV keeps the codes as keys.
    assert (tmp_path / "t.csv").read_text(encoding="utf-8").splitlines()[0] == (
        "method,math_han,math_han_std,math_han_n,math_cyr,math_cyr_std,math_cyr_n,math_lat,math_lat_std,math_lat_n,"
        "math_avg,math_avg_std,math_avg_n,code_han,code_han_std,code_han_n,code_cyr,code_cyr_std,code_cyr_n,"
        "code_lat,code_lat_std,code_lat_n,code_avg,code_avg_std,code_avg_n")
    # --lang-name overrides one name (repeatable); the others keep their defaults.
    assert cli.main(["report", str(runs), "--lang-name", "cyr=Russkiy", "--lang-name", "lat = Espanol gen"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "| Method | MGSM Han (as Zh) | Russkiy | Espanol gen | Avg "
        "| HumanEval Han (as Zh) | Russkiy | Espanol gen | Avg |")
    # Real and generated languages together: the paper's order, then the stand-ins in theirs.
    mixed = [_result("math", lang, "base", 10) for lang in ("lat", "es", "han", "zh", "cyr", "ru")]
    md = to_markdown(build_table(mixed), lang_names={"zh": "Chinese"})
    assert md.splitlines()[0] == (
        "| Method | MGSM Chinese | Ru | Es | Han (as Zh) | Cyrillic (as Ru) | Latin (as Es) | Avg |")


@pytest.mark.parametrize("item", ["cyr", "cyr=", "cyr=  ", "=Russkiy"])
def test_cli_bad_lang_name_exits_2_with_one_line(tmp_path: Path, capsys, item):
    runs = tmp_path / "runs"
    _write(runs, _generated_results())
    assert cli.main(["report", str(runs), "--lang-name", item, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loraflow report: error: --lang-name expects CODE=NAME")
    assert repr(item) in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cli_paper_appends_the_published_table_to_markdown_only(tmp_path: Path, capsys, monkeypatch):
    from loraflow.evaluation import report

    charted = []
    real_to_png = report.to_png
    monkeypatch.setattr(report, "to_png", lambda table, *a, **k: charted.append(table) or real_to_png(table, *a, **k))
    runs, out = tmp_path / "runs", tmp_path / "out"
    _write(runs, _generated_results())
    rc = cli.main(["report", str(runs), "--out-dir", str(out), "--paper", "--task-name", "math=Foreign math",
                   "--lang-name", "han=Hanzi"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert (out / "table.md").read_text(encoding="utf-8") == printed
    lines = printed.splitlines()
    # Ours first, with our names ...
    assert lines[0] == ("| Method | Foreign math Hanzi | Cyrillic (as Ru) | Latin (as Es) | Avg "
                        "| HumanEval Hanzi | Cyrillic (as Ru) | Latin (as Es) | Avg |")
    # ... then the paper's table, labelled, with the paper's own columns and numbers as printed there.
    start = lines.index(PUBLISHED_LABEL)
    assert start > 8 and lines[start - 1] == ""
    assert lines[start + 2:start + 10] == [
        "| Method | MGSM Zh | Ru | Es | Avg | HumanEval Zh | Ru | Es | Avg |",
        "|---|---|---|---|---|---|---|---|---|",
        "| Base | 4.4 | 3.2 | 2.4 | 3.3 | 0.0 | 0.0 | 2.4 | 0.8 |",
        "| Single LoRA (language) | 5.2 | 3.6 | 3.6 | 4.1 | 12.2 | 14.0 | 10.4 | 12.2 |",
        "| Single LoRA (task) | 26.8 | 32.8 | 41.2 | 33.6 | 18.3 | 23.2 | 21.9 | 21.1 |",
        "| Avg fusion | 12.8 | 10.4 | 18.4 | 13.9 | 17.1 | 17.7 | 18.3 | 17.7 |",
        "| LoRAHub | 20.8 | 28.4 | 36.8 | 28.7 | 19.5 | 21.3 | 20.1 | 20.3 |",
        "| LoRA-Flow | 33.2 | 37.6 | 42.0 | 37.6 | 20.7 | 23.8 | 23.2 | 22.6 |",
    ]
    assert lines[start + 10:] == []
    # Never in our CSV or chart.
    csv_text = (out / "table.csv").read_text(encoding="utf-8")
    for published in ("33.2", "22.6", "2.4", "20.3", "Published"):
        assert published not in csv_text
    assert [r["method"] for r in csv.DictReader(io.StringIO(csv_text))] == EXPECTED_ROWS[:6]
    assert len(charted) == 1 and {lang for _, lang in charted[0].columns} == {"han", "cyr", "lat", "Avg"}
    assert sorted({round(c.mean, 6) for c in charted[0].cells.values()}) == [
        10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 30.0, 31.0, 32.0, 33.0, 34.0, 35.0,
        61.0, 62.0, 63.0, 64.0, 65.0, 66.0, 71.0, 72.0, 73.0, 74.0, 75.0, 76.0, 81.0, 82.0, 83.0, 84.0, 85.0, 86.0]


def test_without_paper_nothing_published_appears(tmp_path: Path, capsys):
    from loraflow.evaluation.report import write_report

    runs, out = tmp_path / "runs", tmp_path / "out"
    _write(runs, _generated_results())
    assert cli.main(["report", str(runs), "--md", str(out.with_suffix(".md"))]) == 0
    printed = capsys.readouterr().out
    for text in (printed, out.with_suffix(".md").read_text(encoding="utf-8")):
        assert "Published" not in text and "paper" not in text
        assert "33.2" not in text and "22.6" not in text and "MGSM Zh" not in text
        assert text.count("| Base |") == 1 and text.count("| LoRA-Flow |") == 1
    rep = write_report([runs])
    assert rep.paper is None and "Published" not in rep.markdown
    rep = write_report([runs], paper=True)  # the library API gives the same as --paper
    assert PUBLISHED_LABEL in rep.markdown.splitlines()
    assert rep.paper.get("LoRA-Flow", "math", "zh").mean == 33.2 and rep.paper.get("Base", "code", "es").mean == 2.4
    assert rep.paper.get("LoRA-Flow", "code", "Avg").mean == 22.6
