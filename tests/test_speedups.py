"""
The C extension ``txjournal._speedups`` against its pure-Python reference in
``txjournal.record``: the same records, offsets and exceptions for every
input, valid or damaged, plain or odd; CRC-32C as the crc32c package
computes it, on both the hardware and the table-driven path; and no leaked
references. The extension is imported unconditionally, so a broken build
fails here rather than leaving replay on the slow path unnoticed.
"""

from __future__ import annotations

import os
import random
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from txjournal import _speedups
from txjournal import record as rec

SALT = (0x0123_4567_89AB_CDEF).to_bytes(8, "little")
U64 = 2**64 - 1
REST = struct.Struct("<HBBB")  # version, kind, name_len, user_len

NAMES = [b"deposit", b"withdraw", "n\u00e9w".encode(), b"", b"x" * 255, b"\xff\xfe", b"dep"]
USERS = [b"", b"", b"alice", "\u00fc".encode(), b"u" * 255, b"\xc3"]


def outcome(func: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """What a call gives: its result, or its exception's type and message."""
    try:
        return "result", func(*args, **kwargs)
    except Exception as e:
        return "raised", (type(e), str(e))


@contextmanager
def known_names(mapping: dict[bytes, Any]) -> Iterator[None]:
    """
    Make ``record._names`` hold exactly ``mapping`` for the block: both
    implementations read it (the C one through the module attribute).
    """
    saved = dict(rec._names)
    rec._names.clear()
    rec._names.update(mapping)
    try:
        yield
    finally:
        rec._names.clear()
        rec._names.update(saved)


def both_decode(*args: Any, **kwargs: Any) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """decode_run in C and in Python, each with its own length_states."""
    c_args = list(args)
    py_args = list(args)
    if len(args) > 4 and isinstance(args[4], dict):
        c_args[4] = dict(args[4])
        py_args[4] = dict(args[4])
    c = outcome(_speedups.decode_run, *c_args, **kwargs)
    py = outcome(rec._py_decode_run, *py_args, **kwargs)
    return c, py


def assert_same_decode(*args: Any, **kwargs: Any) -> tuple[str, Any]:
    c, py = both_decode(*args, **kwargs)
    assert c == py
    if c[0] == "result":
        records, offset = c[1]
        assert type(offset) is type(py[1][1])
        for record in records:
            assert type(record) is tuple and len(record) == 7
            assert type(record[6]) is bytes
    return c


# -- which implementation is in use -----------------------------------------------------------


def test_the_extension_is_in_use_unless_pure_python_is_asked_for() -> None:
    if os.environ.get("TXJOURNAL_PURE_PYTHON"):
        assert rec.SPEEDUPS is False
        assert rec.decode_run is rec._py_decode_run
        assert rec.frame_record is rec._py_frame_record
    else:
        assert rec.SPEEDUPS is True
        assert rec.decode_run is _speedups.decode_run
        assert rec.frame_record is _speedups.frame_record


def test_the_c_docstring_keeps_the_reference_one() -> None:
    """The public ``decode_run`` says what the Python one says, whichever it is."""

    def words(text: str | None) -> str:
        return " ".join((text or "").split())

    assert words(rec._py_decode_run.__doc__) in words(_speedups.decode_run.__doc__)
    assert rec.decode_run.__doc__


# -- CRC-32C ----------------------------------------------------------------------------------

CRCS = [_speedups.crc32c, _speedups._crc32c_portable]


@pytest.mark.parametrize("crc", CRCS, ids=["dispatched", "portable"])
def test_crc32c_matches_the_package_at_every_length(crc: Callable[..., int]) -> None:
    rng = random.Random(32)
    for length in range(301):
        data = rng.randbytes(length)
        for value in (0, 0xFFFFFFFF, rng.getrandbits(32), rng.getrandbits(32)):
            assert crc(data, value) == crc32c(data, value), (length, value)
        assert crc(data) == crc32c(data)


@pytest.mark.parametrize("crc", CRCS, ids=["dispatched", "portable"])
def test_crc32c_at_every_alignment_and_in_bulk(crc: Callable[..., int]) -> None:
    rng = random.Random(7)
    data = rng.randbytes(100_003)
    view = memoryview(data)
    for start in range(9):
        assert crc(view[start:start + 77]) == crc32c(data[start:start + 77])
    assert crc(data, 12345) == crc32c(data, 12345)
    assert crc(bytearray(data[:999])) == crc32c(data[:999])


@pytest.mark.parametrize("crc", CRCS, ids=["dispatched", "portable"])
def test_crc32c_chains_and_takes_the_value_modulo_2_32(crc: Callable[..., int]) -> None:
    a, b = b"salt and length", b"the body of a record"
    assert crc(b, crc(a)) == crc(a + b) == crc32c(a + b)
    for value in (2**32, 2**32 + 5, -1, -(2**40) + 3, 2**100 + 7, True):
        assert crc(b"abc", value) == crc32c(b"abc", value) == crc(b"abc", value % 2**32)


@given(data=st.binary(max_size=600), value=st.integers(0, 2**32 - 1))
def test_crc32c_property(data: bytes, value: int) -> None:
    expected = crc32c(data, value)
    assert _speedups.crc32c(data, value) == expected
    assert _speedups._crc32c_portable(data, value) == expected


def test_the_hardware_path_is_taken_where_the_cpu_has_it() -> None:
    assert isinstance(_speedups.HARDWARE_CRC32C, bool)
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        with open("/proc/cpuinfo") as f:
            has_sse42 = " sse4_2" in f.read()
        assert _speedups.HARDWARE_CRC32C is has_sse42


# -- frame_record -----------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    seq=st.integers(0, U64),
    time_ns=st.integers(-(2**63), 2**63 - 1),
    rest=st.binary(max_size=300),
    payload=st.binary(max_size=2000),
    salt_state=st.integers(0, 2**32 - 1) | st.integers(-(2**70), 2**70),
)
def test_frame_record_agrees_with_the_reference(
    seq: int, time_ns: int, rest: bytes, payload: bytes, salt_state: int
) -> None:
    framed = _speedups.frame_record(seq, time_ns, rest, payload, salt_state)
    assert type(framed) is bytes
    assert framed == rec._py_frame_record(seq, time_ns, rest, payload, salt_state)


