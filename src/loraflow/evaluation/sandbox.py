"""Run untrusted, model-written Python programs and report whether they passed.

Containment is structural first: each program runs under bubblewrap (`bwrap`) in its own mount,
PID, network, IPC and UTS namespaces (and a user namespace when not run as root), with every
capability dropped, a clean environment (`--clearenv`) and a filesystem built from nothing: the
system directories (/usr, /bin, /lib, /lib64...; links kept as links) and `/etc/ld.so.cache`, the
interpreter's own prefixes (a virtual environment and the Python it was made from, wherever they
live), all read-only, plus its own fresh temporary working directory, the only writable place.
There is no home directory, /root (but for an interpreter living there), /run, /var, /sys, host
socket or other file in /tmp to read, and /proc and /dev are the sandbox's own (/proc/1 is
bubblewrap, started with the same clean environment). So reads of the scorer's secrets and
writes, renames, deletions or permission changes outside the working directory fail in the kernel
whatever route the program takes (`dir_fd=` calls, `os.fchmod` on an outside descriptor,
`sqlite3.connect`, C extensions). Where bubblewrap is missing or cannot run, code execution fails
closed with a clear error, unless the caller opts in to `isolation="none"` (the second layer
below, alone).

Inside, each program is two processes. The **verdict process** (`python -I -B`, started in the
sandbox) holds the tests; it forks the **program process**, which runs the program's source and
then answers calls of its entry point over a pipe. The verdict process runs the trusted tests
(`check(candidate)`, with the prompt's helpers) where `candidate` sends its arguments across and
decodes the answer as plain data (numbers, strings, lists, tuples, dicts, sets, bytes; objects with
a made-up `__eq__` do not cross). A pass is one fact of the verdict process alone: `check()`
returned there. It is reported on a pipe the program process closed before its first instruction,
and in the verdict process's exit status. There is no token to steal: frame walking, `gc`, reading
inherited fds or `/proc/self`, exiting early, printing, or clearing hooks in the program process
cannot make `check()` return in another process. The verdict process is not dumpable
(`PR_SET_DUMPABLE` 0), so a program running as the same user can neither read nor write its memory
or descriptors through /proc (under bubblewrap every capability is dropped too). Under
`isolation="none"` run as root the kernel does not enforce that (root may read any process), and
the audit hook below is then the only barrier.

The program process has:

- HOME and TMPDIR pointing into its working directory (removed afterwards, never following links);
- an environment built from scratch (PATH, LANG, thread counts): nothing is inherited, so no
  secret in the scorer's environment reaches the program;
- stdin closed, stdout/stderr sent to unlinked temporary files (bounded by RLIMIT_FSIZE, so a
  program that prints gigabytes cannot fill the scorer's memory); what it writes there, truncates
  or closes concerns nobody but itself;
- resource limits (address space, CPU seconds, file size, no core files, RLIMIT_NPROC) set inside
  the namespaces, never on bubblewrap, which needs to create processes to build them;
  RLIMIT_NPROC binds every user but root (for root the audit hook is the fork barrier);
- the process group of the whole sandbox (`start_new_session=True`): it gets SIGKILL at the
  wall-clock timeout and again after the verdict, so stray children die too (under bubblewrap the
  PID namespace dies with it);
- a Python audit hook (PEP 578), installed before the program runs, with no mutable state a
  program can reach. It refuses process creation (`os.fork`, `subprocess`, `os.system`, `os.exec*`,
  `posix_spawn`), signals to other processes (`os.kill` of another pid, `os.killpg`), `ctypes`,
  sockets, links, raising its own resource limits, new audit hooks, `gc`'s object walks, and writes
  or deletions outside the working directory.

A sandbox that cannot start (bubblewrap refused by the kernel, an interpreter that does not run)
is not the program's fault: the verdict process writes "started" before anything of the program
runs, and a run that ends without it raises `SandboxError` instead of reporting `failed`, so no
score is computed from it. Whatever a program does after that affects its own verdict only.

Threat model: this contains the accidents and hostility of generated code (loops, fork bombs,
huge allocations, big files, escaping its directory, killing its parent, reading secrets from
the environment or the scorer's files, forging a pass). What it does not judge is test strength:
a program that returns correct answers only for the test's inputs (read from the test file, which
is public) passes, as it would in the official harness.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

try:  # POSIX only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

from loraflow.common.checks import check_positive
from loraflow.common.errors import LoraFlowError

STATUSES = ("passed", "failed", "timeout", "error")
ISOLATIONS = ("bwrap", "none")
ISOLATION_HELP = ("how model-written code is contained: bwrap (default: each program in its own namespaces, seeing only "
                  "the interpreter, read-only, and its temp dir; needs bubblewrap) or none (opt-in and weaker: no "
                  "namespaces, so the program can read every file the user can, and only the audit hook stops its "
                  "writes, network use and, when run as root, tampering with the verdict process)")

# What the sandbox mounts of the host, read-only, besides the interpreter and the working directory. Symbolic links
# among the directories (/bin -> usr/bin on merged-/usr systems) are recreated as links.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache",)  # the dynamic loader's index of shared libraries

# The tests, prelude and entry point, for the verdict process: read and removed before the program process starts.
_SPEC = "loraflow-tests.json"

# The child's entire environment: nothing is inherited from the scorer.
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# Runs as `python -I -B -c _BOOTSTRAP SPEC VERDICT_FD MAX_WRITE_OPENS RLIMITS` in the sandbox directory: the verdict
# process (see the module docstring). SPEC names a JSON file with the tests, prelude and entry point, read and removed
# before the program process is forked; VERDICT_FD gets "started" at once, then the verdict as one JSON line.
_BOOTSTRAP = r'''
import os as _os, sys as _sys


def _loraflow_verdict(spec_path, verdict_fd, max_write_opens, rlimits):
    """The verdict process: announces itself, sets the limits, forks the program process, then runs the tests
    against it and writes the verdict. It holds no secret: a pass is its own fact (check() returned here)."""
    import json, os, resource
    os.write(verdict_fd, b"started\n")
    with open(spec_path, "rb") as f:
        spec = json.loads(f.read())
    os.remove(spec_path)
    _set_limits(rlimits, skip=resource.RLIMIT_NPROC)  # the verdict process must fork once; the program gets it
    import ctypes  # not dumpable: a same-user program can neither read nor write this process's memory or fds
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (verdict_fd, calls_w, replies_r):
                os.close(fd)
            _loraflow_program(calls_r, replies_w, spec["entry_point"], max_write_opens, rlimits)
        finally:
            os._exit(70)
    os.close(calls_r)
    os.close(replies_w)
    status, detail = _loraflow_judge(spec, os.fdopen(calls_w, "wb"), os.fdopen(replies_r, "rb"), pid)
    os.write(verdict_fd, json.dumps({"status": status, "detail": detail}).encode() + b"\n")
    os._exit(0 if status == "passed" else 1)


def _set_limits(rlimits, skip=None):
    """Apply RLIMITS ("resource,soft,hard;...") to this process, but for the resource `skip`."""
    import resource
    for item in rlimits.split(";"):
        res, soft, hard = map(int, item.split(","))
        if res != skip:
            resource.setrlimit(res, (soft, hard))


_LIMIT = 16 * 1024 * 1024  # bytes in one message between the two processes
_ERRORS = ("SyntaxError", "IndentationError", "TabError", "MemoryError", "SandboxViolation")


def _encode(value, depth=0):
    """Plain data as JSON with tags (tuple, dict with any keys, set, bytes, complex); anything else is refused."""
    if depth > 200:
        raise ValueError("the value is nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, list):
        return [_encode(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {"frozenset" if isinstance(value, frozenset) else "set": [_encode(v, depth + 1) for v in value]}
    raise TypeError("a value of type %s is not plain data" % type(value).__name__)


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ValueError("malformed value")
    (tag, body), = value.items()
    if tag == "tuple":
        return tuple(_decode(v) for v in body)
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in body}
    if tag == "set":
        return {_decode(v) for v in body}
    if tag == "frozenset":
        return frozenset(_decode(v) for v in body)
    if tag == "bytes":
        return bytes.fromhex(body)
    if tag == "complex":
        return complex(float(body[0]), float(body[1]))
    raise ValueError("malformed value")


def _loraflow_program(calls_r, replies_w, entry_point, max_write_opens, rlimits):
    """The program process: limits, audit hook, then the program; afterwards it answers calls of the entry point."""
    import json, os, sys
    _set_limits(rlimits)
    calls, replies = os.fdopen(calls_r, "rb"), os.fdopen(replies_w, "wb")

    def send(message):
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    def failure(e):
        return [type(e).__name__, str(e)[:2000]]

    _install_hook(os.path.realpath(os.getcwd()), os.getpid(), max_write_opens)
    main = sys.modules["__main__"]
    main.__file__ = os.path.join(os.getcwd(), "solution.py")
    sys.argv[:] = ["solution.py"]
    try:
        with open("solution.py", "rb") as f:
            exec(compile(f.read(), "solution.py", "exec"), main.__dict__)
        function = main.__dict__.get(entry_point)
        if function is None:
            raise NameError("name %r is not defined" % entry_point)
        send({"loaded": True})
        while True:
            line = calls.readline(_LIMIT)
            if not line:
                break
            call = _decode(json.loads(line))
            try:
                send({"ok": _encode(function(*call[0], **call[1]))})
            except SystemExit:
                raise
            except BaseException as e:
                send({"raise": failure(e)})
    except SystemExit as e:
        code = e.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        _flush(sys)
        os._exit(code or 0)
    except BaseException as e:
        try:
            send({"load_error": failure(e)})
        except BaseException:
            pass
        _flush(sys)
        os._exit(1)
    _flush(sys)
    os._exit(0)


def _flush(sys):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _install_hook(root, pid, max_write_opens):
    """The audit hook (PEP 578) of the program process. Its state is immutable but for a counter, and nothing
    the program can reach refers to it (the introspection that could find it is refused)."""
    import os, sys, itertools
    normpath, join, fsdecode, getcwd = os.path.normpath, os.path.join, os.fsdecode, os.getcwd
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    devices = ("/dev/null", "/dev/stdout", "/dev/stderr")
    denied = frozenset((
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "os.symlink", "os.link", "os.chroot", "resource.setrlimit", "resource.prlimit",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook",
    ))
    denied_imports = frozenset(("_ctypes", "ctypes", "_posixsubprocess"))
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
        "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
        "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
    }
    watched = frozenset(denied | {"open", "os.kill", "import"} | set(path_events))
    write_opens = itertools.count(1)

    class SandboxViolation(PermissionError):
        pass

    SandboxViolation.__qualname__ = "SandboxViolation"

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            full = normpath(join(getcwd(), fsdecode(path)))
        except Exception:
            return False
        return full == root or full.startswith(root + "/") or full in devices

    def hook(event, args):
        if event not in watched:
            return
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if not writing:
                return
            if not inside(path):
                raise SandboxViolation("writing %r outside the sandbox is not allowed" % (path,))
            if next(write_opens) > max_write_opens:
                raise SandboxViolation("too many files opened for writing")
        elif event == "os.kill":
            if args[0] != pid:
                raise SandboxViolation("signalling another process is not allowed")
        elif event == "import":
            if args[0] in denied_imports:
                raise SandboxViolation("import of %s is not allowed" % args[0])
        elif event in denied:
            raise SandboxViolation("%s is not allowed" % event)
        else:
            for i in path_events[event]:
                if i < len(args) and not inside(args[i]):
                    raise SandboxViolation("%s outside the sandbox is not allowed" % event)

    # Unaudited ways to signal other processes.
    import signal as _signal_mod, posix as _posix_mod
    for mod, name in ((os, "pidfd_open"), (_posix_mod, "pidfd_open"),
                      (_signal_mod, "pidfd_send_signal"), (sys.modules.get("_signal"), "pidfd_send_signal")):
        if mod is not None and hasattr(mod, name):
            delattr(mod, name)
    sys.addaudithook(hook)


class _CandidateGone(BaseException):
    """The program process ended or answered nonsense: no test may catch this."""


def _loraflow_judge(spec, calls, replies, pid):
    """Run the trusted prelude and tests here, calling the program's entry point across the pipes; return
    (status, detail). Only check() returning normally is a pass."""
    import builtins, json, os, signal

    def receive():
        line = replies.readline(_LIMIT)
        if not line.endswith(b"\n"):
            raise _CandidateGone("too long" if line else "gone")
        message = json.loads(line)
        if not isinstance(message, dict) or len(message) != 1:
            raise _CandidateGone("malformed")
        return message

    def raised(name, text):
        kind = getattr(builtins, name, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            try:
                return kind(text)
            except Exception:
                pass
        return type(name, (Exception,), {})(text)

    def candidate(*args, **kwargs):
        try:
            calls.write(json.dumps(_encode([list(args), kwargs])).encode() + b"\n")
            calls.flush()
        except BrokenPipeError:
            raise _CandidateGone("gone") from None
        message = receive()
        if "ok" in message:
            try:
                return _decode(message["ok"])
            except Exception:
                raise _CandidateGone("malformed") from None
        failure = message.get("raise")
        if not (isinstance(failure, list) and len(failure) == 2 and all(isinstance(s, str) for s in failure)):
            raise _CandidateGone("malformed")
        raise raised(*failure)

    def child_end(reason):
        if reason == "gone":
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                if sig == signal.SIGXCPU:
                    return "timeout", "CPU time limit exceeded (SIGXCPU)"
                if sig == signal.SIGXFSZ:
                    return "error", "file size limit exceeded (SIGXFSZ)"
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = "signal %d" % sig
                return "error", "killed by " + name
            code = os.WEXITSTATUS(status)
            if code == 0:
                return "failed", "exited with status 0 before the tests completed"
            return "failed", "exited with status %d" % code
        return "error", "the program's answer was " + ("too long" if reason == "too long" else "malformed")

    def verdict_of(e):
        name = type(e).__name__
        text = "%s: %s" % (name, e) if str(e) else name
        error = name in _ERRORS or "[Errno 27]" in str(e)
        return ("error" if error else "failed"), text[:2000]

    try:
        first = receive()
    except _CandidateGone as e:
        return child_end(str(e))
    except Exception:
        return child_end("malformed")
    if "loaded" not in first:
        failure = first.get("load_error")
        if not (isinstance(failure, list) and len(failure) == 2 and all(isinstance(s, str) for s in failure)):
            return child_end("malformed")
        return verdict_of(raised(*failure))
    namespace = {"__name__": "__loraflow_tests__", "__builtins__": builtins}
    try:
        exec(compile(spec["prelude"], "prompt.py", "exec"), namespace)
    except Exception:
        namespace = {"__name__": "__loraflow_tests__", "__builtins__": builtins}  # helpers only; a bare stub may not parse
    candidate.__name__ = candidate.__qualname__ = spec["entry_point"]
    namespace[spec["entry_point"]] = candidate
    try:
        exec(compile(spec["test"], "test.py", "exec"), namespace)
        check = namespace.get("check")
        if not callable(check):
            return "error", "the tests define no check(candidate) function"
        check(candidate)
    except _CandidateGone as e:
        return child_end(str(e))
    except BaseException as e:
        return verdict_of(e)
    return "passed", ""


_loraflow_verdict(_sys.argv[1], int(_sys.argv[2]), int(_sys.argv[3]), _sys.argv[4])
'''


@dataclass(frozen=True)
class CodeProgram:
    """One program to score, in the parts that keep the verdict out of its reach.

    `source` (untrusted: the prompt and the model's completion) runs in the program process; `test` (trusted:
    defines `check(candidate)`) runs in the verdict process with `prelude` (trusted helpers, e.g. the prompt's
    other functions) and calls `entry_point` across a pipe. `text` is the same program as the official harness
    runs it in one interpreter.
    """

    source: str
    test: str
    entry_point: str
    prelude: str = ""

    def __post_init__(self) -> None:
        if not self.entry_point.isidentifier():
            raise LoraFlowError(f"entry point {self.entry_point!r} is not a Python name")

    @property
    def text(self) -> str:
        """`source + "\\n" + test + "\\n" + "check(entry_point)"`: the official single-interpreter program."""
        return self.source + "\n" + self.test + "\n" + f"check({self.entry_point})"


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed program (each applied with `resource.setrlimit`)."""

    memory_bytes: int = 2 * 1024**3
    """RLIMIT_AS: address space of the program's process (2 GiB)."""
    file_size_bytes: int = 16 * 1024**2
    """RLIMIT_FSIZE: largest file the program may write, stdout/stderr included (16 MiB)."""
    max_processes: int = 1
    """RLIMIT_NPROC: counts every process and thread of the user, so 1 means "no new ones". It is set
    inside the sandbox, on the program only. The kernel does not enforce it for root; the audit hook
    refuses forks in that case too."""
    max_write_opens: int = 64
    """How many times the program may open a file for writing (bounds its disk use)."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU in seconds; None: the wall-clock timeout rounded up, plus one second."""

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "file_size_bytes", "max_processes", "max_write_opens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SandboxLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise ValueError(f"SandboxLimits.cpu_seconds must be >= 1 or None, got {self.cpu_seconds}")


