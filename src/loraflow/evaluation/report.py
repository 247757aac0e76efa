"""Results tables in the paper's layout, from the RESULT.json files of `loraflow eval` / `score`.

A RESULT.json is a JSON object with at least `task` ("math", "code", ...), `method` ("base",
"single:zh", "single:math", "avg", "static:0.3,0.7", "lorahub", "loraflow", ...), `score` (a
fraction in [0, 1]), `correct` and `total`; optionally `lang` (null/absent -> "-"), `label` (the
row's display name), `adapter_role` ("language" | "task", for single-LoRA methods), `seed`,
`partial` (true for a run over only the first rows of its test set, `eval --limit`), `template`
(the prompt template) and `data` (the test file). Other fields are ignored. Runs of one cell must
share their template and test set: averaging across them is refused.

`build_table` groups them into rows (methods, in the paper's order) and columns (per task, the
languages and an average), averaging repeated runs of one cell (e.g. several seeds) into mean and
sample standard deviation. `to_markdown`, `to_csv` and `to_png` render a table; `write_report`
does the whole job for the `loraflow report` command. `paper_table` is the paper's published
table, which `write_report(..., paper=True)` appends to the Markdown (never to the CSV or chart).

matplotlib is imported inside `to_png` only, so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraflow.common.errors import LoraFlowError
from loraflow.common.extras import require
from loraflow.common.io import atomic_path, check_output_file, write_text_atomic

REQUIRED_KEYS = ("task", "method", "score", "correct", "total")

# The paper's rows, in its order; any other row comes after these, in first-seen order.
PAPER_ROWS = (
    "Base",
    "Single LoRA (language)",
    "Single LoRA (task)",
    "Avg fusion",
    "LoRAHub",
    "LoRA-Flow",
)
TASK_ORDER = ("math", "code")
# The paper's languages, then the demo's generated stand-ins for them, in the same order.
LANG_ORDER = ("zh", "ru", "es", "han", "cyr", "lat")
DEFAULT_TASK_NAMES = {"math": "MGSM", "code": "HumanEval"}
# Column headers of known language codes (Markdown, chart; the CSV keeps the codes). Another code
# shows capitalised ("de" -> "De"); `lang_names` / `--lang-name CODE=NAME` override any of these.
DEFAULT_LANG_NAMES = {
    "zh": "Zh",
    "ru": "Ru",
    "es": "Es",
    # The demo's generated languages, and the paper's language each stands in for.
    "han": "Han (as Zh)",  # ideographic script without spaces
    "cyr": "Cyrillic (as Ru)",
    "lat": "Latin (as Es)",  # Latin letters with its own spelling
}
AVG = "Avg"  # the `lang` of a per-task average column
MISSING = "–"
NO_LANG = "-"

# Adapter names that `single:NAME` reads as a language LoRA or a task LoRA when the result has
# no `adapter_role`. Languages: ISO 639-1 codes of the paper, MGSM and other common ones.
LANGUAGE_CODES = frozenset(
    "zh ru es en de fr ja th sw bn te ar it pt ko vi hi id tr pl nl uk cs fa he el sv fi da no hu ro".split()
)
TASK_NAMES = frozenset({"math", "code"})
_SIMPLE_LABELS = {"base": "Base", "avg": "Avg fusion", "lorahub": "LoRAHub", "loraflow": "LoRA-Flow"}


@dataclass
class Cell:
    """One table cell, as percentages.

    For a language column: `mean` and `std` over the `n` runs of that cell (`std` is the sample
    standard deviation, None when n == 1). For an average column: `mean` of the row's language
    means, `n` = the number of languages averaged, `partial` = some of the task's languages are
    missing from this row, so the average is over fewer languages than the other rows'.
    """

    mean: float
    std: float | None = None
    n: int = 1
    partial: bool = False
    limited: bool = False  # some run of this cell covered only part of its test set (--limit)


@dataclass
class Table:
    """A results table: `rows` (display names), `columns` ((task, lang) pairs; lang may be "Avg")
    and `cells` keyed by (row, (task, lang)); a key that is absent is a missing cell."""

    rows: list[str]
    columns: list[tuple[str, str]]
    cells: dict[tuple[str, tuple[str, str]], Cell]
    notes: list[str] = field(default_factory=list)

    def get(self, row: str, task: str, lang: str) -> Cell | None:
        """The cell of `row` for (task, lang), or None when missing."""
        return self.cells.get((row, (task, lang)))

    @property
    def tasks(self) -> list[str]:
        """The tasks, in column order."""
        return list(dict.fromkeys(t for t, _ in self.columns))


# ----------------------------------------------------------------------------------------------
# Loading


def _check_result(obj: Any, where: str) -> None:
    """Raise LoraFlowError naming `where` when `obj` is not a valid result object."""
    if not isinstance(obj, dict):
        raise LoraFlowError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise LoraFlowError(f"{where}: not a result file, missing key(s) {', '.join(missing)}")
    for key in ("task", "method"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise LoraFlowError(f"{where}: {key!r} must be a non-empty string, got {obj[key]!r}")
    for key in ("lang", "label"):
        if obj.get(key) is not None and (not isinstance(obj[key], str) or not obj[key].strip()):
            raise LoraFlowError(f"{where}: {key!r} must be a non-empty string or null, got {obj[key]!r}")
    role = obj.get("adapter_role")
    if role is not None and role not in ("language", "task"):
        raise LoraFlowError(f"{where}: 'adapter_role' must be 'language' or 'task', got {role!r}")
    for key in ("correct", "total"):
        if not isinstance(obj[key], int) or isinstance(obj[key], bool) or obj[key] < 0:
            raise LoraFlowError(f"{where}: {key!r} must be a non-negative integer, got {obj[key]!r}")
    if obj["total"] == 0 or obj["correct"] > obj["total"]:
        raise LoraFlowError(f"{where}: need 0 <= correct <= total and total > 0, got {obj['correct']}/{obj['total']}")
    score = obj["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise LoraFlowError(f"{where}: 'score' must be a number, got {score!r}")
    if not 0.0 <= score <= 1.0:
        raise LoraFlowError(f"{where}: 'score' must be a fraction in [0, 1], got {score!r}")
    if abs(score - obj["correct"] / obj["total"]) > 1e-3:
        raise LoraFlowError(
            f"{where}: 'score' {score!r} disagrees with correct/total = {obj['correct']}/{obj['total']}"
        )
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise LoraFlowError(f"{where}: 'seed' must be an integer or null, got {seed!r}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise LoraFlowError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LoraFlowError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise LoraFlowError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise LoraFlowError(f"{path}: cannot read ({e.strerror or e})") from None


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Read and validate RESULT.json files.

    Args:
        paths: the files to read; every one must be a valid result.
    Returns:
        One dict per file (a copy of its JSON object) with `_source` set to the file's path.
    Raises:
        LoraFlowError: naming the file and the problem (missing file, bad JSON, missing or
            ill-typed keys, a score outside [0, 1] or inconsistent with correct/total).
    """
    results = []
    for p in paths:
        path = Path(p)
        obj = _read_json(path)
        _check_result(obj, str(path))
        results.append({**obj, "_source": str(path)})
    return results


