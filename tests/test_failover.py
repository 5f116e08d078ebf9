"""
The writer's lease, NOTIFY-driven replicas and promotion, against the real
PostgreSQL server (see ``pg_support``). No sleeps: waits are on Deferreds
(``when_applied``, ``promote``) bounded by ``addTimeout``.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import pytest_twisted
from conftest import until
from pg_support import PG_DSN, Cluster, scratch_database, sql
from twisted.internet import defer, reactor

from examples.bank import Deposit
from txjournal.errors import JournalWriteError, NotRunning, SnapshotError, WriterActive
from txjournal.journal.postgres import PostgresJournal, lease_holders_sql, lease_key
from txjournal.journal.sql import Fenced
from txjournal.replica import ReadOnlyReplica

pytestmark = pytest.mark.timeout(60)

WAIT = 20.0  # seconds any single wait may take before the test fails


def within(d: defer.Deferred[Any], seconds: float = WAIT) -> defer.Deferred[Any]:
    return d.addTimeout(seconds, reactor)


def epoch(prefix: str) -> int:
    return int(sql(f"SELECT value FROM {prefix}_meta WHERE key = 'writer_epoch'")[0][0])  # type: ignore[call-overload]


def stored_seqs(prefix: str) -> list[int]:
    return [int(r[0]) for r in sql(f"SELECT seq FROM {prefix}_records ORDER BY seq")]  # type: ignore[call-overload]


# -- the lease -----------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_is_alive(prefix: str) -> None:
    first = PostgresJournal(PG_DSN, table_prefix=prefix)
    first.open()
    list(first.replay(1))
    try:
        second = PostgresJournal(PG_DSN, table_prefix=prefix, lease_timeout=0.2)
        with pytest.raises(WriterActive) as caught:
            second.open()
        second.close()
        # The message names the live writer's session, so an operator can find it.
        assert f"server pid {first.backend_pid}" in str(caught.value)
        assert "txjournal writer" in str(caught.value) and "--take-over" in str(caught.value)
        assert epoch(prefix) == first.epoch  # the refused writer fenced nobody
    finally:
        first.close()
    # Once the first is gone (its session ended), the lease is free.
    third = PostgresJournal(PG_DSN, table_prefix=prefix, lease_timeout=5)
    third.open()
    assert third.epoch == first.epoch + 1
    third.close()


def test_a_terminated_writer_frees_the_lease_and_fails_its_next_batch(prefix: str) -> None:
    from test_sql_journals import encoded

    first = PostgresJournal(PG_DSN, table_prefix=prefix)
    first.open()
    list(first.replay(1))
    first.append(encoded(first, 1, 2), 1, 2)
    sql("SELECT pg_terminate_backend(%s)", (first.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        first.append(encoded(first, 3, 1), 3, 3)
    assert first.backend_pid is None  # the failed journal let its connection go
    second = PostgresJournal(PG_DSN, table_prefix=prefix, lease_timeout=5)
    second.open()
    assert [r.seq for r in second.replay(1)] == [1, 2]
    second.close()
    assert stored_seqs(prefix) == [1, 2]


def test_a_fenced_writer_lets_its_lease_go(prefix: str) -> None:
    from test_sql_journals import encoded

    old = PostgresJournal(PG_DSN, table_prefix=prefix)
    old.open()
    list(old.replay(1))
    sql(f"UPDATE {prefix}_meta SET value = '999' WHERE key = 'writer_epoch'")  # as a take-over would
    with pytest.raises(Fenced, match="epoch 999"):
        old.append(encoded(old, 1, 3), 1, 3)
    assert stored_seqs(prefix) == []
    assert sql(*lease_holders_sql(lease_key(old.journal_id))) == []


def test_each_append_notifies_with_its_last_sequence_number(prefix: str) -> None:
    from test_sql_journals import encoded

    journal = PostgresJournal(PG_DSN, table_prefix=prefix)
    journal.open()
    list(journal.replay(1))
    with psycopg.connect(PG_DSN, autocommit=True) as listener:
        listener.execute(f"LISTEN {journal.channel}")
        journal.append(encoded(journal, 1, 3), 1, 3)
        journal.append(encoded(journal, 4, 1), 4, 4)
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
    journal.close()
    assert got == ["3", "4"]


# -- replicas woken by NOTIFY ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_replica_wakes_on_notify_long_before_its_next_poll(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica(poll_interval=3600)  # one poll at start, then only NOTIFY
    await within(replica.when_applied(1))
    for i in range(5):
        await writer.execute(Deposit("alice", 1))
        await within(replica.when_applied(2 + i))
    assert replica.model.accounts == {"alice": 6}
    assert replica.wakeups >= 5


@pytest_twisted.ensureDeferred
async def test_replica_without_listen_relies_on_polling(cluster: Cluster) -> None:
    writer = cluster.writer()
    replica = cluster.replica(listen=False, poll_interval=0.05)
    await writer.execute(Deposit("alice", 1))
    await within(replica.when_applied(1))
    assert replica.wakeups == 0


@pytest_twisted.ensureDeferred
async def test_a_lost_listening_connection_falls_back_to_polling_and_listens_again(
    cluster: Cluster,
) -> None:
    writer = cluster.writer()
    replica = cluster.replica(poll_interval=0.05)
    await writer.execute(Deposit("alice", 1))
    await within(replica.when_applied(1))
    # The LISTEN connection opens in a thread; the first poll may apply seq 1 before it.
    await until(lambda: replica._listener is not None)
    listener = replica._listener
    assert listener is not None
    sql("SELECT pg_terminate_backend(%s)", (listener.conn.info.backend_pid,))
    await writer.execute(Deposit("alice", 1))
    await within(replica.when_applied(2))  # polling carries on
    # A later poll listens again on a new connection.
    await until(lambda: replica._listener is not None and replica._listener is not listener)
    woken = replica.wakeups
    await writer.execute(Deposit("alice", 1))
    await within(replica.when_applied(3))
    assert replica.model.accounts == {"alice": 3}
    await until(lambda: replica.wakeups > woken)  # the new connection delivers NOTIFYs


# -- promotion --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_promote_after_the_writer_stopped_keeps_every_command(cluster: Cluster) -> None:
    writer = cluster.writer()
    for i in range(10):
        await writer.execute(Deposit(f"c{i % 3}", i + 1))
    replica = cluster.replica(snapshots=cluster.snapshots)
    await within(replica.when_applied(10))
    accounts = dict(writer.model.accounts)
    await writer.stopService()
    writer_epoch = epoch(cluster.prefix)

    await within(replica.promote())
    assert replica.promoted and replica.promotion_seconds is not None
    assert epoch(cluster.prefix) == writer_epoch + 1
    assert replica.model.accounts == accounts
    assert await replica.execute(Deposit("c0", 100)) == accounts["c0"] + 100
    assert await replica.execute_named("deposit", {"account": "new", "amount": 7}) == 7
    assert stored_seqs(cluster.prefix) == list(range(1, 13))
    assert replica.lag()["seq_behind"] == 0
    # The promoted writer takes snapshots in the replica's store.
    assert await replica.snapshot() == 12
    assert cluster.snapshots.list()[0] == 12
    # The old writer cannot come back as a writer while the new one lives.
    with pytest.raises(WriterActive):
        PostgresJournal(PG_DSN, table_prefix=cluster.prefix, lease_timeout=0.2).open()


@pytest_twisted.ensureDeferred
async def test_promote_catches_up_records_the_replica_had_not_applied(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    await within(replica.when_applied(1))
    await replica.pause_following()
    for _ in range(7):
        await writer.execute(Deposit("alice", 1))
    await writer.stopService()
    assert replica.applied_seq == 1
    await within(replica.promote())
    assert replica.model.accounts == {"alice": 8}
    assert await replica.execute(Deposit("alice", 1)) == 9
    assert stored_seqs(cluster.prefix) == list(range(1, 10))


@pytest_twisted.ensureDeferred
async def test_promote_is_refused_while_a_writer_is_alive_and_the_replica_goes_on(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica(lease_timeout=0.2)
    await within(replica.when_applied(1))
    before = epoch(cluster.prefix)
    with pytest.raises(WriterActive, match="another writer holds the lease"):
        await within(replica.promote())
    assert not replica.promoted and replica.following
    assert epoch(cluster.prefix) == before  # nobody was fenced
    await writer.execute(Deposit("alice", 1))  # the writer is unharmed
    await within(replica.when_applied(2))  # and the replica still follows
    with pytest.raises(ReadOnlyReplica):
        await replica.execute(Deposit("alice", 1))


@pytest_twisted.ensureDeferred
async def test_promote_with_take_over_under_load_loses_no_acknowledged_command(
    cluster: Cluster,
) -> None:
    writer = cluster.writer()
    replica = cluster.replica()
    acked: dict[str, int] = {}
    refused: list[BaseException] = []
    reached: defer.Deferred[None] = defer.Deferred()

    async def caller(account: str) -> None:
        for _ in range(5000):
            try:
                acked[account] = await writer.execute(Deposit(account, 1))
            except JournalWriteError as e:
                refused.append(e)
                return
            if sum(acked.values()) >= 300 and not reached.called:
                reached.callback(None)

    callers = [defer.ensureDeferred(caller(f"c{i}")) for i in range(10)]
    await within(reached)
    await within(replica.promote(take_over=True))
    await within(defer.gatherResults(callers))
    assert len(refused) == 10  # every caller saw the old writer fail-stop
    for account, balance in acked.items():
        assert replica.model.accounts[account] >= balance, account
    # Nothing invented: the journal holds exactly what the model shows.
    assert stored_seqs(cluster.prefix) == list(range(1, sum(replica.model.accounts.values()) + 1))
    assert await replica.execute(Deposit("after", 1)) == 1
    # The old writer fails fast and stays failed.
    with pytest.raises(JournalWriteError):
        await writer.execute(Deposit("late", 1))
    assert "late" not in replica.model.accounts


@pytest_twisted.ensureDeferred
async def test_auto_promotion_elects_exactly_one_replica(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 5))
    a = cluster.replica(auto_promote=True, promote_grace=0.1, lease_timeout=1)
    b = cluster.replica(auto_promote=True, promote_grace=0.1, lease_timeout=1)
    await within(a.when_applied(1))
    await within(b.when_applied(1))
    assert not a.promoted and not b.promoted  # the writer is alive
    await writer.stopService()
    first = await within(defer.DeferredList([a.when_promoted(), b.when_promoted()], fireOnOneCallback=True))
    winner, other = (a, b) if first[1] == 0 else (b, a)
    assert winner.promoted
    assert await winner.execute(Deposit("alice", 1)) == 6
    await within(other.when_applied(2))  # the loser follows the new writer
    assert not other.promoted and other.model.accounts == {"alice": 6}
    with pytest.raises(ReadOnlyReplica):
        await other.execute(Deposit("alice", 1))


@pytest_twisted.ensureDeferred
async def test_promoted_without_a_snapshot_store_refuses_snapshots_clearly(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    await within(replica.when_applied(1))
    await writer.stopService()
    await within(replica.promote())
    with pytest.raises(SnapshotError, match="no snapshot store"):
        await replica.snapshot()
    assert await replica.execute(Deposit("alice", 1)) == 2


@pytest_twisted.ensureDeferred
async def test_promote_of_a_stopped_replica_fails(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    await replica.stopService()
    with pytest.raises(NotRunning):
        await replica.promote()


# -- over Perspective Broker -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pb_status_and_promote_need_the_admin_role(cluster: Cluster) -> None:
    from test_pb import Harness, assert_remote, remote_failure

    from txjournal.pb import PermissionDenied, RemoteArgumentError, RemoteJournalError

    writer = cluster.writer()
    await writer.execute(Deposit("alice", 10))
    replica = cluster.replica(lease_timeout=0.2)
    await within(replica.when_applied(1))
    on_writer, on_replica = Harness(writer), Harness(replica)  # type: ignore[arg-type]
    await on_writer.start()
    await on_replica.start()
    try:
        reader = await on_replica.login("reader", "reader-pw")
        status = await reader.callRemote("status")
        assert status["role"] == "replica" and status["last_seq"] == 1
        assert status["lag"]["seq_behind"] == 0
        for name, password in (("reader", "reader-pw"), ("alice", "alice-pw")):
            user = await on_replica.login(name, password)
            e = await remote_failure(user.callRemote("promote", False))
            assert_remote(e, PermissionDenied, "admin role")
        ops = await on_replica.login("ops", "ops-pw")
        e = await remote_failure(ops.callRemote("promote", "yes"))
        assert_remote(e, RemoteArgumentError, "take_over")
        e = await remote_failure(ops.callRemote("promote", False))  # the writer lives
        assert_remote(e, RemoteJournalError, "another writer holds the lease")
        assert not replica.promoted

        ops_on_writer = await on_writer.login("ops", "ops-pw")
        e = await remote_failure(ops_on_writer.callRemote("promote", False))
        assert_remote(e, RemoteArgumentError, "writer already")
        assert (await ops_on_writer.callRemote("status"))["role"] == "writer"

        await writer.stopService()
        status = await ops.callRemote("promote", False)
        assert status == {"role": "writer", "last_seq": 1, "lag": None, "error": None}
        alice = await on_replica.login("alice", "alice-pw")
        assert await alice.callRemote("execute", "deposit", {"account": "alice", "amount": 1}) == 11
        assert (await alice.callRemote("status"))["last_seq"] == 2
    finally:
        await on_replica.close()
        await on_writer.close()


@pytest_twisted.ensureDeferred
async def test_python_m_txjournal_promote_turns_a_replica_into_the_writer(
    cluster: Cluster, tmp_path: Any
) -> None:
    import json
    import os
    import sys

    from test_pb import Harness
    from twisted.internet.utils import getProcessOutputAndValue

    writer = cluster.writer()
    await writer.execute(Deposit("alice", 3))
    replica = cluster.replica()
    await within(replica.when_applied(1))
    harness = Harness(replica)  # type: ignore[arg-type]
    await harness.start()
    (tmp_path / "ops.pw").write_text("ops-pw\n")

    async def cli(*argv: str) -> tuple[int, Any, str]:
        subcommand, *rest = argv
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "txjournal", subcommand, "--connect", f"tcp:127.0.0.1:{harness.port.getHost().port}",
             "--user", "ops", "--password-file", str(tmp_path / "ops.pw"), *rest],
            env=dict(os.environ),
        )
        return code, json.loads(out) if out.strip() else None, err.decode()

    try:
        code, status, err = await cli("status")
        assert code == 0 and status["role"] == "replica", err
        await writer.stopService()
        code, status, err = await cli("promote")
        assert code == 0 and status == {"role": "writer", "last_seq": 1, "lag": None, "error": None}, err
        assert await replica.execute(Deposit("alice", 1)) == 4
    finally:
        await harness.close()


# -- found by review ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_failure_after_the_catch_up_never_makes_the_replica_follow_again(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Once the catch-up replay has moved the model, this process is the
    writer whatever fails next: following again would apply those records
    a second time.
    """
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica(snapshots=cluster.snapshots)
    await within(replica.when_applied(1))
    await replica.pause_following()
    for _ in range(5):
        await writer.execute(Deposit("alice", 1))
    await writer.stopService()
    real_list = cluster.snapshots.list
    calls = []

    def list_then_fail() -> list[int]:
        calls.append(1)
        if len(calls) == 2:  # the first call is the writer's start, the second after it
            raise OSError("the snapshot store went away")
        return real_list()

    monkeypatch.setattr(cluster.snapshots, "list", list_then_fail)
    await within(replica.promote())
    assert replica.promoted and not replica.following
    assert replica.model.accounts == {"alice": 6}  # not 11
    assert await replica.execute(Deposit("alice", 1)) == 7
    assert stored_seqs(cluster.prefix) == list(range(1, 8))


