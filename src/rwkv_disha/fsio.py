"""Writing files safely: one atomic-write helper, one-line OS errors, stale-temp cleanup, folder locks.

Every file the tool writes goes through :func:`atomic_write`: the content goes to a temporary file
``.NAME.<pid>.<random>.tmp`` in the destination folder, then ``os.replace`` moves it into place, so a crash,
a full disk or Ctrl-C never leaves a half-written file under the final name, and the temporary file is
removed on every error path. Temporaries of killed processes are removed by :func:`clean_stale_temps`
the next time a command writes into that folder. Output files get the usual ``0666 & ~umask`` mode.
Writers that make their own temporary file beside their target (safetensors' ``save_file``) write inside a
private temporary folder of the same naming (:func:`atomic_write_safetensors`), so a killed run's folder is
removed with whatever the writer left in it. Files that belong together (an adapter and its sidecar) go
through :func:`atomic_write_files`, which never leaves a new one beside an old one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rwkv_disha.errors import RWKVDishaError

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "not writable (permission denied)",
    errno.EPERM: "not writable (operation not permitted)",
    errno.EROFS: "not writable (read-only file system)",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a parent is not a directory",
    errno.ENOENT: "its folder does not exist",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "input/output error",
}
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def os_error_cause(e: BaseException) -> str:
    """A short cause for an OSError (``no space left on the device``, ``is a directory``, ...)."""
    if isinstance(e, OSError) and e.errno in _CAUSES:
        return _CAUSES[e.errno]
    if isinstance(e, OSError):
        return e.strerror or str(e)
    # torch.save reports a full disk as a RuntimeError from its zip writer
    text = str(e)
    if "unexpected pos" in text or "file write failed" in text or "No space" in text:
        return "no space left on the device (or the write failed)"
    return text.splitlines()[0] if text else type(e).__name__


def _is_write_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "inline_container" in text or "unexpected pos" in text or "file write failed" in text
    )


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a temp file of a dead one is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary path next to ``path``: ``.NAME.<pid>.<random>.tmp`` (created, empty)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    return Path(tmp)


def temp_folder(path: str | os.PathLike) -> Path:
    """A fresh private folder next to ``path``, named as :func:`temp_path` names files
    (``.NAME.<pid>.<random>.tmp``): :func:`clean_stale_temps` removes a killed run's one with its files."""
    p = Path(path)
    return Path(tempfile.mkdtemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent))


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _file_name(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a file's name: refused when it is a folder, or ends with a slash as a folder's does."""
    text = os.fspath(path)
    if Path(text).is_dir():
        raise RWKVDishaError(f"{flag} {Path(text)} is a directory: give a file name")
    if text.endswith(("/", os.sep)):
        raise RWKVDishaError(f"{flag} {text} ends with a slash, as a folder does: give a file name")
    return Path(text)


def check_output_path(path: str | os.PathLike, flag: str = "--output", overwrite: bool = True) -> Path:
    """Refuse an output path that is a directory, exists (unless ``overwrite``) or cannot be written.

    Call it before long work; :func:`atomic_write` catches what still goes wrong later.
    """
    p = _file_name(path, flag)
    if (p.exists() or p.is_symlink()) and not overwrite:  # a dangling link is a user's file too
        raise RWKVDishaError(f"{flag} {p} already exists: choose another name or pass --overwrite 1")
    check_folder_creatable(p.parent if str(p.parent) else Path("."), f"{flag} {p}:")
    if p.parent.is_dir():
        _probe_create(p, flag)
    return p


def check_new_file(path: str | os.PathLike, flag: str, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file that cannot be written as asked: a name that is a folder or
    ends with a slash, an existing file (unless ``overwrite``), a folder that does not exist, or one where
    no file can be created (tried for real: :func:`_probe_create`)."""
    p = _file_name(path, flag)
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise RWKVDishaError(f"{flag} {p} already exists: choose another name or pass --overwrite 1")
    folder = p.parent
    above = folder
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise RWKVDishaError(f"{flag} {p}: {above} is a file, not a folder")
    if not folder.is_dir():
        raise RWKVDishaError(f"{flag} {p}: the folder {folder} does not exist; create it or choose another")
    _probe_create(p, flag)
    return p


def _probe_create(p: Path, flag: str) -> None:
    """Create and remove a temporary file beside ``p``: root passes ``os.access`` on read-only mounts and on
    /proc alike, so only a real try tells whether the folder takes new files."""
    try:
        temp_path(p).unlink()
    except OSError as e:
        # ENOENT from an existing folder: a virtual file system (/proc) that takes no new files
        cause = "" if e.errno == errno.ENOENT else f": {os_error_cause(e)}"
        raise RWKVDishaError(
            f"{flag} {p}: no file can be created in {p.parent}{cause}; choose another folder"
        ) from None


def check_folder_creatable(folder: str | os.PathLike, label: str) -> None:
    """Refuse a folder that could not be created (or written, when it exists), without creating it: its
    nearest existing ancestor must be a writable folder. ``label`` starts the error line."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RWKVDishaError(f"{label} {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RWKVDishaError(f"{label} {probe} is not writable")


@contextmanager
def _temps_removed_on_failure(made: list[Path], target: Callable[[], str]) -> Iterator[None]:
    """On any failure inside, remove the temporary files in ``made``; an OS error (full disk, not writable,
    a directory in the way) becomes one line, ``cannot write <target()>: <cause>``."""
    try:
        yield
    except BaseException as e:
        for tmp in made:
            tmp.unlink(missing_ok=True)
        if _is_write_error(e):
            raise RWKVDishaError(f"cannot write {target()}: {os_error_cause(e)}") from None
        raise


def _filled_temp(p: Path, write: Callable[[Path], Any], made: list[Path]) -> Path:
    """A temporary file beside ``p`` (its folder made, a killed run's leftovers removed) filled by
    ``write(tmp)``, with the mode a new file gets; its name goes into ``made`` before the write, so that
    the caller removes it on any failure."""
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(p.parent)
    tmp = temp_path(p)
    made.append(tmp)
    write(tmp)
    os.chmod(tmp, _umask_mode())
    return tmp


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], Any], what: str = "output", overwrite: bool = True
) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then move it to ``path`` atomically.

    Creates missing parent folders. Any failure removes the temporary file; an OS error (full disk, not
    writable, path is a directory) becomes one :class:`RWKVDishaError` line naming ``path`` and the cause.
    Without ``overwrite``, a file that appeared at ``path`` since the checks is kept and refused.
    """
    p = Path(path)
    made: list[Path] = []  # the temporary file, once named: removed on any failure
    with _temps_removed_on_failure(made, lambda: f"{what} {p}"):
        tmp = _filled_temp(p, write, made)
        if overwrite:
            os.replace(tmp, p)
        else:
            _move_to_new(tmp, p, what)
        made.clear()
    return p


def _move_to_new(tmp: Path, p: Path, what: str) -> None:
    """Move ``tmp`` to ``p`` only if ``p`` does not exist: a hard link fails on an existing name, where
    ``os.replace`` would clobber it; a file system without hard links gets a last check and the rename."""
    try:
        os.link(tmp, p)
    except FileExistsError:
        raise RWKVDishaError(
            f"{what} {p} already exists: choose another name or pass --overwrite 1"
        ) from None
    except OSError:
        if p.exists() or p.is_symlink():
            raise RWKVDishaError(
                f"{what} {p} already exists: choose another name or pass --overwrite 1"
            ) from None
        os.replace(tmp, p)
        return
    tmp.unlink()


def atomic_write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    metadata: dict[str, str] | None = None,
    what: str = "output",
    overwrite: bool = True,
) -> Path:
    """Write ``tensors`` as a safetensors file at ``path`` through :func:`atomic_write`.

    ``safetensors.torch.save_file`` writes its own ``.tmpXXXXXX`` beside its target and renames it; a
    killed run would leave that full-size file under a name we cannot tell from a user's. So it writes
    inside a :func:`temp_folder`, and the finished file moves out to our temporary file.
    """
    return atomic_write(path, safetensors_writer(path, tensors, metadata), what, overwrite)


def safetensors_writer(
    path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Callable[[Path], None]:
    """The ``write(tmp)`` of :func:`atomic_write_safetensors`, for :func:`atomic_write_files`."""
    from safetensors.torch import save_file

    p = Path(path)

    def write(tmp: Path) -> None:
        folder = temp_folder(p)
        try:
            inner = folder / p.name
            save_file(tensors, str(inner), metadata)
            os.replace(inner, tmp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return write


def text_writer(text: str) -> Callable[[Path], None]:
    """A ``write(tmp)`` that writes ``text`` as UTF-8 and syncs it (:func:`atomic_write`'s argument)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def atomic_write_text(
    path: str | os.PathLike, text: str, what: str = "output", overwrite: bool = True
) -> Path:
    return atomic_write(path, text_writer(text), what, overwrite)


def atomic_write_json(
    path: str | os.PathLike, obj: Any, what: str = "output", overwrite: bool = True
) -> Path:
    return atomic_write_text(path, json_text(obj), what, overwrite)


def atomic_write_files(files: list[tuple[str | os.PathLike, Callable[[Path], Any], str]]) -> list[Path]:
    """Write files that belong together (an adapter and its sidecar), each ``(path, write, what)`` as
    :func:`atomic_write` does, so that they are never left mismatched: every temporary file is filled
    first (a failure there changes nothing), then the existing files after the first are removed, then
    the temporaries are moved into place in order. A failure or a crash at any point leaves the old set,
    or the first files new and the rest missing: never a new first file beside an old second one."""
    paths = [Path(f[0]) for f in files]
    temps: list[Path] = []
    at = 0  # the file being worked on, for the error line
    with _temps_removed_on_failure(temps, lambda: f"{files[at][2]} {paths[at]}"):
        for at in range(len(paths)):
            _filled_temp(paths[at], files[at][1], temps)
        for at in range(1, len(paths)):
            paths[at].unlink(missing_ok=True)  # an old one must not outlive a failure to replace the first
        for at, tmp in enumerate(list(temps)):
            os.replace(tmp, paths[at])
            temps.remove(tmp)
    return paths


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.<pid>.*.tmp`` files and :func:`temp_folder` folders in ``folder`` whose process is gone
    (a killed earlier run)."""
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            try:
                if _remove_temp(entry):
                    removed.append(entry)
            except OSError:
                pass
    return removed


def _remove_temp(entry: Path) -> bool:
    """Remove a stale temporary file, or a stale :func:`temp_folder` with its files; whether it was removed.

    A folder holding a subfolder is kept: ours never do, so it is a user's that happens to match the name.
    """
    if not entry.is_dir() or entry.is_symlink():
        entry.unlink()
        return True
    if any(child.is_dir() and not child.is_symlink() for child in entry.iterdir()):
        return False
    shutil.rmtree(entry)
    return True


def lock_holder(fd: int, wait_s: float = 1.0) -> str:
    """Who holds the flock on ``fd``, as its holder wrote it (``rwkv-disha train (pid N)``). The holder
    writes that line just after taking the lock, so an empty file is read again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if holder or time.monotonic() > deadline:
            return holder or "another process"
        time.sleep(0.02)


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (``folder/.rwkv-disha.lock``) for the duration of the block.

    A second process asking for the same folder gets one line naming the holder's pid. The lock is an
    ``flock``: the kernel drops it when the holder dies, so a killed run never leaves a stale lock.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".rwkv-disha.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RWKVDishaError(
                f"{folder} is in use by {lock_holder(fd)}: wait for it to finish or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"rwkv-disha {command} (pid {os.getpid()})".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # releases the flock