class SandboxError(LoraFlowError):
    """The sandbox itself could not run a program (an infrastructure failure, not the program's fault).

    Raised instead of classifying the program, so that no score is computed from runs that never
    started; the message says why (bubblewrap's or the interpreter's own last line of error).
    """


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one sandboxed program.

    status: "passed" (ran to the end and printed the run's token, exit 0), "failed" (an
    exception, e.g. a failed assert, or an exit before the tests completed), "timeout" (wall-clock
    or CPU limit), or "error" (syntax error, crash, resource limit or sandbox violation).
    """

    status: str
    detail: str
    duration: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _rlimits(limits: SandboxLimits, timeout: float) -> str:
    """The bootstrap's RLIMITS argument: (resource, soft, hard) triples clipped to the current hard limits."""
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(timeout) + 1
    wanted = [
        (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes),
    ]
    out = []
    for res, soft, hard in wanted:
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        out.append(f"{res},{soft},{hard}")
    return ";".join(out)


def _kill_group(pgid: int, attempts: int = 20) -> None:
    """SIGKILL every process in the group, repeating while members remain (a fork bomb races the kill)."""
    for i in range(attempts):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if i + 1 < attempts:
            time.sleep(0.005)


def _wait_exit(pid: int, deadline: float) -> bool:
    """Wait for `pid` to exit WITHOUT reaping it (so its pid, our process-group id, stays reserved).

    Returns False when the deadline passes first.
    """
    delay = 0.0005
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.02)


