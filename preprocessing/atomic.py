"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every output of the project goes through :func:`atomic_path`: write to a hidden temporary file in
the destination folder (same file system, so the rename is atomic), fsync, then ``os.replace``.

Permissions: ``mkstemp`` makes its file ``0600``; before the rename the file gets the mode a plain
``open(path, "w")`` would give it (``0666`` less the process umask), so colleagues and export
service accounts on a shared drive can read the outputs exactly as they could any other file.
Folders made here are plain ``mkdir`` folders (``0777`` less the umask).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()
_PROC_UMASK = re.compile(r"^Umask:\s*([0-7]+)\s*$", re.MULTILINE)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux (4.7+) publishes it in ``/proc/self/status``; elsewhere it is read by the only portable
    means, setting and restoring it, under a lock so two threads of this module cannot interleave
    (another library calling ``os.umask`` at that very moment could still see the probe value).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            found = _PROC_UMASK.search(fh.read())
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode of a newly created regular file under the current umask (e.g. ``0644`` for ``022``)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. The temporary name
    keeps the final suffix (``.nii.gz``, ``.png``) because some writers choose the format by it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if final.name.endswith(".nii.gz") else final.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # After the writer, not after mkstemp: some writers replace the file instead of opening it.
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
