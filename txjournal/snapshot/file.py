"""
Snapshots as files in ``DATADIR/snapshots``, one per covered sequence number.

A snapshot file is a 64-byte header and the serialized model::

    magic "TXSNAP\\r\\n" | u16 version | u16 flags | u32 reserved | u64 seq
    | u64 payload length | 32-byte SHA-256 of the payload | u32 header crc
    | u32 reserved

It is written to a temp file, fsynced, renamed into place and the directory
fsynced, so a crash leaves either the old set of snapshots or the new one.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import struct

from crc32c import crc32c
from zope.interface import implementer

from txjournal.errors import SnapshotError
from txjournal.fs import OSFileSystem, write_all
from txjournal.interfaces import IFileSystem, ISnapshotStore
from txjournal.record import mask

MAGIC = b"TXSNAP\r\n"
VERSION = 1
_HEAD = struct.Struct("<8sHHIQQ32s")
_CRC = struct.Struct("<II")
HEADER_SIZE = _HEAD.size + _CRC.size  # 72

_NAME_RE = re.compile(r"^(\d{20})\.snapshot$")
_TEMP_PREFIX = ".tmp-"


def snapshot_name(seq: int) -> str:
    return f"{seq:020d}.snapshot"


def encode_header(seq: int, payload: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, 0, 0, seq, len(payload), hashlib.sha256(payload).digest())
    return head + _CRC.pack(mask(crc32c(head)), 0)


def decode(path: str, data: bytes, seq: int) -> bytes:
    """Check a snapshot file's bytes and return its payload."""
    if len(data) < HEADER_SIZE:
        raise SnapshotError(f"snapshot {path} is truncated ({len(data)} bytes, header needs {HEADER_SIZE})")
    head = data[: _HEAD.size]
    magic, version, _flags, _r, stored_seq, length, digest = _HEAD.unpack(head)
    if magic != MAGIC:
        raise SnapshotError(f"snapshot {path} has bad magic {magic!r}")
    (crc, _r2) = _CRC.unpack_from(data, _HEAD.size)
    if crc != mask(crc32c(head)):
        raise SnapshotError(f"snapshot {path} has a bad header checksum")
    if version != VERSION:
        raise SnapshotError(f"snapshot {path} has unsupported version {version}")
    if stored_seq != seq:
        raise SnapshotError(f"snapshot {path} says it covers {stored_seq}, its name says {seq}")
    payload = data[HEADER_SIZE:]
    if len(payload) != length:
        raise SnapshotError(
            f"snapshot {path} is truncated: payload is {len(payload)} bytes, header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"snapshot {path} fails its SHA-256 digest check")
    return payload


@implementer(ISnapshotStore)
class FileSnapshotStore:
    def __init__(self, directory: str, fs: IFileSystem | None = None, readonly: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self.location = self.directory
        self.readonly = readonly
        self._fs: IFileSystem = fs if fs is not None else OSFileSystem()
        if not readonly:
            self._fs.makedirs(self.directory)
            for name in self._names():
                if name.startswith(_TEMP_PREFIX):
                    # An interrupted write: never renamed, never counted.
                    self._fs.unlink(os.path.join(self.directory, name))

    def _names(self) -> list[str]:
        try:
            return self._fs.listdir(self.directory)
        except FileNotFoundError:
            return []

    def path(self, seq: int) -> str:
        return os.path.join(self.directory, snapshot_name(seq))

    def list(self) -> builtins.list[int]:
        seqs = [int(m.group(1)) for m in map(_NAME_RE.match, self._names()) if m]
        return sorted(seqs, reverse=True)

    def load(self, seq: int) -> bytes:
        path = self.path(seq)
        try:
            data = self._fs.read(path)
        except OSError as e:
            raise SnapshotError(f"snapshot {path} cannot be read: {e}") from None
        return decode(path, data, seq)

    def save(self, seq: int, payload: bytes) -> str:
        fs = self._fs
        final = self.path(seq)
        temp = os.path.join(self.directory, _TEMP_PREFIX + snapshot_name(seq))
        try:
            fs.unlink(temp)
        except FileNotFoundError:
            pass
        fd = fs.create_exclusive(temp)
        try:
            try:
                write_all(fs, fd, encode_header(seq, payload))
                write_all(fs, fd, payload)
                fs.fsync(fd)
            finally:
                fs.close(fd)
            fs.rename(temp, final)
        except BaseException:
            # Never leave a half-written snapshot behind, even under a
            # name that start-up ignores: it would only fill the disk.
            try:
                fs.unlink(temp)
            except OSError:
                pass
            raise
        fs.fsync_dir(self.directory)
        return final

    def prune(self, keep: int) -> builtins.list[int]:
        if keep < 1:
            raise ValueError("keep at least one snapshot")
        removed = self.list()[keep:]
        for seq in removed:
            self._fs.unlink(self.path(seq))
        if removed:
            self._fs.fsync_dir(self.directory)
        return removed
