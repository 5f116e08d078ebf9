"""
The fast paths of the command pipeline and of replay give exactly what the
plain paths give: the engine frames records byte for byte as
``record.encode_record`` does, ``Schema.encode_live`` builds what
``Schema.decode`` would, ``record.decode_run`` agrees with ``decode_at``, the
service's replay loop decodes, upgrades, skips and fails as ``decode`` does,
and the writer thread runs calls in order.
"""

from __future__ import annotations

import enum
import math
import os
import platform
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from conftest import sync_runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from examples.bank import Deposit
from txjournal import (
    CommandEncodeError,
    Context,
    InvalidArguments,
    JournalService,
    RecoveryError,
    Schema,
    UnknownCommand,
)
from txjournal import record as rec
from txjournal.journal.memory import MemoryJournal, MemorySnapshotStore
from txjournal.writer import WriterThread


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def make_schema() -> Schema[dict[str, Any]]:
    schema: Schema[dict[str, Any]] = Schema("fast", model=dict)

    @schema.command("put", version=3, upgrade={1: lambda f: {"key": f["k"], "value": f["v"]}})
    @dataclass
    class Put:
        key: Any
        value: Any = None
        tags: list[Any] = field(default_factory=list)

        def execute(self, model: dict[str, Any], ctx: Context) -> Any:
            model[repr(self.key)] = self.value
            return self.value

    @schema.command("checked")
    @dataclass
    class Checked:
        amount: Any

        def __post_init__(self) -> None:
            if self.amount == "type":
                raise TypeError("amount of the wrong type")
            if self.amount == "value":
                raise ValueError("amount out of range")

        def execute(self, model: dict[str, Any], ctx: Context) -> None:
            model["checked"] = self.amount

    @schema.command("weird fields")
    @dataclass
    class Weird:
        __private: int = 0  # stored under its mangled name

        def execute(self, model: dict[str, Any], ctx: Context) -> None:
            pass

    schema.retire("gone")
    return schema


SCHEMA = make_schema()
Put = SCHEMA.commands["put"].cls
Checked = SCHEMA.commands["checked"].cls

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True), st.text(), st.binary(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
    ),
    max_leaves=6,
) | st.sampled_from([Colour.RED, Text("x"), bytearray(b"ab"), -0.0, 2**64, 1.5])


