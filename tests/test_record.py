"""Record framing: pure functions, so tested exhaustively and by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txjournal import record as rec

SALT = (0x1122334455667788).to_bytes(8, "little")


def frame(seq: int, fields: bytes = b"\x80", name: bytes = b"deposit", user: bytes = b"") -> bytes:
    return rec.encode_record(SALT, seq, 123_000_000_000 + seq, name, 2, fields, user)


def test_round_trip() -> None:
    data = frame(7, b"\x81\xa1a\x01", user="zoë".encode())
    record, end = rec.decode_at(data, 0, SALT)
    assert end == len(data)
    assert record == rec.Record(7, 123_000_000_007, "deposit", 2, rec.KIND_COMMAND, "zoë", b"\x81\xa1a\x01")


@given(
    seq=st.integers(1, 2**63),
    time_ns=st.integers(-(2**63), 2**63 - 1),
    version=st.integers(1, 0xFFFF),
    name=st.text(min_size=1, max_size=60),
    user=st.text(max_size=60),
    fields=st.binary(max_size=300),
)
def test_round_trip_property(seq: int, time_ns: int, version: int, name: str, user: str, fields: bytes) -> None:
    data = rec.encode_record(SALT, seq, time_ns, name.encode(), version, fields, user.encode())
    record, end = rec.decode_at(data, 0, SALT)
    assert end == len(data)
    assert (record.seq, record.time_ns, record.version, record.name, record.fields) == (
        seq, time_ns, version, name, fields,
    )
    assert record.user == (user or None)


def test_every_truncation_is_incomplete() -> None:
    data = frame(1)
    for cut in range(len(data)):
        with pytest.raises(rec.Incomplete):
            rec.decode_at(data[:cut], 0, SALT)


def test_every_single_bit_flip_is_detected() -> None:
    data = frame(3, b"\x82\xa1a\x01\xa1b\x02")
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            with pytest.raises(rec.RecordError):
                rec.decode_at(bytes(damaged), 0, SALT)


def test_other_salt_never_verifies() -> None:
    with pytest.raises(rec.RecordError, match="checksum"):
        rec.decode_at(frame(1), 0, b"\x00" * 8)


def test_find_valid_record_skips_damage_and_old_seqs() -> None:
    good = frame(5) + frame(6)
    garbage = b"\xff" * 13
    buf = frame(4) + garbage + good
    start = len(frame(4))
    assert rec.find_valid_record(buf, start, SALT, 4) == start + len(garbage)
    assert rec.find_valid_record(buf, start, SALT, 6) is None
    assert rec.find_valid_record(b"\x00" * 4096, 0, SALT, 0) is None


def test_segment_header() -> None:
    head = rec.encode_segment_header(0xDEADBEEF, 42)
    assert len(head) == rec.SEGMENT_HEADER_SIZE == 32
    parsed = rec.decode_segment_header(head)
    assert (parsed.salt, parsed.first_seq, parsed.version) == (0xDEADBEEF, 42, rec.FORMAT_VERSION)
    with pytest.raises(rec.BadSegmentHeader, match="magic"):
        rec.decode_segment_header(b"X" + head[1:])
    with pytest.raises(rec.BadSegmentHeader, match="checksum"):
        rec.decode_segment_header(head[:20] + bytes([head[20] ^ 1]) + head[21:])
    with pytest.raises(rec.BadSegmentHeader, match="bytes long"):
        rec.decode_segment_header(head[:10])


@given(
    seq=st.integers(1, 2**63),
    name=st.text(min_size=1, max_size=30),
    user=st.text(max_size=30),
    fields=st.binary(max_size=200),
    flip=st.integers(0, 10_000),
    cut=st.integers(0, 10_000),
)
def test_fast_decoder_agrees_with_the_careful_one(
    seq: int, name: str, user: str, fields: bytes, flip: int, cut: int
) -> None:
    data = bytearray(rec.encode_record(SALT, seq, 5, name.encode(), 1, fields, user.encode()))
    variants = [bytes(data), bytes(data[: cut % (len(data) + 1)])]
    damaged = bytearray(data)
    damaged[flip % len(data)] ^= 0x10
    variants.append(bytes(damaged))
    for buf in variants:
        fast = rec.decode_fast(buf, 0, rec.salt_crc(SALT))
        try:
            careful = rec.decode_at(buf, 0, SALT)
        except rec.RecordError:
            assert fast is None
        else:
            assert fast == careful
