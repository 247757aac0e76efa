"""The code sandbox: correct programs pass, and hostile ones never pass nor harm the scorer."""

from __future__ import annotations

import os
import signal
import time

import pytest

import subprocess

from loraflow.common.errors import LoraFlowError
from loraflow.evaluation.sandbox import ExecutionResult, SandboxLimits, _kill_group, run_program, run_programs

CHECK = "\ndef check(candidate):\n    assert candidate(2) == 4\n\ncheck(square)\n"
GOOD = "def square(x):\n    return x * x\n"


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
    loops = ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"]
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
    flood = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits=limits, timeout=2.0)
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
    result = run_program(program)
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
