"""The code sandbox: correct programs pass, and hostile ones never pass nor harm the scorer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loraflow.common.errors import LoraFlowError
from loraflow.evaluation.sandbox import (
    CodeProgram, ExecutionResult, SandboxError, SandboxLimits, _force_rmtree, _kill_group, run_program, run_programs,
)

TEST = "def check(candidate):\n    assert candidate(2) == 4\n"
GOOD = "def square(x):\n    return x * x\n"


class _Check:
    """`source + CHECK` is the program whose source is `source`, scored by TEST on its `square`."""

    def __radd__(self, source: str) -> CodeProgram:
        return CodeProgram(source, TEST, "square")


CHECK = _Check()
REAL_BWRAP = shutil.which("bwrap")  # before any test replaces shutil.which


def _sandbox_dir(result: ExecutionResult) -> str:
    """Programs below raise RuntimeError(os.getcwd()) to report their working directory."""
    assert result.detail.startswith("RuntimeError: "), result
    return result.detail.split(": ", 1)[1]


def test_an_interpreter_under_tmp_runs_inside_the_sandbox(tmp_path):
    """The sandbox mounts a fresh /tmp; an interpreter (or virtual environment) living under /tmp, as in a CI
    clone there, must still be found, read-only."""
    import sys

    assert str(tmp_path).startswith("/tmp/")
    python = tmp_path / "venv-bin" / "python"
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    result = run_program(GOOD + CHECK, python=str(python))
    assert result.status == "passed", result.detail
    escape = run_program(f"open({str(python.parent / 'x')!r}, 'w').write('x')\n" + GOOD + CHECK, python=str(python))
    assert escape.status != "passed" and not (python.parent / "x").exists()  # bound read-only


def test_correct_and_wrong_programs():
    ok, wrong, syntax, crash = run_programs(
        [GOOD + CHECK, "def square(x):\n    return x + x + 1\n" + CHECK, "def square(x)\n    return x\n" + CHECK,
         "def square(x):\n    return undefined_name\n" + CHECK],
        workers=2,
    )
    assert ok.status == "passed" and ok.passed and ok.detail == ""
    assert wrong.status == "failed" and wrong.detail == "AssertionError"
    assert syntax.status == "error" and syntax.detail.startswith("SyntaxError")
    assert crash.status == "failed" and "NameError" in crash.detail
    assert all(r.duration > 0 for r in (ok, wrong, syntax, crash))


def test_infinite_loop_times_out():
    loops = ["while True:\n    pass\n" + CHECK, "import time\ntime.sleep(60)\n" + CHECK]
    results = run_programs(loops + [GOOD + CHECK, GOOD + CHECK], workers=2, timeout=1.0)
    assert [r.status for r in results] == ["timeout", "timeout", "passed", "passed"]
    assert results[0].detail == "timed out after 1 s"
    assert all(r.duration < 60 for r in results)  # the sleeping program was cut off, not waited for


@pytest.mark.parametrize(
    "program",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess\nsubprocess.Popen(['sleep', '60'])\n",
        "import os\nos.system('sleep 60 &')\n",
        "import os\nos.posix_spawn('/bin/sleep', ['sleep', '60'], {})\n",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
        "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6))\n",
    ],
    ids=["fork-bomb", "subprocess", "os.system", "posix_spawn", "multiprocessing", "raise-limits"],
)
def test_process_creation_is_contained(program):
    result = run_program(GOOD + program + CHECK, timeout=2.0)
    assert result.status != "passed"


def test_huge_allocation_fails_inside_the_memory_limit():
    limits = SandboxLimits(memory_bytes=256 * 1024**2)
    # calloc'd bytearrays would succeed lazily under overcommit; only RLIMIT_AS stops this one
    result = run_program("x = bytearray(1024**3)\n" + GOOD + CHECK, limits=limits)
    assert result.status == "error" and "MemoryError" in result.detail
    assert run_program("x = bytearray(64 * 1024**2)\n" + GOOD + CHECK, limits=limits).passed


def test_big_files_and_big_output_are_capped():
    limits = SandboxLimits(file_size_bytes=1024**2)
    write = run_program("with open('big.bin', 'wb') as f:\n    f.write(b'x' * 8 * 1024**2)\n" + GOOD + CHECK, limits=limits)
    assert write.status == "error" and "File too large" in write.detail
    flood = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n" + CHECK, limits=limits, timeout=2.0)
    assert not flood.passed


def test_files_stay_in_a_temporary_directory_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside.txt"
    program = (
        "import os\n"
        "open('leak.txt', 'w').write('x')\n"
        "os.mkdir('sub')\n"
        "open('sub/more.txt', 'w').write('y')\n"
        "raise RuntimeError(os.getcwd())\n"
    )
    result = run_program(program + CHECK)
    workdir = _sandbox_dir(result)
    assert os.path.realpath(workdir) != os.path.realpath(tmp_path)
    assert not os.path.exists(workdir)  # removed afterwards, with everything written in it
    assert list(tmp_path.iterdir()) == []  # nothing written to the scorer's cwd

    escape = run_program(f"open({str(outside)!r}, 'w').write('owned')\n" + GOOD + CHECK)
    assert escape.status == "error" and "outside the sandbox" in escape.detail
    relative = run_program("import os\nopen('../../escaped.txt', 'w').write('x')\n" + GOOD + CHECK)
    assert not relative.passed
    assert not outside.exists()


@pytest.mark.parametrize(
    "early_exit",
    ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n", "exit()\n", "quit(0)\n"],
    ids=["os._exit", "sys.exit", "SystemExit", "exit", "quit"],
)
def test_exiting_before_the_tests_never_passes(early_exit):
    wrong = "def square(x):\n    return 0\n"
    result = run_program(wrong + early_exit + CHECK)
    assert result.status == "failed"
    assert result.detail == "exited with status 0 before the tests completed"


def test_redefining_check_or_builtins_does_not_pass_wrong_code():
    wrong = "def square(x):\n    return 0\n"
    # a completion's own check() is replaced by the test's check(), defined after it
    assert run_program(wrong + "def check(candidate):\n    pass\n" + CHECK).status == "failed"
    # silencing print/exit does not hide the sentinel (it is written to fd 1 directly) ...
    silenced = "import builtins\nbuiltins.print = lambda *a, **k: None\nbuiltins.exit = None\n"
    assert run_program(silenced + GOOD + CHECK).passed
    # ... and cannot make a wrong solution pass
    assert run_program(silenced + wrong + CHECK).status == "failed"
    # a profile hook that turns the call to check() into a clean exit
    hook = (
        "import sys\n"
        "def _skip(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name == 'check':\n"
        "        raise SystemExit(0)\n"
        "sys.setprofile(_skip)\n"
    )
    assert run_program(hook + wrong + CHECK).status == "failed"


def test_fake_sentinels_do_not_pass():
    forge = (
        "import os, re, secrets, sys\n"
        "for _ in range(200):\n"
        "    print(secrets.token_hex(16))\n"
        "    print('\\n' + secrets.token_hex(16) + '\\n', file=sys.stderr)\n"
        # whatever looks like a token in the program text, argv, environment or own directory
        "blob = open(__file__).read() + ' '.join(sys.argv) + str(os.environ) + ' '.join(os.listdir('.'))\n"
        "for t in re.findall(r'[0-9a-f]{32}', blob):\n"
        "    print(t)\n"
        "sys.stdout.flush()\n"
        "os._exit(0)\n"
    )
    result = run_program("def square(x):\n    return 0\n" + forge + CHECK)
    assert result.status == "failed"


# ------------------------------------------------------------------ a pass is the verdict process's fact (#27)
# Each attack ends by claiming success every way a process can (exit 0, printing, writing to every descriptor it
# has and to the verdict process's through /proc); the solution itself is wrong.
_CLAIM = (
    "import json, os, sys\n"
    "def _claim(extra=b''):\n"
    "    line = json.dumps({'status': 'passed', 'detail': ''}).encode() + b'\\n'\n"
    "    for fd in range(256):\n"
    "        for data in (b'started\\n' + line, extra + b'\\n'):\n"
    "            try:\n"
    "                os.write(fd, data)\n"
    "            except OSError:\n"
    "                pass\n"
    "    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
    "        try:\n"
    "            fds = os.listdir('/proc/%s/fd' % pid)\n"
    "        except OSError:\n"
    "            continue\n"
    "        for fd in fds:\n"
    "            try:\n"
    "                with open('/proc/%s/fd/%s' % (pid, fd), 'wb') as f:\n"
    "                    f.write(b'started\\n' + line)\n"
    "            except Exception:\n"
    "                pass\n"
    "    print('passed', flush=True)\n"
    "    os._exit(0)\n"
)
_FORGERIES = {
    # the attack on the old bootstrap: read every integer local up the stack as an fd, print what it holds
    "frame-walk": "f = sys._getframe()\nloot = b''\nwhile f is not None:\n"
                  "    for v in list(f.f_locals.values()):\n"
                  "        if isinstance(v, int) and 2 < v < 1024:\n"
                  "            try:\n                loot += os.read(v, 4096)\n            except OSError:\n"
                  "                pass\n"
                  "    f = f.f_back\n_claim(loot)\n",
    "inherited-fds": "loot = b''\nfor fd in range(3, 256):\n    try:\n        loot += os.read(fd, 4096)\n"
                     "    except OSError:\n        pass\n_claim(loot)\n",
    "proc-self": "loot = b''\nfor name in os.listdir('/proc/self/fd'):\n    try:\n"
                 "        loot += open('/proc/self/fd/' + name, 'rb').read(4096)\n    except Exception:\n"
                 "        pass\n_claim(loot)\n",
    "gc": "import gc\ntry:\n    gc.get_objects()\nexcept Exception:\n    pass\n_claim()\n",
    "traceback-frames": "try:\n    raise ValueError\nexcept ValueError as e:\n    f = e.__traceback__.tb_frame\n"
                        "while f.f_back is not None:\n    f = f.f_back\n"
                        "for v in list(f.f_globals.values()):\n    getattr(v, '__closure__', None)\n_claim()\n",
    "during-the-call": "def square(x):\n    _claim()\n",
    "parent-memory": "loot = b''\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n    try:\n"
                     "        loot += open('/proc/%s/environ' % pid, 'rb').read()\n"
                     "        open('/proc/%s/mem' % pid, 'r+b').write(b'x')\n    except Exception:\n"
                     "        pass\n_claim(loot)\n",
}


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_a_wrong_program_cannot_forge_a_pass(isolation):
    """Whatever the program process does, only check() returning in the verdict process is a pass."""
    wrong = "def square(x):\n    return None\n"
    programs = [wrong + _CLAIM + attack + CHECK for attack in _FORGERIES.values()]
    results = run_programs(programs, workers=2, isolation=isolation)
    assert [name for name, r in zip(_FORGERIES, results) if r.passed] == [], results
    # the same claims after a right answer do not get in the way of its pass
    assert run_program(GOOD + _CLAIM + CHECK, isolation=isolation).passed


def test_answers_are_plain_data():
    """An object that equals everything does not cross to the tests; plain types keep their type."""
    always = "class Yes:\n    def __eq__(self, other):\n        return True\ndef square(x):\n    return Yes()\n"
    result = run_program(always + CHECK)
    assert result.status == "failed" and "not plain data" in result.detail
    typed = CodeProgram(
        "def f(x):\n    return (x, {1: 'a', 'b': [2.5, None]}, {3}, frozenset({4}), b'z', 1j, float('inf'), True)\n",
        "def check(c):\n    v = c([1, (2, 3)])\n    assert v == ([1, (2, 3)], {1: 'a', 'b': [2.5, None]}, {3}, frozenset({4}), "
        "b'z', 1j, float('inf'), True)\n    assert type(v) is tuple and type(v[0][1]) is tuple and v[-1] is True\n",
        "f")
    assert run_program(typed).passed
    # the tests reach the prompt's helpers (HumanEval/32 calls poly() of its prompt), and exceptions keep their type
    helper = CodeProgram("def double(x):\n    return 2 * x\ndef f(x):\n    raise KeyError(x)\n",
                         "def check(c):\n    assert double(2) == 4\n    try:\n        c(1)\n    except KeyError:\n"
                         "        return\n    raise AssertionError('no KeyError')\n",
                         "f", prelude="def double(x):\n    return 2 * x\ndef f(x):\n    \"\"\"doc\"\"\"\n")
    assert run_program(helper).passed


@pytest.mark.parametrize("noise", [
    "open('/dev/stdout', 'w').write('hello')\n",
    "import sys\nopen('/dev/stderr', 'w').write('x' * 100000)\nsys.stdout.truncate(0) if sys.stdout.seekable() else 0\n",
    "import os\nos.close(0)\nos.close(1)\nos.close(2)\n",
    "import os\nos.ftruncate(1, 0)\nos.write(1, b'loraflow-sandbox-started\\n' * 1000)\n",
], ids=["open-stdout", "flood-stderr", "close-0-2", "truncate-stdout"])
def test_output_tricks_affect_only_their_own_program(noise):
    """Writing, truncating or closing the standard streams is harmless: right answers pass beside them, and
    every other program of the run is scored."""
    results = run_programs([GOOD + noise + CHECK, GOOD + CHECK, "def square(x):\n    return 0\n" + noise + CHECK],
                           workers=2)
    assert [r.status for r in results] == ["passed", "passed", "failed"], results


def test_cleanup_never_follows_links(tmp_path, monkeypatch):
    """A link planted in the sandbox directory whose removal fails once: the retry chmods no file outside."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    outside.chmod(0o640)
    box = tmp_path / "box"
    (box / "sub").mkdir(parents=True)
    (box / "sub" / "link").symlink_to(outside)
    (box / "uplink").symlink_to(tmp_path)
    real_unlink, failed = os.unlink, []

    def flaky_unlink(path, *args, **kwargs):
        if str(path).endswith("link") and path not in failed:
            failed.append(path)
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    tmp_path.chmod(0o750)
    monkeypatch.setattr(os, "unlink", flaky_unlink)
    _force_rmtree(str(box))
    assert failed and not box.exists()
    assert outside.read_text() == "keep" and (outside.stat().st_mode & 0o777) == 0o640
    assert (tmp_path.stat().st_mode & 0o777) == 0o750


