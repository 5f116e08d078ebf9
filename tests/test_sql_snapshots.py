"""
The SQL snapshot stores (SQLite, and PostgreSQL on the real server, see
``pg_support``): damaged rows name where they are, and a JournalService
with the file journal and an SQL snapshot store restarts from its
snapshot, falling back to an older one when the newest row is damaged.
The stores' plain behaviour is in ``test_conformance``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pg_support import PG_DSN, require_pg, sql, unique_prefix

from examples.bank import Deposit, Transfer, bank
from txjournal import JournalService
from txjournal.errors import SnapshotError
from txjournal.snapshot.postgres import MAX_PAYLOAD, PostgresSnapshotStore
from txjournal.snapshot.sqlite import SQLiteSnapshotStore, SQLSnapshotStore
from txjournal.urls import check_snapshots, open_snapshot_store

pytestmark = pytest.mark.timeout(60)


@dataclass
class Backend:
    """``make`` gives a new store on the same storage; ``query`` runs SQL from another connection."""

    name: str
    make: Callable[[], SQLSnapshotStore]
    query: Callable[..., list[tuple[Any, ...]]]
    table: str


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made: list[SQLSnapshotStore] = []
    if request.param == "sqlite":
        path = str(tmp_path / "db" / "snapshots.sqlite")

        def make() -> SQLSnapshotStore:
            made.append(SQLiteSnapshotStore(path))
            return made[-1]

        def query(text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                return conn.execute(text.replace("%s", "?"), params).fetchall()
            finally:
                conn.close()

        yield Backend("sqlite", make, query, "txjournal_snapshots")
    else:
        require_pg()
        prefix = unique_prefix()

        def make() -> SQLSnapshotStore:
            made.append(PostgresSnapshotStore(PG_DSN, table_prefix=prefix))
            return made[-1]

        yield Backend("postgres", make, sql, f"{prefix}_snapshots")
    for store in made:
        store.close()
    if request.param == "postgres":
        sql(f"DROP TABLE IF EXISTS {prefix}_snapshots")


def damage(backend: Backend, seq: int) -> None:
    """Change one byte of a stored payload, as a disk or a hand might."""
    ((payload,),) = backend.query(f"SELECT payload FROM {backend.table} WHERE seq = %s", (seq,))
    payload = bytes(payload)
    bad = payload[:-1] + bytes([payload[-1] ^ 1])
    backend.query(f"UPDATE {backend.table} SET payload = %s WHERE seq = %s", (bad, seq))


def test_a_corrupted_payload_row_names_seq_and_location(backend: Backend) -> None:
    store = backend.make()
    store.save(3, b"three")
    store.save(8, b"eight" * 100)
    damage(backend, 8)
    again = backend.make()
    with pytest.raises(SnapshotError, match=r"snapshot 8 in .*" + backend.table + ".*SHA-256"):
        again.load(8)
    assert again.load(3) == b"three"
    # The model digest is read without the payload, so it is still there.
    assert len(again.model_digest(8)) == 32
    with pytest.raises(SnapshotError, match="snapshot 5 in .* does not exist"):
        again.model_digest(5)


def test_save_records_digests_and_time(backend: Backend) -> None:
    store = backend.make()
    digest = bytes(range(32))
    store.save(4, b"four", digest)
    assert backend.make().model_digest(4) == digest
    ((seq, created),) = backend.query(f"SELECT seq, created_ns FROM {backend.table}")
    assert seq == 4 and created > 0
    with pytest.raises(ValueError, match="32 bytes"):
        store.save(5, b"five", b"short")
    assert backend.make().list() == [4]


def test_sqlite_snapshot_file_is_private(tmp_path: Path) -> None:
    store = SQLiteSnapshotStore(str(tmp_path / "private" / "snaps.sqlite"))
    store.save(1, b"x")
    store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "private" / "snaps.sqlite").st_mode) == 0o600


def test_postgres_store_never_shows_the_password() -> None:
    store = PostgresSnapshotStore("postgresql://txj:sekret@127.0.0.1:1/test")
    assert "sekret" not in store.location and "127.0.0.1" in store.location
    with pytest.raises(SnapshotError) as info:
        store.load(1)  # cannot connect: the message still names where, without it
    assert "sekret" not in str(info.value) and "snapshot 1" in str(info.value)


def test_postgres_refuses_payloads_beyond_bytea() -> None:
    store = PostgresSnapshotStore(PG_DSN, table_prefix="never_created")

    class Huge(bytes):
        def __len__(self) -> int:
            return MAX_PAYLOAD

    with pytest.raises(SnapshotError, match="1 GiB"):
        store._check_payload(Huge(b""))


def test_snapshot_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_snapshots("") == "" and check_snapshots("file:") == ""
    assert open_snapshot_store("") is None and open_snapshot_store("file:") is None
    assert check_snapshots("sqlite:rel/s.db") == f"sqlite://{tmp_path}/rel/s.db"
    store = open_snapshot_store("sqlite:///abs/s.db")
    assert isinstance(store, SQLiteSnapshotStore) and store.path == "/abs/s.db"
    pg = open_snapshot_store("postgresql://txj:sekret@127.0.0.1/test")
    assert isinstance(pg, PostgresSnapshotStore) and "sekret" not in pg.location
    with pytest.raises(ValueError, match="snapshot store URL") as info:
        check_snapshots("mysql://u:sekret@h/db")
    assert "sekret" not in str(info.value)
    with pytest.raises(ValueError, match="host"):
        check_snapshots("sqlite://host/x.db")


# -- under a JournalService -----------------------------------------------------------


def service(tmp_path: Path, store: SQLSnapshotStore) -> JournalService[Any]:
    # The file journal in the data directory; snapshots only when asked.
    svc = JournalService(
        bank, str(tmp_path / "data"), snapshots=store, snapshot_on_stop=False, snapshot_interval=None
    )
    svc.startService()
    return svc


@pytest_twisted.ensureDeferred
async def test_service_restarts_from_an_sql_snapshot(backend: Backend, tmp_path: Path) -> None:
    svc = service(tmp_path, backend.make())
    for i in range(20):
        await svc.execute(Deposit(f"a{i % 4}", i + 1))
    await svc.execute(Transfer("a0", "a1", 3))
    seq = await svc.snapshot()
    assert seq == 21 and backend.make().list() == [21]
    await svc.execute(Deposit("late", 7))
    before = dict(svc.model.accounts)
    await svc.stopService()

    again = service(tmp_path, backend.make())
    assert again.loaded_snapshot_seq == 21
    assert again.replayed == 1
    assert again.model.accounts == before
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_a_damaged_newest_snapshot_falls_back_to_the_older(backend: Backend, tmp_path: Path) -> None:
    svc = service(tmp_path, backend.make())
    for i in range(5):
        await svc.execute(Deposit("alice", i + 1))
    older = await svc.snapshot()
    for i in range(4):
        await svc.execute(Deposit("bob", i + 1))
    newest = await svc.snapshot()
    await svc.execute(Deposit("carol", 2))
    before = dict(svc.model.accounts)
    await svc.stopService()
    assert (older, newest) == (5, 9)
    assert backend.make().list() == [9, 5]

    damage(backend, newest)
    again = service(tmp_path, backend.make())
    assert again.loaded_snapshot_seq == older
    assert again.replayed == 5
    assert again.model.accounts == before
    await again.stopService()