@settings(max_examples=300)
@given(
    salt=st.binary(min_size=8, max_size=8),
    seq=st.integers(0, U64),
    time_ns=st.integers(-(2**63), 2**63 - 1),
    name=st.sampled_from(NAMES) | st.binary(max_size=255),
    user=st.sampled_from(USERS) | st.binary(max_size=255),
    version=st.integers(0, 0xFFFF),
    kind=st.integers(0, 255),
    payload=st.binary(max_size=2000),
)
def test_frame_record_is_encode_record(
    salt: bytes, seq: int, time_ns: int, name: bytes, user: bytes, version: int, kind: int,
    payload: bytes,
) -> None:
    rest = REST.pack(version, kind, len(name), len(user)) + name + user
    expected = rec.encode_record(salt, seq, time_ns, name, version, payload, user, kind)
    for frame in (_speedups.frame_record, rec._py_frame_record):
        assert frame(seq, time_ns, rest, payload, rec.salt_crc(salt)) == expected


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((-1, 0, b"", b"", 0), {}),
        ((2**64, 0, b"", b"", 0), {}),
        ((0, 2**63, b"", b"", 0), {}),
        ((0, -(2**63) - 1, b"", b"", 0), {}),
        ((1.0, 0, b"", b"", 0), {}),
        ((1, 0, "text", b"", 0), {}),
        ((1, 0, b"", None, 0), {}),
        ((1, 0, b"", b"", 1.5), {}),
        ((True, False, b"r", b"p", 0), {}),  # bools: not exact ints, to the reference
        ((1, 2, bytearray(b"rest"), memoryview(b"payload"), 7), {}),
        ((1, 2, b"rest", b"payload"), {}),
        ((1, 2, b"rest", b"payload", 7, 8), {}),
        ((1, 2, b"rest"), {"payload": b"p", "salt_state": 7}),
        ((), {"seq": 1, "time_ns": 2, "rest": b"r", "payload": b"p", "salt_state": 7}),
        ((1, 2, b"rest", b"payload", 7), {"seq": 1}),
        ((1, 2, b"rest", b"payload"), {"nonsense": 7}),
    ],
)
def test_frame_record_odd_calls_agree(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    c = outcome(_speedups.frame_record, *args, **kwargs)
    assert c == outcome(rec._py_frame_record, *args, **kwargs)


def test_frame_record_range_errors_are_structs() -> None:
    with pytest.raises(struct.error):
        _speedups.frame_record(-1, 0, b"", b"", 0)
    with pytest.raises(struct.error):
        _speedups.frame_record(0, 2**63, b"", b"", 0)


# -- decode_run: generated journals -----------------------------------------------------------


def resign(buf: bytearray, at: int, salt: bytes) -> None:
    """Give the record at ``at`` the right checksum for its (maybe damaged) length."""
    if at + rec.PREFIX_SIZE > len(buf):
        return
    (length,) = struct.unpack_from("<I", buf, at)
    body = bytes(buf[at + rec.PREFIX_SIZE : at + rec.PREFIX_SIZE + length])
    struct.pack_into("<I", buf, at + 4, rec.checksum(salt, length, body))


def mostly(
    plain: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], percent: int = 70
) -> st.SearchStrategy[Any]:
    """``plain`` ``percent`` times in a hundred, else ``odd``: most runs must decode something."""
    return st.integers(0, 99).flatmap(lambda k: plain if k < percent else odd)