@pytest_twisted.ensureDeferred
async def test_stopping_during_a_promotion_leaves_no_writer_behind(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    await within(replica.when_applied(1))
    await writer.stopService()
    promoting = replica.promote()
    stopped = replica.stopService()  # before the lease was taken
    with pytest.raises(NotRunning, match="stopped while it was being promoted"):
        await within(promoting)
    await within(stopped)
    assert not replica.promoted
    # The lease is free: a new writer starts at once.
    again = PostgresJournal(PG_DSN, table_prefix=cluster.prefix, lease_timeout=0.5)
    again.open()
    again.close()


@pytest_twisted.ensureDeferred
async def test_replicas_that_lose_the_auto_promotion_race_keep_following_at_once(
    cluster: Cluster,
) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 5))
    # A long lease_timeout: losers must not wait for it.
    replicas = [cluster.replica(auto_promote=True, promote_grace=0.1, lease_timeout=30) for _ in range(3)]
    for r in replicas:
        await within(r.when_applied(1))
    await writer.stopService()
    await within(defer.DeferredList([r.when_promoted() for r in replicas], fireOnOneCallback=True))
    winner = next(r for r in replicas if r.promoted)
    assert await winner.execute(Deposit("alice", 1)) == 6
    for r in replicas:
        if r is not winner:
            assert await within(r.when_applied(2), 5.0) == 2
            assert not r.promoted


