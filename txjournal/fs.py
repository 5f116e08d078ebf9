"""
The one seam through which the file journal and snapshot store touch the disk.

Everything that can fail with EIO or ENOSPC goes through :class:`OSFileSystem`
so that tests can substitute a file system whose ``write`` stops half-way or
whose ``fsync`` fails, and check that txjournal fails stop instead of
papering over it.
"""

from __future__ import annotations

import os
import stat

from zope.interface import implementer

from txjournal.interfaces import IFileSystem

#: Files that hold data are created readable by their owner only.
FILE_MODE = 0o600
DIR_MODE = 0o700


@implementer(IFileSystem)
class OSFileSystem:
    """The real thing: thin wrappers over :mod:`os`."""

    def open_append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def create_exclusive(self, path: str) -> int:
        return os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
        )

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def truncate(self, path: str, length: int) -> None:
        os.truncate(path, length)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_prefix(self, path: str, length: int) -> bytes:
        with open(path, "rb") as f:
            return f.read(length)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)


def write_all(fs: IFileSystem, fd: int, data: bytes | memoryview) -> None:
    """Write every byte, looping over short writes (which are legal)."""
    view = memoryview(data)
    while view:
        n = fs.write(fd, view)
        if n <= 0:
            raise OSError(f"write returned {n}")
        view = view[n:]


def check_private_dir(path: str) -> None:
    """
    Refuse a data directory that other users can write to: they could swap
    the journal under us. Raises :class:`txjournal.errors.UnsafeDataDir`.
    """
    from txjournal.errors import UnsafeDataDir

    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDataDir(f"{path} is not a directory")
    if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP):
        raise UnsafeDataDir(
            f"data directory {path} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run 'chmod 700 {path}'"
        )
