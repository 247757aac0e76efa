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

Inside, as a second layer, each program runs in its own `python -I -B` subprocess with:

- HOME and TMPDIR pointing into its working directory (removed afterwards);
- an environment built from scratch (PATH, LANG, thread counts): nothing is inherited, so no
  secret in the scorer's environment reaches the program;
- stdin closed, stdout/stderr sent to unlinked temporary files (bounded by RLIMIT_FSIZE, so a
  program that prints gigabytes cannot fill the scorer's memory);
- resource limits (address space, CPU seconds, file size, no core files, RLIMIT_NPROC) that the
  bootstrap below sets on itself inside the namespaces, never on bubblewrap, which needs to
  create processes to build them; RLIMIT_NPROC binds every user but root (for root the audit
  hook is the fork barrier);
- its own session and process group (`start_new_session=True`); the whole group gets SIGKILL
  at the wall-clock timeout and again after the program ends, so stray children die too (under
  bubblewrap the PID namespace dies with it);
- a small bootstrap that sets those limits and installs a Python audit hook (PEP 578) before the
  program runs. The hook refuses process creation (`os.fork`, `subprocess`, `os.system`,
  `os.exec*`, `posix_spawn`), signals to other processes (`os.kill` of another pid, `os.killpg`),
  `ctypes`, sockets, links, raising its own resource limits, and writes or deletions outside the
  working directory.

Passing needs more than exit status 0: after the program (prompt + completion + tests +
`check(entry_point)`) returns normally, the bootstrap reads a random per-run token from a pipe
and prints it, then exits. The token is not in the program text, its argv or its environment, so
a program that exits early (`sys.exit(0)`, `os._exit(0)`, `raise SystemExit`), silences the
tests, or prints a made-up sentinel never counts as passed.

A sandbox that cannot start (bubblewrap refused by the kernel, an interpreter that does not run)
is not the program's fault: the bootstrap writes a start marker before the program runs, and a run
that ends without it raises `SandboxError` instead of reporting `failed`, so no score is computed
from it.

Threat model: this contains the accidents and hostility of generated code (loops, fork bombs,
huge allocations, big files, escaping its directory, killing its parent, reading secrets from
the environment or the scorer's files). The program can still read the interpreter's files and,
from inside the same interpreter, the token pipe; a score is trustworthy only for code not written
to game it.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
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
ISOLATION_HELP = ("bwrap (default: each program in its own namespaces, seeing only the interpreter, read-only, and "
                  "its temp dir; needs bubblewrap) or none (audit hook and limits only: weaker, opt-in)")

# The bootstrap writes this to stdout once its limits are set, before the program runs: a run that ends without it
# never started (see `SandboxError`).
_STARTED = b"loraflow-sandbox-started\n"

# What the sandbox mounts of the host, read-only, besides the interpreter and the working directory. Symbolic links
# among the directories (/bin -> usr/bin on merged-/usr systems) are recreated as links.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache",)  # the dynamic loader's index of shared libraries

# Exceptions that mean "the program could not be evaluated" rather than "its tests failed".
_ERROR_EXCEPTIONS = ("SyntaxError", "IndentationError", "TabError", "MemoryError", "SandboxViolation")

# The child's entire environment: nothing is inherited from the scorer.
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# Runs as `python -I -B -c _BOOTSTRAP TOKEN_FD MAX_WRITE_OPENS RLIMITS` inside the sandbox directory.
# It sets the resource limits (RLIMITS: "resource,soft,hard;..."), writes the start marker, installs the
# audit hook, executes solution.py as __main__, and only if that returns normally reads the token from
# TOKEN_FD, prints it and exits with status 0.
_BOOTSTRAP = r'''
import os as _os, sys as _sys

def _loraflow_sandbox(token_fd, max_write_opens, rlimits):
    os, sys = _os, _sys
    import resource
    for item in rlimits.split(";"):
        res, soft, hard = map(int, item.split(","))
        resource.setrlimit(res, (soft, hard))
    os.write(1, b"loraflow-sandbox-started\n")
    root = os.path.realpath(os.getcwd())
    pid = os.getpid()
    normpath, join, fsdecode, getcwd = os.path.normpath, os.path.join, os.fsdecode, os.getcwd
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    devices = ("/dev/null", "/dev/stdout", "/dev/stderr")
    denied = frozenset((
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "os.symlink", "os.link", "os.chroot", "resource.setrlimit", "resource.prlimit",
    ))
    denied_imports = frozenset(("_ctypes", "ctypes", "_posixsubprocess"))
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
        "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
        "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
    }
    watched = denied | {"open", "os.kill", "import"} | set(path_events)
    write_opens = [0]

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
            write_opens[0] += 1
            if write_opens[0] > max_write_opens:
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

    with open("solution.py", "rb") as f:
        source = f.read()
    code = compile(source, "solution.py", "exec")
    main = sys.modules["__main__"]
    main.__file__ = join(root, "solution.py")
    sys.argv[:] = ["solution.py"]
    exec(code, main.__dict__)

    token = b""
    while True:
        chunk = os.read(token_fd, 256)
        if not chunk:
            break
        token += chunk
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(1, b"\n" + token + b"\n")
    os._exit(0)

_loraflow_sandbox(int(_sys.argv[1]), int(_sys.argv[2]), _sys.argv[3])
'''


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
    """Remove the sandbox directory even if the program made parts of it unreadable."""

    def onerror(func, p, exc_info):  # noqa: ARG001
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def run_program(
    program: str,
    *,
    timeout: float = 3.0,
    limits: SandboxLimits | None = None,
    python: str | None = None,
    isolation: str = "bwrap",
) -> ExecutionResult:
    """Run one untrusted Python program in the sandbox and say whether it passed.

    Args:
        program: the full program text (prompt + completion + tests + `check(...)`).
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


def _run(program: str, timeout: float, limits: SandboxLimits, python: str, wrapper: list[str]) -> ExecutionResult:
    """`run_program` with the isolation already resolved into a command prefix.

    Raises:
        SandboxError: the sandbox or the interpreter ended before the bootstrap started the program.
    """
    start = time.monotonic()
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="loraflow-sandbox-")
    read_fd = write_fd = -1
    try:
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = dict(_BASE_ENV, HOME=workdir, TMPDIR=workdir)
        read_fd, write_fd = os.pipe()
        os.write(write_fd, token.encode())
        os.close(write_fd)
        write_fd = -1
        cmd = [python, "-I", "-B", "-c", _BOOTSTRAP, str(read_fd), str(limits.max_write_opens),
               _rlimits(limits, timeout)]
        if wrapper:
            cmd = [*wrapper, *_interpreter_binds(python), "--bind", workdir, workdir, "--remount-ro", "/",
                   "--clearenv", *(a for k, v in env.items() for a in ("--setenv", k, v)), "--chdir", workdir,
                   "--", *cmd]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                # bubblewrap gets the same clean environment: the program can read it as /proc/1/environ
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(read_fd,), start_new_session=True)
            except (OSError, subprocess.SubprocessError) as e:
                why = str(e)
                raise SandboxError(f"the code sandbox could not start a program ({why}); {_advice(wrapper, why)}") from None
            os.close(read_fd)
            read_fd = -1
            finished = _wait_exit(proc.pid, start + timeout)
            # The leader is not reaped yet (alive or a zombie), so its pid, the group id, cannot have
            # been reused: kill the whole group once, reap the leader, then kill any stragglers.
            _kill_group(proc.pid, attempts=1)
            returncode = proc.wait()
            _kill_group(proc.pid)
            duration = time.monotonic() - start
            out.seek(0)
            stdout = out.read()
            err.seek(max(0, os.fstat(err.fileno()).st_size - 8192))
            stderr = err.read().decode("utf-8", errors="replace")
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        _force_rmtree(workdir)
    if finished and not stdout.startswith(_STARTED):
        why = _last_line(stderr) or f"exit status {returncode}"
        raise SandboxError(f"the code sandbox could not start a program ({why}); {_advice(wrapper, why)}")
    if wrapper and returncode > 128 and finished:  # bubblewrap reports a signal death as 128 + signal
        returncode = 128 - returncode
    return _classify(finished, returncode, token.encode() in stdout, stderr, timeout, duration)


def _advice(wrapper: list[str], why: str) -> str:
    if not wrapper:
        return "no score was computed; check that the interpreter runs (python -I -B)"
    userns = ("bubblewrap needs user namespaces when not run as root (sysctl user.max_user_namespaces > 0; on "
              "Ubuntu 24.04+ also kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap), "
              if "namespace" in why else "")
    return f"no score was computed; {userns}or, accepting a weaker sandbox, pass --isolation none"


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
    result = _run("pass\n", 60.0, SandboxLimits(), python, list(prefix))
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


def _classify(finished: bool, rc: int, saw_token: bool, stderr: str, timeout: float, duration: float) -> ExecutionResult:
    if not finished:
        return ExecutionResult("timeout", f"timed out after {timeout:g} s", duration)
    if rc == 0 and saw_token:
        return ExecutionResult("passed", "", duration)
    if rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return ExecutionResult("timeout", "CPU time limit exceeded (SIGXCPU)", duration)
        if sig == signal.SIGXFSZ:
            return ExecutionResult("error", "file size limit exceeded (SIGXFSZ)", duration)
        return ExecutionResult("error", f"killed by {name}", duration)
    if rc == 0:
        return ExecutionResult("failed", "exited with status 0 before the tests completed", duration)
    last = _last_line(stderr)
    exc_name = last.split(":", 1)[0].rsplit(".", 1)[-1]
    resource_limit = "[Errno 27]" in last  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ)
    status = "error" if exc_name in _ERROR_EXCEPTIONS or resource_limit else "failed"
    return ExecutionResult(status, last or f"exited with status {rc}", duration)


def run_programs(
    programs: Sequence[str],
    *,
    workers: int | None = None,
    timeout: float = 3.0,
    limits: SandboxLimits | None = None,
    python: str | None = None,
    isolation: str = "bwrap",
) -> list[ExecutionResult]:
    """Run many programs in parallel sandboxes (one subprocess per program), results in input order.

    Args:
        programs: full program texts.
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
