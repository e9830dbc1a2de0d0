"""One run per run directory: an exclusive ``flock`` on ``RUN/.jacplug.lock`` held for the run's life.

Why ``flock``: the kernel drops the lock when the holding process ends, however it ends (an
exception, Ctrl-C, SIGTERM, even SIGKILL or a power cut on a local disk), so a lock left behind by a
killed run is never "stale" in a way anyone must detect or clean: the file may remain, but the next
run takes it over at once. The file holds the holder's pid, host and start time, only so that a
second run can say who holds the directory.

The lock is taken without waiting: a second ``jacplug train --out DIR`` (or ``--resume``) while the
first still runs is refused with one line naming the holder. A run that created the directory and
ends before writing anything into it (say, an unknown model name) removes the directory again.

Where ``fcntl`` does not exist (Windows) the same guarantees come from the platform's own primitive,
``msvcrt.locking`` on one byte far past the holder's record (Windows locks are mandatory: a locked record
could not be read by the run that is refused): Windows drops it when its handle closes or its process ends.

The lock file is opened through :func:`jacplug.io.files.open_entry`: never through a symbolic link (a
link planted as ``.jacplug.lock`` would otherwise make the run truncate its target), refused in one line.
Once it holds the lock, a run also refuses a directory with a symbolic link anywhere in it (a linked
``metrics.jsonl``, checkpoint or ``config.json``), before it computes anything: the write path would refuse
each such entry anyway, but only when the run reaches it, and an optional observer's refusal is a warning.

Not the ``filelock`` package: its native locks rest on the same primitives and keep the same guarantees
(recent versions also open the file without following links), but they do not name the holder in a
refusal (only its soft, pid-file fallback records one) and do not remove a directory the run created and
never used, which are what users see here; the primitive itself is :func:`_try_lock`'s few lines.

Limits: on network file systems a lock is only as good as the server's lock support (NFSv4 on Linux
honours ``flock`` across clients).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError
from . import files

try:
    import fcntl
except ImportError:  # Windows: msvcrt.locking instead
    fcntl = None

LOCK_FILE = ".jacplug.lock"
#: where ``msvcrt.locking`` locks its byte: past any holder's record, which stays readable
MSVCRT_LOCK_OFFSET = 1 << 20
#: attempts when the directory vanishes between its creation and the lock file's: a race with a finishing
#: holder is lost a few times at most
VANISHED_RETRIES = 20


class RunDirBusy(UserError):
    """Another live process holds the run directory's lock."""


class RunDirLock:
    """Context manager: holds ``DIR/.jacplug.lock`` exclusively from ``__enter__`` to ``__exit__``.

    ``__enter__`` creates ``DIR`` when needed and raises :class:`RunDirBusy` (one line naming the
    holder's pid and host) when another process holds the lock.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunDirLock":
        vanished = 0
        while True:
            try:
                fd = self._open()
            except FileNotFoundError as exc:
                # a finishing holder removed the directory between our mkdir and open: try again, but a
                # directory that cannot be made at all (under /proc, say) would make this loop forever
                vanished += 1
                if vanished < VANISHED_RETRIES:
                    continue
                raise UserError(f"cannot use {str(self.directory)!r} as the run directory ({exc.strerror}: "
                                "it cannot be created there); choose another --out") from None
            except OSError as exc:
                raise UserError(f"cannot use {str(self.directory)!r} as the run directory ({exc.strerror})") from None
            try:
                taken = _try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not taken:
                os.close(fd)
                raise RunDirBusy(
                    f"run directory {str(self.directory)!r} is in use by {self._holder()}; wait for that run "
                    "to finish (or stop it), or choose another --out"
                ) from None
            if self._same_file(fd):
                break
            os.close(fd)  # a finishing holder removed the file between our open and flock: take the new one
        try:
            files.refuse_links_under(self.directory)
        except UserError:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            files.write_all(fd, json.dumps(holder).encode())
        except OSError as exc:
            os.close(fd)
            raise files.WriteFailed(self.path, exc) from None
        self._fd = fd
        return self

    def _open(self) -> int:
        if not self.directory.exists():
            self._created = True
            self.directory.mkdir(parents=True, exist_ok=True)
        return files.open_entry(self.path, os.O_RDWR | os.O_CREAT)

    def __exit__(self, *exc_info: object) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._created and self._only_lock_left():
                self.path.unlink(missing_ok=True)  # still locked: nobody can take the file we remove
                self.directory.rmdir()
            else:
                os.ftruncate(fd, 0)
        except OSError:
            pass  # best effort: an empty directory or an old holder's record is harmless
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _only_lock_left(self) -> bool:
        return [p.name for p in self.directory.iterdir()] == [LOCK_FILE]

    def _holder(self) -> str:
        """``pid N on host H (since T)`` from the lock file, or a generic phrase when it is not written yet."""
        try:
            info = json.loads(self.path.read_text())
            return f"another jacplug run (pid {info['pid']} on host {info['host']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another jacplug run"


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting: True when taken, False when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True
    try:
        import msvcrt
    except ImportError:
        raise UserError("the run directory cannot be locked on this platform (it has neither fcntl nor msvcrt); "
                        "run jacplug on Linux, macOS or Windows") from None
    os.lseek(fd, MSVCRT_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EDEADLOCK):
            return False
        raise
    return True