def _last_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def _force_rmtree(path: str) -> None:
    """Remove the sandbox directory even if the program made parts of it unreadable. Only directories inside it
    are ever chmod-ed, and links are never followed (the program's processes are dead by now, so what `lstat`
    sees stays true)."""

    def unlock(p: str) -> None:
        if p != path and not p.startswith(path + os.sep):  # the directory holding the sandbox is not ours
            return
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                os.chmod(p, 0o700)
        except OSError:
            pass

    def onerror(func, p, exc_info):  # noqa: ARG001
        unlock(os.path.dirname(p))
        unlock(p)
        try:
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def run_program(
    program: CodeProgram,
    *,
    timeout: float = 3.0,
    limits: SandboxLimits | None = None,
    python: str | None = None,
    isolation: str = "bwrap",
) -> ExecutionResult:
    """Run one untrusted Python program in the sandbox and say whether it passed.

    Args:
        program: the program's source, tests and entry point.
        timeout: wall-clock seconds, interpreter start-up included.
        limits: resource limits; `SandboxLimits()` by default.
        python: the interpreter; the running one by default.
        isolation: "bwrap" (namespaces, minimal read-only filesystem; the default) or "none" (opt-in).

    Returns:
        An `ExecutionResult`; this function never raises because of what the program does.

    Raises:
        LoraFlowError: bad options, or isolation "bwrap" where bubblewrap is missing.
        SandboxError: the sandbox cannot run programs here (checked first), or could not start this one.
    """
    if resource is None:  # pragma: no cover
        raise LoraFlowError("the code sandbox needs a POSIX system (resource limits, process groups)")
    _check_timeout(timeout)
    python = _interpreter(python)
    return _run(program, timeout, limits or SandboxLimits(), python, isolation_command(isolation, python))


