"""
``python -m txjournal stats SOURCE``: journal statistics (see
:mod:`txjournal.stats` and ``docs/stats.rst``).

Exit status: 0 ok; 1 the journal cannot be read (damage, missing table,
database down); 2 a usage error (bad time, not a data directory, no
matplotlib for ``--chart``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import TextIO

from txjournal import stats as st
from txjournal.errors import TxJournalError
from txjournal.tools import NotADataDir, iso_time
from txjournal.tools_cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _error, print_report


def _time(text: str) -> int:
    try:
        return st.parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or time (e.g. 2026-01-02 or 2026-01-02T13:00:00Z)"
        ) from None


def configure_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="a data directory (file journal) or a journal URL (sqlite:///path.db, postgresql://...)",
    )
    parser.add_argument("--since", type=_time, metavar="ISO8601", help="only records at or after this time (UTC unless a zone is given)")
    parser.add_argument("--until", type=_time, metavar="ISO8601", help="only records before this time")
    parser.add_argument("--by", choices=st.GROUP_BYS, help="group by command/query name, user, hour or day (UTC); default: one total")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    parser.add_argument("--chart", metavar="PNG", help="also draw commands per hour into PNG (needs matplotlib)")
    parser.add_argument(
        "--table-prefix",
        default="txjournal",
        metavar="PREFIX",
        help="PostgreSQL journals: the tables' prefix (default: txjournal)",
    )


def print_stats(report: st.StatsReport, out: TextIO) -> None:
    """The human-readable form of a :class:`~txjournal.stats.StatsReport`."""
    w = out.write
    window = ""
    if report.since_ns is not None or report.until_ns is not None:
        since = iso_time(report.since_ns) if report.since_ns is not None else "the start"
        until = iso_time(report.until_ns) if report.until_ns is not None else "the end"
        window = f", from {since} until {until}"
    w(f"Journal {report.source}{window}\n")
    label = (report.by or "group").upper()
    w(f"{label:<24} {'COMMANDS':>9} {'QUERIES':>8} {'FAILED':>7}  {'FIRST (UTC)':<27}  "
      f"{'LAST (UTC)':<27} {'BYTES':>12} {'MEAN':>9}\n")
    rows = [*report.groups, report.total] if report.by else [report.total]
    for g in rows:
        d = g.to_dict()
        key = "-" if g.key is None else g.key
        if g is report.total and report.by:
            key = "TOTAL"
        other = f"  (+{g.other} records of unknown kinds)" if g.other else ""
        w(f"{key:<24} {g.commands:>9} {g.queries:>8} {'?':>7}  {d['first_time'] or '-':<27}  "
          f"{d['last_time'] or '-':<27} {g.total_bytes:>12} {g.mean_bytes or 0:>9.1f}{other}\n")
    w(f"\n{report.note}\n")


def run_stats(args: argparse.Namespace) -> int:
    if args.chart and importlib.util.find_spec("matplotlib") is None:
        _error("--chart needs matplotlib, which is not installed: pip install 'txjournal[bench]' "
               "(or pip install matplotlib)")
        return EXIT_USAGE
    try:
        report = st.stats(args.source, args.since, args.until, args.by, args.table_prefix)
        hourly = None
        if args.chart:
            hourly = report if args.by == "hour" else st.stats(
                args.source, args.since, args.until, "hour", args.table_prefix
            )
    except (NotADataDir, ValueError) as e:
        _error(str(e))
        return EXIT_USAGE
    except (TxJournalError, OSError) as e:
        _error(f"cannot read {args.source}: {e}")
        return EXIT_FAILED
    if not print_report(report, args.json, print_stats):
        return EXIT_OK
    if hourly is not None:
        try:
            st.chart(hourly, args.chart)
        except OSError as e:
            _error(f"cannot write the chart {args.chart}: {e}")
            return EXIT_FAILED
        print(f"Chart of commands per hour written to {args.chart}", file=sys.stderr)
    return EXIT_OK


#: ``(help, configure, run)`` of the subcommand, for :data:`txjournal.cli.SUBCOMMANDS`.
SUBCOMMAND = (
    "journal statistics by name, user, hour or day (no application code needed)",
    configure_stats,
    run_stats,
)