def test_killing_the_parent_is_refused():
    me = os.getpid()
    for attack in (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\n",
        "import ctypes\nctypes.CDLL(None).kill(__import__('os').getppid(), 9)\n",
    ):
        result = run_program(GOOD + attack + CHECK)
        assert not result.passed
        assert os.getpid() == me  # still alive to check it
    # killing itself is allowed, and is not a pass
    result = run_program(GOOD + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n" + CHECK)
    assert result.status == "error" and result.detail == "killed by SIGKILL"


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("LORAFLOW_FAKE_SECRET", "hunter2-do-not-leak")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-injected-path")
    program = (
        "import os, sys\n"
        "assert 'LORAFLOW_FAKE_SECRET' not in os.environ, 'secret leaked'\n"
        "assert b'hunter2' not in open('/proc/self/environ', 'rb').read(), 'secret in environ block'\n"
        "assert '/nonexistent-injected-path' not in sys.path\n"
        "assert sys.flags.isolated == 1\n"
        "assert os.environ['HOME'] == os.getcwd() and 'PATH' in os.environ\n"
        "assert sys.stdin.read() == ''\n"
    )
    result = run_program(program + GOOD + CHECK)
    assert result.passed, result


def test_limits_validation():
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=0)
    with pytest.raises(ValueError, match="cpu_seconds"):
        SandboxLimits(cpu_seconds=0)


