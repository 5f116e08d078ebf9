"""
The ``check``, ``rebuild`` and ``replay`` subcommands of ``python -m txjournal``.

::

    python -m txjournal check   SOURCE --app MODULE:ATTR [--snapshots STORE] [--json]
    python -m txjournal rebuild DATADIR --app MODULE:ATTR
    python -m txjournal replay  SOURCE --app MODULE:ATTR [--snapshots STORE]
                                [--until SEQ | --until-time ISO8601]
                                [--from-scratch] [--query NAME [key=value ...] | --shell | --bench]

SOURCE is a data directory or an SQL journal's URL (``sqlite:///path.db``,
``postgresql://user@host/db``; ``--table-prefix`` for a PostgreSQL
journal's tables), read read-only: no table is created and a PostgreSQL
journal is never taken over. STORE is the snapshot store to compare with
or start from: a URL of the same forms or a directory of snapshot files
(default: ``DATADIR/snapshots``; an SQL journal has none unless named).
``rebuild`` writes, so it needs a data directory (its ``LOCK``).

Unlike ``verify``/``inspect``/``repair`` these need the application's code
(``--app``, imported as ``twistd journal --app`` does): they run its
commands. The work is in :mod:`txjournal.history`; this module parses,
shows progress on a terminal (stderr, only when it is a terminal) and
prints. Registered in :data:`txjournal.cli.SUBCOMMANDS`.

Exit status: 0 success (``check``: every snapshot matches); 1 ``check``
found a divergence or could not compare a snapshot, the history cannot be
replayed (unknown command, damage, pruned journal), a database cannot be
read, ``rebuild`` refused (the service runs), or a ``--query`` failed; 2
usage errors (a DATADIR that is not a directory, a URL that names no
journal or given to ``rebuild``, an ``--app`` that does not import, an
unknown query or bad arguments).
"""

from __future__ import annotations

import argparse
import code
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from twisted.python import usage

from txjournal import history
from txjournal.errors import TxJournalError
from txjournal.progress import ProgressBar
from txjournal.schema import Schema
from txjournal.tools import NotADataDir, iso_time, source_name
from txjournal.tools_cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    _error,
    _seq,
    add_source,
    describe_error,
    error_in,
    print_report,
)


def _time(text: str) -> int:
    try:
        return history.parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_common(parser: argparse.ArgumentParser, urls: bool = True) -> None:
    if urls:
        add_source(parser)
    else:
        parser.add_argument(
            "datadir", metavar="DATADIR", help="the data directory (holds journal/ and snapshots/)"
        )
    parser.add_argument(
        "--app",
        required=True,
        metavar="MODULE:ATTR",
        help="the application's Schema, e.g. examples.bank:bank (the current directory is on sys.path)",
    )


def _load(spec: str) -> Schema[Any] | None:
    from txjournal.tap import load_schema

    try:
        return load_schema(spec)
    except usage.UsageError as e:
        _error(str(e))
        return None


def _progress(label: str) -> ProgressBar:
    # On a terminal, a bar; into a pipe or a log, a line every few seconds
    # (short runs stay silent, long ones show they are alive).
    return ProgressBar(sys.stderr, label)


def _rate(commands: int, seconds: float) -> str:
    return f"{commands / seconds:,.0f}" if seconds > 0 else "-"


def _replay_failed(e: Exception, args: argparse.Namespace) -> int:
    """Print why a replay stopped; the exit status for it."""
    others = getattr(args, "snapshots", None)
    if isinstance(e, NotADataDir):
        error_in(args.datadir, str(e), others)
        return EXIT_USAGE
    if isinstance(e, history.UnreplayableRecord):
        _error(
            f"{e}. Nothing was changed. Register the command again (with an upgrade "
            f"for old versions), or declare its name retired with schema.retire("
            f"{e.name!r}) if skipping it is what you mean"
        )
        return EXIT_FAILED
    error_in(args.datadir, f"{source_name(args.datadir)}: {describe_error(e, args.datadir)}", others)
    return EXIT_FAILED


# -- check --------------------------------------------------------------------------


