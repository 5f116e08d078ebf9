"""
Journal statistics: how many commands and query audit records, grouped by
name, user, hour or day, with their first and last time and their size.
Behind ``python -m txjournal stats``; see ``docs/stats.rst``.

Like :mod:`txjournal.tools`, it works without the application's code, and
it never loads a whole journal into memory:

* a data directory (the file journal) is scanned record by record with the
  read-only :class:`~txjournal.journal.file.FileJournal`;
* an SQL journal (``sqlite:///...``, ``postgresql://...``) is aggregated by
  the database with one ``GROUP BY`` query; no record row is fetched.

What the journal cannot say: whether a command **failed**. Every command is
journaled before it runs, including those that raise, and outcomes are not
recorded. Each group therefore reports ``failed`` as ``None`` (unknown)
rather than a guess; only replaying with the application's code tells.

Only what the journal still holds is counted: records removed by pruning
(``prune_segments``, or SQL journal pruning) are gone from the statistics too.

Sizes are the bytes of each encoded record (its 8-byte prefix and its body,
see ``docs/format.rst``): the same number for the same record in every
backend (the SQL journals keep the encoded record in their ``record`` column).
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from txjournal import record as rec
from txjournal import urls
from txjournal.journal.file import FileJournal
from txjournal.tools import NotADataDir, ToolError, iso_ns, iso_time

GroupBy = Literal["name", "user", "hour", "day"]
GROUP_BYS: tuple[str, ...] = ("name", "user", "hour", "day")

HOUR_NS = 3600 * 1_000_000_000
DAY_NS = 24 * HOUR_NS

#: Why ``failed`` is always ``None``; part of every report.
FAILED_NOTE = (
    "failed: unknown. The journal records every command before it runs, including "
    "commands that raise, and does not record outcomes; only replaying with the "
    "application's code tells which failed."
)



class StatsError(ToolError):
    """The source cannot be read for statistics; the message says why."""


def parse_time(text: str) -> int:
    """
    An ISO 8601 date or date-time as nanoseconds since the epoch (its first
    nanosecond; UTC without a zone). Raises :class:`ValueError`.
    """
    return iso_ns(text)


@dataclass
class Group:
    """
    The records of one group. ``key`` is the name, the user (``None``: no
    user), the hour (``2026-01-02T13:00:00Z``) or the day (``2026-01-02``),
    or ``"all"`` for the total. ``other`` counts records of kinds this code
    does not know. ``failed`` is always ``None``: see :data:`FAILED_NOTE`.
    """

    key: str | None
    records: int = 0
    commands: int = 0
    queries: int = 0
    other: int = 0
    failed: None = None
    first_time_ns: int | None = None
    last_time_ns: int | None = None
    total_bytes: int = 0

    @property
    def mean_bytes(self) -> float | None:
        return round(self.total_bytes / self.records, 1) if self.records else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_bytes"] = self.mean_bytes
        data["first_time"] = None if self.first_time_ns is None else iso_time(self.first_time_ns)
        data["last_time"] = None if self.last_time_ns is None else iso_time(self.last_time_ns)
        return data


@dataclass
class StatsReport:
    """
    What :func:`stats` found: one :class:`Group` per key in key order (by
    time for ``hour`` and ``day``; ``None`` first for ``user``), and
    ``total`` over all of them. ``since`` (inclusive) and ``until``
    (exclusive) are the time window in nanoseconds, if one was given.
    """

    source: str
    by: str | None
    since_ns: int | None
    until_ns: int | None
    groups: list[Group]
    total: Group
    note: str = FAILED_NOTE

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "by": self.by,
            "since": None if self.since_ns is None else iso_time(self.since_ns),
            "until": None if self.until_ns is None else iso_time(self.until_ns),
            "groups": [g.to_dict() for g in self.groups],
            "total": self.total.to_dict(),
            "note": self.note,
        }


def bucket_key(by: str | None, bucket: Any) -> str | None:
    """The group key of an hour or day bucket number (or a name or user as is)."""
    if by == "hour":
        return iso_time(int(bucket) * HOUR_NS).replace(".000000", "")
    if by == "day":
        return iso_time(int(bucket) * DAY_NS)[:10]
    if by is None:
        return "all"
    return None if bucket is None else str(bucket)


def record_size(record: rec.Record) -> int:
    """The bytes of the encoded record (prefix and body)."""
    user = record.user.encode("utf-8") if record.user else b""
    return (
        rec.PREFIX_SIZE + rec.BODY_HEAD_SIZE + len(record.name.encode("utf-8")) + len(user)
        + len(record.fields)
    )


def _add(group: Group, kind: int, time_ns: int, size: int) -> None:
    group.records += 1
    if kind == rec.KIND_COMMAND:
        group.commands += 1
    elif kind == rec.KIND_QUERY:
        group.queries += 1
    else:
        group.other += 1
    if group.first_time_ns is None or time_ns < group.first_time_ns:
        group.first_time_ns = time_ns
    if group.last_time_ns is None or time_ns > group.last_time_ns:
        group.last_time_ns = time_ns
    group.total_bytes += size


def _sort_key(item: tuple[Any, Group]) -> tuple[int, Any]:
    bucket = item[0]
    return (0, "") if bucket is None else (1, bucket)


def _total(groups: Iterable[Group]) -> Group:
    total = Group("all")
    for g in groups:
        total.records += g.records
        total.commands += g.commands
        total.queries += g.queries
        total.other += g.other
        total.total_bytes += g.total_bytes
        for t in (g.first_time_ns, g.last_time_ns):
            if t is None:
                continue
            if total.first_time_ns is None or t < total.first_time_ns:
                total.first_time_ns = t
            if total.last_time_ns is None or t > total.last_time_ns:
                total.last_time_ns = t
    return total


def _report(
    source: str, by: str | None, since: int | None, until: int | None, buckets: dict[Any, Group]
) -> StatsReport:
    groups = [g for _, g in sorted(buckets.items(), key=_sort_key)]
    return StatsReport(source, by, since, until, groups, _total(groups))


def is_url(source: str) -> bool:
    """Whether ``source`` names an SQL journal rather than a data directory."""
    return source.startswith(("sqlite:", "postgresql://", "postgres://"))


def stats(
    source: str,
    since: int | None = None,
    until: int | None = None,
    by: str | None = None,
    table_prefix: str = "txjournal",
) -> StatsReport:
    """
    Statistics of the journal ``source``: a data directory or a journal URL.

    :param since: count only records at or after this time (ns since the epoch).
    :param until: count only records before this time.
    :param by: ``"name"``, ``"user"``, ``"hour"``, ``"day"`` (UTC), or
        ``None`` for one group of everything.
    :param table_prefix: the PostgreSQL journal's table prefix.
    :raises NotADataDir: ``source`` is neither a URL nor a directory.
    :raises StatsError: the SQL journal's table is missing or unreadable.
    :raises ~txjournal.errors.JournalCorrupt: damage in a file journal.
    """
    if by is not None and by not in GROUP_BYS:
        raise ValueError(f"cannot group by {by!r}: use one of {', '.join(GROUP_BYS)}")
    if is_url(source):
        url = urls.check(source)
        if url.startswith("sqlite:"):
            return _sqlite_stats(url, url[len("sqlite://"):], since, until, by)
        return _postgres_stats(url, table_prefix, since, until, by)
    return _file_stats(source, since, until, by)


# -- the file journal -------------------------------------------------------------


def _file_stats(datadir: str, since: int | None, until: int | None, by: str | None) -> StatsReport:
    path = os.path.abspath(datadir)
    if not os.path.isdir(path):
        raise NotADataDir(f"{path} is neither a data directory nor a journal URL")
    journal = FileJournal(os.path.join(path, "journal"), readonly=True)
    journal.open()
    buckets: dict[Any, Group] = {}
    try:
        first = journal.first_seq()
        if first is not None:
            for record in journal.replay(first):
                t = record.time_ns
                if (since is not None and t < since) or (until is not None and t >= until):
                    continue
                if by == "name":
                    bucket: Any = record.name
                elif by == "user":
                    bucket = record.user
                elif by == "hour":
                    bucket = t // HOUR_NS
                elif by == "day":
                    bucket = t // DAY_NS
                else:
                    bucket = "all"
                group = buckets.get(bucket)
                if group is None:
                    group = buckets[bucket] = Group(bucket_key(by, bucket))
                _add(group, record.kind, t, record_size(record))
    finally:
        journal.close()
    return _report(path, by, since, until, buckets)


# -- SQL journals -----------------------------------------------------------------


def _bucket_sql(by: str | None, user_column: str) -> str:
    if by == "name":
        return "name"
    if by == "user":
        return user_column
    if by in ("hour", "day"):
        n = HOUR_NS if by == "hour" else DAY_NS
        # Floor division in both SQLite and PostgreSQL, whose "/" truncates.
        return f"((time_ns - ((time_ns % {n}) + {n}) % {n}) / {n})"
    return "'all'"


def aggregate_sql(
    table: str, size_expr: str, user_column: str, param: str,
    since: int | None, until: int | None, by: str | None,
) -> tuple[str, list[Any]]:
    """The one ``GROUP BY`` query an SQL journal's statistics come from."""
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append(f"time_ns >= {param}")
        params.append(since)
    if until is not None:
        where.append(f"time_ns < {param}")
        params.append(until)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    bucket = _bucket_sql(by, user_column)
    if param == "%s":
        bucket = bucket.replace("%", "%%")  # a literal "%" for the pyformat drivers
    query = (
        f"SELECT {bucket} AS bucket, count(*), "
        f"sum(CASE WHEN kind = {rec.KIND_COMMAND} THEN 1 ELSE 0 END), "
        f"sum(CASE WHEN kind = {rec.KIND_QUERY} THEN 1 ELSE 0 END), "
        f"min(time_ns), max(time_ns), sum({size_expr}) "
        f"FROM {table}{clause} GROUP BY 1"
    )
    return query, params