@st.composite
def journals(draw: st.DrawFn) -> tuple[bytes, bytes, list[int], list[int]]:
    """A run of records, perhaps damaged: (salt, data, record offsets, their seqs)."""
    salt = draw(st.binary(min_size=8, max_size=8))
    first = draw(st.sampled_from([0, 1, 1000, 2**63, U64 - 2, U64]) | st.integers(0, U64))
    count = draw(mostly(st.integers(1, 8), st.just(0), 95))
    rng = random.Random(draw(st.integers(0, 2**32)))
    parts: list[bytes] = []
    seqs: list[int] = []
    seq = first
    for _ in range(count):
        gap = draw(st.sampled_from([0] * 8 + [1, -1, 5]))
        seq = (seq + gap) % 2**64
        size = draw(st.sampled_from([0, 1, 60, 2000]) | st.integers(0, 2000))
        parts.append(rec.encode_record(
            salt, seq, draw(st.integers(-(2**63), 2**63 - 1)), draw(st.sampled_from(NAMES)),
            draw(st.integers(0, 0xFFFF)), rng.randbytes(size), draw(st.sampled_from(USERS)),
            draw(st.integers(0, 255)),
        ))
        seqs.append(seq)
        seq = (seq + 1) % 2**64
    offsets = []
    at = 0
    for part in parts:
        offsets.append(at)
        at += len(part)
    buf = bytearray(b"".join(parts))

    for _ in range(draw(mostly(st.just(0), st.integers(1, 3)))):
        if not buf:
            break
        what = draw(st.sampled_from(["flip", "length", "name_len", "user_len", "seq"]))
        if what == "flip":
            buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
            continue
        at = draw(st.sampled_from(offsets))
        if at + rec.PREFIX_SIZE + rec.BODY_HEAD_SIZE > len(buf):
            continue
        if what == "length":
            (length,) = struct.unpack_from("<I", buf, at)
            new = draw(st.sampled_from([
                0, 1, 20, 21, 22, length - 1, length + 1, length + 100,
                rec.MAX_RECORD_SIZE, rec.MAX_RECORD_SIZE + 1, 2**31, 2**32 - 1,
            ]) | st.integers(0, 2**32 - 1))
            struct.pack_into("<I", buf, at, new % 2**32)
        elif what == "name_len":
            buf[at + 27] = draw(st.integers(0, 255))
        elif what == "user_len":
            buf[at + 28] = draw(st.integers(0, 255))
        else:
            struct.pack_into("<Q", buf, at + 8, draw(st.integers(0, U64)))
        if draw(st.booleans()):
            resign(buf, at, salt)  # so the checks after the checksum are reached

    cut = draw(mostly(st.none(), st.integers(0, len(buf))))
    data = bytes(buf if cut is None else buf[:cut])
    return salt, data, offsets, seqs


@st.composite
def name_tables(draw: st.DrawFn) -> dict[bytes, Any]:
    """Which names and users ``_names`` knows (mostly all, else some or none), and as what."""
    every = sorted(set(NAMES + USERS))
    known = draw(mostly(st.just(every), st.lists(st.sampled_from(every), unique=True)))
    table: dict[bytes, Any] = {}
    for raw in known:
        table[raw] = draw(mostly(
            st.just(raw.decode("utf-8", "replace")), st.sampled_from(["", None, "other"])
        ))
    return table


