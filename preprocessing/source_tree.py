"""Walk a source folder: the regular files to read, plus a row for everything else met.

Rules (the README's "input rules"):

- Only regular files are opened. A named pipe (FIFO), socket or device file would block or
  stream for ever if opened; it gets a ``skipped`` entry with the reason.
- Symbolic links that point OUT of SOURCE are followed, to files and to folders (a cohort folder
  of links into a PACS export is common), each real file and folder once. A link that points
  INTO SOURCE is not followed: its target is read where it lies, under its own name, so nothing is
  read twice; a link to a folder that contains it is a loop. Every link not followed -- into
  SOURCE, a loop, a second link to what is already read, a broken link -- gets a ``skipped``
  entry with the reason.
- A folder that cannot be listed (permissions, I/O error) is an ``error`` entry: the files in
  it are missing from the run, which must not look complete.
- Folders in ``exclude`` (the run's own OUT when it lies inside SOURCE) and the product's private
  folders (``.staging``, ``.model``) are not entered, silently: they hold our own outputs.

Paths may hold bytes that are not UTF-8 (Python keeps them as surrogate escapes);
:func:`printable_path` makes such a path safe to write into a UTF-8 table.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Folder names the product writes inside OUT; never inputs.
PRIVATE_FOLDERS = frozenset({".staging", ".model"})


@dataclass(frozen=True)
class TreeEntry:
    """Something met while walking that is not a file to read.

    Attributes:
        path: the path as met (under the source folder).
        status: "skipped" (deliberately not read) or "error" (could not be looked at).
        reason: why, for the manifest.
    """

    path: Path
    status: str
    reason: str


def printable_path(path: str | os.PathLike) -> str:
    """``path`` as text that always encodes to UTF-8: undecodable bytes become ``\\xNN``.

    A file name written by another system (Latin-1 ``é`` is the byte 0xE9) reaches Python as a
    lone surrogate, which a UTF-8 writer rejects; this keeps the row and shows the byte.
    """
    return printable_text(os.fspath(path))


def printable_text(text: str) -> str:
    """``text`` with surrogate escapes (undecodable file-name bytes) shown as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape") if _only_escapes(text) else None
        if raw is not None:
            return raw.decode("utf-8", "backslashreplace")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _only_escapes(text: str) -> bool:
    """True when every surrogate in ``text`` is one that ``surrogateescape`` produced."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def walk_source_tree(
    root: Path, exclude: Iterable[str | os.PathLike] = ()
) -> tuple[list[Path], list[TreeEntry]]:
    """Regular files under ``root`` (sorted, depth first) and an entry for everything not read.

    Args:
        root: the source folder.
        exclude: folders not to enter (compared by real path, so a link to them is excluded too).

    Returns:
        (files, entries): ``files`` to read, each real file once; ``entries`` for special files,
        skipped links and unlistable folders (see the module docstring).
    """
    excluded = {os.path.realpath(p) for p in exclude}
    root_real = os.path.realpath(root)
    seen_dirs: dict[str, Path] = {root_real: root}  # real path -> the path it was read under
    seen_files: dict[str, Path] = {}
    files: list[Path] = []
    entries: list[TreeEntry] = []
    stack: list[tuple[Path, str]] = [(root, root_real)]
    while stack:
        folder, folder_real = stack.pop()
        try:
            with os.scandir(folder) as listing:
                children = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            entries.append(TreeEntry(folder, "error", _unlistable(exc)))
            continue
        subdirs: list[tuple[Path, str]] = []
        for entry in children:
            path = Path(entry.path)
            kind, real, note = _classify(entry, folder_real)
            if kind == "skip":
                entries.append(TreeEntry(path, "skipped", note))
                continue
            if kind == "dir" and (real in excluded or entry.name in PRIVATE_FOLDERS):
                logger.debug("not entering %s (output or private folder)", printable_path(path))
                continue
            seen = seen_dirs if kind == "dir" else seen_files
            reason = _link_not_followed(kind, real, root_real, folder_real) if entry.is_symlink() else ""
            if not reason and real in seen:  # e.g. two links out of SOURCE, one to a parent of the other
                reason = f"the same {_WHAT[kind]} was already read as {printable_path(seen[real])}; read once"
            if reason:
                entries.append(TreeEntry(path, "skipped", reason))
                continue
            seen[real] = path
            if kind == "dir":
                subdirs.append((path, real))
            else:
                files.append(path)
        stack.extend(reversed(subdirs))
    return files, entries


_WHAT = {"dir": "folder", "file": "file"}


def _link_not_followed(kind: str, real: str, root_real: str, folder_real: str) -> str:
    """Why a link to ``real`` is not followed ("" when it is: it points out of SOURCE)."""
    if kind == "dir" and _within(folder_real, real):
        return "symlink loop: the link points to a folder that contains it; not followed"
    if _within(real, root_real):
        return f"symlink to a {_WHAT[kind]} inside SOURCE, which is read where it lies; not followed"
    return ""


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def classify_path(path: Path) -> tuple[str, str]:
    """("file", "") for a regular file (links followed), else ("skipped", the reason)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return "skipped", _broken_link(exc) if os.path.islink(path) else f"cannot stat: {exc.strerror}"
    if stat.S_ISREG(mode):
        return "file", ""
    return "skipped", _special(mode)


def _classify(entry: os.DirEntry, folder_real: str) -> tuple[str, str, str]:
    """(kind, real path, reason): kind "dir", "file" or "skip"."""
    try:
        if entry.is_symlink():
            try:
                mode = os.stat(entry.path).st_mode  # follows the link
            except OSError as exc:
                return "skip", "", _broken_link(exc)
            real = os.path.realpath(entry.path)
        else:
            real = os.path.join(folder_real, entry.name)
            # is_dir/is_file answer from the listing's d_type on Linux: no system call per file.
            if entry.is_dir(follow_symlinks=False):
                return "dir", real, ""
            if entry.is_file(follow_symlinks=False):
                return "file", real, ""
            mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:  # the entry vanished or cannot be looked at
        return "skip", "", f"cannot stat: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "dir", real, ""
    if stat.S_ISREG(mode):
        return "file", real, ""
    return "skip", real, _special(mode)


def _special(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        what = "a named pipe (FIFO)"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device file"
    else:
        what = "a special file"
    return f"not a regular file ({what}); only regular files are read"


def _broken_link(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop (the link resolves to itself); not followed"
    return f"broken symlink ({exc.strerror}); its target cannot be read"


def _unlistable(exc: OSError) -> str:
    return (
        f"cannot list folder: {type(exc).__name__}: {exc.strerror or exc}; nothing in it was read "
        "(check its permissions and rerun)"
    )