def _live_members(pgid: int) -> list[int]:
    """Pids of processes in group `pgid` that are not zombies (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            except OSError:
                continue
            if int(pgrp) == pgid and state != "Z":
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_group_kill_reaches_background_children():
    """The clean-up the sandbox runs after every program kills a leader and its backgrounded children."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    deadline = time.monotonic() + 5
    while len(_live_members(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_live_members(proc.pid)) == 3  # sh and two sleeps
    _kill_group(proc.pid, attempts=1)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    _kill_group(proc.pid)
    deadline = time.monotonic() + 2
    while _live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _live_members(proc.pid) == []


# ------------------------------------------------------------------ structural containment (#9)
_ESCAPES = {
    "unlink-dir_fd": "os.unlink('victim.txt', dir_fd=os.open(OUT, os.O_RDONLY))",
    "rename-dir_fd": "fd = os.open(OUT, os.O_RDONLY)\nos.rename('victim.txt', 'moved.txt', src_dir_fd=fd, dst_dir_fd=fd)",
    "rename-out": "fd = os.open(OUT, os.O_RDONLY)\nos.rename('victim.txt', os.path.join(os.getcwd(), 'x'), src_dir_fd=fd)",
    "fchmod": "os.fchmod(os.open(os.path.join(OUT, 'victim.txt'), os.O_RDONLY), 0o777)",
    "fchown": "os.fchown(os.open(os.path.join(OUT, 'victim.txt'), os.O_RDONLY), 1, 1)",
    "sqlite": "import sqlite3\nsqlite3.connect(os.path.join(OUT, 'evil.db')).execute('create table t(x)')",
    "create-dir_fd": "os.close(os.open('new.txt', os.O_CREAT | os.O_WRONLY, dir_fd=os.open(OUT, os.O_RDONLY)))",
    "mkdir-dir_fd": "os.mkdir('newdir', dir_fd=os.open(OUT, os.O_RDONLY))",
    "rmdir-dir_fd": "os.rmdir('victimdir', dir_fd=os.open(OUT, os.O_RDONLY))",
    "utime-dir_fd": "os.utime('victim.txt', (0, 0), dir_fd=os.open(OUT, os.O_RDONLY))",
    "proc-root": "open('/proc/self/root' + OUT + '/new.txt', 'w').write('x')",
    "proc-cwd": "os.chdir(OUT)\nopen('/proc/self/cwd/new.txt', 'w').write('x')",
    "chdir-relative": "os.chdir(OUT)\nos.remove('victim.txt')",
    "truncate-fd": "os.ftruncate(os.open(os.path.join(OUT, 'victim.txt'), os.O_RDWR), 0)",
    "shm": "open('/dev/shm/loraflow-escape', 'w').write('x')",
    "scratch-tmp": "open('/tmp/loraflow-escape-' + str(os.getpid()), 'w').write('x')",
}


@pytest.fixture
def outside(tmp_path):
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "victim.txt").chmod(0o644)
    (tmp_path / "victimdir").mkdir()
    return tmp_path


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mode, p.stat().st_uid, p.stat().st_mtime_ns,
                   p.read_bytes() if p.is_file() else b"") for p in root.rglob("*"))