big = st.sampled_from([2**63, 2**64, 2**70, -(2**63) - 1, -(2**70)])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    journal=journals(),
    names=name_tables(),
    start=st.data(),
)
def test_decode_run_agrees_with_the_reference(
    journal: tuple[bytes, bytes, list[int], list[int]],
    names: dict[bytes, Any],
    start: st.DataObject,
) -> None:
    salt, data, offsets, seqs = journal
    n = len(data)
    i = start.draw(
        mostly(st.integers(0, max(len(offsets) - 1, 0)), st.just(len(offsets)), 90), label="record"
    )
    # Mostly a plain call, as FileJournal makes; else any argument may be odd.
    odd = start.draw(st.integers(0, 9), label="odd") >= 7

    def arg(plain: st.SearchStrategy[Any], oddly: st.SearchStrategy[Any], label: str) -> Any:
        return start.draw(mostly(plain, oddly) if odd else plain, label=label)

    offset = arg(
        st.just(offsets[i] if i < len(offsets) else n), st.integers(-n - 40, n + 40) | big, "offset"
    )
    end = arg(st.just(n) | st.integers(max(n - 30, 0), n), st.integers(-40, n + 40) | big, "end")
    expected = arg(
        st.just(seqs[i] if i < len(seqs) else 0),
        st.sampled_from([-1, 0, U64, 2**64]) | st.integers(0, U64),
        "expected",
    )
    limit = arg(st.integers(1, len(offsets) + 2), st.integers(-2, 0) | big, "limit")
    salt_state = rec.salt_crc(salt) + arg(
        st.just(0), st.sampled_from([2**32, -(2**32), 1]), "salt_state offset"
    )
    with known_names(names):
        assert_same_decode(data, offset, end, salt_state, {}, expected, limit)


@settings(max_examples=300, deadline=None)
@given(journal=journals(), limit=st.integers(1, 10))
def test_decode_run_reads_whole_valid_journals(
    journal: tuple[bytes, bytes, list[int], list[int]], limit: int
) -> None:
    """With every name known, replaying in batches as FileJournal does."""
    salt, data, offsets, seqs = journal
    assume(offsets)
    table = {raw: raw.decode("utf-8", "replace") for raw in NAMES + USERS}
    offset, expected = 0, seqs[0]
    state = rec.salt_crc(salt)
    with known_names(table):
        while True:
            _, (records, nxt) = assert_same_decode(data, offset, len(data), state, {}, expected, limit)
            if not records:
                break
            assert nxt > offset
            offset, expected = nxt, expected + len(records)


def run(count: int, first: int = 1, name: bytes = b"deposit", user: bytes = b"") -> bytes:
    return b"".join(
        rec.encode_record(SALT, (first + k) % 2**64, k, name, 1, b"\x81\xa1a" + bytes([k % 128]), user)
        for k in range(count)
    )


STATE = rec.salt_crc(SALT)
KNOWN = {b"deposit": "deposit", b"alice": "alice"}


def test_decode_run_decodes_what_encode_record_wrote() -> None:
    data = run(3, user=b"alice")
    with known_names(KNOWN):
        records, offset = _speedups.decode_run(data, 0, len(data), STATE, {}, 1, 10)
    assert offset == len(data)
    assert records == [(1 + k, k, "deposit", 1, rec.KIND_COMMAND, "alice", b"\x81\xa1a" + bytes([k]))
                       for k in range(3)]


def test_decode_run_stops_after_the_largest_sequence_number() -> None:
    """The record after seq 2**64 - 1 wraps to 0 in 64 bits: not the next one."""
    data = run(4, first=U64 - 1)  # seqs 2**64 - 2, 2**64 - 1, 0, 1
    with known_names(KNOWN):
        records, offset = assert_same_decode(data, 0, len(data), STATE, {}, U64 - 1, 10)[1]
    assert [r[0] for r in records] == [U64 - 1, U64]
    assert offset == len(run(2, first=U64 - 1))


