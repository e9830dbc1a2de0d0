"""One run per run directory: an exclusive ``flock`` on ``RUN/.jacplug.lock`` held for the run's life.

Why ``flock``: the kernel drops the lock when the holding process ends, however it ends (an
exception, Ctrl-C, SIGTERM, even SIGKILL or a power cut on a local disk), so a lock left behind by a
killed run is never "stale" in a way anyone must detect or clean: the file may remain, but the next
run takes it over at once. The file holds the holder's pid, host and start time, only so that a
second run can say who holds the directory.

The lock is taken without waiting: a second ``jacplug train --out DIR`` (or ``--resume``) while the
first still runs is refused with one line naming the holder. A run that created the directory and
ends before writing anything into it (say, an unknown model name) removes the directory again.

Not the ``filelock`` package: it locks, but does not name the holder in the refusal, nor remove a
directory the run created and never used, which are the two things users see here.

Limits: ``flock`` needs a POSIX system; on network file systems it is only as good as the server's
lock support (NFSv4 on Linux honours it across clients).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

LOCK_FILE = ".jacplug.lock"
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
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirBusy(
                    f"run directory {str(self.directory)!r} is in use by {self._holder()}; wait for that run "
                    "to finish (or stop it), or choose another --out"
                ) from None
            if self._same_file(fd):
                break
            os.close(fd)  # a finishing holder removed the file between our open and flock: take the new one
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        return self

    def _open(self) -> int:
        if not self.directory.exists():
            self._created = True
            self.directory.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)

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
