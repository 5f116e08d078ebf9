"""
What the SQL journals (:mod:`txjournal.journal.sqlite`,
:mod:`txjournal.journal.postgres`) share: one row per record, the exact
encoded record kept as the source of truth, and the checks replay makes.

Why a row holds both the encoded record *and* its columns: the ``record``
blob is what replay trusts (it carries the salted checksum, so a row
edited by hand, restored from another journal's backup or damaged by the
database never passes for history), while ``seq``, ``time_ns``, ``kind``,
``name``, ``version``, ``user`` and ``fields`` (the command's arguments as
JSON) are there so operators can query the history with SQL. They are
derived from the blob and never read back by txjournal.

Why a batch is one transaction: the engine acknowledges a batch as a
whole, so the database must keep it whole or not at all; a database has
no torn tail, which is why the SQL journals never cut anything off.

Why appends re-check the newest stored sequence number: the primary key on
``seq`` already refuses a record another writer stored, but a stale writer
could otherwise fill in sequence numbers that pruning removed. Checking
``max(seq) = first_seq - 1`` inside the inserting transaction closes that
gap; two writers racing past the check still collide on the key.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
from twisted.logger import Logger

from txjournal import record as rec
from txjournal.errors import JournalCorrupt, TxJournalError

#: Rows fetched per query during replay: bounded memory, few round trips.
REPLAY_PAGE = 2000


class SequenceTaken(TxJournalError):
    """
    Another writer already stored (or pruned past) the sequence numbers this
    journal tried to append: this process is a stale writer and must stop.
    Nothing of the refused batch was written.
    """


class Fenced(SequenceTaken):
    """Another writer took over the journal; this one may append nothing more."""


class JournalClosed(TxJournalError):
    """The journal stopped accepting appends after a failure, or was closed."""


#: One row of the ``records`` table, in column order.
Row = tuple[int, int, int, str, int, str | None, str | None, bytes]


def _jsonable(value: Any) -> Any:
    """
    Make decoded msgpack JSON-friendly: bytes become ``{"$base64": ...}``,
    map keys become strings, non-finite floats become strings and NUL
    characters (which PostgreSQL's ``jsonb`` refuses) become U+FFFD. Lossy
    on purpose: the column is for reading with SQL, replay uses the blob.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {_jsonable_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _jsonable_key(key: Any) -> str:
    out = _jsonable(key)
    return out if isinstance(out, str) else json.dumps(out, sort_keys=True)


def fields_json(fields: bytes) -> str | None:
    """The msgpack ``fields`` of a record as JSON text, or ``None`` if they do not decode."""
    try:
        decoded = msgpack.unpackb(fields, raw=False, strict_map_key=False)
    except Exception:
        return None
    return json.dumps(_jsonable(decoded), ensure_ascii=False, allow_nan=False)


def rows_of_batch(data: bytes, first_seq: int, last_seq: int, salt: bytes) -> list[Row]:
    """
    Split a batch (a concatenation of encoded records) into rows, checking
    that it holds exactly ``first_seq..last_seq`` in order: a batch that
    does not say what the engine claims is a bug, refused before writing.
    """
    view = memoryview(data)
    rows: list[Row] = []
    expected = first_seq
    offset = 0
    while offset < len(view):
        record, end = rec.decode_at(view, offset, salt)
        if record.seq != expected:
            raise ValueError(f"batch holds sequence number {record.seq} where {expected} belongs")
        rows.append((
            record.seq, record.time_ns, record.kind, record.name, record.version,
            record.user, fields_json(record.fields), bytes(view[offset:end]),
        ))
        expected += 1
        offset = end
    if expected != last_seq + 1:
        raise ValueError(f"batch ends at {expected - 1}, not at {last_seq}")
    return rows


class SQLJournal(ABC):
    """
    The journal logic over a DB-API connection; subclasses supply the
    dialect. Not thread-safe: one thread at a time uses it (replay on the
    reactor thread at start-up, then appends and prunes on the writer
    thread), which the service's life cycle guarantees.
    """

    log = Logger()

    #: DB-API parameter marker of the driver.
    param = "?"

    def __init__(self, location: str, sync: bool) -> None:
        self.location = location
        self.sync = sync
        self.journal_id = 0
        self.salt = b""
        self.next_seq = 1
        self.last_time_ns = 0
        self._replayed = False
        self._prefetched: tuple[int, list[rec.Record], int, int] | None = None
        self._failed: BaseException | None = None
        #: Where messages say a row lives: the location plus, if needed, the table.
        self.where = location

    # -- dialect --------------------------------------------------------------

    @abstractmethod
    def _connect(self) -> Any:
        """Connect and create the tables if missing; return the connection."""

    @abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement in its own transaction; return its rows."""

    @abstractmethod
    def _insert_batch(self, rows: list[Row], first_seq: int) -> None:
        """
        In one transaction: check ``max(seq) = first_seq - 1`` (else raise
        :class:`SequenceTaken`), insert ``rows``, commit durably.
        """

    def _after_failure(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called once an append failed; the journal accepts nothing more."""

    @abstractmethod
    def _close_connection(self) -> None:
        """Close the connection, ignoring a connection that is already gone."""

    records_table = "records"
    meta_table = "meta"

    # -- IJournal ---------------------------------------------------------------

    def open(self) -> None:
        self._connect()
        self._failed = None
        p = self.param
        # Fixed at the first open, not the first append: every writer on this
        # storage then salts records alike, and the key alone fences them.
        candidate = str(secrets.randbits(64))
        self._execute(
            f"INSERT INTO {self.meta_table} (key, value) VALUES ({p}, {p}) ON CONFLICT DO NOTHING",
            ("journal_id", candidate),
        )
        rows = self._execute(f"SELECT value FROM {self.meta_table} WHERE key = {p}", ("journal_id",))
        self.journal_id = int(rows[0][0])
        self.salt = self.journal_id.to_bytes(8, "little")

    def prefetch(self, from_seq: int) -> int:
        """
        Read every record ``>= from_seq`` now (on the calling thread) and
        keep them, so that the next ``replay(from_seq)`` yields them without
        touching the database: a promoted replica fetches its catch-up in a
        pool thread and applies it on the reactor thread. Returns how many.
        """
        records = list(self.replay(from_seq))
        self._prefetched = (from_seq, records, self.next_seq, self.last_time_ns)
        return len(records)

    def replay(self, from_seq: int = 1, keep_through: int = 0) -> Iterator[rec.Record]:
        """
        Yield records ``>= from_seq`` decoded from their stored bytes.
        ``keep_through`` changes nothing here: a committed row is never a
        torn write, so every bad row is damage.
        """
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == from_seq:
            _, records, self.next_seq, self.last_time_ns = prefetched
            yield from records
            self._replayed = True
            return
        self._replayed = False
        p = self.param
        ((newest,),) = self._execute(f"SELECT max(seq) FROM {self.records_table}")
        last = int(newest) if newest is not None else 0
        if last:
            # Logged times never decrease, so the newest row's is the bound
            # for the next command's, even when replay yields nothing.
            ((time_ns,),) = self._execute(
                f"SELECT time_ns FROM {self.records_table} WHERE seq = {p}", (last,)
            )
            self.last_time_ns = int(time_ns)
        expected = from_seq
        salt = self.salt
        while expected <= last:
            page = self._execute(
                f"SELECT seq, record FROM {self.records_table} WHERE seq >= {p} "
                f"ORDER BY seq LIMIT {REPLAY_PAGE}",
                (expected,),
            )
            if not page:
                break
            for seq, blob in page:
                if seq != expected:
                    raise JournalCorrupt(
                        self.where, 0, expected,
                        f"records {expected}..{seq - 1} are missing (the next row is {seq})",
                    )
                record = self._decode(seq, bytes(blob), salt)
                expected += 1
                yield record
        if last and expected <= last:
            raise JournalCorrupt(self.where, 0, expected, f"records {expected}..{last} vanished during replay")
        self.next_seq = last + 1
        self._replayed = True

    def _decode(self, seq: int, blob: bytes, salt: bytes) -> rec.Record:
        try:
            record, end = rec.decode_at(blob, 0, salt)
        except rec.RecordError as e:
            raise JournalCorrupt(self.where, 0, seq, f"the stored record of row {seq} is invalid ({e.reason})") from None
        if end != len(blob):
            raise JournalCorrupt(self.where, 0, seq, f"row {seq} holds {len(blob) - end} bytes after its record")
        if record.seq != seq:
            raise JournalCorrupt(self.where, 0, seq, f"row {seq} holds the record of sequence number {record.seq}", record.name)
        return record

    def append(self, data: bytes, first_seq: int, last_seq: int) -> None:
        if self._failed is not None:
            raise JournalClosed(f"the journal in {self.where} stopped after an earlier failure: {self._failed}")
        if not self._replayed:
            raise ValueError("replay the journal to its end before appending")
        if first_seq != self.next_seq:
            raise ValueError(f"append of {first_seq} but the journal expects {self.next_seq}")
        rows = rows_of_batch(data, first_seq, last_seq, self.salt)
        try:
            self._insert_batch(rows, first_seq)
        except BaseException as e:
            # The outcome is unknown (a commit may have reached the server):
            # like the file journal, accept nothing more; restart recovers.
            self._failed = e
            try:
                self._after_failure()
            except Exception:
                self.log.failure("Closing {where} after a failed append also failed", where=self.where)
            raise
        self.next_seq = last_seq + 1

    def prune(self, upto_seq: int) -> list[str]:
        """
        Delete rows ``<= upto_seq``, always keeping the newest row (it is
        what tells a later writer where the journal ends). Run it on the
        writer thread. Returns one description of what went, if anything.
        """
        p = self.param
        rows = self._execute(
            f"DELETE FROM {self.records_table} WHERE seq <= {p} "
            f"AND seq < (SELECT max(seq) FROM {self.records_table}) RETURNING seq",
            (upto_seq,),
        )
        if not rows:
            return []
        seqs = [r[0] for r in rows]
        return [f"{self.where} rows {min(seqs)}..{max(seqs)}"]

    def close(self) -> None:
        self._close_connection()
        self._replayed = False
