"""Write-then-rename, so that a reader (or a crash) never leaves half a file behind.

Every write goes to a temporary file in the destination's own folder (so the rename stays on one
file system), is flushed to disk (``fsync``), and is then renamed over the destination with
:func:`os.replace`; the folder is synced too, so the rename itself survives a power cut. A reader sees
the old file or the new one, never a mix.

A process killed between the first byte and the rename (``kill -9``, a power cut) leaves its
temporary file behind. Temporary files are named ``.lmk3d-tmp-<pid>-<random>.tmp``
(:data:`TEMP_PREFIX`, :data:`TEMP_SUFFIX`): hidden, with a suffix no reader or datastore scan takes
for an image or a label, and carrying the writer's process id, so :func:`remove_stale_temps` can tell
a leftover (its writer is gone) from a write in progress in another live process.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_PREFIX", "TEMP_SUFFIX", "atomic_copy", "atomic_write_bytes", "atomic_write_text", "fsync_dir",
           "owner_gone", "remove_stale_temps", "stale_owner"]

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".lmk3d-tmp-"
TEMP_SUFFIX = ".tmp"

# Temporary files this process is writing now: a leftover of an earlier process that had the same
# process id (a container restarts with the same pids) is stale, a write in progress in another
# thread is not.
_in_progress: set[str] = set()
_in_progress_lock = threading.Lock()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename, a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse to fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike[str], fill: Callable[[BinaryIO], None]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=TEMP_SUFFIX, dir=p.parent)
    busy = os.path.realpath(tmp)
    with _in_progress_lock:
        _in_progress.add(busy)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
        fsync_dir(p.parent)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        with _in_progress_lock:
            _in_progress.discard(busy)
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    def fill(f: BinaryIO) -> None:
        f.write(data)

    return _atomic(path, fill)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Copy the file ``src`` to ``path`` the same way (``path`` never holds part of ``src``).

    A symbolic link at ``path`` is replaced by the file, not followed.
    """
    def fill(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)

    return _atomic(path, fill)


def owner_gone(pid: int) -> bool:
    """Whether no process ``pid`` is running (a process we may not signal is running)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    except OSError:
        return False
    return False


def stale_owner(name: str, prefix: str) -> bool:
    """Whether ``name`` (``<prefix><pid>-...``) was left by a process that is no longer running it.

    True when its process is gone, when the name has no readable pid (an older version's leftover),
    and when the pid is the current process's: an earlier process can have had the same pid (a
    container restarts with the same pids), so the caller must leave out what it is writing itself.
    """
    head = name[len(prefix):].split("-", 1)[0]
    if not head.isdigit() or int(head) == os.getpid():
        return True
    return owner_gone(int(head))


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (not in its sub-folders).

    Only files named like this module's temporary files (``.lmk3d-tmp-<pid>-...tmp``) whose writer
    process is gone are removed, so a write in progress in another live process is left alone. Each
    removal is logged.

    Returns:
        The removed files (none when ``folder`` does not exist).
    """
    removed: list[Path] = []
    for entry in _stale_entries(folder, TEMP_PREFIX, False, _writing):
        if not entry.name.endswith(TEMP_SUFFIX):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        logger.warning("removed %s: a temporary file left by an interrupted write", entry.path)
        removed.append(Path(entry.path))
    return removed


def _writing(path: str) -> bool:
    with _in_progress_lock:
        return path in _in_progress


def _stale_entries(folder: str | os.PathLike[str], prefix: str, folders: bool,
                   busy: Callable[[str], bool]) -> list[os.DirEntry[str]]:
    """The files (or ``folders``) ``<prefix><pid>-...`` in ``folder`` whose writer is gone (:func:`stale_owner`)."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [e for e in entries if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False) == folders
            and stale_owner(e.name, prefix) and not busy(os.path.realpath(e.path))]


def remove_stale_dirs(folder: str | os.PathLike[str], prefix: str, busy: Callable[[str], bool],
                      what: str) -> list[Path]:
    """Remove the folders named ``<prefix><pid>-...`` in ``folder`` that killed processes left.

    A folder is stale when its process is gone, or when it is this process's and ``busy`` (called with
    its real path) says nothing of this process is filling it; another live process's folder is left
    alone. Each removal is logged, naming ``what`` left it.

    Returns:
        The removed folders (none when ``folder`` does not exist).
    """
    removed: list[Path] = []
    for entry in _stale_entries(folder, prefix, True, busy):
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            logger.warning("removed %s: a folder left by %s", entry.path, what)
            removed.append(Path(entry.path))
    return removed
