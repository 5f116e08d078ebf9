"""
One owner per data directory, enforced with ``flock`` on ``DATADIR/LOCK``.

``flock`` locks belong to an open file description, so a second service in
the same process is refused just like a second process, and the kernel drops
the lock when its owner dies, even by SIGKILL: no stale lock files.
"""

from __future__ import annotations

import fcntl
import os
import socket

from txjournal.errors import DataDirLocked, UnsafeDataDir
from txjournal.fs import FILE_MODE


class DataDirLock:
    def __init__(self, datadir: str) -> None:
        self.path = os.path.join(os.path.abspath(datadir), "LOCK")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            raise UnsafeDataDir(
                f"lock file {self.path} cannot be opened for writing: {e.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            finally:
                os.close(fd)
            raise DataDirLocked(self.path, holder or "holder unknown") from None
        except BaseException:
            os.close(fd)
            raise
        info = f"pid {os.getpid()} on {socket.gethostname()}".encode()
        try:
            # Only a hint for DataDirLocked messages: a full disk must not stop
            # the restart that recovers the journal.
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