def _looks_like_result(obj: Any) -> bool:
    return isinstance(obj, dict) and "method" in obj and "score" in obj


def gather_results(inputs: Sequence[str | os.PathLike]) -> tuple[list[dict], list[str]]:
    """Collect results from files, directories and glob patterns.

    An explicit file must be a valid result. A directory contributes the `*.json` files in it and
    in its subfolders, and a glob pattern its matches (`**` recurses); of those, files that are not
    JSON objects with `method` and `score` keys are skipped, but one that has them must be valid.
    A file reached twice is read once. When nothing is found, the error says where it looked.

    Returns:
        (results, one "PATH: why" line per skipped file).
    Raises:
        LoraFlowError: on an invalid result, a missing path, a glob matching nothing, or no
            results at all.
    """
    results: list[dict] = []
    seen: set[Path] = set()
    skipped: list[str] = []
    looked: list[str] = []

    def take(path: Path, strict: bool) -> None:
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        if strict:
            results.extend(load_results([path]))
            return
        try:
            obj = _read_json(path)
        except LoraFlowError as e:
            skipped.append(str(e))
            return
        if not _looks_like_result(obj):
            skipped.append(f"{path}: not a result (no 'method' and 'score')")
            return
        _check_result(obj, str(path))
        results.append({**obj, "_source": str(path)})

    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*.json") if f.is_file())
            folders = len({f.parent for f in found})
            looked.append(f"{text} and its subfolders ({len(found)} JSON file(s) in {folders} folder(s))")
            for f in found:
                take(f, strict=False)
        elif any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise LoraFlowError(f"{text}: no file matches this pattern")
            for m in matches:
                if Path(m).is_file():
                    take(Path(m), strict=False)
        else:
            take(path, strict=True)
    if not results:
        where = "; ".join(looked) or ", ".join(os.fspath(i) for i in inputs) or "(no inputs)"
        extra = f" ({len(skipped)} non-result JSON file(s) skipped: {'; '.join(skipped)})" if skipped else ""
        raise LoraFlowError(f"no result files found in {where}{extra}")
    return results, skipped


