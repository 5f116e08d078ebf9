"""
The file journal: numbered segments of checksummed records in ``DATADIR/journal``.

Recovery rules (see ``docs/format.rst``): an invalid record at the end of the
last segment with no valid record after it is a torn write and is cut off;
any other invalid record, a gap in sequence numbers or a segment that does
not follow its predecessor is corruption and stops start-up with the file,
offset and sequence number.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator

from twisted.logger import Logger
from zope.interface import implementer

from txjournal import record as rec
from txjournal.errors import JournalCorrupt, NothingWritten, describe_os_error
from txjournal.fs import OSFileSystem, write_all
from txjournal.interfaces import IFileSystem, IJournal

DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
#: Records per list yielded by :meth:`FileJournal.replay_batches`.
REPLAY_BATCH = 1024

_SEGMENT_RE = re.compile(r"^(\d{20})\.log$")
_TEMP_PREFIX = ".tmp-"


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.log"


@implementer(IJournal)
class FileJournal:
    """
    A journal in a directory of segment files.

    :param segment_size: roll over to a new segment once the current one has
        grown past this many bytes (checked between batches, so a segment
        may exceed it by one batch).
    :param sync: ``False`` skips ``fdatasync``: acknowledged commands can
        then be lost on power failure. For tests and benchmarks only.
    :param readonly: never modify anything (the inspection tools); a torn
        tail is reported in :attr:`torn_tail` instead of being cut off.
    """

    log = Logger()

    def __init__(
        self,
        directory: str,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        sync: bool = True,
        fs: IFileSystem | None = None,
        readonly: bool = False,
    ) -> None:
        if segment_size < rec.SEGMENT_HEADER_SIZE + 64:
            raise ValueError(f"segment_size {segment_size} is too small")
        self.directory = os.path.abspath(directory)
        self.location = self.directory
        self.segment_size = segment_size
        self.sync = sync
        self.readonly = readonly
        self._fs: IFileSystem = fs if fs is not None else OSFileSystem()
        self.segments: list[tuple[int, str]] = []
        self.journal_id = 0
        self.salt = b""
        self.next_seq = 1
        #: ``(path, offset, reason)`` of a torn tail found by :meth:`replay`.
        self.torn_tail: tuple[str, int, str] | None = None
        self.progress_total = 0
        self.progress_done = 0
        #: Logged time of the last record read by :meth:`replay`, yielded or not.
        self.last_time_ns = 0
        self._replayed = False
        self._fd: int | None = None
        self._tail_path: str | None = None
        self._size = 0

    # -- opening and replay ---------------------------------------------------

    def open(self) -> None:
        fs = self._fs
        if not self.readonly:
            fs.makedirs(self.directory)
        try:
            names = fs.listdir(self.directory)
        except FileNotFoundError:
            names = []
        segments = []
        for name in names:
            m = _SEGMENT_RE.match(name)
            if m:
                segments.append((int(m.group(1)), os.path.join(self.directory, name)))
            elif name.startswith(_TEMP_PREFIX) and not self.readonly:
                # A segment whose creation was interrupted before its rename:
                # it never held a record.
                fs.unlink(os.path.join(self.directory, name))
        # Ordered by first sequence number, never by directory listing order.
        self.segments = sorted(segments)
        if not self.segments:
            self.journal_id = secrets.randbits(64)
            self.salt = self.journal_id.to_bytes(8, "little")

    def first_seq(self) -> int | None:
        """The first sequence number the journal still holds, if any."""
        return self.segments[0][0] if self.segments else None

    def replay(self, from_seq: int = 1, keep_through: int = 0) -> Iterator[rec.Record]:
        new, record = tuple.__new__, rec.Record
        for batch in self.replay_batches(from_seq, keep_through):
            for t in batch:
                yield new(record, t)

    def replay_batches(
        self, from_seq: int = 1, keep_through: int = 0
    ) -> Iterator[list[rec.RecordTuple]]:
        """
        :meth:`replay` in lists of at most :data:`REPLAY_BATCH` records, each
        a plain tuple in the order of :class:`~txjournal.record.Record`'s
        fields: replay's per-record overhead is most of its cost. Memory
        stays that of one segment, whatever the journal's length.
        """
        segments = self.segments
        self._replayed = False
        if not segments:
            self.next_seq = 1
            self._replayed = True
            return
        start = 0
        for i, (first, _path) in enumerate(segments):
            if first <= from_seq:
                start = i
        expected = segments[start][0]
        if expected > from_seq:
            raise JournalCorrupt(
                segments[start][1], 0, from_seq,
                f"records {from_seq}..{expected - 1} are missing (the oldest "
                f"segment starts at {expected})",
            )
        last = len(segments) - 1
        salt: bytes | None = None
        #: Bytes of segments to read and read so far: progress for long replays.
        try:
            self.progress_total = sum(self._fs.size(path) for _first, path in segments[start:])
        except OSError:
            self.progress_total = 0  # a vanished segment is reported just below
        self.progress_done = 0
        for i in range(start, len(segments)):
            first, path = segments[i]
            try:
                data = self._fs.read(path)
            except FileNotFoundError:
                raise JournalCorrupt(
                    path, 0, first, "segment disappeared while the journal was read"
                ) from None
            try:
                header = rec.decode_segment_header(data)
            except rec.BadSegmentHeader as e:
                raise JournalCorrupt(path, 0, None, f"bad segment header: {e}") from None
            if header.first_seq != first:
                raise JournalCorrupt(
                    path, 0, header.first_seq,
                    f"segment header says it starts at {header.first_seq}, its name says {first}",
                )
            if salt is None:
                salt = header.salt_bytes
                self.journal_id = header.salt
                self.salt = salt
            elif header.salt_bytes != salt:
                raise JournalCorrupt(
                    path, 0, first, "segment belongs to another journal (salt differs)"
                )
            if first != expected:
                raise JournalCorrupt(
                    path, 0, expected,
                    f"segment starts at {first} but the previous one ended at "
                    f"{expected - 1}: records {expected}..{first - 1} are missing",
                )
            done = self.progress_done
            offset = rec.SEGMENT_HEADER_SIZE
            end = len(data)
            salt_state = rec.salt_crc(salt)
            length_states: dict[int, int] = {}
            while offset < end:
                records, nxt = rec.decode_run(
                    data, offset, end, salt_state, length_states, expected, REPLAY_BATCH
                )
                if records:
                    expected += len(records)
                    offset = nxt
                    self.last_time_ns = records[-1][1]
                    self.progress_done = done + offset
                    if records[0][0] < from_seq:
                        records = [r for r in records if r[0] >= from_seq]
                        if not records:
                            continue
                    yield records
                    continue
                # The record at offset is not the plain valid next one: decode
                # it the slow way, which tells exactly what is wrong with it.
                try:
                    record, nxt = rec.decode_at(data, offset, salt)
                except rec.RecordError as e:
                    if i == last and rec.find_valid_record(data, offset + 1, salt, expected - 1) is None:
                        if expected <= keep_through:
                            # A snapshot covers this record, so it was applied
                            # and acknowledged: damage, never a torn write.
                            raise JournalCorrupt(
                                path, offset, expected,
                                f"invalid last record ({e.reason}), but a snapshot covers "
                                f"sequence number {keep_through}, so it was acknowledged; "
                                f"not cutting it off",
                            ) from None
                        self._torn(path, offset, e.reason, data[offset:end], isinstance(e, rec.Incomplete))
                        end = offset
                        break
                    reason = e.reason
                    if e.seq is not None and e.seq != expected:
                        reason += f"; its sequence field reads {e.seq}"
                    raise JournalCorrupt(
                        path, offset, expected,
                        f"invalid record ({reason}) followed by valid data"
                        if i == last else f"invalid record ({reason})",
                    ) from None
                if record.seq != expected:
                    raise JournalCorrupt(
                        path, offset, record.seq,
                        f"expected sequence number {expected}",
                        record.name,
                    )
                expected += 1
                offset = nxt
                self.last_time_ns = record.time_ns
                self.progress_done = done + offset
                if record.seq >= from_seq:
                    yield [tuple(record)]  # type: ignore[list-item]
            self.progress_done = done + len(data)
            if i == last:
                self._tail_path = path
                self._size = end
                if not self.readonly and self._fd is None and end < self.segment_size:
                    # Opened now, not at the first append: a segment that
                    # cannot be written (permissions, an immutable file) then
                    # stops start-up with its name, instead of a service
                    # that reports ready and fails its first command.
                    self._fd = self._fs.open_append(path)
            # Let go of this segment before reading the next: else both are in
            # memory while the read runs, and peak memory is two segments.
            data = b""
        self.next_seq = expected
        self._replayed = True

    def _torn(
        self, path: str, offset: int, reason: str, tail: bytes | memoryview, short: bool
    ) -> None:
        self.torn_tail = (path, offset, reason)
        if self.readonly:
            return
        fs = self._fs
        if short:
            self.log.warn(
                "Cutting off a torn write at the end of the journal: {length} bytes "
                "at offset {offset} of {path} ({reason}). These commands were never "
                "acknowledged.",
                length=len(tail), offset=offset, path=path, reason=reason,
            )
        else:
            # A whole record that fails its checksum is as likely damage to
            # an acknowledged command as a torn write: keep its bytes.
            aside = f"{path}.damaged-tail-{offset}"
            n = 1
            while os.path.lexists(aside):  # same offset damaged again, or a crash mid-way
                n += 1
                aside = f"{path}.damaged-tail-{offset}.{n}"
            fd = fs.create_exclusive(aside)
            try:
                write_all(fs, fd, bytes(tail))
                fs.fsync(fd)
            finally:
                fs.close(fd)
            fs.fsync_dir(self.directory)
            self.log.critical(
                "The last record of the journal is invalid ({reason}) at offset "
                "{offset} of {path}: a torn write, or damage to a command that may "
                "have been acknowledged. Cutting it off; its {length} bytes are kept "
                "in {aside}.",
                reason=reason, offset=offset, path=path, length=len(tail), aside=aside,
            )
        fs.truncate(path, offset)
        fd = fs.open_append(path)
        try:
            fs.fsync(fd)
        finally:
            fs.close(fd)

    # -- appending (writer thread) --------------------------------------------

    def append(self, data: bytes, first_seq: int, last_seq: int) -> None:
        if self.readonly:
            raise ValueError("journal was opened read-only")
        if not self._replayed:
            raise ValueError("replay the journal to its end before appending")
        if first_seq != self.next_seq:
            raise ValueError(f"append of {first_seq} but the journal expects {self.next_seq}")
        fs = self._fs
        if self._fd is None or self._size >= self.segment_size:
            try:
                self._open_for_append(first_seq)
            except OSError as e:
                raise NothingWritten(
                    f"opening the journal segment for sequence number {first_seq} in "
                    f"{self.directory} failed ({describe_os_error(e)})"
                ) from e
        assert self._fd is not None
        write_all(fs, self._fd, data)
        if self.sync:
            fs.fdatasync(self._fd)
        self._size += len(data)
        self.next_seq = last_seq + 1

    def append_is_quick(self) -> bool:
        """
        Whether the next :meth:`append` only writes (and syncs) the open
        segment, with no segment to create: the engine may then run it on
        the reactor thread (inline commit) without risking a longer stall.
        """
        return self._fd is not None and self._size < self.segment_size

    def _open_for_append(self, first_seq: int) -> None:
        fs = self._fs
        if self._fd is None and self._tail_path is not None and self._size < self.segment_size:
            self._fd = fs.open_append(self._tail_path)
            return
        if self._fd is not None:
            fs.close(self._fd)
            self._fd = None
        # A new segment appears under its final name only once its header is
        # durable, so a crash mid-creation leaves a temp file, not a segment
        # with a torn header.
        name = segment_name(first_seq)
        final = os.path.join(self.directory, name)
        temp = os.path.join(self.directory, _TEMP_PREFIX + name)
        fd = fs.create_exclusive(temp)
        try:
            write_all(fs, fd, rec.encode_segment_header(self.journal_id, first_seq))
            fs.fsync(fd)
        finally:
            fs.close(fd)
        fs.rename(temp, final)
        fs.fsync_dir(self.directory)
        self.segments.append((first_seq, final))
        self._tail_path = final
        self._size = rec.SEGMENT_HEADER_SIZE
        self._fd = fs.open_append(final)

    def prune(self, upto_seq: int) -> list[str]:
        """
        Remove segments holding only records ``<= upto_seq`` (never the
        newest segment). Run it on the writer thread: it shares
        :attr:`segments` with :meth:`append`.
        """
        if self.readonly:
            raise ValueError("journal was opened read-only")
        removed = []
        while len(self.segments) > 1 and self.segments[1][0] - 1 <= upto_seq:
            _first, path = self.segments.pop(0)
            self._fs.unlink(path)
            removed.append(path)
        if removed:
            self._fs.fsync_dir(self.directory)
        return removed

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._fs.close(fd)
