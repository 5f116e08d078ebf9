"""
Write the golden data directory that ``tests/test_golden.py`` reads.

::

    .venv/bin/python tests/golden/make_golden.py [DEST]   # default tests/golden/v1

The files under ``tests/golden/v1/`` were written by this script and are
committed: the test reads *them*, not a fresh run, so a change to the
on-disk format, to replay or to the bank's commands that would stop
today's data directories from loading the same way fails the test. Never
regenerate them to make that test pass; a new format gets a new directory
(``v2``) next to this one, and the old one stays, read by the new code.

Everything is fixed so that a run is reproducible: the journal id (the salt
of every checksum), the logged times (a ``task.Clock``), the commands, and
the synchronous runner. The directory holds, across two segments: every
bank command type, two rejected commands (an overdraft and reopening an
account: both part of history), records with and without a user name, a
query audit record, and one snapshot in the middle, so that start-up loads
the snapshot and replays the rest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet.defer import Deferred, maybeDeferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from examples.bank import Bank, Deposit, OpenAccount, Transfer, Withdraw, bank  # noqa: E402
from txjournal import JournalService  # noqa: E402
from txjournal.journal.file import FileJournal  # noqa: E402

#: The journal id of the golden journal (random in real life).
JOURNAL_ID = 0x60_1D_E4_00_C0_FF_EE_01
#: Logged time of the first command; each later one is 2.5 s later.
START = 1_750_000_000.0
STEP = 2.5
SEGMENT_SIZE = 360
#: Snapshot after this many records.
SNAPSHOT_AFTER = 6

#: (command or ("query", name, kwargs), user)
SCRIPT: list[tuple[Any, str | None]] = [
    (OpenAccount("alice"), "admin"),
    (Deposit("alice", 100), "admin"),
    (Deposit("bob", 50), None),
    (Withdraw("alice", 30), None),
    (Transfer("alice", "bob", 20), "teller"),
    (Withdraw("bob", 500), "teller"),           # rejected: overdraft
    (OpenAccount("carol"), None),
    (OpenAccount("alice"), "admin"),            # rejected: exists
    (Transfer("bob", "carol", 10), None),
    (("query", "balance", {"account": "bob"}), "auditor"),
    (Deposit("carol", 5), "teller"),
]


class _FixedJournal(FileJournal):
    """A file journal whose id is :data:`JOURNAL_ID` instead of a random one."""

    def open(self) -> None:
        super().open()
        if not self.segments:
            self.journal_id = JOURNAL_ID
            self.salt = JOURNAL_ID.to_bytes(8, "little")


def _sync(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def make(dest: Path) -> Bank:
    """Write the golden data directory into ``dest`` (which must not exist); the final model."""
    dest.mkdir(mode=0o700)
    clock = Clock()
    clock.advance(START - STEP)
    svc: JournalService[Bank] = JournalService(
        bank,
        str(dest),
        journal=_FixedJournal(str(dest / "journal"), segment_size=SEGMENT_SIZE),
        runner=_sync,
        reactor=clock,
        snapshot_interval=None,
        snapshot_on_stop=False,
        audit_queries=True,  # the one query below becomes a query audit record
    )
    svc.startService()
    outcomes: list[Any] = []
    for i, (step, user) in enumerate(SCRIPT, 1):
        clock.advance(STEP)
        if isinstance(step, tuple):
            _kind, name, kwargs = step
            d = svc.query_as(user, name, kwargs)
        else:
            d = svc.execute(step, user)
        d.addBoth(outcomes.append)
        assert d.called, "a synchronous runner finishes at once"
        if i == SNAPSHOT_AFTER:
            snap = svc.snapshot()
            assert snap.called
    model = svc.model
    stopped = svc.stopService()
    assert stopped.called
    os.unlink(dest / "LOCK")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", nargs="?", default=str(HERE / "v1"))
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    if dest.exists():
        if not args.force:
            parser.error(f"{dest} exists; the committed golden files are not regenerated lightly (--force)")
        shutil.rmtree(dest)
    model = make(dest)
    for path in sorted(dest.rglob("*")):
        print(path.relative_to(dest), path.stat().st_size if path.is_file() else "")
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
