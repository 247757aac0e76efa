"""File helpers: the one atomic writer (files and directories) and JSONL reading with file:line errors.

Writes never leave a half-written file or directory behind, and never replace something that is
not ours: a directory is replaced only when it is empty, carries our marker file (`MARKER`, written
into every directory we produce) or holds nothing but the files the new version would hold; a
single output file (a result, a chart, a table) is replaced only when the directory's ledger
(`LEDGER`, one `SHA256  NAME` line per file we wrote there, as `sha256sum` prints) records its
current content, so a file someone else wrote, or edited since, is kept. A file is never replaced
by a directory or the reverse, nor is an input of the same run. `force=True` lifts the ownership
rule (never the input rule).

Crash safety of directory replacement: the new version is complete in a hidden temporary sibling
before it is swapped in, with one atomic `renameat2(RENAME_EXCHANGE)` where the OS has it; elsewhere
with two renames, and a kill between them is repaired by `recover_dir` (run before every
replacement and by readers such as `--resume`), which also removes what killed writers left.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from loraflow.common.errors import LoraFlowError

MARKER = ".loraflow-written"
"""Written last into every directory `atomic_dir` produces: says "ours, and complete"."""

LEDGER = ".loraflow-files"
"""Next to the single output files loraflow wrote: `SHA256  NAME` per file written (appended, sha256sum format)."""

_SPECIAL_ROOTS = ("/proc", "/sys", "/dev")
_RENAME_EXCHANGE = 2


# ----------------------------------------------------------------------------- checks before writing
def _is_special(path: Path) -> bool:
    resolved = str(path.resolve(strict=False))
    return any(resolved == root or resolved.startswith(root + "/") for root in _SPECIAL_ROOTS)


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory (created parents are fine)."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise LoraFlowError(f"{path}: cannot write the {what}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise LoraFlowError(f"{path}: cannot write the {what}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LoraFlowError(f"{path}: cannot write the {what}: {parent} is not writable (permission denied)")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_is_ours(path: str | os.PathLike) -> bool:
    """Whether the existing file `path` is, byte for byte, one that loraflow wrote (its directory's `LEDGER` says so)."""
    path = Path(path)
    try:
        lines = (path.parent / LEDGER).read_text(encoding="utf-8").splitlines()
        recorded = {digest for digest, _, name in (line.partition("  ") for line in lines) if name == path.name}
        return bool(recorded) and _sha256(path) in recorded
    except (OSError, UnicodeDecodeError):
        return False


def _record_written(path: Path, content: Path) -> None:
    """Append `content`'s hash under `path`'s name to the ledger (one write: concurrent writers do not mix lines)."""
    if "\n" in path.name:
        return  # never recorded, so never replaced without --force
    line = f"{_sha256(content)}  {path.name}\n".encode()
    umask = os.umask(0)
    os.umask(umask)
    try:
        fd = os.open(path.parent / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~umask)
    except OSError:
        return  # e.g. a link planted in its place: unrecorded, the file just counts as not ours next time
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def check_output_file(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                      what: str = "output file", force: bool | None = None) -> Path:
    """Refuse, before any expensive work, an output file path that cannot or must not be written.

    Refused: a directory, a device or other non-regular file, anything under /proc, /sys or /dev,
    a path whose parent is a file or not writable, and any of `inputs` (the run's own input files).
    With `force=False`, also an existing file loraflow did not write (`file_is_ours`); `force=None`
    leaves ownership to the caller (a file inside a directory it checked as a whole).
    """
    path = Path(path)
    if not str(path) or str(path).endswith(os.sep):
        raise LoraFlowError(f"{path}: the {what} needs a file name")
    if _is_special(path):
        raise LoraFlowError(f"{path}: refusing to write the {what} under {', '.join(_SPECIAL_ROOTS)}")
    if path.is_dir():
        raise LoraFlowError(f"{path}: is a directory; the {what} needs a file path")
    if path.exists() and not path.is_file():
        raise LoraFlowError(f"{path}: exists and is not a regular file; refusing to replace it with the {what}")
    for src in inputs:
        if src is not None and (_same_file(path, Path(src)) or path.resolve() == Path(src).resolve()):
            raise LoraFlowError(f"{path}: is an input of this run ({src}); write the {what} elsewhere")
    _check_parent(path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise LoraFlowError(f"{path}: the existing {what} is not writable (permission denied)")
    if force is False and path.exists() and not file_is_ours(path):
        raise LoraFlowError(f"{path}: exists and was not written by loraflow (or was changed since); refusing to "
                            f"replace it with the {what} (choose another path, or pass --force to replace it)")
    return path


def is_ours(directory: str | os.PathLike, known_names: Iterable[str] = ()) -> bool:
    """Whether `directory` may be replaced: empty, marked by us, or holding only `known_names` files."""
    directory = Path(directory)
    entries = list(directory.iterdir())
    if not entries or (directory / MARKER).is_file():
        return True
    known = set(known_names)
    return bool(known) and all(e.name in known and e.is_file() and not e.is_symlink() for e in entries)


def check_output_dir(path: str | os.PathLike, *, force: bool = False, known_names: Iterable[str] = (),
                     inputs: Iterable[str | os.PathLike | None] = (), what: str = "output directory") -> Path:
    """Refuse, before any expensive work, an output directory that cannot or must not be (re)written.

    A regular file is never turned into a directory; an existing directory must be ours
    (`is_ours`) unless `force`; no input of the run may be inside it or be it.
    """
    path = Path(path)
    if _is_special(path):
        raise LoraFlowError(f"{path}: refusing to write the {what} under {', '.join(_SPECIAL_ROOTS)}")
    if path.exists() and not path.is_dir():
        raise LoraFlowError(f"{path}: is a file, not a directory; refusing to replace it with the {what}")
    _check_parent(path, what)
    for src in inputs:
        if src is None:
            continue
        src = Path(src).resolve()
        if src == path.resolve() or path.resolve() in src.parents:
            raise LoraFlowError(f"{path}: holds an input of this run ({src}); write the {what} elsewhere")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise LoraFlowError(f"{path}: not writable (permission denied)")
        if not force and not is_ours(path, known_names):
            raise LoraFlowError(
                f"{path}: exists and was not written by loraflow; refusing to replace it "
                "(choose another path, or pass --force to replace it)"
            )
    return path


# ----------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                force: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    With `force` True or False (a user-facing output file), an existing file is replaced only if it
    is ours or `force`, and the new file is recorded in the directory's `LEDGER` as ours.
    """
    path = check_output_file(path, inputs=inputs, force=force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise LoraFlowError(f"{path}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        if force is not None:
            check_output_file(path, inputs=inputs, force=force)  # a file that appeared meanwhile
            _record_written(path, tmp_path)  # before the rename: a recorded hash only ever matches our content
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str, *, inputs: Iterable[str | os.PathLike | None] = (),
                      force: bool | None = None) -> None:
    """Write `text` to `path` so that readers never see a half-written file (`force`: see `atomic_path`)."""
    with atomic_path(path, inputs=inputs, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, *, inputs: Iterable[str | os.PathLike | None] = (),
                      force: bool | None = None) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", inputs=inputs, force=force)


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict], *,
                       inputs: Iterable[str | os.PathLike | None] = (), force: bool | None = None) -> None:
    """Write one JSON object per line, atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), inputs=inputs,
                      force=force)