# ----------------------------------------------------------------------------------------------
# Building the table


def _single_role(name: str, result: Mapping[str, Any]) -> str | None:
    """'language', 'task' or None for the adapter of `single:NAME`."""
    role = result.get("adapter_role")
    if role:
        return role
    if name == result.get("lang") or name in LANGUAGE_CODES:
        return "language"
    if name == result.get("task") or name in TASK_NAMES:
        return "task"
    return None


def method_label(result: Mapping[str, Any]) -> str:
    """The row name of a result: its `label` if given, else the method's default display name.

    base -> "Base", avg -> "Avg fusion", lorahub -> "LoRAHub", loraflow -> "LoRA-Flow",
    single:NAME -> "Single LoRA (language)" / "Single LoRA (task)" by `adapter_role` or by NAME
    (a language code / the task), else "Single LoRA (NAME)"; static:0.3,0.7 -> "Static (0.3, 0.7)";
    anything else stays as written.
    """
    if result.get("label"):
        return str(result["label"])
    method = str(result["method"]).strip()
    if method in _SIMPLE_LABELS:
        return _SIMPLE_LABELS[method]
    kind, _, arg = method.partition(":")
    if kind == "single" and arg:
        role = _single_role(arg.strip(), result)
        return f"Single LoRA ({role or arg.strip()})"
    if kind == "static":
        weights = [w.strip() for w in arg.split(",") if w.strip()]
        return f"Static ({', '.join(weights)})" if weights else "Static"
    return method


def _ordered(seen: Iterable[str], order: Sequence[str]) -> list[str]:
    """Items of `order` that were seen, then the other seen items in first-seen order."""
    seen = list(dict.fromkeys(seen))
    return [x for x in order if x in seen] + [x for x in seen if x not in order]