def _interpreter(python: str | None) -> str:
    """The interpreter as a path: the running one by default, a bare name looked up on PATH."""
    if not python:
        return sys.executable
    return python if os.sep in python else (shutil.which(python) or python)


def _check_timeout(timeout) -> None:
    try:
        check_positive("timeout", timeout)
    except ValueError:
        raise LoraFlowError(f"timeout must be a finite number of seconds > 0, got {timeout}") from None


def _run(program: CodeProgram, timeout: float, limits: SandboxLimits, python: str,
         wrapper: list[str]) -> ExecutionResult:
    """`run_program` with the isolation already resolved into a command prefix.

    Raises:
        SandboxError: the sandbox or the interpreter ended before the verdict process started.
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="loraflow-sandbox-")
    read_fd = write_fd = -1
    try:
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8") as f:
            f.write(program.source)
        spec = os.path.join(workdir, _SPEC)
        with open(spec, "w", encoding="utf-8") as f:
            json.dump({"test": program.test, "prelude": program.prelude, "entry_point": program.entry_point}, f)
        env = dict(_BASE_ENV, HOME=workdir, TMPDIR=workdir)
        read_fd, write_fd = os.pipe()
        cmd = [python, "-I", "-B", "-c", _BOOTSTRAP, spec, str(write_fd), str(limits.max_write_opens),
               _rlimits(limits, timeout)]
        if wrapper:
            cmd = [*wrapper, *_interpreter_binds(python), "--bind", workdir, workdir, "--remount-ro", "/",
                   "--clearenv", *(a for k, v in env.items() for a in ("--setenv", k, v)), "--chdir", workdir,
                   "--", *cmd]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                # bubblewrap gets the same clean environment: the program can read it as /proc/1/environ
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(write_fd,), start_new_session=True)
            except (OSError, subprocess.SubprocessError) as e:
                why = str(e)
                raise SandboxError(f"the code sandbox could not start a program ({why}); {_advice(wrapper, why)}") from None
            os.close(write_fd)
            write_fd = -1
            finished = _wait_exit(proc.pid, start + timeout)
            # The leader is not reaped yet (alive or a zombie), so its pid, the group id, cannot have
            # been reused: kill the whole group once, reap the leader, then kill any stragglers.
            _kill_group(proc.pid, attempts=1)
            returncode = proc.wait()
            _kill_group(proc.pid)
            duration = time.monotonic() - start
            verdict = _read_available(read_fd, 1 << 16)
            err.seek(max(0, os.fstat(err.fileno()).st_size - 8192))
            stderr = err.read().decode("utf-8", errors="replace")
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        _force_rmtree(workdir)
    started, _, rest = verdict.partition(b"\n")
    if finished and started != b"started":
        why = _last_line(stderr) or f"exit status {returncode}"
        raise SandboxError(f"the code sandbox could not start a program ({why}); {_advice(wrapper, why)}")
    if wrapper and returncode > 128 and finished:  # bubblewrap reports a signal death as 128 + signal
        returncode = 128 - returncode
    return _classify(finished, returncode, rest, stderr, timeout, duration)


def _read_available(fd: int, limit: int) -> bytes:
    """What the pipe holds now, at most `limit` bytes, without waiting for writers that may still live."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _advice(wrapper: list[str], why: str) -> str:
    if not wrapper:
        return "no score was computed; check that the interpreter runs (python -I -B)"
    userns = ("bubblewrap needs user namespaces when not run as root (sysctl user.max_user_namespaces > 0; on "
              "Ubuntu 24.04+ also kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap), "
              if "namespace" in why else "")
    return f"no score was computed; {userns}or, accepting a weaker sandbox (no namespaces: see --help), pass --isolation none"