def configure_check(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")


def print_check(report: history.CheckReport, out: TextIO) -> None:
    """The human-readable form of a :class:`~txjournal.history.CheckReport`."""
    w = out.write
    stats = report.stats
    w(
        f"Replayed {report.datadir} from 1 to {report.last_seq} with the current code: "
        f"{stats.commands} commands ({stats.failed} raised, as they did live), "
        f"{stats.retired} retired and {stats.other} other records skipped, "
        f"{stats.seconds:.2f}s\n"
    )
    for s in report.snapshots:
        if s.matches:
            w(f"  snapshot {s.seq:>12}  matches\n")
        elif s.matches is None:
            w(f"  snapshot {s.seq:>12}  NOT CHECKED: {s.note}\n")
        else:
            w(f"  snapshot {s.seq:>12}  DIFFERS\n")
    divergence = report.divergence
    if divergence is not None:
        w(
            f"DIVERGED at snapshot {divergence.seq} ({divergence.path}): the current code "
            f"builds a different model from the same history (stored digest "
            f"{divergence.stored}, replayed {divergence.computed}). A command changed "
            f"behaviour for records up to {divergence.seq}; compare with the previous "
            f"snapshot to narrow it down, or use 'python -m txjournal replay --until'.\n"
        )
    elif report.snapshot_store is None:
        w("No snapshot store given (--snapshots): nothing to compare with; every record replayed.\n")
    elif not report.total_snapshots:
        w("No snapshots to compare with; every record replayed.\n")
    elif report.ok:
        w(f"OK: all {report.total_snapshots} snapshots match.\n")
    else:
        w(
            f"{report.matched} of {report.total_snapshots} snapshots match; "
            f"{len(report.unchecked)} could not be compared (see above).\n"
        )


def _with_progress(
    label: str, args: argparse.Namespace, run: Callable[[Schema[Any], Any], Any]
) -> Any:
    """
    Load ``--app``, run ``run(schema, progress_bar)`` under a progress bar;
    the report, or the exit status if the app or the replay failed.
    """
    schema = _load(args.app)
    if schema is None:
        return EXIT_USAGE
    bar = _progress(label)
    try:
        report = run(schema, bar)
    except (TxJournalError, OSError) as e:
        bar.finish()
        return _replay_failed(e, args)
    bar.finish()
    return report


def run_check(args: argparse.Namespace) -> int:
    report = _with_progress(
        "check", args, lambda schema, bar: history.check(
            schema, args.datadir, progress=bar,
            snapshots=args.snapshots, table_prefix=args.table_prefix,
        ),
    )
    if isinstance(report, int):
        return report
    print_report(report, args.json, print_check)
    return EXIT_OK if report.ok else EXIT_FAILED


# -- rebuild ------------------------------------------------------------------------


def configure_rebuild(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, urls=False)


def print_rebuild(report: history.RebuildReport, out: TextIO) -> None:
    w = out.write
    stats = report.stats
    w(
        f"Replayed {stats.commands} commands in {stats.seconds:.2f}s "
        f"({_rate(stats.commands, stats.seconds)} commands/s; {stats.failed} raised, as "
        f"they did live; {stats.retired} retired and {stats.other} other records skipped).\n"
    )
    if report.backup_dir is not None:
        w(f"Moved {len(report.moved)} old snapshot(s) to {report.backup_dir}/.\n")
    w(f"Wrote {report.snapshot} ({report.size} bytes) covering sequence number {report.seq}; "
      f"model digest {report.digest}.\n")
    if report.torn_tail is not None:
        w(f"Note: the journal ends in a torn write ({report.torn_tail}); start-up cuts it off.\n")


def run_rebuild(args: argparse.Namespace) -> int:
    report = _with_progress(
        "rebuild", args, lambda schema, bar: history.rebuild(schema, args.datadir, progress=bar)
    )
    if isinstance(report, int):
        return report
    print_rebuild(report, sys.stdout)
    return EXIT_OK


# -- replay -------------------------------------------------------------------------


def configure_replay(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    point = parser.add_mutually_exclusive_group()
    point.add_argument("--until", type=_seq, metavar="SEQ", help="the last sequence number to include")
    point.add_argument(
        "--until-time",
        type=_time,
        metavar="ISO8601",
        help="include records logged at or before this time (UTC unless it names a zone)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="replay from sequence number 1 instead of starting at a snapshot",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--query",
        nargs="+",
        metavar=("NAME", "key=value"),
        help="run a named query on the model and print its result as JSON "
        "(arguments as for 'python -m txjournal query')",
    )
    action.add_argument(
        "--shell", action="store_true", help="an interactive Python shell with the model as 'model'"
    )
    action.add_argument(
        "--bench",
        action="store_true",
        help="time every command and print replay speed per command name "
        "(replays from 1: snapshots would skip the commands to time)",
    )


def _query_arguments(schema: Schema[Any], name: str, words: list[str]) -> dict[str, Any]:
    """Turn ``key=value`` words into the query's arguments (raises ``UsageProblem``)."""
    from txjournal import cli

    described = schema.describe()["queries"].get(name)
    types = described["arguments"] if described else {}
    return cli.coerce_arguments(words, types)


def print_bench(stats: history.ReplayStats, out: TextIO) -> None:
    """The per-command table of a timed replay."""
    w = out.write
    w(f"{'COMMAND':<24} {'COUNT':>10} {'FAILED':>8} {'SECONDS':>10} {'COMMANDS/S':>12} {'µS/COMMAND':>11}\n")
    rows = sorted(stats.timings.values(), key=lambda t: (-t.seconds, t.name))
    total = history.CommandTiming("TOTAL")
    for t in rows:
        total.count += t.count
        total.failed += t.failed
        total.seconds += t.seconds
    for t in [*rows, total]:
        rate = f"{t.per_second:,.0f}" if t.per_second is not None else "-"
        micro = f"{t.microseconds:.1f}" if t.microseconds is not None else "-"
        w(f"{t.name:<24} {t.count:>10,} {t.failed:>8,} {t.seconds:>10.4f} {rate:>12} {micro:>11}\n")
    w(
        f"Replay took {stats.seconds:.3f}s in all for {stats.records:,} records "
        f"({_rate(stats.commands, stats.seconds)} commands/s, reading and decoding included); "
        f"{stats.retired} retired and {stats.other} other records skipped.\n"
    )


def _describe_point(point: history.PointInTime, args: argparse.Namespace) -> str:
    when = f" (logged {iso_time(point.time_ns)})" if point.time_ns is not None else ""
    start = f"snapshot {point.snapshot}" if point.snapshot else "an empty model"
    text = (
        f"Model as of sequence number {point.seq}{when}: {start} + "
        f"{point.stats.commands} commands replayed in {point.stats.seconds:.3f}s"
    )
    if point.journal_end and args.until is not None and point.seq < args.until:
        text += f"; the journal ends at {point.seq}, before {args.until}"
    return text


def run_replay(args: argparse.Namespace) -> int:
    from txjournal import cli

    schema = _load(args.app)
    if schema is None:
        return EXIT_USAGE
    kwargs: dict[str, Any] = {}
    if args.query:
        name, *words = args.query
        try:
            schema.query_type(name)
            kwargs = _query_arguments(schema, name, words)
        except (TxJournalError, cli.UsageProblem) as e:
            _error(str(e))
            return EXIT_USAGE
    bar = _progress("replay")
    try:
        point = history.replay_to(
            schema,
            args.datadir,
            until_seq=args.until,
            until_time_ns=args.until_time,
            use_snapshots=not (args.from_scratch or args.bench),
            timing=args.bench,
            progress=bar,
            snapshots=args.snapshots,
            table_prefix=args.table_prefix,
        )
    except (TxJournalError, OSError) as e:
        bar.finish()
        return _replay_failed(e, args)
    bar.finish()
    for seq, reason in point.skipped_snapshots:
        print(f"txjournal: note: not starting from snapshot {seq}: {reason}", file=sys.stderr)
    summary = _describe_point(point, args)
    if args.query:
        print(summary, file=sys.stderr)
        try:
            result = schema.bind_query(name, kwargs)(point.model)
        except TxJournalError as e:
            _error(str(e))
            return EXIT_USAGE
        except Exception as e:
            _error(f"query {name!r} raised {type(e).__name__}: {e}")
            return EXIT_FAILED
        try:
            text = json.dumps(cli.to_json(result))
        except (TypeError, ValueError) as e:
            _error(f"the result cannot be shown as JSON: {e}: {result!r}")
            return EXIT_FAILED
        print(text)
        return EXIT_OK
    if args.bench:
        print(summary, file=sys.stderr)
        print_bench(point.stats, sys.stdout)
        return EXIT_OK
    if args.shell:
        banner = (
            f"{summary}.\n'model' is the model, 'schema' the schema "
            f"(schema.bind_query(name, kwargs)(model) runs a query). Changes stay in "
            f"this process: nothing is written. Ctrl-D leaves."
        )
        code.interact(
            banner=banner,
            local={"model": point.model, "schema": schema, "point": point},
            exitmsg="",
        )
        return EXIT_OK
    print(summary + ".")
    return EXIT_OK