def test_decode_run_stops_at_end_not_at_the_end_of_the_buffer() -> None:
    data = run(3)
    with known_names(KNOWN):
        for end in range(len(data) + 1):
            records, offset = assert_same_decode(data, 0, end, STATE, {}, 1, 10)[1]
            assert offset <= end


def test_decode_run_reads_the_smallest_record_at_the_very_end() -> None:
    """29 bytes, no name, user or fields: the loop must still take it."""
    data = run(2) + rec.encode_record(SALT, 3, 3, b"", 1, b"")
    with known_names({**KNOWN, b"": ""}):
        for end in (len(data) - 1, len(data)):
            records, offset = assert_same_decode(data, 0, end, STATE, {}, 1, 10)[1]
            assert len(records) == 2 + (end == len(data))
    assert records[-1] == (3, 3, "", 1, rec.KIND_COMMAND, None, b"")


@pytest.mark.parametrize("user", [b"", b"u"])
def test_decode_run_stops_where_name_or_user_overrun_into_known_bytes(user: bytes) -> None:
    """
    A record with a valid checksum whose name or user would run on into the
    next record (or past the end of the data), where the bytes happen to be
    a known name: the bounds check, not the names table, must stop it.
    """
    following = rec.encode_record(SALT, 2, 6, b"deposit", 1, b"\x80")
    for name_len, user_len in [(3, len(user)), (7, len(user)), (3, 2 + len(user)), (255, 255)]:
        if not user and user_len:
            continue
        body = rec._BODY_HEAD.pack(1, 5, 1, rec.KIND_COMMAND, name_len, user_len) + b"dep" + user
        framed = rec._PREFIX.pack(len(body), rec.checksum(SALT, len(body), body)) + body
        for data in (framed + following, framed):
            tail = data[rec.PREFIX_SIZE + rec.BODY_HEAD_SIZE:]
            table = {tail[:name_len]: "overrun", tail[name_len:name_len + user_len]: "overrun",
                     b"dep": "dep", user: "u"}
            with known_names(table):
                result = assert_same_decode(data, 0, len(data), STATE, {}, 1, 10)
            assert result == ("result", ([], 0)) or name_len + user_len <= 3 + len(user)


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_decode_run_at_the_largest_record(extra: int) -> None:
    """A body of exactly MAX_RECORD_SIZE bytes is a record; one byte more is not."""
    head = rec.BODY_HEAD_SIZE + len(b"deposit")
    data = rec.encode_record(SALT, 1, 1, b"deposit", 1, bytes(rec.MAX_RECORD_SIZE - head + extra))
    with known_names(KNOWN):
        records, offset = assert_same_decode(data, 0, len(data), STATE, {}, 1, 10)[1]
    assert len(records) == (extra <= 0)


def test_decode_run_sees_a_rebound_names_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like the Python code, the C code reads ``record._names`` on every call."""
    data = run(2)
    monkeypatch.setattr(rec, "_names", {b"deposit": "renamed"})
    for decode in (_speedups.decode_run, rec._py_decode_run):
        records, _ = decode(data, 0, len(data), STATE, {}, 1, 10)
        assert [r[2] for r in records] == ["renamed", "renamed"]
    monkeypatch.setattr(rec, "_names", {})
    assert _speedups.decode_run(data, 0, len(data), STATE, {}, 1, 10) == ([], 0)


def test_decode_run_with_many_names_and_users() -> None:
    """More distinct names than the C code's per-call cache holds."""
    names = [f"command{k}".encode() for k in range(40)]
    users = [f"user{k}".encode() for k in range(7)] + [b""]
    data = b"".join(
        rec.encode_record(SALT, 1 + k, k, names[k * 7 % 40], 1, b"\x80", users[k % 8])
        for k in range(300)
    )
    table = {raw: raw.decode() for raw in names + users}
    with known_names(table):
        records, offset = assert_same_decode(data, 0, len(data), STATE, {}, 1, 1000)[1]
    assert len(records) == 300 and offset == len(data)
    assert [r[2] for r in records[:3]] == ["command0", "command7", "command14"]
    assert [r[5] for r in records[:3]] == ["user0", "user1", "user2"]
    assert records[7][5] is None