def isolation_command(isolation: str, python: str | None = None) -> list[str]:
    """The bubblewrap command prefix for `isolation` ([] for "none"), checked to work here.

    The check runs a trivial program exactly as programs are run (same interpreter, limits and
    isolation), once per process for each interpreter and prefix.

    Raises:
        LoraFlowError: an unknown isolation, or "bwrap" where bubblewrap is missing (the message
            says how to install it or to opt out).
        SandboxError: the sandbox cannot run a program here (the message gives bubblewrap's reason).
    """
    if isolation not in ISOLATIONS:
        raise LoraFlowError(f"--isolation {isolation!r}: expected one of {', '.join(ISOLATIONS)}")
    prefix: list[str] = []
    if isolation == "bwrap":
        exe = shutil.which("bwrap")
        if exe is None:
            raise LoraFlowError("refusing to run model-written code without isolation: bwrap not found; install "
                                "bubblewrap (e.g. apt-get install bubblewrap) or, accepting a weaker sandbox, pass "
                                "isolation 'none' (--isolation none)")
        prefix = [exe, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                  "--dev", "/dev", "--proc", "/proc", *_system_binds()]
    _probe(tuple(prefix), _interpreter(python))
    return prefix


@functools.lru_cache(maxsize=16)
def _probe(prefix: tuple[str, ...], python: str) -> None:
    """Run a trivial program in the sandbox; raise SandboxError unless it passes (successes are remembered)."""
    trivial = CodeProgram("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f")
    result = _run(trivial, 60.0, SandboxLimits(), python, list(prefix))
    if not result.passed:
        why = f"{result.status}: {result.detail}"
        raise SandboxError(f"the code sandbox cannot run a trivial program here ({why}); {_advice(list(prefix), why)}")


