"""
Journal backends named by URL, as operators give them on the command line::

    (none) or file:          the file journal in DATADIR/journal (default)
    sqlite:///abs/path.db    an SQLite journal (sqlite:relative/path.db also works)
    postgresql://user@host/db   a PostgreSQL journal (any libpq URL; postgres:// too)

The LOCK stays in the data directory; so do snapshots, unless
:func:`open_snapshot_store` names a store by a URL of the same forms
(chosen independently of the journal's). Passwords in URLs are
never logged: use :func:`describe` for messages.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from txjournal.interfaces import IJournal, ISnapshotStore

_SQLITE = "sqlite:"
_POSTGRES = ("postgresql://", "postgres://")


def check(url: str) -> str:
    """
    Validate a journal URL and return it with any SQLite path made absolute
    (``twistd`` may change directory before the service starts).
    """
    if url in ("", "file:"):
        return ""
    if url.startswith(_SQLITE):
        path = url[len(_SQLITE):]
        if path.startswith("///"):
            path = path[2:]
        elif path.startswith("//"):
            raise ValueError(f"sqlite URL {url!r} names a host; use sqlite:///absolute/path.db")
        if not path:
            raise ValueError("sqlite URL names no file; use sqlite:///absolute/path.db")
        return "sqlite://" + os.path.abspath(path)
    if url.startswith(_POSTGRES):
        try:
            from psycopg.conninfo import conninfo_to_dict

            conninfo_to_dict(url)
        except ImportError:
            pass  # psycopg not installed: opening the journal says so
        except Exception:
            # psycopg's own message quotes the URL, password included.
            raise ValueError(
                f"{hide_password(url)} is not a valid PostgreSQL URL (check its "
                f"percent-encoding, brackets and port)"
            ) from None
        return url
    raise ValueError(
        f"unknown journal URL {describe(url)!r}: use sqlite:///path.db, "
        f"postgresql://user@host/database, or file: (the default)"
    )


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return parts._replace(netloc=f"{user}@{netloc[-1]}").geturl()


def open_journal(url: str, sync: bool = True) -> IJournal | None:
    """The journal a (checked) URL names; ``None`` for the default file journal."""
    url = check(url)
    if not url:
        return None
    journal: IJournal
    if url.startswith(_SQLITE):
        from txjournal.journal.sqlite import SQLiteJournal

        journal = SQLiteJournal(url[len("sqlite://"):], sync=sync)
    else:
        from txjournal.journal.postgres import PostgresJournal

        journal = PostgresJournal(url, sync=sync)
    return journal


def check_snapshots(url: str) -> str:
    """
    Validate a snapshot-store URL (the same forms as a journal's) and return
    it with any SQLite path made absolute; ``""`` for the default files.
    """
    try:
        return check(url)
    except ValueError as e:
        if url.startswith((_SQLITE, *_POSTGRES)):
            raise
        raise ValueError(
            f"unknown snapshot store URL {describe(url)!r}: use sqlite:///path.db, "
            f"postgresql://user@host/database, or file: (DATADIR/snapshots, the default)"
        ) from e


def open_snapshot_store(url: str) -> ISnapshotStore | None:
    """
    The snapshot store a URL names; ``None`` for the default files in
    ``DATADIR/snapshots``. Independent of the journal's URL: any journal
    works with any store (the store opens a connection of its own).
    """
    url = check_snapshots(url)
    if not url:
        return None
    store: ISnapshotStore
    if url.startswith(_SQLITE):
        from txjournal.snapshot.sqlite import SQLiteSnapshotStore

        store = SQLiteSnapshotStore(url[len("sqlite://"):])
    else:
        from txjournal.snapshot.postgres import PostgresSnapshotStore

        store = PostgresSnapshotStore(url)
    return store


_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(source: str) -> bool:
    """
    Whether a tool's SOURCE argument is meant as a URL rather than a data
    directory: ``sqlite:...``, ``file:...``, or anything that starts
    ``scheme://`` (an unknown scheme then gets :func:`check`'s clear error
    instead of "not a directory").
    """
    return source.startswith((_SQLITE, "file:")) or bool(_SCHEME_RE.match(source))


def hide_password(url: str) -> str:
    """
    Like :func:`describe`, and also hides a ``password`` query parameter
    (``postgresql://host/db?password=...``, which libpq accepts too). Never
    raises: a URL too broken to parse is not shown at all.
    """
    try:
        text = describe(url)
        parts = urlsplit(text)
        if parts.query and "password" in parts.query.lower():
            query = [
                (k, "***" if k.lower() == "password" else v)
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
            ]
            text = parts._replace(query=urlencode(query, safe="*")).geturl()
    except ValueError:
        return f"{url.split(':', 1)[0]}:(a URL that does not parse; not shown)"
    return text
