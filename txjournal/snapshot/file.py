"""
Snapshots as files in ``DATADIR/snapshots``, one per covered sequence number.

A snapshot file is a 104-byte header and the serialized model::

    magic "TXSNAP\\r\\n" | u16 version (2) | u16 flags | u32 reserved | u64 seq
    | u64 payload length | 32-byte SHA-256 of the payload
    | 32-byte model digest | u32 reserved | u32 header crc

Version 1 files (72-byte header, no model digest) are still read.

It is written to a temp file, fsynced, renamed into place and the directory
fsynced, so a crash leaves either the old set of snapshots or the new one.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import struct
from dataclasses import dataclass

from crc32c import crc32c
from zope.interface import implementer

from txjournal.errors import SnapshotError
from txjournal.fs import OSFileSystem, write_all
from txjournal.interfaces import IFileSystem, ISnapshotStore
from txjournal.record import mask

MAGIC = b"TXSNAP\r\n"
VERSION = 2
_PREFIX = struct.Struct("<8sH")  # magic, version: the same in every version
# Version 1: ... | payload SHA-256 | u32 crc | u32 reserved (not covered).
_HEAD_V1 = struct.Struct("<8sHHIQQ32s")
_CRC_V1 = struct.Struct("<II")
V1_HEADER_SIZE = _HEAD_V1.size + _CRC_V1.size  # 72
# Version 2 adds the model digest, and every header byte is under the crc.
_HEAD = struct.Struct("<8sHHIQQ32s32sI")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size  # 104

#: Bytes of snapshot written between syncs.
SYNC_EVERY = 2 * 1024 * 1024

_NAME_RE = re.compile(r"^(\d{20})\.snapshot$")
_TEMP_PREFIX = ".tmp-"


def snapshot_name(seq: int) -> str:
    return f"{seq:020d}.snapshot"


@dataclass(frozen=True)
class SnapshotHeader:
    version: int
    seq: int
    length: int
    payload_digest: bytes
    #: SHA-256 of the schema's digest of the model (see ``Schema.model_digest``);
    #: for version 1 files, the payload's SHA-256.
    model_digest: bytes
    size: int


def encode_header(seq: int, payload: bytes, model_digest: bytes | None = None) -> bytes:
    payload_digest = hashlib.sha256(payload).digest()
    if model_digest is None:
        model_digest = payload_digest
    if len(model_digest) != 32:
        raise ValueError("a model digest is 32 bytes (a SHA-256)")
    head = _HEAD.pack(MAGIC, VERSION, 0, 0, seq, len(payload), payload_digest, model_digest, 0)
    return head + _CRC.pack(mask(crc32c(head)))


def decode_header(path: str, data: bytes, seq: int) -> SnapshotHeader:
    """Check a snapshot's header (either version) against its file name."""
    if len(data) < _PREFIX.size:
        raise SnapshotError(f"snapshot {path} is truncated ({len(data)} bytes)")
    magic, version = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"snapshot {path} has bad magic {magic!r}")
    if version == 1:
        head_struct, crc_struct, size = _HEAD_V1, _CRC_V1, V1_HEADER_SIZE
    elif version == 2:
        head_struct, crc_struct, size = _HEAD, _CRC, HEADER_SIZE
    else:
        raise SnapshotError(f"snapshot {path} has unsupported version {version}")
    if len(data) < size:
        raise SnapshotError(f"snapshot {path} is truncated ({len(data)} bytes, header needs {size})")
    head = data[: head_struct.size]
    crc = crc_struct.unpack_from(data, head_struct.size)[0]
    if crc != mask(crc32c(head)):
        raise SnapshotError(f"snapshot {path} has a bad header checksum")
    fields = head_struct.unpack(head)
    stored_seq, length, payload_digest = fields[4], fields[5], fields[6]
    model_digest = fields[7] if version == 2 else payload_digest
    if stored_seq != seq:
        raise SnapshotError(f"snapshot {path} says it covers {stored_seq}, its name says {seq}")
    return SnapshotHeader(version, stored_seq, length, payload_digest, model_digest, size)


def decode(path: str, data: bytes, seq: int) -> bytes:
    """Check a snapshot file's bytes and return its payload."""
    header = decode_header(path, data, seq)
    payload = data[header.size :]
    if len(payload) != header.length:
        raise SnapshotError(
            f"snapshot {path} is truncated: payload is {len(payload)} bytes, header says {header.length}"
        )
    if hashlib.sha256(payload).digest() != header.payload_digest:
        raise SnapshotError(f"snapshot {path} fails its SHA-256 digest check")
    return payload


@implementer(ISnapshotStore)
class FileSnapshotStore:
    def __init__(
        self,
        directory: str,
        fs: IFileSystem | None = None,
        readonly: bool = False,
        *,
        clean: bool = True,
    ) -> None:
        """
        :param clean: remove temp files of interrupted writes (the owner of
            the data directory does, at start; a snapshot process working
            for it must not, as the temp file may be someone else's).
        """
        self.directory = os.path.abspath(directory)
        self.location = self.directory
        self.readonly = readonly
        self._fs: IFileSystem = fs if fs is not None else OSFileSystem()
        if not readonly:
            self._fs.makedirs(self.directory)
        if not readonly and clean:
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

    def model_digest(self, seq: int) -> bytes:
        return self.header(seq).model_digest

    def header(self, seq: int) -> SnapshotHeader:
        """A snapshot's checked header, without reading its payload."""
        path = self.path(seq)
        try:
            head = self._fs.read_prefix(path, HEADER_SIZE)
        except OSError as e:
            raise SnapshotError(f"snapshot {path} cannot be read: {e}") from None
        return decode_header(path, head, seq)

    def save(self, seq: int, payload: bytes, model_digest: bytes | None = None) -> str:
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
                write_all(fs, fd, encode_header(seq, payload, model_digest))
                # In slices, each synced: one large burst of dirty pages makes
                # the journal's own fdatasync on the same disk wait behind it
                # (measured: a 155 MiB snapshot written at once held a command for 1.2 s;
                # in 2 MiB slices, 45 ms).
                view = memoryview(payload)
                for start in range(0, len(view), SYNC_EVERY):
                    write_all(fs, fd, view[start : start + SYNC_EVERY])
                    fs.fdatasync(fd)
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

    def discard_temp(self, seq: int) -> None:
        """Remove the temp file of an interrupted :meth:`save` of ``seq``, if any."""
        try:
            self._fs.unlink(os.path.join(self.directory, _TEMP_PREFIX + snapshot_name(seq)))
        except FileNotFoundError:
            pass

    def prune(self, keep: int) -> builtins.list[int]:
        if keep < 1:
            raise ValueError("keep at least one snapshot")
        removed = self.list()[keep:]
        for seq in removed:
            self._fs.unlink(self.path(seq))
        if removed:
            self._fs.fsync_dir(self.directory)
        return removed
