"""
Journal record framing and checksums: pure functions, no I/O.

The format is documented in ``docs/format.rst``; keep the two in step. In
short, a segment is a 32-byte header followed by records::

    segment header  magic "TXJRNL\\r\\n" | u16 version | u16 flags
                    | u64 salt | u64 first_seq | u32 crc      (little-endian)
    record          u32 length | u32 crc | body[length]
    body            u64 seq | i64 time_ns | u16 version | u8 kind
                    | u8 name_len | u8 user_len | name | user | fields

``crc`` is the masked CRC-32C of ``salt | length | body``. Putting the
segment's salt under the checksum means bytes left over from another journal
(a reused or preallocated file) never verify; putting the sequence number
under it means a stale record can never pass for a later one.

:func:`decode_run` and :func:`frame_record`, the per-record hot paths of
replay and of the engine, are the C versions from ``txjournal._speedups``
when that extension imports and ``TXJOURNAL_PURE_PYTHON`` is not set (see
:data:`SPEEDUPS`); ``_py_decode_run`` and ``_py_frame_record`` here are the
pure-Python reference they must agree with, and the fallback.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from crc32c import crc32c

MAGIC = b"TXJRNL\r\n"
FORMAT_VERSION = 1

#: A record's ``kind``: a command that changes the model.
KIND_COMMAND = 1
#: A query audit record: who ran which query with which arguments. Replay
#: skips it; it never changes the model.
KIND_QUERY = 2

_SEGMENT_HEADER = struct.Struct("<8sHHQQ")
_SEGMENT_CRC = struct.Struct("<I")
SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size + _SEGMENT_CRC.size  # 32

_PREFIX = struct.Struct("<II")  # length, crc
PREFIX_SIZE = _PREFIX.size
_BODY_HEAD = struct.Struct("<QqHBBB")  # seq, time_ns, version, kind, name_len, user_len
BODY_HEAD_SIZE = _BODY_HEAD.size
_LENGTH = struct.Struct("<I")

#: Upper bound on one record's body; anything larger is damage, not data.
MAX_RECORD_SIZE = 64 * 1024 * 1024

MASK_DELTA = 0xA282EAD8
_MASK_DELTA = MASK_DELTA


def mask(crc: int) -> int:
    """
    Mask a CRC as LevelDB does, so that a record holding CRCs of its own
    (an embedded journal, say) does not make the outer checksum weak.
    """
    # (crc * 0x100000001) is crc twice side by side: shifted right by 15, its
    # low 32 bits are crc rotated right by 15 (fewer operations on ints than
    # ``(crc >> 15) | (crc << 17)``, which replay pays per record).
    return (((crc * 0x100000001) >> 15) + _MASK_DELTA) & 0xFFFFFFFF


def checksum(salt: bytes, length: int, body: bytes | memoryview) -> int:
    return mask(crc32c(body, crc32c(salt + _LENGTH.pack(length))))


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    version: int
    flags: int
    salt: int
    first_seq: int

    @property
    def salt_bytes(self) -> bytes:
        return self.salt.to_bytes(8, "little")


def encode_segment_header(salt: int, first_seq: int, flags: int = 0) -> bytes:
    head = _SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, flags, salt, first_seq)
    return head + _SEGMENT_CRC.pack(mask(crc32c(head)))


class BadSegmentHeader(ValueError):
    """The first bytes of a segment are not a valid header."""


def decode_segment_header(data: bytes | memoryview) -> SegmentHeader:
    if len(data) < SEGMENT_HEADER_SIZE:
        raise BadSegmentHeader(
            f"header is {len(data)} bytes long, expected {SEGMENT_HEADER_SIZE}"
        )
    head = bytes(data[: _SEGMENT_HEADER.size])
    magic, version, flags, salt, first_seq = _SEGMENT_HEADER.unpack(head)
    if magic != MAGIC:
        raise BadSegmentHeader(f"bad magic {magic!r}, not a txjournal segment")
    (crc,) = _SEGMENT_CRC.unpack_from(data, _SEGMENT_HEADER.size)
    if crc != mask(crc32c(head)):
        raise BadSegmentHeader("header checksum mismatch")
    if version != FORMAT_VERSION:
        raise BadSegmentHeader(
            f"format version {version} is not supported (this code reads "
            f"version {FORMAT_VERSION})"
        )
    return SegmentHeader(version, flags, salt, first_seq)


class Record(NamedTuple):
    """
    One decoded journal record; ``fields`` is the still-encoded payload.

    A named tuple rather than a frozen dataclass: replay builds one per
    record and a tuple is several times cheaper to construct.
    """

    seq: int
    time_ns: int
    name: str
    version: int
    kind: int
    user: str | None
    fields: bytes


def encode_record(
    salt: bytes,
    seq: int,
    time_ns: int,
    name: bytes,
    version: int,
    fields: bytes,
    user: bytes = b"",
    kind: int = KIND_COMMAND,
) -> bytes:
    """
    Frame one record. ``name`` and ``user`` are UTF-8 bytes of at most 255
    bytes each (the schema checks names when they are registered).
    """
    body = (
        _BODY_HEAD.pack(seq, time_ns, version, kind, len(name), len(user))
        + name
        + user
        + fields
    )
    length = len(body)
    return _PREFIX.pack(length, checksum(salt, length, body)) + body


class RecordError(ValueError):
    """The bytes at an offset are not a valid record."""

    def __init__(self, reason: str, seq: int | None = None) -> None:
        self.reason = reason
        self.seq = seq
        super().__init__(reason)


class Incomplete(RecordError):
    """The data ends inside the record."""


#: Names and users decoded before: replay sees the same few over and over.
_names: dict[bytes, str] = {}


def _text(raw: bytes) -> str:
    try:
        return _names[raw]
    except KeyError:
        text = raw.decode("utf-8")
        if len(_names) < 4096:
            _names[raw] = text
        return text


def decode_at(
    buf: bytes | memoryview, offset: int, salt: bytes
) -> tuple[Record, int]:
    """
    Decode the record at ``offset``; return it and the offset after it.

    Raises :class:`Incomplete` when ``buf`` ends inside the record and
    :class:`RecordError` when the bytes are not a valid record.
    """
    end = len(buf)
    if offset + PREFIX_SIZE > end:
        raise Incomplete(f"{end - offset} bytes left, too few for a record prefix")
    length, crc = _PREFIX.unpack_from(buf, offset)
    if length < BODY_HEAD_SIZE or length > MAX_RECORD_SIZE:
        raise RecordError(f"implausible record length {length}")
    start = offset + PREFIX_SIZE
    stop = start + length
    if stop > end:
        raise Incomplete(f"record of {length} bytes but only {end - start} left")
    body = buf[start:stop]
    if mask(crc32c(body, crc32c(salt + _LENGTH.pack(length)))) != crc:
        seq = _BODY_HEAD.unpack_from(body)[0]
        raise RecordError("checksum mismatch", seq)
    seq, time_ns, version, kind, name_len, user_len = _BODY_HEAD.unpack_from(body)
    p = BODY_HEAD_SIZE + name_len
    q = p + user_len
    if q > length:
        raise RecordError("name and user overrun the record", seq)
    try:
        name = _text(bytes(body[BODY_HEAD_SIZE:p]))
        user = _text(bytes(body[p:q])) if user_len else None
    except UnicodeDecodeError as e:
        raise RecordError(f"undecodable name or user: {e}", seq) from None
    return Record(seq, time_ns, name, version, kind, user, bytes(body[q:])), stop


_HEAD_ALL = struct.Struct("<IIQqHBBB")  # the prefix and the body head in one go
_HEAD_ALL_SIZE = _HEAD_ALL.size


def salt_crc(salt: bytes) -> int:
    """The CRC-32C state after the salt, for :func:`decode_fast`."""
    return crc32c(salt)


def decode_fast(
    buf: bytes, offset: int, salt_state: int
) -> tuple[Record, int] | None:
    """
    :func:`decode_at` for the common case, about twice as fast on ``bytes``:
    the record at ``offset`` and the offset after it, or ``None`` if
    anything is off, in which case the caller asks :func:`decode_at` for
    the exact error. ``salt_state`` comes from :func:`salt_crc`.
    """
    end = len(buf)
    if offset + _HEAD_ALL_SIZE > end:
        return None
    length, crc, seq, time_ns, version, kind, name_len, user_len = _HEAD_ALL.unpack_from(buf, offset)
    start = offset + PREFIX_SIZE
    stop = start + length
    if length < BODY_HEAD_SIZE or length > MAX_RECORD_SIZE or stop > end:
        return None
    body = buf[start:stop]
    c = crc32c(body, crc32c(_LENGTH.pack(length), salt_state))
    if (((c * 0x100000001) >> 15) + _MASK_DELTA) & 0xFFFFFFFF != crc:
        return None
    p = BODY_HEAD_SIZE + name_len
    q = p + user_len
    if q > length:
        return None
    try:
        name = _names.get(body[BODY_HEAD_SIZE:p]) or _text(body[BODY_HEAD_SIZE:p])
        user = (_names.get(body[p:q]) or _text(body[p:q])) if user_len else None
    except UnicodeDecodeError:
        return None
    return Record(seq, time_ns, name, version, kind, user, body[q:]), stop


#: A :class:`Record` as a plain tuple: (seq, time_ns, name, version, kind, user, fields).
RecordTuple = tuple[int, int, str, int, int, "str | None", bytes]


def _py_decode_run(
    buf: bytes,
    offset: int,
    end: int,
    salt_state: int,
    length_states: dict[int, int],
    expected: int,
    limit: int,
) -> tuple[list[RecordTuple], int]:
    """
    Decode consecutive records from ``offset``, the first of which must have
    the sequence number ``expected``, in one tight loop: the bulk form of
    :func:`decode_fast` for replay. Return the records and the offset after
    the last one. The records are plain tuples in the order of
    :class:`Record`'s fields (cheaper to build); ``Record._make`` or
    ``tuple.__new__(Record, t)`` turns one into a :class:`Record`.

    It stops after ``limit`` records, at ``end``, and *before* the first
    record that is not valid or not numbered next (including one that
    :func:`decode_fast` would pass to :func:`decode_at`): the caller decodes
    that one with :func:`decode_at` for the exact error. ``salt_state`` comes
    from :func:`salt_crc`; ``length_states`` caches the checksum state after
    salt and length (one dict per salt, filled here).
    """
    records: list[RecordTuple] = []
    append = records.append
    unpack = _HEAD_ALL.unpack_from
    pack_length = _LENGTH.pack
    names = _names
    last = expected + limit
    limit_offset = end - _HEAD_ALL_SIZE
    head_size = BODY_HEAD_SIZE
    delta = _MASK_DELTA
    max_size = MAX_RECORD_SIZE
    while expected < last and offset <= limit_offset:
        length, crc, seq, time_ns, version, kind, name_len, user_len = unpack(buf, offset)
        start = offset + PREFIX_SIZE
        stop = start + length
        if seq != expected or stop > end or length < head_size or length > max_size:
            break
        state = length_states.get(length)
        if state is None:
            if len(length_states) >= 4096:
                length_states.clear()
            state = length_states[length] = crc32c(pack_length(length), salt_state)
        c = crc32c(buf[start:stop], state)
        if (((c * 0x100000001) >> 15) + delta) & 0xFFFFFFFF != crc:
            break
        start += head_size
        p = start + name_len
        if user_len:
            q = p + user_len
            if q > stop:
                break
            name = names.get(buf[start:p])
            user = names.get(buf[p:q])
            if name is None or user is None:
                break
        elif p > stop:
            break
        else:
            q = p
            name = names.get(buf[start:p])
            if name is None:
                break
            user = None
        append((seq, time_ns, name, version, kind, user, buf[q:stop]))
        expected += 1
        offset = stop
    return records, offset


_SEQ_TIME = struct.Struct("<Qq")  # the start of a record body: seq, time_ns


def _py_frame_record(
    seq: int, time_ns: int, rest: bytes, payload: bytes, salt_state: int
) -> bytes:
    """
    Frame one record whose body is ``seq``, ``time_ns``, then ``rest`` (the
    rest of the body head, name and user) and ``payload``: the engine's hot
    path. The engine keeps ``rest`` per command name, so per command only
    the sequence number, the time and the payload are new. ``salt_state``
    comes from :func:`salt_crc`.

    With ``rest = struct.pack("<HBBB", version, kind, len(name), len(user))
    + name + user`` this is exactly :func:`encode_record`'s output.
    """
    body = _SEQ_TIME.pack(seq, time_ns) + rest + payload
    length = len(body)
    c = crc32c(body, crc32c(_LENGTH.pack(length), salt_state))
    return _PREFIX.pack(length, (((c * 0x100000001) >> 15) + _MASK_DELTA) & 0xFFFFFFFF) + body


def find_valid_record(
    buf: bytes | memoryview, start: int, salt: bytes, after_seq: int
) -> int | None:
    """
    Return the offset of the first valid record at or after ``start`` whose
    sequence number is greater than ``after_seq``, or ``None``.

    This tells a torn tail from corruption: after a checksum mismatch the
    length field cannot be trusted, so "the data ends inside this record"
    proves nothing; only the absence of any valid later record does.
    """
    end = len(buf)
    unpack_prefix = _PREFIX.unpack_from
    unpack_seq = struct.Struct("<Q").unpack_from
    for offset in range(start, end - PREFIX_SIZE - BODY_HEAD_SIZE + 1):
        length, crc = unpack_prefix(buf, offset)
        if length < BODY_HEAD_SIZE or offset + PREFIX_SIZE + length > end:
            continue
        (seq,) = unpack_seq(buf, offset + PREFIX_SIZE)
        if seq <= after_seq:
            continue
        body = buf[offset + PREFIX_SIZE : offset + PREFIX_SIZE + length]
        if checksum(salt, length, body) == crc:
            return offset
    return None


def iter_records(
    buf: bytes | memoryview, offset: int, salt: bytes
) -> Iterator[tuple[int, Record]]:
    """Yield ``(offset, record)`` until the end of ``buf`` or the first error."""
    end = len(buf)
    while offset < end:
        record, nxt = decode_at(buf, offset, salt)
        yield offset, record
        offset = nxt


# -- C speedups --------------------------------------------------------------------------

#: Whether :func:`decode_run` and :func:`frame_record` are the C versions from
#: ``txjournal._speedups``. They are unless the extension cannot be imported
#: (a checkout used without installing it: installing builds it, and fails
#: without a C compiler) or the environment variable ``TXJOURNAL_PURE_PYTHON``
#: asks for the reference code here, which is how the tests run both.
SPEEDUPS = False
decode_run = _py_decode_run
frame_record = _py_frame_record
if not os.environ.get("TXJOURNAL_PURE_PYTHON"):
    try:
        from txjournal import _speedups
    except ImportError:
        pass
    else:
        decode_run = _speedups.decode_run
        frame_record = _speedups.frame_record
        SPEEDUPS = True
