"""
``twistd journal``: serve a schema's model over Perspective Broker.

::

    python -m txjournal adduser --users var/users admin rw
    twistd -n journal --app examples.bank:bank --users var/users

Every path given on the command line is made absolute while the options are
parsed, because ``twistd`` may change directory (``--rundir``) before the
service starts. The users file is read and checked at parse time too, so a
bad file stops ``twistd`` with a usage error instead of a traceback.

The PB endpoint is any server endpoint string. PB's login is an MD5
challenge-response and ``tcp:`` traffic is cleartext: keep the default
loopback interface, or use ``unix:/path/to/socket:mode=600`` or
``ssl:8789:privateKey=key.pem:certKey=cert.pem``. A relative ``unix:``
socket path is made absolute; the key and certificate files of ``ssl:`` are
read when the service is made, before ``twistd`` changes directory.

Nothing here imports the reactor at module level (``twistd -r`` installs
the chosen reactor after plugins are scanned).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage

from txjournal.errors import TxJournalError
from txjournal.journal.file import DEFAULT_SEGMENT_SIZE
from txjournal.schema import Schema
from txjournal.users import Users, load_users

log = Logger()

DEFAULT_PB = "tcp:8789:interface=127.0.0.1"

#: Endpoint types whose string parsers only record their arguments, so a
#: description can be checked at parse time without a reactor.
_CHECKABLE_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl", "unix"})

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def load_schema(spec: str, add_cwd: bool = True) -> Schema[Any]:
    """
    Import ``module:attribute`` (the attribute may be dotted) and check that
    it is a :class:`~txjournal.Schema`.

    The current directory is put on ``sys.path`` first (unless ``add_cwd``
    is false), as ``python -m`` does but ``twistd`` does not, so that
    ``--app myapp:schema`` finds ``./myapp.py``.

    :raises usage.UsageError: naming what went wrong.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise usage.UsageError(f"--app must look like 'package.module:attribute', got {spec!r}")
    cwd = os.getcwd()
    if add_cwd and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise usage.UsageError(
            f"--app {spec}: cannot import module {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise usage.UsageError(
                f"--app {spec}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not isinstance(obj, Schema):
        raise usage.UsageError(
            f"--app {spec}: {attr!r} is a {type(obj).__name__}, not a txjournal.Schema"
        )
    return obj


def _split_unescaped(text: str, sep: str, maxsplit: int = -1) -> list[str]:
    """
    Split at ``sep`` where it is not backslash-escaped, keeping the escapes
    (the endpoint string syntax of :func:`~twisted.internet.endpoints.serverFromString`).
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for c in chars:
        if c == "\\":
            current.append(c)
            current.append(next(chars, ""))
        elif c == sep and maxsplit != 0:
            parts.append("".join(current))
            current = []
            maxsplit -= 1
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for c in chars:
        out.append(next(chars, "") if c == "\\" else c)
    return "".join(out)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def absolute_endpoint(description: str) -> str:
    """
    Make the socket path of a ``unix:`` endpoint absolute; return other
    descriptions unchanged.

    ``unix:PATH[:options]`` and ``unix:address=PATH[:options]`` are both
    understood, with the endpoint syntax's backslash escapes.
    """
    parts = _split_unescaped(description, ":")
    if parts[0].strip().lower() != "unix":
        return description
    for i, part in enumerate(parts[1:], start=1):
        pieces = _split_unescaped(part, "=", 1)
        if len(pieces) == 1:  # the first positional argument is the address
            parts[i] = _escape(os.path.abspath(_unescape(part)))
            break
        if _unescape(pieces[0]) == "address":
            parts[i] = "address=" + _escape(os.path.abspath(_unescape(pieces[1])))
            break
    return ":".join(parts)


def _check_endpoint(description: str) -> None:
    """
    Check a server endpoint description at parse time.

    ``serverFromString`` only stores the reactor for the built-in types, so a
    placeholder lets a typo (or an unreadable ``ssl:`` key) be reported now,
    without importing the reactor, which ``twist --reactor`` has not
    installed yet at this point. For other types, only that a plugin
    offers the type is checked; the rest is checked when the service is made.
    """
    kind = description.split(":", 1)[0].strip()
    if kind.lower() not in _CHECKABLE_ENDPOINTS:
        from twisted.internet.interfaces import IStreamServerEndpointStringParser
        from twisted.plugin import getPlugins

        known = {p.prefix for p in getPlugins(IStreamServerEndpointStringParser)}
        if kind not in known:
            raise usage.UsageError(
                f"--pb {description!r}: unknown endpoint type {kind!r} (use tcp:, ssl: or "
                f"unix:, or one of {', '.join(sorted(known)) or 'no plugins'})"
            )
        return
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(object(), description)
    except Exception as e:
        raise usage.UsageError(f"--pb {description!r} is not a usable endpoint: {e}") from e


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{value!r} is not a non-negative number of seconds")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return number


def _exposed_tcp(description: str) -> bool:
    """Whether a ``tcp:`` endpoint listens on something other than loopback."""
    parts = _split_unescaped(description, ":")
    if parts[0].strip().lower() not in ("tcp", "tcp6"):
        return False
    for part in parts[1:]:
        pieces = _split_unescaped(part, "=", 1)
        if len(pieces) == 2 and _unescape(pieces[0]) == "interface":
            return _unescape(pieces[1]) not in _LOOPBACK
    return True


class Options(usage.Options):
    """Options of ``twistd journal``."""

    synopsis = "--app MODULE:ATTRIBUTE [--users FILE | --no-pb] [options]"

    longdesc = (
        "Keep a txjournal Schema's model in memory, durable through a command "
        "journal, and serve it over Perspective Broker. Create the users file "
        "with 'python -m txjournal adduser --users FILE NAME rw'. PB logs in with "
        "an MD5 challenge-response over cleartext TCP: listen on loopback (the "
        "default), a unix: socket, or ssl:."
    )

    optParameters = [
        ["app", None, None, "The schema to serve, as 'package.module:attribute' (required)."],
        ["datadir", None, None, "Data directory (journal, snapshots, LOCK). [default: ./var/<schema name>]"],
        ["pb", None, DEFAULT_PB, "PB server endpoint: tcp:, ssl: or unix: endpoint string."],
        ["journal", None, "", "Where the journal lives: sqlite:///path.db, postgresql://user@host/db, or file: (DATADIR/journal, the default)."],
        ["snapshots", None, "", "Where snapshots live: sqlite:///path.db, postgresql://user@host/db, or file: (DATADIR/snapshots, the default)."],
        ["replica-of", None, "", "Run as a read-only replica following the writer's PostgreSQL journal at this URL (postgresql://user@host/db): queries only, commands are refused."],
        ["poll-interval", None, 0.5, "With --replica-of: seconds between polls for new journal records (the writer's NOTIFY wakes the replica sooner).", _non_negative_float],
        ["promote-grace", None, None, "With --auto-promote: seconds without a live writer before this replica promotes itself. [default: 1]", _non_negative_float],
        ["users", None, None, "Users file of name:password:role lines, mode 0600 (required unless --no-pb)."],
        ["snapshot-interval", None, 300.0, "Seconds between snapshots; 0 disables them.", _non_negative_float],
        ["keep-snapshots", None, 3, "How many snapshots to keep.", _positive_int],
        ["snapshot-timeout", None, 3600.0, "Seconds after which a snapshot process (forked, or replaying with --snapshot-replay) is killed and its snapshot fails; 0 for no limit.", _non_negative_float],
        ["segment-size", None, DEFAULT_SEGMENT_SIZE, "Start a new journal segment after this many bytes.", _positive_int],
    ]

    optFlags = [
        ["no-pb", None, "Do not listen for PB clients (the journal only)."],
        ["no-snapshot-on-stop", None, "Do not write a snapshot on a clean shutdown."],
        ["no-inline-commit", None, "Never sync the journal on the reactor thread, even under light load (costs a lone caller two thread wake-ups per command)."],
        ["no-tune-gc", None, "Leave the garbage collector's settings alone (by default a writer freezes its loaded model out of the collector's full passes and raises its first threshold; a replica never does)."],
        ["snapshot-replay", None, "Write snapshots from a new process that loads the newest snapshot and replays the journal (the --app schema), so the reactor pauses only to start it (1-4 ms), not for a fork (20-25 ms per GiB of process here, 108 ms for a 4 GiB model); costs that process's CPU, time and memory. File journal and snapshots only."],
        ["take-over", None, "With a PostgreSQL --journal: if another writer is alive, fence it and end its session instead of refusing to start."],
        ["auto-promote", None, "With --replica-of: become the writer when no writer has held the journal's lease for --promote-grace seconds."],
        [
            "unsafe-no-sync",
            None,
            "UNSAFE: acknowledge commands before they are on stable storage; a crash "
            "or power failure loses acknowledged commands. For tests and benchmarks only.",
        ],
    ]

    #: Set by :meth:`postOptions`.
    schema: Schema[Any]
    users: Users | None

    def postOptions(self) -> None:
        if not self["app"]:
            raise usage.UsageError("--app MODULE:ATTRIBUTE is required")
        self.schema = load_schema(self["app"])
        self["schema"] = self.schema
        from txjournal import urls

        try:
            self["journal"] = urls.check(self["journal"] or "")
        except ValueError as e:
            raise usage.UsageError(f"--journal: {e}") from e
        try:
            self["snapshots"] = urls.check_snapshots(self["snapshots"] or "")
        except ValueError as e:
            raise usage.UsageError(f"--snapshots: {e}") from e
        if self["replica-of"]:
            try:
                urls.check(self["replica-of"])
            except ValueError as e:
                raise usage.UsageError(f"--replica-of: {e}") from e
            if not self["replica-of"].startswith(("postgresql://", "postgres://")):
                raise usage.UsageError(
                    f"--replica-of {urls.describe(self['replica-of'])!r}: a replica follows a "
                    f"PostgreSQL journal; give a postgresql://user@host/database URL"
                )
            if self["journal"]:
                raise usage.UsageError("--replica-of and --journal exclude each other: a replica has no journal of its own")
            if not self["poll-interval"] > 0:
                raise usage.UsageError("--poll-interval must be more than 0 seconds")
            if self["take-over"]:
                raise usage.UsageError("--take-over is for a writer; a replica takes over with 'python -m txjournal promote --take-over'")
        elif self["auto-promote"]:
            raise usage.UsageError("--auto-promote needs --replica-of: only a replica is promoted")
        if self["promote-grace"] is not None and not self["auto-promote"]:
            raise usage.UsageError("--promote-grace only means something with --auto-promote")
        if self["take-over"] and not self["journal"].startswith(("postgresql://", "postgres://")):
            raise usage.UsageError("--take-over needs a PostgreSQL --journal: only it has a lease to take over")
        if self["snapshot-replay"] and (self["replica-of"] or self["journal"] or self["snapshots"]):
            raise usage.UsageError(
                "--snapshot-replay is for a writer with the file journal and snapshots of "
                "its --datadir (not --journal, --snapshots or --replica-of)"
            )
        datadir = self["datadir"] or os.path.join("var", self.schema.name)
        self["datadir"] = os.path.abspath(datadir)
        self.users = None
        if self["users"]:
            self["users"] = os.path.abspath(self["users"])
            try:
                self.users = load_users(self["users"])
            except TxJournalError as e:
                raise usage.UsageError(str(e)) from e
        elif not self["no-pb"]:
            raise usage.UsageError(
                "--users FILE is required to serve PB (create one with 'python -m "
                "txjournal adduser --users FILE NAME rw'), or give --no-pb"
            )
        self["users_db"] = self.users
        if not self["no-pb"]:
            if self.users is not None and not len(self.users):
                raise usage.UsageError(f"users file {self['users']} lists no users")
            self["pb"] = absolute_endpoint(self["pb"])
            _check_endpoint(self["pb"])
        try:
            # Mirror FileJournal's own check so it fails here, not at start-up.
            from txjournal.journal.file import FileJournal

            FileJournal(os.path.join(self["datadir"], "journal"), segment_size=self["segment-size"])
        except ValueError as e:
            raise usage.UsageError(f"--segment-size: {e}") from e


def makeService(options: Options) -> MultiService:
    """
    The journal service first, then the PB listener.

    ``MultiService`` starts its children in order and the journal service
    replays synchronously in ``startService``, so the model is complete
    before PB serves anyone. The listener does open its port earlier (in
    ``privilegedStartService``); until the journal runs, logins fail with
    a clear "not running" error.
    """
    from twisted.application import strports

    from txjournal.pb import pb_factory
    from txjournal.service import JournalService

    top = MultiService()
    interval = options["snapshot-interval"]
    sync = not options["unsafe-no-sync"]
    from txjournal.urls import open_journal, open_snapshot_store

    journal: Any
    if options["replica-of"]:
        # A read-only follower of the writer's journal: no datadir lock, no
        # journal of its own; snapshots only if --snapshots names a store.
        from txjournal.replica import ReplicaService

        journal = ReplicaService(
            options["schema"],
            options["replica-of"],
            snapshots=open_snapshot_store(options["snapshots"]) if options["snapshots"] else None,
            poll_interval=options["poll-interval"],
            auto_promote=bool(options["auto-promote"]),
            promote_grace=1.0 if options["promote-grace"] is None else options["promote-grace"],
            # What the replica becomes if promoted: a writer like any other.
            writer_options={
                "sync": sync,
                "snapshot_interval": interval or None,
                "snapshot_on_stop": not options["no-snapshot-on-stop"],
                "keep_snapshots": options["keep-snapshots"],
            },
        )
    else:
        journal_backend = open_journal(options["journal"], sync=sync)
        if options["take-over"]:
            from txjournal.journal.postgres import PostgresJournal

            assert isinstance(journal_backend, PostgresJournal)
            journal_backend.take_over = True
        journal = JournalService(
            options["schema"],
            options["datadir"],
            journal=journal_backend,
            snapshots=open_snapshot_store(options["snapshots"]),
            sync=sync,
            snapshot_interval=interval or None,
            snapshot_on_stop=not options["no-snapshot-on-stop"],
            keep_snapshots=options["keep-snapshots"],
            segment_size=options["segment-size"],
            inline_commit=not options["no-inline-commit"],
            tune_gc=not options["no-tune-gc"],
            snapshot_app=options["app"] if options["snapshot-replay"] else None,
            snapshot_timeout=options["snapshot-timeout"] or None,
        )
    journal.setName("journal")
    journal.setServiceParent(top)
    if not sync:
        log.warn(
            "--unsafe-no-sync: commands are acknowledged before they are on stable "
            "storage; a crash or power failure loses acknowledged commands"
        )
    if not options["no-pb"]:
        users = options["users_db"]
        assert users is not None
        if _exposed_tcp(options["pb"]):
            log.warn(
                "PB listens on {endpoint}, beyond loopback, over cleartext TCP with an "
                "MD5 challenge-response login: prefer ssl: or unix: endpoints",
                endpoint=options["pb"],
            )
        listener = strports.service(options["pb"], pb_factory(journal, users))
        listener.setName("pb")
        listener.setServiceParent(top)
    return top