def build_table(results: Sequence[Mapping[str, Any]]) -> Table:
    """Group results into the paper's table.

    Rows: Base, Single LoRA (language), Single LoRA (task), Avg fusion, LoRAHub, LoRA-Flow, then
    any other row in first-seen order. Columns: per task (math, code, then others) the languages
    present for that task (zh, ru, es, then others), plus an "Avg" column when the task has more
    than one language. Values are percentages (score * 100); several results for one cell give
    mean and sample std.
    """
    groups: dict[tuple[str, tuple[str, str]], list[float]] = {}
    members: dict[tuple[str, tuple[str, str]], list[Mapping[str, Any]]] = {}
    seeds: dict[tuple[str, tuple[str, str], int], list[str]] = {}
    rows_seen, tasks_seen = [], []
    langs_seen: dict[str, list[str]] = {}
    for r in results:
        row = method_label(r)
        task = str(r["task"])
        lang = str(r.get("lang") or NO_LANG)
        rows_seen.append(row)
        tasks_seen.append(task)
        langs_seen.setdefault(task, []).append(lang)
        groups.setdefault((row, (task, lang)), []).append(100.0 * float(r["score"]))
        members.setdefault((row, (task, lang)), []).append(r)
        if r.get("seed") is not None:
            seeds.setdefault((row, (task, lang), r["seed"]), []).append(str(r.get("_source", "?")))

    rows = _ordered(rows_seen, PAPER_ROWS)
    columns: list[tuple[str, str]] = []
    cells: dict[tuple[str, tuple[str, str]], Cell] = {}
    for task in _ordered(tasks_seen, TASK_ORDER):
        langs = _ordered(langs_seen[task], LANG_ORDER)
        columns += [(task, lang) for lang in langs]
        for row in rows:
            for lang in langs:
                values = groups.get((row, (task, lang)))
                if values:
                    runs = members[(row, (task, lang))]
                    _check_comparable(row, task, lang, runs)
                    std = statistics.stdev(values) if len(values) > 1 else None
                    limited = any(is_partial(r) for r in runs)
                    cells[(row, (task, lang))] = Cell(statistics.fmean(values), std, len(values), limited=limited)
        if len(langs) > 1:
            columns.append((task, AVG))
            for row in rows:
                parts = [cells[(row, (task, lang))] for lang in langs if (row, (task, lang)) in cells]
                if parts:
                    cells[(row, (task, AVG))] = Cell(statistics.fmean(c.mean for c in parts), None, len(parts),
                                                     len(parts) < len(langs), any(c.limited for c in parts))

    notes = [
        f"{row}, {task} {lang}: seed {seed} appears in {len(srcs)} files ({', '.join(srcs)})"
        for (row, (task, lang), seed), srcs in seeds.items()
        if len(srcs) > 1
    ]
    return Table(rows=rows, columns=columns, cells=cells, notes=notes)


def is_partial(result: Mapping[str, Any]) -> bool:
    """Whether a run covered only part of its test set (`eval --limit`)."""
    if "partial" in result:
        return bool(result["partial"])
    limit = (result.get("config") or {}).get("limit") if isinstance(result.get("config"), dict) else None
    return bool(limit)


def _template_of(result: Mapping[str, Any]) -> str | None:
    template = result.get("template")
    if template is None and isinstance(result.get("config"), dict):
        template = result["config"].get("template")
    if isinstance(template, dict):  # as it renders: a record from before template format 2 reads as then
        from loraflow.data.formats import PromptTemplate

        try:
            template = asdict(PromptTemplate.from_record(template))
        except (TypeError, ValueError):
            pass  # compared as written
    return None if template is None else json.dumps(template, sort_keys=True, ensure_ascii=False)


def _test_set_of(result: Mapping[str, Any]) -> str | None:
    data = result.get("data")
    return None if not isinstance(data, str) else Path(data).name


def _check_comparable(row: str, task: str, lang: str, runs: Sequence[Mapping[str, Any]]) -> None:
    """Runs averaged into one cell must share their prompt template and test set."""
    for what, key in (("prompt templates", _template_of), ("test sets", _test_set_of)):
        kinds: dict[str | None, list[str]] = {}
        for r in runs:
            kinds.setdefault(key(r), []).append(str(r.get("_source", "?")))
        if len(kinds) > 1:
            detail = "; ".join(f"{k or 'unrecorded'}: {', '.join(v)}" for k, v in kinds.items())
            raise LoraFlowError(
                f"{row}, {task} {lang}: refusing to average runs with different {what} ({detail}); "
                "give them different --label values or report them separately"
            )


# ----------------------------------------------------------------------------------------------
# Rendering


def _task_name(task: str, task_names: Mapping[str, str] | None) -> str:
    return {**DEFAULT_TASK_NAMES, **(task_names or {})}.get(task, task)


def _lang_name(lang: str, lang_names: Mapping[str, str] | None = None) -> str:
    """The header of a language column: `lang_names`, else DEFAULT_LANG_NAMES, else the code
    capitalised; the average and no-language columns keep theirs."""
    if lang in (AVG, NO_LANG):
        return lang
    return {**DEFAULT_LANG_NAMES, **(lang_names or {})}.get(lang) or lang[:1].upper() + lang[1:]