def _system_binds() -> list[str]:
    """bubblewrap arguments mounting `_SYSTEM_DIRS` and `_SYSTEM_FILES` read-only (links as links)."""
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _SYSTEM_FILES:
        if os.path.isfile(path):
            args += ["--ro-bind", path, path]
    return args


def _interpreter_prefixes(python: str) -> list[str]:
    """sys.prefix, exec_prefix, base_prefix and base_exec_prefix of `python` (asked once, unless it is this one)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    code = "import sys; print(sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, sep='\\n')"
    try:
        found = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL, env=dict(_BASE_ENV))
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"the interpreter {python} for model-written code does not run: {e}") from None
    if found.returncode != 0:
        why = _last_line(found.stderr) or f"exit status {found.returncode}"
        raise SandboxError(f"the interpreter {python} for model-written code does not run: {why}")
    return found.stdout.splitlines()


def _resolve(path: str) -> tuple[list[tuple[str, str]], str]:
    """Follow `path` as the kernel would: the symbolic links met on the way, as (link, target), and the real path."""
    links: list[tuple[str, str]] = []
    pending = [p for p in reversed(os.path.abspath(path).split("/")) if p]
    current = "/"
    while pending:
        part = pending.pop()
        if part in (".", ".."):
            current = current if part == "." else os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if not os.path.islink(candidate):
            current = candidate
            continue
        if len(links) >= 40:  # the kernel's own limit
            raise SandboxError(f"{path}: too many levels of symbolic links")
        target = os.readlink(candidate)
        links.append((candidate, target))
        current = "/" if target.startswith("/") else current
        pending.extend(p for p in reversed(target.split("/")) if p)
    return links, current


@functools.lru_cache(maxsize=16)
def _interpreter_binds(python: str) -> tuple[str, ...]:
    """bubblewrap arguments making `python` run in the sandbox: its prefixes (a virtual environment and the
    Python it was made from, wherever they live: under /tmp or /work in a CI clone, under a home directory
    for pyenv) bound read-only, and the symbolic links on the way to them and to its binary recreated as links.
    Nothing else of those places (the rest of a home directory or a checkout) is mounted."""
    system_links = {d for d in _SYSTEM_DIRS if os.path.islink(d)}
    bound = [d for d in _SYSTEM_DIRS if os.path.isdir(d) and d not in system_links]

    def covered(path: str) -> bool:
        return any(path == d or path.startswith(d + "/") for d in bound)

    binds: list[str] = []
    links: dict[str, str] = {}
    for prefix in sorted({p for p in _interpreter_prefixes(python) if p}, key=len):
        hops, real = _resolve(prefix)
        links.update(hops)
        if os.path.isdir(real) and real != "/" and not covered(real):
            bound.append(real)
            binds += ["--ro-bind", real, real]
    hops, real = _resolve(python)
    links.update(hops)
    if not covered(real):
        binds += ["--ro-bind", real, real]
    for link, target in links.items():
        if link not in system_links and not covered(link):
            binds += ["--symlink", target, link]
    return tuple(binds)


def _classify(finished: bool, rc: int, verdict: bytes, stderr: str, timeout: float, duration: float) -> ExecutionResult:
    """The result from the verdict process's line and exit status: a pass needs both to say so."""
    if not finished:
        return ExecutionResult("timeout", f"timed out after {timeout:g} s", duration)
    try:
        found = json.loads(verdict.split(b"\n", 1)[0])
        status, detail = found["status"], found["detail"]
        assert status in STATUSES and isinstance(detail, str)
    except Exception:  # no verdict: the verdict process itself was killed or failed
        if rc < 0:
            return _signalled(-rc, duration)
        why = _last_line(stderr) or f"exit status {rc}"
        return ExecutionResult("error", f"the sandbox's verdict process ended without a verdict ({why})", duration)
    if status == "passed" and rc != 0:
        return ExecutionResult("error", f"the verdict process said passed but exited with status {rc}", duration)
    return ExecutionResult(status, detail, duration)


