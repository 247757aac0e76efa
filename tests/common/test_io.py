"""The one atomic writer: replaces only what is ours, never half-writes, and recovers from kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.common.errors import LoraFlowError
from loraflow.common.io import (
    MARKER,
    atomic_dir,
    check_output_dir,
    check_output_file,
    read_jsonl,
    read_text_lines,
    recover_dir,
    write_json_atomic,
)


def _writer(content: str):
    def write(d: Path) -> None:
        (d / "data.txt").write_text(content)

    return write


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_replaces_its_own_output_but_not_an_unrelated_directory(tmp_path):
    out = tmp_path / "out"
    atomic_dir(out, _writer("one"))
    atomic_dir(out, _writer("two"))  # ours (marker): replaced
    assert (out / "data.txt").read_text() == "two" and (out / MARKER).is_file()

    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(LoraFlowError, match="not written by loraflow.*--force"):
        atomic_dir(mine, _writer("gate"))
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydir", "out"]  # no temp dir left behind
    atomic_dir(mine, _writer("gate"), force=True)
    assert not (mine / "thesis.tex").exists() and (mine / "data.txt").read_text() == "gate"


def test_a_directory_of_only_the_files_we_write_counts_as_ours(tmp_path):
    legacy = tmp_path / "legacy"  # written before the marker existed
    legacy.mkdir()
    (legacy / "data.txt").write_text("old")
    atomic_dir(legacy, _writer("new"))
    assert (legacy / "data.txt").read_text() == "new"


def test_a_file_is_never_turned_into_a_directory(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(LoraFlowError, match="is a file, not a directory"):
        atomic_dir(f, _writer("x"))
    with pytest.raises(LoraFlowError, match="is a file, not a directory"):
        atomic_dir(f, _writer("x"), force=True)
    assert f.read_text() == "keep me"
    with pytest.raises(LoraFlowError, match="notes.txt is a file"):
        atomic_dir(f / "sub" / "out", _writer("x"))


def test_output_file_checks(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"a": 1}\n')
    with pytest.raises(LoraFlowError, match="is an input of this run"):
        check_output_file(data, inputs=[data])
    with pytest.raises(LoraFlowError, match="is an input of this run"):
        write_json_atomic(tmp_path / "." / "t.jsonl", {}, inputs=[data])
    assert data.read_text() == '{"a": 1}\n'
    with pytest.raises(LoraFlowError, match="is a directory"):
        write_json_atomic(tmp_path, {})
    with pytest.raises(LoraFlowError, match="/proc"):
        check_output_file("/proc/self/loraflow.json")
    with pytest.raises(LoraFlowError, match="is a file, not a directory"):
        write_json_atomic(data / "r.json", {})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LoraFlowError, match="not a regular file"):
        check_output_file(fifo)
    with pytest.raises(LoraFlowError, match="holds an input"):
        check_output_dir(tmp_path, inputs=[data], force=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(LoraFlowError, match="permission denied"):
        check_output_file(ro / "r.json")


def test_recover_restores_a_complete_copy_left_between_two_renames(tmp_path):
    """A kill after `target -> old` and before `tmp -> target` leaves no target: recovery puts it back."""
    pid = _dead_pid()
    target = tmp_path / "last"
    complete = tmp_path / f".last.tmp-{pid}-abc"
    complete.mkdir()
    (complete / "data.txt").write_text("epoch 3")
    (complete / MARKER).write_text("{}")
    older = tmp_path / f".last.old-{pid}-abc"
    older.mkdir()
    (older / "data.txt").write_text("epoch 2")
    (older / MARKER).write_text("{}")
    os.utime(older / MARKER, ns=(1, 1))
    half = tmp_path / f".last.tmp-{pid}-def"  # a write that never finished: no marker
    half.mkdir()
    (half / "data.txt").write_text("partial")
    recover_dir(target)
    assert (target / "data.txt").read_text() == "epoch 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_killed_save_leaves_nothing_that_lasts(tmp_path):
    """kill -9 in the middle of a save: the old version stays, the next save removes the leftovers."""
    target = tmp_path / "best"
    atomic_dir(target, _writer("v1"))
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom loraflow.common.io import atomic_dir\n"
        "def write(d):\n    (d / 'data.txt').write_text('v2')\n    print('writing', flush=True)\n    time.sleep(60)\n"
        f"atomic_dir({str(target)!r}, write)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (target / "data.txt").read_text() == "v1"
    assert len(list(tmp_path.iterdir())) == 2  # the killed writer's temp dir is still there ...
    atomic_dir(target, _writer("v3"))
    assert (target / "data.txt").read_text() == "v3"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # ... until the next save


def test_non_utf8_lines_are_reported_with_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"a": 1}\n{"a": "\xff\xfe"}\n')
    with pytest.raises(LoraFlowError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_jsonl(f)
    with pytest.raises(LoraFlowError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_text_lines(f)
    with pytest.raises(LoraFlowError, match="is a directory"):
        read_jsonl(tmp_path)
    with pytest.raises(LoraFlowError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    assert read_text_lines(_crlf(tmp_path)) == ["a", "b"]


def _crlf(tmp_path: Path) -> Path:
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"a\r\nb\r\n")
    return f


def test_single_output_files_replace_only_their_own(tmp_path):
    """Issue 16 item 8: a file loraflow did not write (or that was changed since) is refused and kept byte for
    byte; loraflow's own earlier output is replaced; force replaces a foreign one."""
    from loraflow.common.io import LEDGER, file_is_ours, write_text_atomic

    ours, theirs = tmp_path / "result.json", tmp_path / "paper.json"
    theirs.write_bytes(b'{"mine": true}\n')
    write_json_atomic(ours, {"score": 0.1}, force=False)
    assert file_is_ours(ours) and not file_is_ours(theirs)
    write_json_atomic(ours, {"score": 0.2}, force=False)  # a re-run replaces its own output
    assert '"score": 0.2' in ours.read_text()
    with pytest.raises(LoraFlowError, match="paper.json: exists and was not written by loraflow.*--force"):
        write_json_atomic(theirs, {"score": 0.3}, force=False)
    assert theirs.read_bytes() == b'{"mine": true}\n'
    ours.write_text(ours.read_text() + " ")  # edited by hand after we wrote it: no longer ours alone
    with pytest.raises(LoraFlowError, match="not written by loraflow"):
        check_output_file(ours, force=False)
    write_json_atomic(theirs, {"score": 0.3}, force=True)
    assert '"score": 0.3' in theirs.read_text() and file_is_ours(theirs)
    # a same-named file elsewhere is judged by its own directory's ledger
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "result.json").write_text('{"score": 0.2}')
    assert not file_is_ours(tmp_path / "sub" / "result.json")
    # the ledger is sha256sum's format, one line per write
    lines = (tmp_path / LEDGER).read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split("  ")[0]) == 64 for line in lines)
    # internal writers that manage ownership themselves (force=None) neither check nor record
    write_text_atomic(tmp_path / "log.json", "{}")
    assert len((tmp_path / LEDGER).read_text().splitlines()) == 3