def column_headers(
    table: Table, task_names: Mapping[str, str] | None = None, lang_names: Mapping[str, str] | None = None
) -> list[str]:
    """Short headers in the paper's style: "MGSM Zh", "Ru", "Es", "Avg", "HumanEval Zh", ...

    `task_names` / `lang_names` override the display names of tasks (DEFAULT_TASK_NAMES) and of
    language codes (DEFAULT_LANG_NAMES).
    """
    headers, last_task = [], None
    for task, lang in table.columns:
        name = _lang_name(lang, lang_names)
        if task != last_task:
            tname = _task_name(task, task_names)
            name = tname if lang == NO_LANG else f"{tname} {name}"
            last_task = task
        headers.append(name)
    return headers


def to_markdown(
    table: Table,
    *,
    task_names: Mapping[str, str] | None = None,
    title: str | None = None,
    lang_names: Mapping[str, str] | None = None,
) -> str:
    """The table as GitHub Markdown, one decimal, "mean ± std" for cells with several runs.

    Args:
        table: from `build_table`.
        task_names: display names per task, overriding MGSM (math) / HumanEval (code).
        title: an optional heading line.
        lang_names: display names per language code, overriding DEFAULT_LANG_NAMES.
    """
    multi_ns = sorted({c.n for (_, (_, lang)), c in table.cells.items() if lang != AVG and c.n > 1})
    show_n = len(multi_ns) > 1
    any_partial = any_limited = False
    lines = []
    if title:
        lines += [f"### {title}", ""]
    headers = [h.replace("|", "\\|") for h in column_headers(table, task_names, lang_names)]
    lines.append("| " + " | ".join(["Method", *headers]) + " |")
    lines.append("|" + "---|" * (len(table.columns) + 1))
    for row in table.rows:
        texts = []
        for col in table.columns:
            c = table.cells.get((row, col))
            if c is None:
                texts.append(MISSING)
                continue
            text = f"{c.mean:.1f}"
            if c.std is not None:
                text += f" ± {c.std:.1f}" + (f" (n={c.n})" if show_n else "")
            if c.partial:
                text += "*"
                any_partial = True
            if c.limited:
                text += " †"
                any_limited = True
            texts.append(text)
        lines.append("| " + " | ".join([row.replace("|", "\\|"), *texts]) + " |")
    foot = []
    if multi_ns:
        runs = "n runs" if show_n else f"{multi_ns[0]} runs"
        foot.append(f"Scores in %; a ± b = mean ± sample standard deviation over {runs}.")
    if any_partial:
        foot.append("\\* average over the languages this row has results for only.")
    if any_limited:
        foot.append("† partial run: only the first rows of the test set (eval --limit); not comparable to full runs.")
    if foot:
        lines += ["", *foot]
    return "\n".join(lines) + "\n"


def _csv_key(task: str, lang: str) -> str:
    return task if lang == NO_LANG else f"{task}_{lang.lower()}"


def _num(x: float | None) -> str:
    return "" if x is None else repr(round(x, 6))