def test_writes_outside_the_sandbox_fail_whatever_the_route(outside):
    """Calls the audit hook cannot see (fd-relative, through /proc, by a C library) still change nothing."""
    before = _snapshot(outside)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    tmp_before = set(os.listdir("/tmp"))
    programs = [f"import os\nOUT = {str(outside)!r}\n" + code + "\n" + GOOD + CHECK for code in _ESCAPES.values()]
    results = run_programs(programs, workers=2, timeout=5.0)
    assert _snapshot(outside) == before
    assert [name for name, r in zip(_ESCAPES, results) if r.passed] == []
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) == shm_before
    assert not [n for n in set(os.listdir("/tmp")) - tmp_before if n.startswith("loraflow-escape")]


def test_no_network_inside_the_sandbox():
    program = "import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo'], socket.if_nameindex()\n"
    result = run_program(program + GOOD + CHECK)
    assert result.passed, result  # a network namespace of its own: loopback only


def test_missing_isolation_fails_closed_unless_opted_out(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    with pytest.raises(LoraFlowError, match="bwrap not found.*bubblewrap.*--isolation none"):
        run_programs([GOOD + CHECK])
    with pytest.raises(LoraFlowError, match="bubblewrap"):
        run_program(GOOD + CHECK)
    assert run_program(GOOD + CHECK, isolation="none").passed
    with pytest.raises(LoraFlowError, match="--isolation 'docker'"):
        run_programs([GOOD + CHECK], isolation="docker")


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1])
def test_bad_timeouts_are_refused(timeout):
    with pytest.raises(LoraFlowError, match="timeout"):
        run_programs([GOOD + CHECK], timeout=timeout)