def test_take_over_ignores_writers_of_other_databases_on_the_same_server(prefix: str) -> None:
    """A copied database keeps the journal id (and so the lease key) of its original."""
    from test_sql_journals import encoded

    original = PostgresJournal(PG_DSN, table_prefix=prefix)
    original.open()
    list(original.replay(1))
    original.append(encoded(original, 1, 1), 1, 1)
    try:
        # As a restored backup would be (CREATE DATABASE ... TEMPLATE needs
        # the template idle): the same tables and rows in another database.
        with scratch_database("txj_copy") as copy_url:
            with psycopg.connect(PG_DSN, autocommit=True) as src, psycopg.connect(copy_url, autocommit=True) as dst:
                dst.execute(
                    f'CREATE TABLE {prefix}_records (seq bigint PRIMARY KEY, time_ns bigint NOT NULL, '
                    f'kind integer NOT NULL, name text NOT NULL, version integer NOT NULL, "user" text, '
                    f'fields jsonb, record bytea NOT NULL)'
                )
                dst.execute(f"CREATE TABLE {prefix}_meta (key text PRIMARY KEY, value text NOT NULL)")
                rows = src.execute(
                    f'SELECT seq, time_ns, kind, name, version, "user", fields::text, record FROM {prefix}_records'
                ).fetchall()
                for row in rows:
                    dst.execute(f"INSERT INTO {prefix}_records VALUES (%s,%s,%s,%s,%s,%s,%s::jsonb,%s)", row)
                for row in src.execute(f"SELECT * FROM {prefix}_meta").fetchall():
                    dst.execute(f"INSERT INTO {prefix}_meta VALUES (%s,%s)", row)
            clone = PostgresJournal(copy_url, table_prefix=prefix, take_over=True, lease_timeout=2)
            clone.open()  # same journal id, same lease key, another database
            assert clone.journal_id == original.journal_id
            assert clone.lease_holders() == []
            clone.close()
        # The original's writer was not touched.
        original.append(encoded(original, 2, 1), 2, 2)
        assert stored_seqs(prefix) == [1, 2]
    finally:
        original.close()