def same(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down (and NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def start(journal: MemoryJournal, schema: Schema[Any] = SCHEMA) -> JournalService[Any]:
    """A started service on ``journal`` whose writes happen at once, on a test clock."""
    svc: JournalService[Any] = JournalService(
        schema, journal=journal, snapshots=MemorySnapshotStore(), reactor=Clock(),
        runner=sync_runner,
    )
    svc.startService()
    return svc


def outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


# -- Schema.encode_live ------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(key=values, value=values)
def test_encode_live_builds_what_decode_builds(key: Any, value: Any) -> None:
    command = Put(key, value)
    try:
        expected_type, expected_payload = SCHEMA.encode(command)
    except CommandEncodeError:
        with pytest.raises(CommandEncodeError):
            SCHEMA.encode_live(command)
        return
    decoded = SCHEMA.decode("put", 3, expected_payload)
    for pack in (None, msgpack.Packer(use_bin_type=True).pack):
        ctype, payload, live = SCHEMA.encode_live(command, pack)
        assert ctype is expected_type and payload == expected_payload
        assert live is not command and type(live) is Put
        assert same(vars(live), vars(decoded))


def test_encode_live_fails_as_encode_and_decode_do() -> None:
    with pytest.raises(UnknownCommand):
        SCHEMA.encode_live(Deposit("a", 1))
    with pytest.raises(CommandEncodeError, match="'put' cannot be journaled"):
        SCHEMA.encode_live(Put("k", {1, 2}))
    with pytest.raises(InvalidArguments, match="'checked' do not fit: amount of the wrong type"):
        SCHEMA.decode("checked", 1, SCHEMA.encode(Checked(1))[1].replace(b"\x01", b"\xa4type"))
    command = Checked(1)
    command.amount = "type"
    with pytest.raises(InvalidArguments, match="'checked' do not fit: amount of the wrong type"):
        SCHEMA.encode_live(command)
    command.amount = "value"
    with pytest.raises(ValueError, match="out of range"):
        SCHEMA.encode_live(command)


def test_fields_getter_handles_any_field_name() -> None:
    weird = SCHEMA.commands["weird fields"]
    command = weird.cls(5)
    assert weird.fields_of(command) == {"_Weird__private": 5}
    _ctype, payload, live = SCHEMA.encode_live(command)
    assert live == SCHEMA.decode("weird fields", 1, payload) == command


# -- the engine's framing ---------------------------------------------------------------


def test_engine_frames_records_as_encode_record_does() -> None:
    journal = MemoryJournal()
    svc = start(journal)
    commands: list[tuple[Any, str | None]] = [
        (Put("a", 1), None), (Put("a", [1, (2, 3)]), "alice"), (Put("é" * 300, b"x" * 70000), None),
        (Checked(1), "bob"), (Put(1, None), "ü" * 100), (Put("a", 1), ""),
    ]
    for command, user in commands:
        outcome(svc.execute(command, user))
    assert not isinstance(outcome(svc.engine.audit(b"query", b"\x80", "carol")), Failure)
    blob = b"".join(journal.data)
    records = [r for _o, r in rec.iter_records(blob, 0, journal.salt)]
    assert len(records) == len(commands) + 1
    expected = []
    for r in records:
        expected.append(rec.encode_record(
            journal.salt, r.seq, r.time_ns, r.name.encode(), r.version, r.fields,
            (r.user or "").encode(), r.kind,
        ))
    assert b"".join(expected) == blob
    assert [r.user for r in records] == [None, "alice", None, "bob", "ü" * 100, None, "carol"]
    assert records[-1].kind == rec.KIND_QUERY
    # Lengths are cached with their checksum state: the same length twice still verifies.
    outcome(svc.execute(Put("a", 2)))
    outcome(svc.execute(Put("a", 3)))
    assert len(list(rec.iter_records(b"".join(journal.data), 0, journal.salt))) == len(records) + 2


def test_oversized_records_are_refused_before_they_are_written() -> None:
    journal = MemoryJournal()
    svc = start(journal)
    big = b"x" * (rec.MAX_RECORD_SIZE - rec.BODY_HEAD_SIZE - len(b"put") - 10)
    for user in (None, "someone with a long name"):
        result = outcome(svc.execute(Put("k", big), user))
        assert isinstance(result, Failure) and result.check(CommandEncodeError)
    assert journal.data == []


def fresh_service(schema: Schema[Any] = SCHEMA) -> tuple[JournalService[Any], MemoryJournal]:
    journal = MemoryJournal()
    return start(journal, schema), journal


def test_a_nan_field_runs_live_as_replay_decodes_it() -> None:
    """
    Containers find an object by identity before equality, and NaN is not
    equal to itself: the live run must not hold the caller's very NaN.
    """
    nan_schema: Schema[dict[str, Any]] = Schema("nan", model=dict)
    marker = float("nan")

    @nan_schema.command("observe")
    @dataclass
    class Observe:
        value: float

        def execute(self, model: dict[str, Any], ctx: Context) -> Any:
            seen = model.setdefault("seen", [marker])
            model["hits"] = model.get("hits", 0) + (self.value in seen)
            return model["hits"]

    svc, journal = fresh_service(nan_schema)
    for _ in range(3):
        outcome(svc.execute(Observe(marker)))
    live = dict(svc.model)
    journal.close()
    again = start(journal, nan_schema)
    assert again.model["hits"] == live["hits"] == 0


def test_a_big_command_does_not_pin_the_packers_buffer() -> None:
    svc, _ = fresh_service()
    engine = svc.engine
    packer = engine._pack
    outcome(svc.execute(Put("small", 1)))
    assert engine._pack is packer  # reused
    outcome(svc.execute(Put("big", b"x" * (2 << 20))))
    assert engine._pack is not packer and engine._pack is not None  # replaced, buffer dropped
    result = outcome(svc.execute(Put("bad", object())))
    assert isinstance(result, Failure) and result.check(CommandEncodeError)
    assert engine._pack is not None


def test_an_empty_user_name_is_no_user_live_as_on_replay() -> None:
    user_schema: Schema[dict[str, Any]] = Schema("users", model=dict)

    @user_schema.command("who")
    @dataclass
    class Who:
        def execute(self, model: dict[str, Any], ctx: Context) -> Any:
            model.setdefault("users", []).append(ctx.user)
            return ctx.user

    svc, journal = fresh_service(user_schema)
    assert outcome(svc.execute(Who(), "")) is None
    journal.close()
    again = start(journal, user_schema)
    assert again.model["users"] == svc.model["users"] == [None]


# -- record.decode_run ----------------------------------------------------------------------

SALT = (0x1234_5678_9ABC_DEF0).to_bytes(8, "little")


def slow_decode(buf: bytes, offset: int, expected: int) -> tuple[list[tuple[Any, ...]], int, str]:
    """The plain loop: decode_at record by record until an error or a gap."""
    out = []
    while offset < len(buf):
        try:
            record, nxt = rec.decode_at(buf, offset, SALT)
        except rec.RecordError as e:
            return out, offset, f"error {type(e).__name__} {e.reason}"
        if record.seq != expected:
            return out, offset, f"gap {record.seq}"
        out.append(tuple(record))
        expected += 1
        offset = nxt
    return out, offset, "end"


def fast_decode(buf: bytes, offset: int, expected: int, limit: int) -> tuple[list[tuple[Any, ...]], int, str]:
    """FileJournal's loop: decode_run, and decode_at for the record it stops at."""
    out: list[tuple[Any, ...]] = []
    states: dict[int, int] = {}
    state = rec.salt_crc(SALT)
    while offset < len(buf):
        records, nxt = rec.decode_run(buf, offset, len(buf), state, states, expected, limit)
        assert len(records) <= limit
        if records:
            out.extend(records)
            expected += len(records)
            offset = nxt
            continue
        try:
            record, nxt = rec.decode_at(buf, offset, SALT)
        except rec.RecordError as e:
            return out, offset, f"error {type(e).__name__} {e.reason}"
        if record.seq != expected:
            return out, offset, f"gap {record.seq}"
        out.append(tuple(record))
        expected += 1
        offset = nxt
    return out, offset, "end"


record_specs = st.lists(
    st.tuples(
        st.sampled_from([b"deposit", b"withdraw", "n\u00e9w".encode(), b"\xff\xfe", b""]),
        st.sampled_from([b"", b"alice", "\u00fc".encode(), b"\xc3"]),
        st.binary(max_size=40),
        st.integers(1, 3),
        st.sampled_from([rec.KIND_COMMAND, rec.KIND_QUERY, 7]),
    ),
    max_size=12,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=record_specs,
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 10_000) | st.none(),
    skip=st.integers(0, 3),
    limit=st.integers(1, 5),
)
def test_decode_run_agrees_with_decode_at(
    specs: list[tuple[bytes, bytes, bytes, int, int]],
    damage: list[tuple[int, int]],
    cut: int | None,
    skip: int,
    limit: int,
) -> None:
    parts = [
        rec.encode_record(SALT, seq, 1000 + seq, name, version, fields, user, kind)
        for seq, (name, user, fields, version, kind) in enumerate(specs, 1)
        if seq != skip
    ]
    buf = bytearray(b"".join(parts))
    for at, byte in damage:
        if buf:
            buf[at % len(buf)] = byte
    data = bytes(buf if cut is None else buf[: cut % (len(buf) + 1)])
    assert fast_decode(data, 0, 1, limit) == slow_decode(data, 0, 1)


def test_decode_run_stops_at_its_limit() -> None:
    data = b"".join(rec.encode_record(SALT, s, s, b"deposit", 1, b"\x80") for s in range(1, 11))
    rec.decode_at(data, 0, SALT)  # the name is known from now on
    records, offset = rec.decode_run(data, 0, len(data), rec.salt_crc(SALT), {}, 1, 4)
    assert [r[0] for r in records] == [1, 2, 3, 4]
    records, _end = rec.decode_run(data, offset, len(data), rec.salt_crc(SALT), {}, 5, 100)
    assert [r[0] for r in records] == list(range(5, 11))


@pytest.mark.parametrize("user", [b"", b"u"])
def test_decode_run_stops_at_a_valid_checksum_over_overrunning_lengths(user: bytes) -> None:
    """
    A record whose checksum is right but whose name or user overruns it into
    the next record, where the bytes it would take happen to be a known name.
    """
    following = rec.encode_record(SALT, 2, 6, b"deposit", 1, b"\x80")
    short = 3
    if user:
        body = rec._BODY_HEAD.pack(1, 5, 1, rec.KIND_COMMAND, 3, 2) + b"dep" + user
        overrun = (b"dep", user + following[:1])
    else:
        body = rec._BODY_HEAD.pack(1, 5, 1, rec.KIND_COMMAND, 7, 0) + b"dep"
        overrun = (b"dep" + following[: 7 - short], b"")
    framed = rec._PREFIX.pack(len(body), rec.checksum(SALT, len(body), body)) + body
    data = framed + following
    for known in overrun:  # make the overrunning bytes known names
        if known:
            rec.decode_at(rec.encode_record(SALT, 1, 1, known, 1, b""), 0, SALT)
    assert rec.decode_run(data, 0, len(data), rec.salt_crc(SALT), {}, 1, 10) == ([], 0)
    with pytest.raises(rec.RecordError, match="overrun"):
        rec.decode_at(data, 0, SALT)


def test_mask_is_the_rotation_plus_delta() -> None:
    for crc in (0, 1, 0x7FFF, 0x8000, 0xFFFFFFFF, 0x12345678, 0x80000000):
        rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
        assert rec.mask(crc) == (rotated + 0xA282EAD8) & 0xFFFFFFFF


# -- the service's replay loop ------------------------------------------------------------------


def replay_journal(*entries: tuple[bytes, int, bytes]) -> MemoryJournal:
    journal = MemoryJournal()
    for seq, (name, version, fields) in enumerate(entries, 1):
        journal.data.append(rec.encode_record(journal.salt, seq, seq, name, version, fields))
    journal.next_seq = len(entries) + 1
    return journal


def test_replay_decodes_upgrades_and_skips_retired() -> None:
    pack = msgpack.packb
    journal = replay_journal(
        (b"put", 3, pack({"key": "a", "value": [1, 2]})),
        (b"gone", 1, b"anything at all"),
        (b"put", 1, pack({"k": "b", "v": 2})),
        (b"checked", 1, pack({"amount": 5})),
        (b"put", 3, pack({"key": "c", "value": None, "tags": ["x"]})),
    )
    svc = start(journal)
    assert svc.replayed == 5
    assert svc.model == {"'a'": [1, 2], "'b'": 2, "checked": 5, "'c'": None}


@pytest.mark.parametrize(
    "entry, message",
    [
        ((b"nope", 1, msgpack.packb({})), "record 2 \\(command 'nope' version 1\\): .*nope"),
        ((b"put", 3, b"\xc1"), "record 2 .*'put' do not decode"),
        ((b"put", 3, b"\x01\x02"), "record 2 .*'put' do not decode"),
        ((b"put", 3, msgpack.packb([1])), "record 2 .*'put' are not a map"),
        ((b"put", 3, msgpack.packb({"bogus": 1})), "record 2 .*'put' do not fit: .*bogus"),
        ((b"checked", 1, msgpack.packb({"amount": "type"})), "record 2 .*'checked' do not fit: amount of"),
        ((b"put", 4, msgpack.packb({"key": 1})), "record 2 .*version 4 is newer"),
        ((b"put", 2, msgpack.packb({"key": 1})), "record 2 .*version 2 has no upgrade"),
    ],
)
def test_replay_fails_as_decode_does(entry: tuple[bytes, int, bytes], message: str) -> None:
    journal = replay_journal((b"put", 3, msgpack.packb({"key": "a"})), entry)
    with pytest.raises(RecoveryError, match=message):
        start(journal)
    # The same message as decode() itself gives.
    name, version, fields = entry
    with pytest.raises((UnknownCommand, InvalidArguments)) as info:
        SCHEMA.decode(name.decode(), version, fields)
    with pytest.raises(RecoveryError) as replayed:
        start(replay_journal((b"put", 3, msgpack.packb({"key": "a"})), entry))
    assert str(replayed.value).endswith(str(info.value))


def test_replay_lets_other_constructor_errors_through_as_decode_does() -> None:
    journal = replay_journal((b"checked", 1, msgpack.packb({"amount": "value"})))
    with pytest.raises(ValueError, match="out of range"):
        start(journal)


# -- the writer thread --------------------------------------------------------------------------


class ThreadReactor:
    """Just enough reactor for WriterThread: callFromThread into a list."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.lock = threading.Condition()

    def callFromThread(self, f: Any, *args: Any) -> None:
        with self.lock:
            self.calls.append((f, args))
            self.lock.notify_all()

    def run(self, count: int) -> None:
        """Run ``count`` calls from the thread, waiting for them."""
        done = 0
        while done < count:
            with self.lock:
                if not self.lock.wait_for(lambda: self.calls, timeout=10):
                    raise AssertionError("the writer thread never answered")
                calls, self.calls = self.calls, []
            for f, args in calls:
                f(*args)
                done += 1


def test_writer_thread_runs_calls_in_order_and_reports_errors() -> None:
    reactor = ThreadReactor()
    writer = WriterThread(reactor, "test-writer")
    ran: list[int] = []
    early = writer(ran.append, 0)  # queued before the thread starts
    writer.start()
    try:
        ds = [writer(ran.append, i) for i in range(1, 200)]
        failing = writer(lambda: 1 / 0)
        last = writer(lambda: "done")
        reactor.run(202)
        assert ran == list(range(200))
        assert all(outcome(d) is None for d in [early, *ds])
        assert outcome(failing).check(ZeroDivisionError)
        assert outcome(last) == "done"
        # Calls after a quiet spell still wake the thread.
        for i in range(20):
            d = writer(lambda i=i: i)
            reactor.run(1)
            assert outcome(d) == i
    finally:
        writer.stop()
    writer.stop()  # twice is harmless


#: read(2)'s number, as /proc/<pid>/task/<tid>/syscall shows it.
_READ = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())


def _blocked_in_read(native_id: int) -> bool:
    """Whether a thread of this process sits in read(2) (elsewhere: asleep at all)."""
    try:
        if _READ is None:
            with open(f"/proc/self/task/{native_id}/stat") as f:
                return f.read().rsplit(") ", 1)[1].startswith("S")
        with open(f"/proc/self/task/{native_id}/syscall") as f:
            return f.read().split()[0] == _READ
    except (OSError, IndexError):
        return False


def _until(condition: Any, seconds: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds}s")
        os.sched_yield()


def test_writer_thread_survives_a_signal_while_it_sleeps() -> None:
    import signal

    reactor = ThreadReactor()
    writer = WriterThread(reactor, "test-writer")
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    writer.start()
    try:
        thread = writer._thread
        assert thread is not None and thread.ident is not None and thread.native_id is not None
        for _ in range(3):
            # Delivered to the writer thread while it waits for work in its
            # read: the read is interrupted (EINTR), which must not end the
            # thread; it goes back to its read.
            _until(lambda: _blocked_in_read(thread.native_id))  # type: ignore[arg-type]
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
        d = writer(lambda: "still here")
        reactor.run(1)
        assert outcome(d) == "still here"
        assert thread.is_alive()
    finally:
        writer.stop()
        signal.signal(signal.SIGUSR1, old)


def test_writer_thread_stop_finishes_queued_calls() -> None:
    reactor = ThreadReactor()
    writer = WriterThread(reactor, "test-writer")
    writer.start()
    gate = threading.Event()
    ran: list[int] = []
    writer(gate.wait)
    for i in range(5):
        writer(ran.append, i)
    gate.set()
    writer.stop()
    assert ran == [0, 1, 2, 3, 4]