# ----------------------------------------------------------------------------- atomic directories
def _normal_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 directories; give the tree the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-[^/]*$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(target: str | os.PathLike) -> None:
    """Repair what a killed `atomic_dir` left next to `target`.

    If `target` is missing but a complete copy (one with our marker) survives in a hidden sibling,
    the newest such copy becomes `target`; leftovers of writers that are no longer running are removed.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    pattern = _temp_pattern(target.name)
    stale = []
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _alive(int(m[2])):
            stale.append(entry)
    if not target.exists():
        complete = [e for e in stale if (e / MARKER).is_file()]
        if complete:
            newest = max(complete, key=lambda e: (e / MARKER).stat().st_mtime_ns)
            os.replace(newest, target)
            stale.remove(newest)
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS lacks it."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_dir(target: str | os.PathLike, write: Callable[[Path], None], *, force: bool = False) -> Path:
    """Fill a temporary directory next to `target` with `write(tmp)`, then swap it in as `target`.

    Readers see the old directory or the new one, never a half-written one; if `write` fails,
    `target` is untouched. An existing `target` is replaced only if it is ours (`is_ours`, judged
    against the files the new version holds) or `force`.

    Raises:
        LoraFlowError: `target` is a file, is not ours, or cannot be written.
    """
    target = check_output_dir(target, force=True)  # the ownership check needs the new file names
    recover_dir(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        raise LoraFlowError(f"{target}: cannot write ({e.strerror or e})") from None
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps({"written_by": "loraflow"}) + "\n", encoding="utf-8")
        _normal_permissions(tmp)
        if target.exists():
            if not force and not is_ours(target, [p.name for p in tmp.iterdir()]):
                raise LoraFlowError(
                    f"{target}: exists and was not written by loraflow; refusing to replace it "
                    "(choose another path, or pass --force to replace it)"
                )
            if not _exchange(tmp, target):
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
                os.replace(target, old)
                os.replace(tmp, target)  # a kill between these two renames is repaired by recover_dir
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the previous version
    return target


# ----------------------------------------------------------------------------- reading
def read_text_lines(path: str | os.PathLike, *, what: str = "file") -> list[str]:
    """The lines of a UTF-8 text file (without line ends); errors name the file and the line."""
    path = Path(path)
    raw = read_bytes(path, what=what)
    lines = raw.split(b"\n")
    out = []
    for lineno, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            raise LoraFlowError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
    if out and out[-1] == "":
        out.pop()
    return out


def check_readable_file(path: str | os.PathLike, *, what: str = "file") -> Path:
    """Refuse a missing path, a directory or an unreadable file with one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise LoraFlowError(f"{path}: is a directory, expected a {what}")
    if not path.exists():
        raise LoraFlowError(f"{path}: {what} not found")
    if not os.access(path, os.R_OK):
        raise LoraFlowError(f"{path}: cannot read the {what} (permission denied)")
    return path


def read_bytes(path: str | os.PathLike, *, what: str = "file") -> bytes:
    """The bytes of `path`, with one-line errors for a missing, unreadable or non-regular file."""
    path = check_readable_file(path, what=what)
    try:
        return path.read_bytes()
    except PermissionError:
        raise LoraFlowError(f"{path}: cannot read the {what} (permission denied)") from None
    except OSError as e:
        raise LoraFlowError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed or non-UTF-8 line raises LoraFlowError naming file and line number."""
    path = Path(path)
    rows: list[dict] = []
    for lineno, line in enumerate(read_text_lines(path, what="JSONL file"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoraFlowError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise LoraFlowError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise LoraFlowError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows
