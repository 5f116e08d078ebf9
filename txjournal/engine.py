"""
The command pipeline: sequencing, group commit, apply in order.

All methods run on the reactor thread except the journal's ``append``, which
``runner`` executes on the single writer thread. At most one flush is in
flight; commands that arrive meanwhile form the next batch, so the number of
syncs adapts to the load with no artificial delay (group commit as in
PostgreSQL's WAL). The next batch is handed to the writer *before* the
previous one is applied, so the disk and the model work in parallel.

Under light load the hand-offs cost more than the sync itself: a lone
caller pays two thread wake-ups (to the writer and back) on top of each
``fdatasync``. With *inline commit* (``call_soon`` and ``inline_ready``
given), a small batch that finds the writer idle is written and synced on
the reactor thread at the end of the reactor turn it arrived in, as Redis
does with ``appendfsync always``; the reactor stalls for that one sync. If
an inline sync ever takes longer than ``inline_stall`` seconds, the engine
goes back to the writer thread for ``inline_cooldown`` seconds, twice as
long after each further slow sync (up to an hour; back to the first length
after ten minutes without one): a struggling disk stalls the reactor once
per cool-down at most, and less and less often.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgpack
from crc32c import crc32c
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from txjournal import record as rec
from txjournal.errors import (
    CommandEncodeError,
    InvalidArguments,
    JournalFailed,
    JournalOverloaded,
    JournalWriteError,
    NothingWritten,
    NotRunning,
    describe_os_error,
)
from txjournal.interfaces import IJournal
from txjournal.schema import Context, Schema

M = TypeVar("M")

#: Runs a blocking function on the writer thread; returns a Deferred of it.
Runner = Callable[..., "Deferred[Any]"]

DEFAULT_MAX_PENDING = 100_000
#: Inline commit only for batches this small: a bigger batch has Python
#: work worth overlapping with the sync on the writer thread.
DEFAULT_INLINE_MAX_BATCH = 8
#: ... and only while recent batches averaged fewer commands than this (a
#: lone caller, or nearly): with more callers, blocking the reactor for the
#: sync costs more than the hand-offs it saves.
_INLINE_RECENT_BATCH = 2.0
#: An inline sync slower than this (seconds) turns inline commit off...
DEFAULT_INLINE_STALL = 0.02
#: ... for this long (seconds), twice as long each time after, up to an hour.
DEFAULT_INLINE_COOLDOWN = 10.0
_INLINE_MAX_COOLDOWN = 3600.0
#: After this long (seconds) without a slow inline sync, the cool-down is
#: back to its first length.
_INLINE_FORGIVE = 600.0
_MASK_DELTA = rec.MASK_DELTA


#: One accepted record waiting for the disk: ``(command, seq, time_ns, user,
#: deferred)``, ``command`` being ``None`` for an audit record. A plain tuple:
#: one is built per command on the reactor thread.
_Pending = tuple[Any, int, int, "str | None", "Deferred[Any]"]

_SEQ_TIME = struct.Struct("<Qq")  # the start of a record body: seq, time_ns
_BODY_REST = struct.Struct("<HBBB")  # the rest of its head: version, kind, name_len, user_len
_PREFIX = struct.Struct("<II")  # length, crc
_LENGTH = struct.Struct("<I")
assert _SEQ_TIME.size + _BODY_REST.size == rec.BODY_HEAD_SIZE
#: A payload this long or shorter always fits, whatever the name (at most
#: 255 bytes) and with no user: the size check can be skipped.
_SMALL_PAYLOAD = rec.MAX_RECORD_SIZE - rec.BODY_HEAD_SIZE - 255
#: After packing more than this, the engine's packer is replaced, so the
#: buffer it grew for one big command is not kept for the service's life.
_PACKER_KEEP = 1 << 20


class Engine(Generic[M]):
    """
    Owns the live model once start-up replay is done.

    :param next_seq: the sequence number of the next command.
    :param last_time_ns: the time logged with the last command, so that
        logged times never go backwards even if the wall clock does.
    """

    log = Logger()

    def __init__(
        self,
        schema: Schema[M],
        journal: IJournal,
        model: M,
        runner: Runner,
        seconds: Callable[[], float],
        next_seq: int,
        last_time_ns: int = 0,
        max_pending: int = DEFAULT_MAX_PENDING,
        *,
        call_soon: Callable[[Callable[[], None]], object] | None = None,
        inline_ready: Callable[[], bool] | None = None,
        inline_max_batch: int = DEFAULT_INLINE_MAX_BATCH,
        inline_stall: float = DEFAULT_INLINE_STALL,
        inline_cooldown: float = DEFAULT_INLINE_COOLDOWN,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.schema = schema
        self.model = model
        self.applied_seq = next_seq - 1
        self._journal = journal
        self._journal_id: int = journal.journal_id
        self._salt: bytes = journal.salt
        self._run = runner
        self._seconds = seconds
        # The reactor's clock is time.time: read it in nanoseconds directly
        # (cheaper than scaling a float); any other clock (a test's) is scaled.
        self._time_ns: Callable[[], int] = (
            time.time_ns if seconds is time.time else lambda: int(seconds() * 1e9)
        )
        self._next_seq = next_seq
        self._last_time_ns = last_time_ns
        self._max_pending = max_pending
        self._batch: list[_Pending] = []
        self._parts: list[bytes] = []  # the framed records of _batch
        self._encode_live = schema.encode_live
        # One packer for the reactor thread: msgpack.packb builds a new one
        # per call. None while it is packing (see execute).
        self._pack: Callable[[Any], bytes] | None = msgpack.Packer(use_bin_type=True).pack
        self._rests: dict[bytes, bytes] = {}  # body after seq+time, by command name
        self._salt_state = rec.salt_crc(self._salt)
        self._length_crc: dict[int, int] = {}
        # Sequence, time and checksum of each record: in C where built.
        self._frame: Callable[[int, int, bytes, bytes, int], bytes] = (
            rec.frame_record if rec.SPEEDUPS else self._frame_cached
        )
        self._pending = 0  # accepted, not yet applied or failed
        self._flushing = False
        self._durable: deque[list[_Pending]] = deque()
        self._applying = False
        self._failed: JournalWriteError | None = None
        #: The write error that stopped the journal, in a few words.
        self._failed_why = ""
        self._closed = False
        self._idle_waiters: list[Deferred[None]] = []
        # Inline commit (see the module docstring); off unless both are given.
        self._call_soon = call_soon if inline_ready is not None else None
        self._inline_ready = inline_ready
        self._inline_max_batch = inline_max_batch
        self._inline_stall = inline_stall
        self._inline_cooldown = self._inline_cooldown0 = inline_cooldown
        self._last_slow = 0.0
        self._monotonic = monotonic
        self._inline_scheduled = False
        self._inline_off_until = 0.0  # monotonic time before which it stays off
        # Mean size of recent batches: about 1 means a lone caller, for whom
        # the hand-offs are the cost; more means concurrent callers, whose
        # commands the reactor should keep reading while the disk syncs.
        self._recent_batch = 1.0
        #: Batches written by inline commit (part of :attr:`batches`).
        self.inline_batches = 0
        #: Counters for monitoring: batches written and records in them.
        self.batches = 0
        self.records = 0

    # -- state ------------------------------------------------------------------

    @property
    def failed(self) -> JournalWriteError | None:
        """The write error that stopped the journal, if any."""
        return self._failed

    @property
    def pending(self) -> int:
        """Commands accepted but not yet applied."""
        return self._pending

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest accepted command."""
        return self._next_seq - 1

    def close(self) -> None:
        """Refuse new commands from now on (those accepted still complete)."""
        self._closed = True

    def wait_idle(self) -> Deferred[None]:
        """Fire once every accepted command has been written and applied."""
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if self._idle_waiters and not self._batch and not self._flushing and not self._durable:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    # -- the pipeline -------------------------------------------------------------

    def execute(self, command: Any, user: str | None = None) -> Deferred[Any]:
        """
        Journal ``command`` and apply it once durable.

        Anything wrong with the command itself (unregistered, unencodable)
        fails the returned Deferred at once and writes nothing.
        """
        if self._failed is not None or self._closed or self._pending >= self._max_pending:
            return fail(self._refusal("commands"))
        if not user:
            user = None  # the record cannot tell "" from no user: nor may the live run
        pack = self._pack
        self._pack = None  # a nested execute (from a field's own code) packs on its own
        fresh = True
        try:
            # What runs live is what replay will decode from the very same
            # bytes: a caller mutating its object later, or a tuple that
            # comes back as a list, cannot make the two runs differ.
            try:
                ctype, payload, live = self._encode_live(command, pack)
                fresh = len(payload) > _PACKER_KEEP
            finally:
                if pack is not None:
                    # A Packer keeps its largest buffer: a big command must not pin it.
                    self._pack = msgpack.Packer(use_bin_type=True).pack if fresh else pack
            name = ctype.name_bytes
            if user is None and len(payload) <= _SMALL_PAYLOAD:
                rest = self._rests.get(name)
                if rest is None:
                    rest = _BODY_REST.pack(ctype.version, rec.KIND_COMMAND, len(name), 0) + name
                    self._rests[name] = rest
            else:
                user_bytes = _user_bytes(name, user, payload, "its record")
                rest = (
                    _BODY_REST.pack(ctype.version, rec.KIND_COMMAND, len(name), len(user_bytes))
                    + name
                    + user_bytes
                )
        except InvalidArguments as e:
            return fail(CommandEncodeError(
                f"command {self.schema.type_of(command).name!r} does not survive encoding: {e}"
            ))
        except Exception:
            return fail()
        return self._append(live, rest, payload, user)

    def audit(self, name_bytes: bytes, arguments: bytes, user: str | None) -> Deferred[None]:
        """
        Journal a query audit record (kind ``KIND_QUERY``); the Deferred
        fires once it is durable. It takes a sequence number like any
        record but is never applied, live or on replay.
        """
        refused = self._refusal("query audit records")
        if refused is not None:
            return fail(refused)
        if not user:
            user = None
        try:
            user_bytes = _user_bytes(name_bytes, user, arguments, "the query's audit record")
        except InvalidArguments:
            return fail()
        rest = (
            _BODY_REST.pack(1, rec.KIND_QUERY, len(name_bytes), len(user_bytes))
            + name_bytes
            + user_bytes
        )
        return self._append(None, rest, arguments, user)

    def _stopped(self, what: str) -> JournalFailed:
        return JournalFailed(
            f"not written: the journal stopped after a write error "
            f"({self._failed_why}) and accepts no more {what}; restart the "
            f"service once the cause is fixed"
        )

    def _refusal(self, what: str) -> Exception | None:
        """Why nothing more can be accepted right now, if so."""
        if self._failed is not None:
            return self._stopped(what)
        if self._closed:
            return NotRunning("the journal service is stopping")
        if self._pending >= self._max_pending:
            return JournalOverloaded(
                f"{self._pending} records are waiting for the disk "
                f"(max_pending={self._max_pending}); try again later"
            )
        return None

    def _append(
        self, command: Any, rest: bytes, payload: bytes, user: str | None
    ) -> Deferred[Any]:
        """
        Sequence and frame one record (see :mod:`txjournal.record`; this is
        :func:`~txjournal.record.encode_record` with the name's part of the
        body prepared once) and queue it for the next flush.
        ``rest`` is the body after ``seq, time_ns``: version, kind, the two
        lengths, name and user.
        """
        seq = self._next_seq
        self._next_seq = seq + 1
        time_ns = self._time_ns()
        if time_ns < self._last_time_ns:
            time_ns = self._last_time_ns
        self._last_time_ns = time_ns
        self._parts.append(self._frame(seq, time_ns, rest, payload, self._salt_state))
        d: Deferred[Any] = Deferred()
        self._batch.append((command, seq, time_ns, user, d))
        self._pending += 1
        if not self._flushing:
            self._start_commit()
        return d

    def _start_commit(self) -> None:
        """With nothing in flight: commit the waiting batch, or plan to."""
        if self._inline_scheduled:
            if len(self._batch) > self._inline_max_batch:
                # Too big to commit inline: to the writer at once, so the
                # disk works while the rest of this turn's commands arrive.
                self._flush()
        elif (
            self._call_soon is not None
            and len(self._batch) <= self._inline_max_batch
            and self._recent_batch < _INLINE_RECENT_BATCH
            and self._monotonic() >= self._inline_off_until
        ):
            # At the end of this reactor turn, so that whatever else arrives
            # in it (other connections' commands) joins the batch.
            self._inline_scheduled = True
            self._call_soon(self._commit_soon)
        else:
            self._flush()

    def _frame_cached(
        self, seq: int, time_ns: int, rest: bytes, payload: bytes, salt_state: int
    ) -> bytes:
        """
        :func:`~txjournal.record.frame_record` in Python, with the checksum
        state after salt and length cached by length: for when the C
        version is not in use.
        """
        body = _SEQ_TIME.pack(seq, time_ns) + rest + payload
        length = len(body)
        state = self._length_crc.get(length)
        if state is None:
            state = self._length_state(length)
        c = crc32c(body, state)
        return (
            _PREFIX.pack(
                length, (((c * 0x100000001) >> 15) + _MASK_DELTA) & 0xFFFFFFFF  # rec.mask(c)
            )
            + body
        )

    def _length_state(self, length: int) -> int:
        """The CRC-32C state after ``salt | length``, cached by length."""
        cache = self._length_crc
        if len(cache) >= 4096:
            cache.clear()
        state = cache[length] = crc32c(_LENGTH.pack(length), self._salt_state)
        return state

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        parts, self._parts = self._parts, []
        self._flushing = True
        d = self._run(self._journal.append, b"".join(parts), batch[0][1], batch[-1][1])
        d.addCallbacks(
            self._flushed, self._flush_failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    def _commit_soon(self) -> None:
        """
        Commit the waiting batch: inline if it is small, the disk has been
        quick and the writer thread is idle (nothing of the journal's may
        run there meanwhile); else on the writer thread as usual.
        """
        self._inline_scheduled = False
        if self._flushing or not self._batch:
            return  # a failure emptied it, or it went to the writer already
        if (
            len(self._batch) > self._inline_max_batch
            or self._monotonic() < self._inline_off_until
            or not self._inline_ready()  # type: ignore[misc]
        ):
            self._flush()
            return
        batch, self._batch = self._batch, []
        parts, self._parts = self._parts, []
        self._flushing = True
        started = self._monotonic()
        try:
            self._journal.append(b"".join(parts), batch[0][1], batch[-1][1])
        except BaseException as e:
            self._flush_failed(Failure(), batch)
            if not isinstance(e, Exception):
                raise
            return
        now = self._monotonic()
        took = now - started
        if took <= self._inline_stall:
            if self._inline_cooldown != self._inline_cooldown0 and now - self._last_slow > _INLINE_FORGIVE:
                self._inline_cooldown = self._inline_cooldown0  # quiet for long: forgiven
        else:
            self._last_slow = now
            # Each slow sync doubles the cool-down (up to an hour): a disk that
            # keeps stalling soon stalls the reactor almost never.
            cooldown = self._inline_cooldown
            self._inline_cooldown = min(cooldown * 2, _INLINE_MAX_COOLDOWN)
            self._inline_off_until = now + cooldown
            self.log.warn(
                "An inline journal sync took {took:.3f}s (over {limit}s), stalling the "
                "reactor: commits go through the writer thread for the next {cooldown}s",
                took=took, limit=self._inline_stall, cooldown=cooldown,
            )
        self.inline_batches += 1
        self._flushed(None, batch)

    def _flushed(self, _: object, batch: list[_Pending]) -> None:
        self._flushing = False
        self.batches += 1
        self.records += len(batch)
        self._recent_batch = 0.75 * self._recent_batch + 0.25 * len(batch)
        self._durable.append(batch)
        if self._batch:
            self._start_commit()
        self._apply_durable()

    def _apply_durable(self) -> None:
        if self._applying:
            return
        self._applying = True
        model = self.model
        journal_id = self._journal_id
        durable = self._durable
        try:
            while durable:
                batch = durable.popleft()
                self._pending -= len(batch)
                for command, seq, time_ns, user, d in batch:
                    if command is None:  # an audit record: nothing to apply
                        self.applied_seq = seq
                        d.callback(None)
                        continue
                    try:
                        result = command.execute(model, Context(seq, time_ns, journal_id, user))
                    except Exception:
                        self.applied_seq = seq
                        d.errback(Failure())
                    else:
                        self.applied_seq = seq
                        d.callback(result)
        finally:
            self._applying = False
        self._check_idle()

    def _flush_failed(self, failure: Failure, batch: list[_Pending]) -> None:
        self._flushing = False
        cause: BaseException = failure.value  # type: ignore[assignment]
        span = f"{batch[0][1]}..{batch[-1][1]}"
        if isinstance(cause, NothingWritten):
            err = JournalWriteError(
                f"commands {span} were not written and not applied: {cause}. The "
                f"journal accepts no more commands: fix the cause and restart the service"
            )
            why = f"{cause}, before writing commands {span}"
        else:
            err = JournalWriteError(
                f"writing the journal failed ({describe_os_error(cause)}); the outcome of "
                f"commands {span} is unknown and they were not applied. The journal "
                f"accepts no more commands: fix the cause and restart the service, "
                f"which recovers exactly what reached the disk"
            )
            why = f"{describe_os_error(cause)}, writing commands {span}"
        err.__cause__ = cause
        self._failed = err
        self._failed_why = why
        self.log.critical(
            "Journal write failed: {cause}. No more commands are accepted; queries "
            "still work. Restart the service once the cause is fixed.",
            cause=why,
        )
        waiting, self._batch = self._batch, []
        self._parts = []
        self._pending -= len(batch) + len(waiting)
        for p in batch:
            p[4].errback(err)
        refused = self._stopped("commands")
        for p in waiting:
            p[4].errback(refused)
        self._check_idle()


def _user_bytes(name_bytes: bytes, user: str | None, payload: bytes, what: str) -> bytes:
    """
    The user name as stored, after checking the record fits: replay treats
    a longer record as damage, so it must be refused before it is written
    and acknowledged, not discovered after a restart.
    """
    user_bytes = user.encode("utf-8") if user else b""
    if len(user_bytes) > 255:
        raise InvalidArguments(f"user name {user!r} is longer than 255 bytes")
    body_size = rec.BODY_HEAD_SIZE + len(name_bytes) + len(user_bytes) + len(payload)
    if body_size > rec.MAX_RECORD_SIZE:
        raise InvalidArguments(
            f"{what} would be {body_size} bytes, over the limit of {rec.MAX_RECORD_SIZE} bytes"
        )
    return user_bytes