@pytest.mark.parametrize(
    "call",
    [
        lambda d: (bytearray(d), 0, len(d), STATE, {}, 1, 10),
        lambda d: (memoryview(d), 0, len(d), STATE, {}, 1, 10),
        lambda d: (d, True, len(d), STATE, {}, 1, 10),
        lambda d: (d, 0.0, len(d), STATE, {}, 1, 10),
        lambda d: (d, 0, float(len(d)), STATE, {}, 1, 10),
        lambda d: (d, 0, len(d), STATE, None, 1, 10),
        lambda d: (d, 0, len(d), STATE, None, 1, 0),
        lambda d: (d, 0, len(d), float(STATE), {}, 1, 10),
        lambda d: (d, 0, len(d), STATE, {}, 1.0, 10),
        lambda d: (d, 0, len(d), STATE, {}, True, 10),
        lambda d: (d, 0, len(d), STATE, {}, 1, 2.5),
        lambda d: (d, 0, len(d), STATE, {}, 1, None),
        lambda d: (d, 0, len(d), STATE, {}, 1, True),
        lambda d: (None, 0, len(d), STATE, {}, 1, 0),
        lambda d: (None, 0, len(d), STATE, {}, 1, 10),
        lambda d: (d, -len(d), len(d), STATE, {}, 1, 10),
        lambda d: (d, -len(d) - 1, len(d), STATE, {}, 1, 10),
        lambda d: (d, 0, len(d) + 1, STATE, {}, 1, 10),
        lambda d: (d[:-1], 0, len(d), STATE, {}, 1, 10),
        lambda d: (d, 0, len(d), STATE, {}, 1),
        lambda d: (d, 0, len(d), STATE, {}, 1, 10, 11),
    ],
)
def test_decode_run_odd_calls_agree(call: Callable[[bytes], tuple[Any, ...]]) -> None:
    data = run(3)
    with known_names(KNOWN):
        c, py = both_decode(*call(data))
    assert c == py


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 10},
        {"expected": 1, "limit": 2},
        {"buf": None},
        {"nonsense": 1},
    ],
)
def test_decode_run_keyword_calls_agree(kwargs: dict[str, Any]) -> None:
    data = run(3)
    positional = [data, 0, len(data), STATE, {}, 1, 10][: 7 - len(kwargs)]
    if "buf" in kwargs or "nonsense" in kwargs:
        positional = [data, 0, len(data), STATE, {}, 1]
    with known_names(KNOWN):
        c = outcome(_speedups.decode_run, *positional, **kwargs)
        assert c == outcome(rec._py_decode_run, *positional, **kwargs)


class Touchy(bytes):
    """A key that hashes as its bytes do but fails when compared."""

    def __hash__(self) -> int:
        return hash(bytes(self))

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparing")

    __ne__ = __eq__  # type: ignore[assignment]


def test_decode_run_passes_on_errors_from_the_names_table() -> None:
    data = run(2)
    with known_names({Touchy(b"deposit"): "deposit"}):
        c, py = both_decode(data, 0, len(data), STATE, {}, 1, 10)
    assert c == py == ("raised", (RuntimeError, "no comparing"))


# -- references -------------------------------------------------------------------------------


def test_no_references_are_leaked() -> None:
    """Every path, many times over: no object the calls see gains references."""
    pad = 1000
    data = b"\0" * pad + run(20, user=b"alice")
    damaged = data[:-1]
    offset = int(str(pad))  # an int object of its own, not a shared constant
    name, user = "deposit", "alice"
    rest, payload = b"\x01\x00\x01\x07\x00deposit", b"\x80" * 50
    watched: list[Any] = [data, damaged, name, user, rest, payload, offset, STATE]
    with known_names({b"deposit": name, b"alice": user}):
        before = [sys.getrefcount(o) for o in watched]
        for _ in range(2000):
            _speedups.decode_run(data, offset, len(data), STATE, {}, 1, 100)
            _speedups.decode_run(damaged, offset, len(damaged), STATE, {}, 1, 100)
            _speedups.decode_run(data, offset, len(data), STATE, {}, 99, 100)
            _speedups.decode_run(data, offset, len(data), STATE, {}, 1, 0)
            outcome(_speedups.decode_run, bytearray(data), offset, len(data), STATE, {}, 1, 100)
            _speedups.frame_record(1, 2, rest, payload, STATE)
            outcome(_speedups.frame_record, -1, 2, rest, payload, STATE)
        after = [sys.getrefcount(o) for o in watched]
    assert after == before