@pytest_twisted.ensureDeferred
async def test_status_reports_a_fenced_writer_as_failed(cluster: Cluster) -> None:
    from test_pb import Harness

    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    harness = Harness(writer)
    await harness.start()
    try:
        reader = await harness.login("reader", "reader-pw")
        assert (await reader.callRemote("status"))["role"] == "writer"
        cluster.writer(take_over=True)  # fences the first
        with pytest.raises(JournalWriteError):
            await writer.execute(Deposit("alice", 1))
        status = await reader.callRemote("status")
        assert status["role"] == "failed" and "took over" in status["error"]
        assert "Do not restart this one with --take-over" in status["error"]
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_promotion_fetches_its_catch_up_off_the_reactor_thread(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    await within(replica.when_applied(1))
    await replica.pause_following()
    for _ in range(30):
        await writer.execute(Deposit("alice", 1))
    await writer.stopService()
    queries_on_reactor: list[str] = []
    real_execute = PostgresJournal._execute

    def watched(self: PostgresJournal, sql_text: str, params: Any = ()) -> Any:
        if threading.current_thread() is threading.main_thread():
            queries_on_reactor.append(sql_text)
        return real_execute(self, sql_text, params)

    monkeypatch.setattr(PostgresJournal, "_execute", watched)
    await within(replica.promote())
    assert replica.model.accounts == {"alice": 31}
    assert not [q for q in queries_on_reactor if "_records" in q], queries_on_reactor
    assert await replica.execute(Deposit("alice", 1)) == 32


def test_a_take_over_not_permitted_to_end_the_writers_session_fences_it_and_says_so(
    prefix: str,
) -> None:
    """
    pg_terminate_backend raises (not returns false) for a role that may not
    end the writer's session: the take-over has fenced the writer already,
    waits for the lease, and says what happened; the fenced writer lets the
    lease go at its next batch, and then the take-over succeeds.
    """
    import secrets

    from test_sql_journals import encoded

    from txjournal.journal.sql import Fenced

    writer = PostgresJournal(PG_DSN, table_prefix=prefix)  # a superuser's session
    writer.open()
    list(writer.replay(1))
    writer.append(encoded(writer, 1, 1), 1, 1)
    role = f"txj_plain_{secrets.token_hex(4)}"
    sql(f"CREATE ROLE {role} LOGIN")
    try:
        sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {prefix}_records, {prefix}_meta TO {role}")
        sql(f"GRANT CREATE ON SCHEMA public TO {role}")  # the writer's CREATE TABLE IF NOT EXISTS
        plain_dsn = psycopg.conninfo.make_conninfo(PG_DSN, user=role)
        taking = PostgresJournal(plain_dsn, table_prefix=prefix, take_over=True, lease_timeout=0.5)
        with pytest.raises(WriterActive, match="it is fenced already"):
            taking.open()
        taking.close()
        with pytest.raises(Fenced):  # its next batch, which frees the lease
            writer.append(encoded(writer, 2, 1), 2, 2)
        taking = PostgresJournal(plain_dsn, table_prefix=prefix, take_over=True, lease_timeout=5)
        taking.open()
        assert [r.seq for r in taking.replay(1)] == [1]
        taking.append(encoded(taking, 2, 1), 2, 2)
        taking.close()
        assert stored_seqs(prefix) == [1, 2]
    finally:
        writer.close()
        sql(f"DROP OWNED BY {role}")
        sql(f"DROP ROLE {role}")