def _groups_of_rows(by: str | None, rows: Sequence[Sequence[Any]]) -> dict[Any, Group]:
    buckets: dict[Any, Group] = {}
    for bucket, records, commands, queries, first, last, size in rows:
        if by in ("hour", "day"):
            bucket = int(bucket)
        records = int(records)
        commands = int(commands)
        queries = int(queries)
        buckets[bucket] = Group(
            bucket_key(by, bucket), records, commands, queries, records - commands - queries,
            None, int(first), int(last), int(size),
        )
    return buckets


def _sqlite_stats(
    url: str, path: str, since: int | None, until: int | None, by: str | None
) -> StatsReport:
    if not os.path.isfile(path):
        raise StatsError(f"no SQLite journal at {path}")
    query, params = aggregate_sql("records", "length(record)", '"user"', "?", since, until, by)
    try:
        # Read-only: statistics never create or change anything.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute(query, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise StatsError(f"cannot read the SQLite journal {path}: {e}") from None
    return _report(url, by, since, until, _groups_of_rows(by, rows))


def _postgres_stats(
    url: str, prefix: str, since: int | None, until: int | None, by: str | None
) -> StatsReport:
    import psycopg

    from txjournal.journal.postgres import _PREFIX_RE

    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"table prefix {prefix!r} must be lower case letters, digits and underscores")
    table = f"{prefix}_records"
    query, params = aggregate_sql(table, "octet_length(record)", '"user"', "%s", since, until, by)
    where = f"{urls.describe(url)} table {table}"
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.read_only = True
            rows = conn.execute(query, params).fetchall()
    except psycopg.errors.UndefinedTable:
        raise StatsError(f"no journal table {table} in {urls.describe(url)} (wrong --table-prefix?)") from None
    except psycopg.Error as e:
        raise StatsError(f"cannot read {where}: {str(e).strip()}") from None
    return _report(urls.describe(url), by, since, until, _groups_of_rows(by, rows))


# -- the chart --------------------------------------------------------------------


def chart(report: StatsReport, png: str) -> None:
    """
    Draw commands per hour from an ``hour`` report into ``png``.

    :raises ImportError: matplotlib is not installed (it is optional:
        ``pip install 'txjournal[bench]'``).
    """
    if report.by != "hour":
        raise ValueError("the chart needs a report grouped by hour")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    hours = [
        datetime.datetime.fromtimestamp((g.first_time_ns or 0) // HOUR_NS * 3600, datetime.UTC)
        for g in report.groups
    ]
    counts = [g.commands for g in report.groups]
    fig, ax = plt.subplots(figsize=(10, 4))
    try:
        ax.bar(hours, counts, width=1 / 24, align="edge")  # type: ignore[arg-type,unused-ignore]
        ax.set_xlabel("hour (UTC)")
        ax.set_ylabel("commands")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"Commands per hour: {report.source}")
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