def to_csv(table: Table) -> str:
    """The table as CSV: one header row, then one row per method.

    Columns: `method`, then per table column `<task>_<lang>` (mean %, 6 decimals),
    `<task>_<lang>_std` (sample std %, empty when n == 1) and `<task>_<lang>_n` (runs; for the
    `<task>_avg` columns the number of languages averaged). Missing cells are empty.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["method"]
    for task, lang in table.columns:
        key = _csv_key(task, lang)
        header += [key, f"{key}_std", f"{key}_n"]
    writer.writerow(header)
    for row in table.rows:
        out = [row]
        for col in table.columns:
            c = table.cells.get((row, col))
            out += ["", "", ""] if c is None else [_num(c.mean), _num(c.std), str(c.n)]
        writer.writerow(out)
    return buf.getvalue()


def to_png(
    table: Table,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    task_names: Mapping[str, str] | None = None,
    force: bool | None = None,
    lang_names: Mapping[str, str] | None = None,
) -> Path:
    """Save a grouped bar chart of the table: x = columns, one bar per method, std error bars.

    Tick labels: the task's display name over the language's (`task_names`, `lang_names` as in
    `to_markdown`); a language name's parenthesis, e.g. "Han (as Zh)", goes on a line of its own.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change); written atomically
    (`force`: see loraflow.common.io.atomic_path).
    """
    require("matplotlib", what="the report's bar chart")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    headers = []
    for task, lang in table.columns:
        tname = _task_name(task, task_names)
        lname = _lang_name(lang, lang_names).replace(" (", "\n(")
        headers.append(tname if lang == NO_LANG else f"{tname}\n{lname}")
    n_rows, n_cols = max(len(table.rows), 1), max(len(table.columns), 1)
    fig = Figure(figsize=(max(6.0, 1.1 * n_cols + 2.5), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / n_rows
    for i, row in enumerate(table.rows):
        xs, heights, errs = [], [], []
        for j, col in enumerate(table.columns):
            c = table.cells.get((row, col))
            if c is not None:
                xs.append(j - 0.4 + (i + 0.5) * width)
                heights.append(c.mean)
                errs.append(c.std or 0.0)
        ax.bar(xs, heights, width, label=row)
        with_std = [(x, h, e) for x, h, e in zip(xs, heights, errs) if e > 0]
        if with_std:  # error bars only where several runs give a std
            ex, eh, ee = zip(*with_std)
            ax.errorbar(ex, eh, yerr=ee, fmt="none", ecolor="black", elinewidth=1, capsize=2)
    for j in range(1, len(table.columns)):  # separate the task groups
        if table.columns[j][0] != table.columns[j - 1][0]:
            ax.axvline(j - 0.5, color="0.6", linewidth=0.8)
    ax.set_xticks(range(len(table.columns)))
    ax.set_xticklabels(headers)
    ax.set_ylabel("Score (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Results by method")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ----------------------------------------------------------------------------------------------
# The paper's published table

# Source: Wang et al., "LoRA-Flow: Dynamic LoRA Fusion for Large Language Models in Generative
# Tasks", ACL 2024, Table 1 (Llama-2-7B), as restated in the project's reference ("The paper's
# results"). Percentages exactly as printed there, one decimal; the Avg values are the paper's own
# (not recomputed here). row -> task -> (zh, ru, es, Avg). Shown beside ours for comparison only
# (`report --paper`): never mixed into our table, CSV or chart.
PAPER_TABLE_1: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "Base": {"math": (4.4, 3.2, 2.4, 3.3), "code": (0.0, 0.0, 2.4, 0.8)},
    "Single LoRA (language)": {"math": (5.2, 3.6, 3.6, 4.1), "code": (12.2, 14.0, 10.4, 12.2)},
    "Single LoRA (task)": {"math": (26.8, 32.8, 41.2, 33.6), "code": (18.3, 23.2, 21.9, 21.1)},
    "Avg fusion": {"math": (12.8, 10.4, 18.4, 13.9), "code": (17.1, 17.7, 18.3, 17.7)},
    "LoRAHub": {"math": (20.8, 28.4, 36.8, 28.7), "code": (19.5, 21.3, 20.1, 20.3)},
    "LoRA-Flow": {"math": (33.2, 37.6, 42.0, 37.6), "code": (20.7, 23.8, 23.2, 22.6)},
}
PAPER_TABLE_LANGS = ("zh", "ru", "es", AVG)
PAPER_TABLE_TITLE = (
    "Published: LoRA-Flow paper, Table 1 (Llama-2-7B; MGSM and HumanEval in zh, ru, es) "
    "— for comparison, not produced by this run"
)


def paper_table() -> Table:
    """The paper's published results (PAPER_TABLE_1) as a `Table` in our layout: its six rows,
    and per task (math, code) the columns zh, ru, es and Avg; one run per cell, no std."""
    columns = [(task, lang) for task in TASK_ORDER for lang in PAPER_TABLE_LANGS]
    cells = {
        (row, (task, lang)): Cell(value, None, 3 if lang == AVG else 1)
        for row, by_task in PAPER_TABLE_1.items()
        for task, values in by_task.items()
        for lang, value in zip(PAPER_TABLE_LANGS, values)
    }
    return Table(rows=list(PAPER_TABLE_1), columns=columns, cells=cells)


def paper_markdown() -> str:
    """The paper's published table as Markdown, under the PAPER_TABLE_TITLE heading, with the
    paper's own column names (MGSM, HumanEval; Zh, Ru, Es) whatever names our table uses."""
    return to_markdown(paper_table(), title=PAPER_TABLE_TITLE)