# ------------------------------------------------------------------ infrastructure failures are errors (#16)
def _fake_bwrap(tmp_path, fail_when: str | None = None) -> str:
    """A `bwrap` that fails as bubblewrap does where it cannot create namespaces: always, or (with `fail_when`)
    only for programs containing that text, handing every other run to the real bubblewrap."""
    assert REAL_BWRAP, "the sandbox tests need bubblewrap"
    script = tmp_path / f"fake-bwrap-{fail_when or 'always'}"
    condition = "true" if fail_when is None else f'grep -qF "{fail_when}" "$dir"/* 2>/dev/null'
    script.write_text(
        "#!/bin/sh\n"
        'prev=; dir=; for a in "$@"; do [ "$prev" = --chdir ] && dir=$a; prev=$a; done\n'
        f"if {condition}; then\n"
        "  echo 'bwrap: Creating new namespace failed: Operation not permitted' >&2; exit 1\n"
        "fi\n"
        f'exec {REAL_BWRAP} "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


def _code_files(directory: Path, outputs: list[str], rows: list[dict] | None = None) -> tuple[Path, Path]:
    rows = rows or [{"task_id": f"Mine/{i}", "prompt": "", "entry_point": "square", "test": TEST}
                    for i in range(len(outputs))]
    data, pred = directory / "data.jsonl", directory / "pred.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pred.write_text("".join(json.dumps({"output": o}) + "\n" for o in outputs), encoding="utf-8")
    return data, pred


def test_a_sandbox_that_cannot_start_is_an_error_and_gives_no_score(tmp_path, monkeypatch, capsys):
    """bubblewrap refused by the kernel is the machine's problem, not a failed program: no 0% score, exit 2."""
    from loraflow.cli import main

    always = _fake_bwrap(tmp_path)
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: always if name == "bwrap" else None)
    with pytest.raises(SandboxError, match="Creating new namespace failed.*user namespaces"):
        run_programs([GOOD + CHECK])
    with pytest.raises(SandboxError, match="Creating new namespace failed"):
        run_program(GOOD + CHECK)
    data, pred = _code_files(tmp_path, [GOOD, GOOD])
    out = tmp_path / "RESULT.json"
    rc = main(["score", "--task", "code", "--data", str(data), "--predictions", str(pred), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2 and not out.exists() and captured.out == ""
    assert captured.err.count("\n") == 1 and "Creating new namespace failed" in captured.err, captured.err
    assert captured.err.startswith("loraflow score: error: the code sandbox could not start a program (bwrap: ")

    # a sandbox that stops starting mid-way (the check before scoring passed) stops the whole run
    some = _fake_bwrap(tmp_path, fail_when="INFRA-BREAKS")
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: some if name == "bwrap" else None)
    programs = [GOOD + CHECK] * 3 + ["# INFRA-BREAKS\n" + GOOD + CHECK] + [GOOD + CHECK] * 3
    with pytest.raises(SandboxError, match="could not start a program.*Creating new namespace failed"):
        run_programs(programs, workers=2)
    data, pred = _code_files(tmp_path, [GOOD, GOOD, "# INFRA-BREAKS\n" + GOOD, GOOD])
    rc = main(["score", "--task", "code", "--data", str(data), "--predictions", str(pred), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2 and not out.exists() and captured.out == "" and captured.err.count("\n") == 1
    assert "could not start a program (bwrap: Creating new namespace failed" in captured.err


def test_eval_stops_when_the_sandbox_fails_and_keeps_the_outputs(saved_base, tmp_path, monkeypatch, capsys):
    """`loraflow eval --task code` whose sandbox passes the check before generation but then cannot start the
    programs: exit 2 with the reason, no RESULT.json, and the generated outputs kept for `loraflow score`."""
    from loraflow.cli import main

    rows = [{"task_id": f"Mine/{i}", "prompt": "def square(x):\n", "entry_point": "square", "test": TEST}
            for i in range(2)]
    data, _ = _code_files(tmp_path, ["", ""], rows)
    fake = _fake_bwrap(tmp_path, fail_when="def check(candidate)")  # every scored program, never the check's own
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: fake if name == "bwrap" else None)
    out = tmp_path / "code.json"
    d = saved_base
    rc = main(["eval", "--base", str(d / "base"), "--adapter", f"zh={d / 'zh'}", "--method", "single:zh",
               "--task", "code", "--lang", "es", "--data", str(data), "--out", str(out), "--max-new-tokens", "3",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and not out.exists()
    assert err.startswith("loraflow eval: error: the code sandbox could not start a program (bwrap: Creating"), err
    assert err.endswith(f"(the outputs are kept in {tmp_path / 'code.outputs.jsonl'}; `loraflow score` can score "
                        "them later)")
    assert len((tmp_path / "code.outputs.jsonl").read_text().splitlines()) == 2


def test_an_interpreter_that_does_not_start_is_an_error(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'python: cannot start' >&2\nexit 1\n")
    broken.chmod(0o755)
    for isolation in ("bwrap", "none"):
        with pytest.raises(SandboxError, match="python: cannot start"):
            run_programs([GOOD + CHECK], python=str(broken), isolation=isolation)
    with pytest.raises(SandboxError, match="could not start|does not run"):
        run_program(GOOD + CHECK, python=str(tmp_path / "missing"), isolation="none")


# ------------------------------------------------------------------ the sandbox sees only what the program needs (#16)
# Each hostile program knows where the secrets are and what they look like, never their values (random per run);
# whatever it finds it puts in its exception, whose last line becomes RESULT.json's `detail`.
_HUNT = '''
import json, os, stat, sys
HOME = {home!r}
MARKS = ("hf_", "PRIVATE KEY", "AKIA")
found = []
def look(what, text):
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    for mark in MARKS:
        if mark in text:
            i = text.index(mark)
            found.append(what + ":" + text[max(0, i - 5):i + 60].replace("\\n", " "))
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return b""
def report(seen):
    print(found)
    print(found, file=sys.stderr)
    raise RuntimeError(("LEAKED " + " | ".join(found)) if found else "clean " + seen)
'''
_ROUTES = {
    "files": "for p in [HOME + '/.cache/huggingface/token', HOME + '/.ssh/id_rsa', HOME + '/.env',\n"
             "          os.path.expanduser('~/.cache/huggingface/token'), '/root/.cache/huggingface/token',\n"
             "          '/root/.ssh/id_rsa', '/proc/1/root' + HOME + '/.ssh/id_rsa']:\n"
             "    look(p, read(p))\n"
             "report('files')",
    "environment": "look('os.environ', os.environ)\n"
                   "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:\n"
                   "    for part in ('environ', 'cmdline'):\n"
                   "        look(pid + '/' + part, read('/proc/%s/%s' % (pid, part)))\n"
                   "report('environment')",
    "listing": "seen = {d: sorted(os.listdir(d)) for d in ['/home', '/root', '/run', '/var', '/var/tmp', '/tmp',\n"
               "        HOME, '/etc', '/mnt', '/srv', '/opt'] if os.path.isdir(d)}\n"
               "report(json.dumps(seen))",
    "walk": "files = 0\n"
            "skip = ('/proc', '/sys', '/dev', '/usr', os.getcwd(), sys.prefix, sys.base_prefix, sys.exec_prefix)\n"
            "for root, dirs, names in os.walk('/'):\n"
            "    dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]\n"
            "    for name in names:\n"
            "        path = os.path.join(root, name)\n"
            "        files += 1\n"
            "        mode = os.lstat(path).st_mode\n"
            "        if stat.S_ISSOCK(mode):\n"
            "            found.append('socket:' + path)\n"
            "        elif stat.S_ISREG(mode):\n"
            "            look(path, read(path))\n"
            "    if files > 5000:\n"
            "        found.append('too many files')\n"
            "        break\n"
            "report('walk %d files' % files)",
}


@pytest.fixture
def planted_secrets(monkeypatch):
    """A home directory outside /tmp (the sandbox's old private /tmp would have hidden it) holding a Hugging Face
    token, an SSH key, a .env file and an agent socket, named by HOME; secrets in the environment too."""
    import secrets as random_secrets
    import socket
    import tempfile

    parent = "/var/tmp" if os.access("/var/tmp", os.W_OK) else os.getcwd()
    home = Path(tempfile.mkdtemp(prefix="loraflow-fake-home-", dir=parent))
    values = {
        "token": "hf_" + random_secrets.token_hex(16),
        "ssh": random_secrets.token_hex(24),
        "env-file": "AKIA" + random_secrets.token_hex(8).upper(),
        "HF_TOKEN": "hf_" + random_secrets.token_hex(16),
        "AWS_SECRET_ACCESS_KEY": "AKIA" + random_secrets.token_hex(8).upper(),
    }
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(values["token"])
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{values['ssh']}\n-----END OPENSSH "
                                          "PRIVATE KEY-----\n")
    (home / ".env").write_text(f"AWS_ACCESS_KEY_ID={values['env-file']}\n")
    agent = socket.socket(socket.AF_UNIX)
    agent.bind(str(home / "agent.sock"))
    agent.listen(1)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(home / "agent.sock"))
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, values[name])
    try:
        yield home, values
    finally:
        agent.close()
        shutil.rmtree(home, ignore_errors=True)


def test_planted_secrets_never_reach_an_output(planted_secrets, tmp_path, capsys):
    """Hostile programs look for the scorer's secrets in files, the environment (/proc/*/environ included),
    directory listings and a walk of everything they can see: nothing reaches RESULT.json or the console, and
    /run, /var, the home directory and host sockets are not there at all."""
    from loraflow.cli import main

    home, values = planted_secrets
    hunt = _HUNT.format(home=str(home))
    rows = [{"task_id": f"Hunt/{name}", "prompt": "", "entry_point": "len", "test": "def check(c):\n    pass\n"}
            for name in _ROUTES]
    data, pred = _code_files(tmp_path, [hunt + code for code in _ROUTES.values()], rows)
    out = tmp_path / "RESULT.json"
    rc = main(["score", "--task", "code", "--data", str(data), "--predictions", str(pred), "--out", str(out),
               "--workers", "2", "--timeout", "30"])
    captured = capsys.readouterr()
    text = out.read_text(encoding="utf-8") + captured.out + captured.err
    assert rc == 0 and [name for name, value in values.items() if value in text] == []
    details = {ex["task_id"].split("/")[1]: ex["detail"] for ex in json.loads(out.read_text())["examples"]}
    assert all(d.startswith("RuntimeError: clean ") for d in details.values()), details  # ran, found nothing
    seen = json.loads(details["listing"].split("clean ", 1)[1])
    assert not {"/run", "/var", "/var/tmp", "/home", "/mnt", "/srv", "/opt", str(home)} & set(seen), seen
    # what is there: the interpreter's own prefixes, a working directory in /tmp, the loader's cache in /etc
    assert seen.get("/etc") == ["ld.so.cache"], seen
    workdirs = [name for name in seen["/tmp"] if name.startswith("loraflow-sandbox-")]
    prefixes_in_tmp = {p.split("/")[2] for p in _prefixes() if p.startswith("/tmp/")}  # a venv in a CI clone
    assert len(workdirs) == 1 and set(seen["/tmp"]) - set(workdirs) <= prefixes_in_tmp, seen
    assert set(seen.get("/root", [])) <= {p.split("/")[2] for p in _prefixes() if p.startswith("/root/")}, seen

    # the same hunt for files without bubblewrap finds the token: the test can see a leak
    data, pred = _code_files(tmp_path, [hunt + _ROUTES["files"]], rows[:1])
    rc = main(["score", "--task", "code", "--data", str(data), "--predictions", str(pred), "--out", str(out),
               "--isolation", "none", "--timeout", "30"])
    capsys.readouterr()
    assert rc == 0 and values["token"] in out.read_text(encoding="utf-8")


def _prefixes() -> list[str]:
    import sys

    return [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)]


# ------------------------------------------------------------------ as an ordinary user (#16)
NOBODY = 65534


def _run_unprivileged(code: str, workdir: Path) -> subprocess.CompletedProcess:
    """Run `python -c code` as an unprivileged user: as uid/gid 65534 through `setpriv` when the tests run as root
    (as CI does), as ourselves otherwise. The interpreter and the code under test may live where that user cannot
    look (pyenv under /root, a clone in root's home): such a directory is replaced, for this command only, by an
    empty one holding just those paths (a mount namespace made by bubblewrap, as root); nothing is copied or
    chmod-ed. `workdir` becomes the user's HOME, TMPDIR and working directory."""
    import sys

    import loraflow

    src = str(Path(loraflow.__file__).resolve().parents[1])
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": src, "HF_HUB_OFFLINE": "1",
           "HOME": str(workdir), "TMPDIR": str(workdir)}
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root privileges for this test")
        os.chown(workdir, NOBODY, NOBODY)
        needed = {src, *_prefixes(), *(os.path.dirname(p) for p in _link_chain(sys.executable))}
        hidden: dict[str, set[str]] = {}  # directory others cannot enter -> needed paths under it
        for path in needed:
            parts = Path(path).parts
            for i in range(2, len(parts)):
                ancestor = os.path.join(*parts[:i])
                if not os.stat(ancestor).st_mode & 0o001:
                    hidden.setdefault(ancestor, set()).add(path)
                    break
        outer = [REAL_BWRAP, "--dev-bind", "/", "/"]
        for ancestor, paths in sorted(hidden.items()):
            outer += ["--tmpfs", ancestor]
            for path in sorted(paths):  # bubblewrap would make the directories between them root-only
                between = Path(path).relative_to(ancestor).parents
                for parent in sorted(str(Path(ancestor) / d) for d in between if str(d) != "."):
                    outer += ["--perms", "0755", "--dir", parent]
                outer += ["--ro-bind", path, path]
        cmd = [*outer, "--", setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _link_chain(path: str) -> list[str]:
    """`path` and every file its symbolic links lead to."""
    chain = [os.path.abspath(path)]
    while os.path.islink(chain[-1]) and len(chain) < 40:
        chain.append(os.path.join(os.path.dirname(chain[-1]), os.readlink(chain[-1])))
    return [os.path.realpath(os.path.dirname(p)) + "/" + os.path.basename(p) for p in chain]


@pytest.fixture
def unprivileged_dir():
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="loraflow-unprivileged-"))  # not tmp_path: pytest makes that root-only
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_canonical_solutions_score_100_percent_as_an_unprivileged_user(shared_data, unprivileged_dir):
    """`loraflow score --task code` with the default isolation, as an ordinary user, on the canonical solutions of
    the first 10 Chinese code test rows (bubblewrap must create its namespaces without root)."""
    from loraflow.evaluation.scoring import humaneval_english_prompts

    english = humaneval_english_prompts()
    with open(shared_data / "test" / "zh_code_test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:10]
    outputs = ["```python\n" + english[r["task_id"]] + r["canonical_solution"] + "```" for r in rows]
    _code_files(unprivileged_dir, outputs, rows)
    code = ("import os, sys\n"
            "assert os.getuid() != 0 and os.geteuid() != 0, 'still root'\n"
            "from loraflow.cli.main import main\n"
            "sys.exit(main(['score', '--task', 'code', '--data', 'data.jsonl', '--predictions', 'pred.jsonl', "
            "'--out', 'RESULT.json', '--workers', '2']))\n")
    proc = _run_unprivileged(code, unprivileged_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "score: 10/10 = 100.0%", proc.stdout + proc.stderr
    result = json.loads((unprivileged_dir / "RESULT.json").read_text(encoding="utf-8"))
    assert result["config"]["isolation"] == "bwrap"
    assert [ex["status"] for ex in result["examples"]] == ["passed"] * 10, result["examples"]


def test_an_ordinary_user_out_of_processes_gets_an_error_not_a_score(unprivileged_dir):
    """The old failure, on purpose: RLIMIT_NPROC 1 on the scorer itself (as the old sandbox set it on bubblewrap)
    leaves no process to start a sandbox with; the command says so and exits 2 instead of scoring 0%."""
    _code_files(unprivileged_dir, [GOOD, GOOD])
    code = ("import os, resource, sys\n"
            "assert os.getuid() != 0, 'still root'\n"
            "from loraflow.cli.main import main\n"
            "resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))\n"
            "sys.exit(main(['score', '--task', 'code', '--data', 'data.jsonl', '--predictions', 'pred.jsonl', "
            "'--out', 'RESULT.json']))\n")
    proc = _run_unprivileged(code, unprivileged_dir)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("loraflow score: error: the code sandbox could not start a program (")
    assert proc.stderr.count("\n") == 1 and not (unprivileged_dir / "RESULT.json").exists()


def test_a_wrong_program_cannot_forge_a_pass_as_an_unprivileged_user(unprivileged_dir):
    """The forgeries again as an ordinary user, where the kernel (not root's privileges) guards the verdict
    process: with bubblewrap, and with --isolation none, where only non-dumpability keeps /proc out."""
    wrong = "def square(x):\n    return None\n"
    sources = [wrong + _CLAIM + attack for attack in _FORGERIES.values()] + [GOOD + _CLAIM]
    code = ("import json, os, sys\n"
            "assert os.getuid() != 0, 'still root'\n"
            "from loraflow.evaluation.sandbox import CodeProgram, run_programs\n"
            f"sources, test = json.loads({json.dumps(json.dumps(sources))}), {TEST!r}\n"
            "for isolation in ('bwrap', 'none'):\n"
            "    results = run_programs([CodeProgram(s, test, 'square') for s in sources], workers=2, "
            "isolation=isolation)\n"
            "    print(isolation, json.dumps([r.status for r in results]))\n")
    proc = _run_unprivileged(code, unprivileged_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["bwrap", "none"], proc.stdout
    for line in lines:
        statuses = json.loads(line.split(" ", 1)[1])
        assert [s == "passed" for s in statuses] == [False] * len(_FORGERIES) + [True], line
