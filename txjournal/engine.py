"""
The command pipeline: sequencing, group commit, apply in order.

All methods run on the reactor thread except the journal's ``append``, which
``runner`` executes on the single writer thread. At most one flush is in
flight; commands that arrive meanwhile form the next batch, so the number of
syncs adapts to the load with no artificial delay (group commit as in
PostgreSQL's WAL). The next batch is handed to the writer *before* the
previous one is applied, so the disk and the model work in parallel.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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
    NotRunning,
)
from txjournal.interfaces import IJournal
from txjournal.schema import Context, Schema

M = TypeVar("M")

#: Runs a blocking function on the writer thread; returns a Deferred of it.
Runner = Callable[..., "Deferred[Any]"]

DEFAULT_MAX_PENDING = 100_000


class _Pending:
    __slots__ = ("command", "seq", "time_ns", "user", "deferred", "data")

    def __init__(
        self, command: Any, seq: int, time_ns: int, user: str | None, data: bytes
    ) -> None:
        self.command = command
        self.seq = seq
        self.time_ns = time_ns
        self.user = user
        self.data = data
        self.deferred: Deferred[Any] = Deferred()


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
    ) -> None:
        self.schema = schema
        self.model = model
        self.applied_seq = next_seq - 1
        self._journal = journal
        self._journal_id: int = journal.journal_id
        self._salt: bytes = journal.salt
        self._run = runner
        self._seconds = seconds
        self._next_seq = next_seq
        self._last_time_ns = last_time_ns
        self._max_pending = max_pending
        self._batch: list[_Pending] = []
        self._pending = 0  # accepted, not yet applied or failed
        self._flushing = False
        self._durable: deque[list[_Pending]] = deque()
        self._applying = False
        self._failed: JournalWriteError | None = None
        self._closed = False
        self._idle_waiters: list[Deferred[None]] = []
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
        refused = self._refusal("commands")
        if refused is not None:
            return fail(refused)
        schema = self.schema
        try:
            ctype, payload = schema.encode(command)
            # What runs live is decoded from the very bytes that replay will
            # decode: a caller mutating its object later, or a tuple that
            # comes back as a list, cannot make the two runs differ.
            live = schema.decode(ctype.name, ctype.version, payload)
            user_bytes = _user_bytes(ctype.name_bytes, user, payload, "its record")
        except InvalidArguments as e:
            return fail(CommandEncodeError(
                f"command {ctype.name!r} does not survive encoding: {e}"
            ))
        except Exception:
            return fail()
        return self._append(
            live, ctype.name_bytes, ctype.version, payload, user, user_bytes, rec.KIND_COMMAND
        )

    def audit(self, name_bytes: bytes, arguments: bytes, user: str | None) -> Deferred[None]:
        """
        Journal a query audit record (kind ``KIND_QUERY``); the Deferred
        fires once it is durable. It takes a sequence number like any
        record but is never applied, live or on replay.
        """
        refused = self._refusal("query audit records")
        if refused is not None:
            return fail(refused)
        try:
            user_bytes = _user_bytes(name_bytes, user, arguments, "the query's audit record")
        except InvalidArguments:
            return fail()
        return self._append(None, name_bytes, 1, arguments, user, user_bytes, rec.KIND_QUERY)

    def _refusal(self, what: str) -> Exception | None:
        """Why nothing more can be accepted right now, if so."""
        if self._failed is not None:
            return JournalFailed(
                f"the journal stopped after a write error and accepts no more {what}; "
                f"restart the service ({self._failed})"
            )
        if self._closed:
            return NotRunning("the journal service is stopping")
        if self._pending >= self._max_pending:
            return JournalOverloaded(
                f"{self._pending} records are waiting for the disk "
                f"(max_pending={self._max_pending}); try again later"
            )
        return None

    def _append(
        self,
        command: Any,
        name_bytes: bytes,
        version: int,
        payload: bytes,
        user: str | None,
        user_bytes: bytes,
        kind: int,
    ) -> Deferred[Any]:
        seq = self._next_seq
        self._next_seq = seq + 1
        time_ns = int(self._seconds() * 1e9)
        if time_ns < self._last_time_ns:
            time_ns = self._last_time_ns
        self._last_time_ns = time_ns
        data = rec.encode_record(
            self._salt, seq, time_ns, name_bytes, version, payload, user_bytes, kind
        )
        pending = _Pending(command, seq, time_ns, user, data)
        self._batch.append(pending)
        self._pending += 1
        if not self._flushing:
            self._flush()
        return pending.deferred

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        self._flushing = True
        data = b"".join([p.data for p in batch])
        d = self._run(self._journal.append, data, batch[0].seq, batch[-1].seq)
        d.addCallbacks(
            self._flushed, self._flush_failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    def _flushed(self, _: object, batch: list[_Pending]) -> None:
        self._flushing = False
        self.batches += 1
        self.records += len(batch)
        self._durable.append(batch)
        if self._batch:
            self._flush()
        self._apply_durable()

    def _apply_durable(self) -> None:
        if self._applying:
            return
        self._applying = True
        model = self.model
        journal_id = self._journal_id
        try:
            while self._durable:
                batch = self._durable.popleft()
                self._pending -= len(batch)
                for p in batch:
                    if p.command is None:  # an audit record: nothing to apply
                        self.applied_seq = p.seq
                        p.deferred.callback(None)
                        continue
                    ctx = Context(p.seq, p.time_ns, journal_id, p.user)
                    try:
                        result = p.command.execute(model, ctx)
                    except Exception:
                        self.applied_seq = p.seq
                        p.deferred.errback(Failure())
                    else:
                        self.applied_seq = p.seq
                        p.deferred.callback(result)
        finally:
            self._applying = False
        self._check_idle()

    def _flush_failed(self, failure: Failure, batch: list[_Pending]) -> None:
        self._flushing = False
        cause: BaseException = failure.value  # type: ignore[assignment]
        err = JournalWriteError(
            f"writing the journal failed ({describe_os_error(cause)}); the outcome of "
            f"commands {batch[0].seq}..{batch[-1].seq} is unknown and they were not "
            f"applied. The journal accepts no more commands: fix the cause and "
            f"restart the service, which recovers exactly what reached the disk"
        )
        err.__cause__ = cause
        self._failed = err
        self.log.critical(
            "Journal write failed: {cause}. No more commands are accepted; queries "
            "still work. Restart the service once the cause is fixed.",
            cause=describe_os_error(cause),
        )
        waiting, self._batch = self._batch, []
        self._pending -= len(batch) + len(waiting)
        for p in batch:
            p.deferred.errback(err)
        refused = JournalFailed(f"not written: {err}")
        for p in waiting:
            p.deferred.errback(refused)
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


def describe_os_error(e: BaseException) -> str:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full: {e}"
    return f"{type(e).__name__}: {e}"
