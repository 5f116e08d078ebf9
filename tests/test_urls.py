"""Journal backends chosen by URL, from the API and from ``twistd journal``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.python import usage

from examples.bank import Deposit
from txjournal import urls
from txjournal.journal.postgres import PostgresJournal
from txjournal.journal.sqlite import SQLiteJournal
from txjournal.service import JournalService
from txjournal.tap import Options, makeService


def test_check_and_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert urls.check("") == "" and urls.check("file:") == ""
    assert urls.open_journal("") is None
    assert urls.check("sqlite:rel/j.db") == f"sqlite://{tmp_path}/rel/j.db"
    assert urls.check("sqlite:///abs/j.db") == "sqlite:///abs/j.db"
    journal = urls.open_journal("sqlite:///abs/j.db")
    assert isinstance(journal, SQLiteJournal) and journal.path == "/abs/j.db"
    pg = urls.open_journal("postgresql://txj:sekret@127.0.0.1/test")
    assert isinstance(pg, PostgresJournal) and "sekret" not in pg.location
    for bad in ("mysql://x/y", "sqlite:", "sqlite://host/x.db", "/just/a/path"):
        with pytest.raises(ValueError):
            urls.check(bad)


def test_describe_hides_passwords() -> None:
    assert urls.describe("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert urls.describe("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ValueError) as info:
        urls.check("redis://u:hunter2@h/0")
    assert "hunter2" not in str(info.value)


def _options(tmp_path: Path, *extra: str) -> Options:
    options = Options()
    options.parseOptions(
        ["--app", "examples.bank:bank", "--datadir", str(tmp_path / "d"), "--no-pb", *extra]
    )
    return options


def test_twistd_option_makes_paths_absolute_and_refuses_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    options = _options(tmp_path, "--journal", "sqlite:bank.db")
    assert options["journal"] == f"sqlite://{tmp_path}/bank.db"
    with pytest.raises(usage.UsageError, match="--journal: unknown journal URL"):
        _options(tmp_path, "--journal", "mongodb://x")


@pytest.mark.parametrize("option", ["--journal", "--snapshots", "--replica-of"])
@pytest.mark.parametrize(
    "url", ["postgresql://u:p%ZZsecret@127.0.0.1/db", "postgresql://u:p%ZZsecret@[127.0.0.1/db"]
)
def test_a_malformed_postgresql_url_is_refused_without_its_password(
    tmp_path: Path, option: str, url: str
) -> None:
    with pytest.raises(usage.UsageError, match="is not a valid PostgreSQL URL") as info:
        _options(tmp_path, option, url)
    assert "secret" not in str(info.value) and option in str(info.value)


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_twistd_service_on_an_sqlite_journal(tmp_path: Path) -> None:
    db = tmp_path / "bank.db"
    top = makeService(_options(tmp_path, "--journal", f"sqlite://{db}"))
    top.startService()
    svc: Any = top.getServiceNamed("journal")
    assert isinstance(svc, JournalService)
    assert await svc.execute(Deposit("a", 4)) == 4
    await top.stopService()
    assert os.path.exists(db)
    assert not os.path.exists(tmp_path / "d" / "journal")  # the journal is in SQLite
    again = makeService(_options(tmp_path, "--journal", f"sqlite://{db}"))
    again.startService()
    assert again.getServiceNamed("journal").query("balance", account="a") == 4  # type: ignore[attr-defined]
    await again.stopService()