# ----------------------------------------------------------------------------------------------
# The whole report


@dataclass
class Report:
    """What `write_report` produced: the table, its Markdown (followed by the paper's published
    table when asked for, `paper`), the files written, skipped inputs ("PATH: why" each)."""

    table: Table
    markdown: str
    written: list[Path]
    skipped: list[str]
    paper: Table | None = None


def write_report(
    inputs: Sequence[str | os.PathLike],
    *,
    out_dir: str | os.PathLike | None = None,
    md: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    png: str | os.PathLike | None = None,
    title: str | None = None,
    task_names: Mapping[str, str] | None = None,
    force: bool = False,
    lang_names: Mapping[str, str] | None = None,
    paper: bool = False,
) -> Report:
    """Build the table from result files/directories/globs and write the requested renderings.

    Args:
        inputs: RESULT.json files, directories of them, or glob patterns (see `gather_results`).
        out_dir: if given, write table.md, table.csv and table.png there (unless `md`,
            `csv_path` or `png` name another path for that rendering).
        md, csv_path, png: explicit output paths for each rendering.
        title: heading of the Markdown file and title of the chart.
        task_names: display names per task (default MGSM for math, HumanEval for code).
        force: replace output files that loraflow did not write (otherwise refused, before any is written).
        lang_names: display names per language code (default DEFAULT_LANG_NAMES, e.g. han ->
            "Han (as Zh)"); the CSV keeps the codes.
        paper: append the paper's published table (`paper_markdown`) after ours in the Markdown,
            headed as published numbers; the CSV and chart hold ours only.
    Returns:
        A `Report`; nothing is printed.
    """
    if png or out_dir is not None:
        require("matplotlib", what="the report's bar chart (table.png)")  # before anything is written
    results, skipped = gather_results(inputs)
    table = build_table(results)
    markdown = to_markdown(table, task_names=task_names, title=title, lang_names=lang_names)
    if paper:
        markdown += "\n" + paper_markdown()
    if out_dir is not None:
        out = Path(out_dir)
        md = md or out / "table.md"
        csv_path = csv_path or out / "table.csv"
        png = png or out / "table.png"
    for path, what in ((md, "Markdown file"), (csv_path, "CSV file"), (png, "chart file")):
        if path:
            check_output_file(path, what=what, force=force)
    written = []
    if md:
        write_text_atomic(md, markdown, force=force)
        written.append(Path(md))
    if csv_path:
        write_text_atomic(csv_path, to_csv(table), force=force)
        written.append(Path(csv_path))
    if png:
        written.append(to_png(table, png, title=title, task_names=task_names, force=force, lang_names=lang_names))
    return Report(table=table, markdown=markdown, written=written, skipped=skipped,
                  paper=paper_table() if paper else None)


def _parse_names(items: Sequence[str] | None, flag: str, key: str, example: str) -> dict[str, str]:
    names = {}
    for item in items or []:
        code, sep, name = item.partition("=")
        if not sep or not code.strip() or not name.strip() or any(c in item for c in "\r\n"):
            raise LoraFlowError(f"{flag} expects {key}=NAME (e.g. {example}), got {item!r}")
        names[code.strip()] = name.strip()
    return names


def parse_task_names(items: Sequence[str] | None) -> dict[str, str]:
    """Parse repeated `TASK=NAME` options into a dict; a malformed item raises LoraFlowError."""
    return _parse_names(items, "--task-name", "TASK", "math=GSM8K")


def parse_lang_names(items: Sequence[str] | None) -> dict[str, str]:
    """Parse repeated `CODE=NAME` options (`--lang-name han=Chinese`) into a dict of display names
    per language code; a malformed item (no '=', empty code or name) raises LoraFlowError."""
    return _parse_names(items, "--lang-name", "CODE", "han=Chinese")
