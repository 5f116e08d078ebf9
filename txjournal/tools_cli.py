"""
The ``verify``, ``inspect`` and ``repair`` subcommands of ``python -m txjournal``.

::

    python -m txjournal verify SOURCE [--snapshots STORE] [--table-prefix PREFIX] [--json]
    python -m txjournal inspect SOURCE [--from SEQ] [--to SEQ] [--command NAME]
                                [--kind command|query] [--table-prefix PREFIX] [--json]
    python -m txjournal repair DATADIR --truncate-after SEQ [--yes]

SOURCE is a data directory, or an SQL journal's URL (``sqlite:///path.db``,
``postgresql://user@host/db``), opened read-only: no table is created and
a PostgreSQL journal is never taken over (its running writer is not
fenced). STORE is a snapshot store URL of the same forms or a directory of
snapshot files (default: ``DATADIR/snapshots``; none for an SQL journal).
``repair`` works on data directories only.

They read the journal directly (no server, no application code) through
:mod:`txjournal.tools`; this module only parses and prints. Registered in
:data:`txjournal.cli.SUBCOMMANDS`. Passwords in URLs are never printed.

Exit status: 0 no problem (``verify``), records shown (``inspect``),
repair done or nothing to do (``repair``, with or without ``--yes``); 1
problems found, damage hit while listing, a database that cannot be read
(server down, not a database), repair refused or locked, or ``repair``
without ``--yes`` (a dry run: nothing was changed); 2 usage errors,
including a DATADIR that is not a directory, a URL that names no journal
(malformed, a missing SQLite file, missing tables) and a URL given to
``repair``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from txjournal import tools, urls
from txjournal.errors import JournalCorrupt, TxJournalError
from txjournal.tools import scrub, source_name

# The values of txjournal.cli's EXIT_*; not imported from there because
# txjournal.cli imports this module to register the subcommands.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _error(message: str) -> None:
    print(f"txjournal: error: {message}", file=sys.stderr)


def _reader_gone() -> int:
    """
    Stdout's reader went away (``| head`` has seen enough): not an error.
    Point stdout at /dev/null so the interpreter's final flush stays quiet.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def print_report(report: Any, as_json: bool, printer: Callable[[Any, TextIO], None]) -> bool:
    """
    Print a report as one JSON document or as text; return ``False`` if
    stdout's reader went away meanwhile (see :func:`_reader_gone`).
    """
    try:
        if as_json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            printer(report, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()
        return False
    return True


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a sequence number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _add_datadir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datadir", metavar="DATADIR", help="the data directory (holds journal/ and snapshots/)")


def add_source(parser: argparse.ArgumentParser, snapshots: bool = True) -> None:
    """SOURCE, ``--table-prefix`` and (with ``snapshots``) ``--snapshots``."""
    parser.add_argument(
        "datadir",
        metavar="SOURCE",
        help="a data directory (holds journal/ and snapshots/) or an SQL journal's URL "
        "(sqlite:///abs/path.db, postgresql://user@host/db), opened read-only",
    )
    if snapshots:
        parser.add_argument(
            "--snapshots",
            metavar="STORE",
            help="the snapshot store: sqlite:///path.db, postgresql://user@host/db, or a "
            "directory of snapshot files (default: DATADIR/snapshots; for an SQL journal, "
            "none: its snapshots are wherever the service keeps them)",
        )
    parser.add_argument(
        "--table-prefix",
        default=tools.DEFAULT_TABLE_PREFIX,
        metavar="PREFIX",
        help="the tables' prefix of a PostgreSQL journal and of SQL snapshot stores "
        f"(default: {tools.DEFAULT_TABLE_PREFIX})",
    )


def error_in(source: str, message: str, *others: str | None) -> None:
    """Print an error about ``source``, every password in it taken out."""
    _error(scrub(message, source, *others))


def describe_error(e: Exception, source: str) -> str:
    """
    What to say about ``e``: its message, except that damage in an SQL
    journal is named by table and sequence number (a row has no offset)
    and points at ``verify`` on the same URL.
    """
    if isinstance(e, JournalCorrupt) and urls.is_url(source):
        return (
            f"journal is corrupt: {e.reason}: {e.path} (sequence number {e.seq}); run "
            f"'python -m txjournal verify {source_name(source)}' for the whole picture"
        )
    return str(e)


# -- verify -----------------------------------------------------------------------


def configure_verify(parser: argparse.ArgumentParser) -> None:
    add_source(parser)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")


def run_verify(args: argparse.Namespace) -> int:
    try:
        report = tools.verify(
            args.datadir, snapshots=args.snapshots, table_prefix=args.table_prefix
        )
    except tools.NotADataDir as e:
        error_in(args.datadir, str(e), args.snapshots)
        return EXIT_USAGE
    except (TxJournalError, OSError) as e:
        error_in(args.datadir, f"cannot verify {source_name(args.datadir)}: {e}", args.snapshots)
        return EXIT_FAILED
    print_report(report, args.json, print_verify)
    return EXIT_OK if report.ok else EXIT_FAILED


def _where(p: tools.Problem) -> str:
    where = p.path
    if p.offset is not None:
        where += f" at offset {p.offset}"
    details = []
    if p.seq is not None:
        details.append(f"seq {p.seq}")
    if p.command is not None:
        details.append(f"command {p.command!r}")
    if details:
        where += f" ({', '.join(details)})"
    return where


def print_verify(report: tools.VerifyReport, out: TextIO) -> None:
    """The human-readable form of a :class:`~txjournal.tools.VerifyReport`."""
    w = out.write
    sql = report.backend != "file"
    if sql:
        w(f"{'SQLite' if report.backend == 'sqlite' else 'PostgreSQL'} journal {report.datadir}\n")
    else:
        w(f"Data directory {report.datadir}\n")
    if report.journal_id is not None:
        w(f"  journal id {report.journal_id:016x}\n")
    if report.locked_by is not None:
        w(f"  in use: locked by {report.locked_by} (the journal may grow while it is read)\n")
    if sql:
        rows = report.rows or 0
        span = f", seq {report.first_seq}..{report.last_seq}" if rows else ""
        bad = f", {rows - report.records} of them do not verify" if rows != report.records else ""
        w(f"Journal: {rows} rows{span}{bad}\n")
    else:
        span = f"seq {report.first_seq}..{report.last_seq}" if report.records else "no records"
        checked = "" if report.journal_complete else " (checked up to the damage below)"
        w(f"Journal: {report.records} records, {span}, {len(report.segments)} segments{checked}\n")
    for s in report.segments:
        if s.damaged:
            state = f"seq {s.first_seq}..{s.last_seq}, then DAMAGE" if s.last_seq else "DAMAGED"
        elif not s.verified:
            state = "not checked (after the damage)"
        elif s.last_seq is None:
            state = f"empty (next seq {s.first_seq})"
        else:
            state = f"seq {s.first_seq}..{s.last_seq}"
        w(f"  {s.name}  {state:<32} {s.records:>8} records {s.size:>12} bytes\n")
    if report.snapshot_store is None:
        w("Snapshots: not checked (no --snapshots)\n")
    elif sql or report.snapshot_store != os.path.join(report.datadir, "snapshots"):
        w(f"Snapshots in {report.snapshot_store}: {len(report.snapshots)}\n")
    else:
        w(f"Snapshots: {len(report.snapshots)}\n")
    for snap in reversed(report.snapshots):
        size = "?" if snap.size is None else str(snap.size)
        w(f"  {snap.name}  seq {snap.seq:<12} {size:>12} bytes  {'ok' if snap.ok else 'BAD'}\n")
    if report.temp_files:
        w("Leftover temporary files (interrupted writes; start-up deletes them):\n")
        for path in report.temp_files:
            w(f"  {path}\n")
    if report.startup is not None:
        st = report.startup
        verdict = "intact" if st.ok else "damaged too: start-up refuses"
        w(
            f"Start-up loads snapshot {st.snapshot} and replays from {st.snapshot + 1}: "
            f"read up to {st.last_seq}, {verdict}\n"
        )
    for note in report.notes:
        w(f"Note: {note}.\n")
    if report.ok:
        w("OK: no problems found.\n")
        return
    w(
        f"Problems: {len(report.problems)} ({len(report.errors)} error(s), "
        f"{len(report.warnings)} warning(s))\n"
    )
    for p in report.problems:
        w(f"  {p.severity.upper():<7} {_where(p)}: {p.message}\n")
    store = report.snapshot_store
    journal_errors = [p for p in report.errors if store is None or not p.path.startswith(store)]
    if sql and journal_errors and not (report.startup and report.startup.ok):
        w(
            "A database keeps every committed row whole: there is no torn tail, and "
            "'repair' does not apply. Look at the records around the damage with "
            "'python -m txjournal inspect', then restore the rows from a backup or a "
            "replica (see 'python -m txjournal repair' for the alternative).\n"
        )
    if not report.journal_complete and not (report.startup and report.startup.ok):
        w(
            "The journal was checked up to the first damage only. Look at the records "
            "around it with 'python -m txjournal inspect', then cut the journal before "
            "it with 'python -m txjournal repair DATADIR --truncate-after SEQ'.\n"
        )


# -- inspect ----------------------------------------------------------------------


def configure_inspect(parser: argparse.ArgumentParser) -> None:
    add_source(parser, snapshots=False)
    parser.add_argument("--from", dest="from_seq", type=_seq, metavar="SEQ", help="first sequence number")
    parser.add_argument("--to", dest="to_seq", type=_seq, metavar="SEQ", help="last sequence number")
    parser.add_argument("--command", metavar="NAME", help="only records of this command (or query) name")
    parser.add_argument(
        "--kind",
        choices=["command", "query"],
        help="only commands, or only query audit records",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line; bytes as {"base64": ...}',
    )


def _fields_text(fields: Any) -> str:
    if isinstance(fields, dict):
        return " ".join(f"{k}={v!r}" for k, v in fields.items())
    return repr(fields)


def format_table(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write records as a table; return how many."""
    out.write(f"{'SEQ':>10}  {'TIME (UTC)':<27}  {'COMMAND':<20}  {'USER':<12}  FIELDS\n")
    n = 0
    for r in records:
        name = f"{r['command']} v{r['version']}"
        if r.get("kind", "command") != "command":
            # A query audit record (or a kind this code does not know).
            name = f"{r['kind']}:{name}"
        fields = _fields_text(r["fields"]) if "fields_error" not in r else f"<{r['fields_error']}>"
        out.write(f"{r['seq']:>10}  {r['time']:<27}  {name:<20}  {r['user'] or '-':<12}  {fields}\n")
        n += 1
    return n


def run_inspect(args: argparse.Namespace) -> int:
    try:
        records = tools.inspect(
            args.datadir, args.from_seq, args.to_seq, args.command, args.kind,
            table_prefix=args.table_prefix,
        )
    except tools.NotADataDir as e:
        error_in(args.datadir, str(e))
        return EXIT_USAGE
    except (TxJournalError, OSError) as e:
        error_in(args.datadir, f"cannot inspect {source_name(args.datadir)}: {e}")
        return EXIT_FAILED
    out = sys.stdout
    try:
        if args.json:
            for r in records:
                out.write(json.dumps(tools.to_jsonable(r)) + "\n")
        else:
            format_table(records, out)
        out.flush()
    except BrokenPipeError:
        return _reader_gone()
    except (TxJournalError, OSError) as e:
        out.flush()
        error_in(args.datadir, describe_error(e, args.datadir))
        return EXIT_FAILED
    return EXIT_OK


# -- repair -----------------------------------------------------------------------


def configure_repair(parser: argparse.ArgumentParser) -> None:
    _add_datadir(parser)
    parser.add_argument(
        "--truncate-after",
        type=_seq,
        required=True,
        metavar="SEQ",
        help="the sequence number of the last record to keep",
    )
    parser.add_argument(
        "--yes",
        action="store_true",
        help="really do it (without: show what would be removed and change nothing)",
    )


def print_repair(report: tools.RepairReport, out: TextIO) -> None:
    w = out.write
    would = "would be " if report.dry_run else ""
    last = report.first_seq + report.kept_records - 1
    kept = f"records {report.first_seq}..{last}" if report.kept_records else "no records"
    w(f"Data directory {report.datadir}: keeping {kept}.\n")
    if report.changes_nothing:
        w(f"The journal already ends at {report.truncate_after} and no snapshot covers more: "
          "nothing to do.\n")
        return
    if report.truncated is not None:
        t = report.truncated
        w(f"  {t.path}: {would}cut at offset {t.new_size} "
          f"({t.original_size - t.new_size} bytes removed)\n")
    for m in report.removed_segments:
        w(f"  {m.path}: segment {would}removed ({m.size} bytes)\n")
    for m in report.moved_snapshots:
        w(f"  {m.path}: snapshot {would}removed (covers records that go)\n")
    if report.dry_run:
        w("Nothing was changed. Run again with --yes to do it; everything removed is kept "
          f"under {os.path.join(report.datadir, tools.BACKUP_PREFIX)}<timestamp>/.\n")
    else:
        w(f"Done. Everything removed is kept in {report.backup_dir} "
          f"(see {report.manifest} to put it back).\n")


def run_repair(args: argparse.Namespace) -> int:
    try:
        report = tools.repair(args.datadir, args.truncate_after, dry_run=not args.yes)
    except tools.NotADataDir as e:
        error_in(args.datadir, str(e))
        return EXIT_USAGE
    except TxJournalError as e:
        _error(f"repair refused, nothing was changed: {e}")
        return EXIT_FAILED
    except OSError as e:
        _error(
            f"repair failed part-way: {e}. Fix the cause and run the same repair "
            f"again: it picks up where this one stopped, and the backup directory "
            f"keeps everything already removed"
        )
        return EXIT_FAILED
    print_repair(report, sys.stdout)
    if report.dry_run and not report.changes_nothing:
        return EXIT_FAILED
    return EXIT_OK