def _signalled(sig: int, duration: float) -> ExecutionResult:
    if sig == signal.SIGXCPU:
        return ExecutionResult("timeout", "CPU time limit exceeded (SIGXCPU)", duration)
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return ExecutionResult("error", f"killed by {name}", duration)


def run_programs(
    programs: Sequence[CodeProgram],
    *,
    workers: int | None = None,
    timeout: float = 3.0,
    limits: SandboxLimits | None = None,
    python: str | None = None,
    isolation: str = "bwrap",
) -> list[ExecutionResult]:
    """Run many programs in parallel sandboxes (one subprocess per program), results in input order.

    Args:
        programs: the programs (source, tests, entry point).
        workers: concurrent subprocesses; `default_workers()` by default.
        timeout, limits, python, isolation: as in `run_program`.
    """
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LoraFlowError(f"workers must be a whole number >= 1, got {workers}")
    _check_timeout(timeout)
    python = _interpreter(python)
    wrapper = isolation_command(isolation, python)  # fail closed before any program runs
    if not programs:
        return []
    limits = limits or SandboxLimits()
    with ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="loraflow-sandbox") as pool:
        futures = [pool.submit(_run, p, timeout, limits, python, wrapper) for p in programs]
        try:
            return [f.result() for f in futures]
        except SandboxError:
            for f in futures:  # no score comes of this run: stop starting programs
                f.cancel()
            raise


def default_workers() -> int:
    """Parallel sandboxes by default: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
