"""The one write path: every file a run writes (checkpoints, the resume state, ``config.json``,
``metrics.jsonl``, the lock's record, plots, an experiment's records) goes through here.

Three guarantees, for any entry of a run directory:

* **Never through a link.** Entries are opened with ``O_NOFOLLOW`` and checked with ``fstat`` to be regular
  files; a symbolic link (or a directory, a FIFO...) where a run file belongs is refused in one line naming
  it, and whatever it points at is left untouched. A run directory is the user's, but a link planted in it
  must not make a run truncate or overwrite a file elsewhere.
* **Whole files or none.** :func:`atomic_write_bytes` writes a temporary file in the same directory (created
  with ``O_CREAT | O_EXCL | O_NOFOLLOW``), ``fsync``-s it, ``os.replace``-s it over the target and
  ``fsync``-s the directory, so a crash or a power cut at any instant leaves the old or the new file, never a
  torn one. The mode is the one a plain ``open`` gives (``0o666`` less the umask): the kernel applies the
  umask to the ``0o666`` passed at creation, so the process umask is never read or changed (changing it,
  even for a moment, races with every other thread that creates a file). :func:`append_text` (the
  metrics' lines) cuts the file back to its old length when a line cannot be written whole.
* **A failed write is a one-line error.** Any ``OSError`` (a full disk, a file-size limit, a read-only
  directory) becomes :class:`WriteFailed`, ``could not write PATH: [Errno N] reason``, after the temporary
  file is removed; the file that was there before stays as it was.

:func:`write_all` is the single place where bytes reach a file, so a test can make any write of a run fail
by wrapping it (``tests/test_faults.py``).
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import UserError

TEMP_SUFFIX = ".jacplug-tmp"  # names no other tool picks, so stale ones can be removed safely
#: 0 where the platform has no such flag (Windows): entries are then checked with ``lstat`` first
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


class WriteFailed(UserError):
    """A file of the run could not be written (``path``, and the operating system's ``reason``)."""

    def __init__(self, path: str | Path, reason: OSError) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"could not write {self.path}: {describe(reason)}")


class NotAFile(UserError):
    """A run file's name is taken by a link or by something other than a regular file."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = str(path)
        super().__init__(f"refusing to write {self.path}: it is {what}, and jacplug never writes through links or "
                         "into other kinds of entry; remove it, or choose another --out")


def describe(error: OSError) -> str:
    """``[Errno 27] File too large``: the OS's reason, without the file name Python appends."""
    if error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def open_entry(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that never follows a link at ``path`` and returns only a regular file's descriptor;
    otherwise a one-line :class:`NotAFile` naming ``path``. Other ``OSError``-s propagate."""
    if not NOFOLLOW:
        _refuse_link(path)
    try:
        fd = os.open(path, flags | NOFOLLOW | _BINARY, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's answer to O_NOFOLLOW on a link
            raise NotAFile(path, "a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise NotAFile(path, "a directory") from None
        raise
    kind = _kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise NotAFile(path, kind)
    return fd


def refuse_links_under(directory: str | Path) -> None:
    """Refuse, in one line naming it, the first symbolic link found in ``directory`` or below (links to
    directories are not followed): a run directory holds only what jacplug wrote there."""
    for root, dirs, names in os.walk(directory):
        for name in sorted(dirs + names):
            entry = os.path.join(root, name)
            if os.path.islink(entry):
                raise NotAFile(entry, "a symbolic link")


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by a file holding ``data``, atomically and durably (see the module docstring)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed(path, exc) from None
    _refuse_link(path)
    tmp, fd = _create_temp(path)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)  # the data reach the disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError):
            raise WriteFailed(path, exc) from None
        raise
    try:
        fsync_directory(path.parent)  # the rename itself survives a power cut
    except OSError as exc:
        raise WriteFailed(path, exc) from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """:func:`atomic_write_bytes` of what ``write(fh)`` writes into a binary file object (a figure's
    ``savefig``, say); nothing reaches the disk if ``write`` raises."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (created when missing) in one write; when it cannot be written whole, the
    file is cut back to its old length, so a reader never meets a torn line in the middle of the file."""
    try:
        fd = open_entry(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as exc:
        raise WriteFailed(path, exc) from None
    try:
        size = os.fstat(fd).st_size
        try:
            write_all(fd, text.encode())
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # a reader still skips a torn last line
            raise WriteFailed(path, exc) from None
    finally:
        os.close(fd)


def fsync_directory(directory: str | Path) -> None:
    """``fsync`` a directory, so the entries renamed into it are durable; a no-op where directories
    cannot be opened (Windows) or the file system does not sync them."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write_bytes` left in ``directory`` when its process was
    killed mid-write (a checkpoint's can be as large as the model); returns what was removed.

    Call it only while holding the directory's run lock (:mod:`.lock`), so no live writer owns them.
    """
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new temporary file beside ``path`` (``.NAME.RANDOM.jacplug-tmp``), opened for writing."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | _BINARY, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise WriteFailed(path, exc) from None


def _refuse_link(path: str | Path) -> None:
    """Refuse a target that is a link or another kind of entry than a regular file (a missing one is fine)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise WriteFailed(path, exc) from None
    kind = "a symbolic link" if stat.S_ISLNK(mode) else _kind(mode)
    if kind:
        raise NotAFile(path, kind)


def _kind(mode: int) -> str | None:
    """What an entry is when it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    return "a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only directory: nothing was created in it either
