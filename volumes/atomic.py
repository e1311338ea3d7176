"""Writing files so that a reader or an interrupted run never sees half of one.

Every writer here puts its bytes in a temporary file beside the target and renames it
into place. An exception removes the temporary file; a process killed with SIGKILL (or
a machine that lost power) cannot, so the temporary file stays. Its name says whose it
was::

    .<target>.~<pid>@<host>.<random><suffix>        e.g. .overview.png.~4123@1f2e3d4c.k2j9x0q_.png

(``host`` is 8 hex digits of a hash of the host name), so :func:`sweep_temporaries` can
later remove the debris of writers that are gone - and only theirs: a temporary file of
a process still alive on this host is never touched. Where the owner cannot be checked
(another host on shared storage, or a name from before the owner was recorded) a file
is only removed once it is older than the caller says is safe; callers that know no
writer can be at work in a folder (one case is written by one worker at a time) say 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "is_temporary", "sweep_temporaries", "writer_alive"]

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
"""This host's tag in temporary names."""

# mkstemp's random part: 8 of [a-z0-9_]
_RANDOM = r"[a-z0-9_]{8}"
_OWNED = re.compile(rf"^\.(?P<target>.+)\.~(?P<pid>[0-9]+)@(?P<host>[0-9a-f]{{8}})\.{_RANDOM}(?P<suffix>.*)$")
# the names of earlier versions, without the owner: ".<target>.<random><suffix>" where the
# suffix was ".tmp" or the target's own extension (".png" for "x.png", ".nii.gz" for "x.nii.gz")
_LEGACY = re.compile(rf"^\.(?P<target>.+)\.{_RANDOM}(?P<suffix>(\.[A-Za-z0-9]+){{1,2}})$")


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block completes, rename it into place.

    For writers that take a file name (``nibabel.save``, ``numpy.savez``). The rename is
    atomic on POSIX file systems, so ``path`` holds either its old content or the complete
    new one, never a partial file; an exception removes the temporary file, and the name
    of the temporary file records its owner for :func:`sweep_temporaries` (a SIGKILL
    reaches no ``except``). The file gets the permissions a plain ``open`` would give it
    (mkstemp's are owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.~{os.getpid()}@{HOST}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file_handle)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX file systems, so ``path`` holds either its old content
    or the complete new one, never a partial file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        write(stream)


def writer_alive(pid: int, host: str = HOST) -> bool | None:
    """Whether process ``pid`` of ``host`` is running: True, False, or None when it cannot be told.

    Only a process of this host can be checked. A zombie (killed, not yet reaped by its
    parent) is dead. A reused pid reads as alive, which only delays a sweep.
    """
    if host != HOST:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporary names (this version's or an earlier one's)."""
    if _OWNED.match(name):
        return True
    legacy = _LEGACY.match(name)
    return bool(legacy) and (legacy["suffix"] == ".tmp" or legacy["target"].endswith(legacy["suffix"]))


def _stale(entry: os.DirEntry, now: float, unknown_after_s: float | None) -> bool:
    owned = _OWNED.match(entry.name)
    if owned:
        alive = writer_alive(int(owned["pid"]), owned["host"])
        if alive is not None:
            return not alive
    elif not is_temporary(entry.name):
        return False
    if unknown_after_s is None:
        return False
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime >= unknown_after_s
    except OSError:
        return False


def sweep_temporaries(folder: str | Path, *, unknown_after_s: float | None = 3600.0,
                      recursive: bool = False) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder``; returns what went.

    A temporary file (see the module's docstring) goes when its writer is a dead process
    of this host. When its owner cannot be checked (another host, an older name) it goes
    once it is ``unknown_after_s`` seconds old (``None``: never; 0: at once, for folders
    that no other writer can be using). Nothing else is touched; a missing folder is
    nothing to do.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                removed += sweep_temporaries(entry.path, unknown_after_s=unknown_after_s, recursive=True)
        elif entry.name.startswith(".") and _stale(entry, now, unknown_after_s):
            try:
                os.unlink(entry.path)
            except OSError:
                continue  # gone meanwhile (another sweeper) or not ours to remove
            removed.append(Path(entry.path))
    return removed
