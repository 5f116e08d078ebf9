"""
JournalService and Engine on task.Clock with in-memory backends and a writer
that the test releases by hand: fast, deterministic, no threads.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ManualRunner, sync_runner
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from examples.bank import (
    Bank,
    Deposit,
    InsufficientFunds,
    Transfer,
    UnknownAccount,
    Withdraw,
    bank,
)
from txjournal import (
    CommandEncodeError,
    Context,
    InvalidArguments,
    JournalCorrupt,
    JournalFailed,
    JournalOverloaded,
    JournalService,
    JournalWriteError,
    NotRunning,
    Schema,
    SnapshotError,
    UnknownCommand,
    UnknownQuery,
)
from txjournal.interfaces import IJournal, IJournalService, ISnapshotStore
from txjournal.journal.memory import MemoryJournal, MemorySnapshotStore


def outcome(d: Deferred[Any]) -> Any:
    """The result a Deferred has already fired with (a Failure on error)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def make(
    journal: MemoryJournal | None = None,
    store: MemorySnapshotStore | None = None,
    runner: Any = sync_runner,
    clock: Clock | None = None,
    schema: Schema[Any] = bank,
    **kw: Any,
) -> JournalService[Any]:
    svc = JournalService(
        schema,
        journal=journal if journal is not None else MemoryJournal(),
        snapshots=store if store is not None else MemorySnapshotStore(),
        reactor=clock or Clock(),
        runner=runner,
        **kw,
    )
    svc.startService()
    return svc


def test_interfaces() -> None:
    svc = make()
    assert verifyObject(IJournalService, svc)
    assert verifyObject(IJournal, MemoryJournal())
    assert verifyObject(ISnapshotStore, MemorySnapshotStore())


def test_write_ahead_and_group_commit(manual_runner: ManualRunner) -> None:
    journal = MemoryJournal()
    svc = make(journal, runner=manual_runner)
    d1 = svc.execute(Deposit("alice", 10))
    d2 = svc.execute(Deposit("alice", 5))
    d3 = svc.execute(Deposit("bob", 1))
    # One flush in flight holding the first command; the other two wait.
    assert len(manual_runner.calls) == 1
    assert manual_runner.calls[0][1][1:] == (1, 1)
    # Nothing is applied or acknowledged before the journal append returns.
    assert svc.query("accounts") == {}
    assert not d1.called
    manual_runner.release()
    assert outcome(d1) == 10
    assert svc.query("accounts") == {"alice": 10}
    assert not d2.called
    # The two that arrived during the flush form one batch.
    assert len(manual_runner.calls) == 1
    assert manual_runner.calls[0][1][1:] == (2, 3)
    manual_runner.release()
    assert (outcome(d2), outcome(d3)) == (15, 1)
    assert journal.appends == 2


def test_next_batch_is_written_before_previous_is_applied(manual_runner: ManualRunner) -> None:
    applied_while: list[int] = []
    svc = make(runner=manual_runner)
    svc.execute(Deposit("a", 1)).addCallback(lambda _: applied_while.append(len(manual_runner.calls)))
    manual_runner.release()
    assert applied_while == [0]
    d = svc.execute(Deposit("a", 1))
    svc.execute(Deposit("a", 1))
    manual_runner.release()
    assert outcome(d) == 2


def test_failed_command_errbacks_keeps_record_and_replays_same() -> None:
    journal, store = MemoryJournal(), MemorySnapshotStore()
    svc = make(journal, store, snapshot_on_stop=False)
    assert outcome(svc.execute(Deposit("alice", 10))) == 10
    f = outcome(svc.execute(Withdraw("alice", 50)))
    assert isinstance(f, Failure) and f.check(InsufficientFunds)
    assert svc.query("balance", account="alice") == 10
    # The service keeps serving after a failed command.
    assert outcome(svc.execute(Withdraw("alice", 3))) == 7
    assert journal.next_seq == 4
    outcome(svc.stopService())
    again = make(journal, store)
    assert again.replayed == 3
    assert again.query("accounts") == {"alice": 7}


def test_unencodable_command_writes_nothing_and_consumes_no_seq() -> None:
    schema: Schema[dict[str, Any]] = Schema("t", model=dict)

    @schema.command("put")
    @dataclass
    class Put:
        key: str
        value: Any

        def execute(self, model: dict[str, Any], ctx: Context) -> int:
            model[self.key] = self.value
            return ctx.seq

    journal = MemoryJournal()
    svc = make(journal, schema=schema)
    f = outcome(svc.execute(Put("k", object())))
    assert f.check(CommandEncodeError)
    assert "put" in str(f.value)
    assert journal.appends == 0
    assert outcome(svc.execute(Put("k", [1, 2]))) == 1


def test_unregistered_command_is_rejected() -> None:
    @dataclass
    class Stray:
        def execute(self, model: Any, ctx: Context) -> None: ...

    journal = MemoryJournal()
    svc = make(journal)
    f = outcome(svc.execute(Stray()))
    assert f.check(UnknownCommand)
    assert "Stray" in str(f.value)
    assert journal.appends == 0


def test_live_command_is_the_decoded_copy() -> None:
    schema: Schema[list[Any]] = Schema("t", model=list)

    @schema.command("extend")
    @dataclass
    class Extend:
        items: list[int] = field(default_factory=list)

        def execute(self, model: list[Any], ctx: Context) -> None:
            model.append(self.items)

    runner = ManualRunner()
    journal = MemoryJournal()
    svc = make(journal, runner=runner, schema=schema)
    cmd = Extend([1, 2])
    svc.execute(cmd)
    cmd.items.append(99)  # the caller mutates its object after execute()
    runner.release()
    assert svc.model == [[1, 2]]
    replayed = make(journal, schema=schema)
    assert replayed.model == svc.model


def test_write_failure_fail_stops(manual_runner: ManualRunner) -> None:
    journal = MemoryJournal()
    svc = make(journal, runner=manual_runner)
    assert not svc.execute(Deposit("alice", 10)).called
    manual_runner.release()
    journal.fail_next = OSError(errno.EIO, "Input/output error")
    d1 = svc.execute(Deposit("alice", 1))
    d2 = svc.execute(Deposit("alice", 2))  # waits behind the failing batch
    manual_runner.release()
    f1, f2 = outcome(d1), outcome(d2)
    assert f1.check(JournalWriteError) and "Input/output error" in str(f1.value)
    assert "restart" in str(f1.value)
    assert f2.check(JournalFailed)
    assert svc.query("balance", account="alice") == 10
    f3 = outcome(svc.execute(Deposit("alice", 1)))
    assert f3.check(JournalFailed)
    # A refused command was certainly not written, and the message says
    # so once, naming the error that stopped the journal.
    for f in (f2, f3):
        text = str(f.value)
        assert text.startswith("not written:") and "unknown" not in text
        assert "Input/output error" in text and text.count("restart") == 1
    assert svc.engine.pending == 0
    assert manual_runner.calls == []
    # A restart recovers exactly what reached the journal.
    outcome(svc.stopService())
    assert make(journal).query("accounts") == {"alice": 10}


def test_full_disk_is_named(manual_runner: ManualRunner) -> None:
    journal = MemoryJournal()
    svc = make(journal, runner=manual_runner)
    journal.fail_next = OSError(errno.ENOSPC, "No space left on device")
    d = svc.execute(Deposit("a", 1))
    manual_runner.release()
    assert "disk is full" in str(outcome(d).value)


def test_backpressure(manual_runner: ManualRunner) -> None:
    svc = make(runner=manual_runner, max_pending=2)
    d1, d2 = svc.execute(Deposit("a", 1)), svc.execute(Deposit("a", 1))
    f = outcome(svc.execute(Deposit("a", 1)))
    assert f.check(JournalOverloaded)
    assert svc.engine.pending == 2
    manual_runner.release_all()
    assert svc.engine.pending == 0
    assert (outcome(d1), outcome(d2)) == (1, 2)
    d3 = svc.execute(Deposit("a", 1))
    manual_runner.release()
    assert outcome(d3) == 3


clock_schema: Schema[list[Any]] = Schema("ctx", model=list)


@clock_schema.command("draw")
@dataclass
class Draw:
    def execute(self, model: list[Any], ctx: Context) -> tuple[int, float, float]:
        entry = (ctx.seq, ctx.time, ctx.random.random())
        model.append(entry)
        return entry


def test_context_is_logged_and_replayed_identically() -> None:
    clock = Clock()
    clock.advance(1000.5)
    journal = MemoryJournal()
    svc = make(journal, clock=clock, schema=clock_schema)
    first = outcome(svc.execute(Draw()))
    clock.advance(2)
    second = outcome(svc.execute(Draw()))
    assert first[:2] == (1, 1000.5) and second[:2] == (2, 1002.5)
    assert first[2] != second[2]
    # Replay at a different time sees the logged time and the same draws.
    later = Clock()
    later.advance(99999)
    replayed = make(journal, clock=later, schema=clock_schema)
    assert replayed.model == svc.model


def test_logged_time_never_goes_backwards() -> None:
    clock = Clock()
    clock.advance(500)
    svc = make(clock=clock, schema=clock_schema)
    outcome(svc.execute(Draw()))
    clock.rightNow = 100.0  # the wall clock steps back
    assert outcome(svc.execute(Draw()))[1] == 500.0


def test_snapshot_then_restart_replays_only_later_commands() -> None:
    journal, store = MemoryJournal(), MemorySnapshotStore()
    svc = make(journal, store, snapshot_on_stop=False)
    for _ in range(5):
        svc.execute(Deposit("a", 1))
    assert outcome(svc.snapshot()) == 5
    svc.execute(Deposit("a", 1))
    outcome(svc.stopService())
    again = make(journal, store)
    assert again.loaded_snapshot_seq == 5
    assert again.replayed == 1
    assert again.query("balance", account="a") == 6


def test_snapshot_schedule_and_on_stop_and_keep() -> None:
    clock = Clock()
    store = MemorySnapshotStore()
    svc = make(store=store, clock=clock, snapshot_interval=10, keep_snapshots=2)
    svc.execute(Deposit("a", 1))
    clock.advance(10)
    assert store.list() == [1]
    clock.advance(10)  # nothing new: no new snapshot
    assert store.list() == [1]
    svc.execute(Deposit("a", 1))
    clock.advance(10)
    svc.execute(Deposit("a", 1))
    clock.advance(10)
    assert store.list() == [3, 2]
    svc.execute(Deposit("a", 1))
    outcome(svc.stopService())
    assert store.list() == [4, 3]


def test_no_scheduled_snapshots_after_a_write_error() -> None:
    clock = Clock()
    journal, store = MemoryJournal(), MemorySnapshotStore()
    svc = make(journal, store, clock=clock, snapshot_interval=10)
    svc.execute(Deposit("a", 1))
    journal.fail_next = OSError(errno.ENOSPC, "No space left on device")
    assert outcome(svc.execute(Deposit("a", 2))).check(JournalWriteError)
    clock.advance(30)
    assert store.list() == []
    # Asked for, one is still taken: the model holds what was applied.
    assert outcome(svc.snapshot()) == 1
    assert store.list() == [1]


def test_no_snapshot_on_stop_when_disabled() -> None:
    store = MemorySnapshotStore()
    svc = make(store=store, snapshot_on_stop=False)
    svc.execute(Deposit("a", 1))
    outcome(svc.stopService())
    assert store.list() == []


def test_bad_snapshot_falls_back_to_older_one() -> None:
    journal, store = MemoryJournal(), MemorySnapshotStore()
    svc = make(journal, store, snapshot_on_stop=False)
    svc.execute(Deposit("a", 1))
    outcome(svc.snapshot())
    svc.execute(Deposit("a", 2))
    outcome(svc.snapshot())
    svc.execute(Deposit("a", 4))
    outcome(svc.stopService())
    store.snapshots[2] = b"garbage, not a pickle"
    again = make(journal, store)
    assert again.loaded_snapshot_seq == 1
    assert again.replayed == 2
    assert again.query("balance", account="a") == 7
    outcome(again.stopService())
    store.snapshots = {1: b"\x80\x05garbage", 3: b""}
    third = make(journal, store)
    assert third.loaded_snapshot_seq == 0
    assert third.query("balance", account="a") == 7


def test_stop_waits_for_flush_in_flight(manual_runner: ManualRunner) -> None:
    svc = make(runner=manual_runner, snapshot_on_stop=False)
    d = svc.execute(Deposit("a", 1))
    stopped: list[object] = []
    svc.stopService().addBoth(stopped.append)
    assert stopped == []
    assert outcome(svc.execute(Deposit("a", 1))).check(NotRunning)
    manual_runner.release()
    assert outcome(d) == 1
    assert stopped == [None]


def test_when_ready() -> None:
    svc = JournalService(
        bank, journal=MemoryJournal(), snapshots=MemorySnapshotStore(),
        reactor=Clock(), runner=sync_runner,
    )
    ready = svc.when_ready()
    assert not ready.called
    assert outcome(svc.execute(Deposit("a", 1))).check(NotRunning)
    svc.startService()
    assert outcome(ready) is None
    assert outcome(svc.when_ready()) is None


def test_when_ready_errbacks_on_failed_start() -> None:
    journal = MemoryJournal()
    journal.data.append(b"\x00" * 40)  # damage followed by nothing: not a record at all
    journal.data.append(b"garbage")
    svc = JournalService(
        bank, journal=journal, snapshots=MemorySnapshotStore(), reactor=Clock(), runner=sync_runner
    )
    ready = svc.when_ready()
    with pytest.raises(JournalCorrupt):
        svc.startService()
    assert isinstance(outcome(ready), Failure)
    assert isinstance(outcome(svc.when_ready()), Failure)
    assert not svc.running


def test_queries() -> None:
    svc = make()
    svc.execute(Deposit("a", 3))
    assert svc.query("balance", account="a") == 3
    assert svc.query(lambda m: sorted(m.accounts)) == ["a"]
    assert svc.query("total") == 3
    with pytest.raises(UnknownQuery, match="nope"):
        svc.query("nope")
    with pytest.raises(InvalidArguments, match="missing"):
        svc.query("balance")
    with pytest.raises(InvalidArguments, match="no argument 'acct'"):
        svc.query("balance", acct="a")
    with pytest.raises(InvalidArguments, match="expected str"):
        svc.query("balance", account=3)


def test_execute_named_validates() -> None:
    svc = make()
    assert outcome(svc.execute_named("deposit", {"account": "a", "amount": 2})) == 2
    cases = [
        ("nope", {}, UnknownCommand, "no command named 'nope'"),
        ("deposit", {"account": "a"}, InvalidArguments, "missing argument"),
        ("deposit", {"account": "a", "amount": 1, "x": 1}, InvalidArguments, "no argument 'x'"),
        ("deposit", {"account": "a", "amount": "ten"}, InvalidArguments, "expected int"),
        ("deposit", {"account": "a", "amount": True}, InvalidArguments, "expected int"),
        ("transfer", {"source": ["a"], "target": "b", "amount": 1}, InvalidArguments, "expected str"),
    ]
    for name, kwargs, exc, message in cases:
        f = outcome(svc.execute_named(name, kwargs))
        assert f.check(exc), (name, kwargs, f)
        assert message in str(f.value)
    assert svc.query("accounts") == {"a": 2}


def test_transfer_conserves_and_refuses_overdraft() -> None:
    svc = make()
    svc.execute(Deposit("a", 10))
    svc.execute(Deposit("b", 0 + 1))
    assert outcome(svc.execute(Transfer("a", "b", 4))) == {"a": 6, "b": 5}
    assert outcome(svc.execute(Transfer("a", "b", 7))).check(InsufficientFunds)
    assert svc.query("total") == 11


def test_model_factory_is_used_fresh() -> None:
    a, b = make(), make()
    a.execute(Deposit("x", 1))
    assert b.query("accounts") == {}
    assert isinstance(a.model, Bank)


def test_snapshots_store_the_model_digest() -> None:
    import hashlib

    store = MemorySnapshotStore()
    svc = make(store=store)
    svc.execute(Deposit("a", 1))
    assert outcome(svc.snapshot()) == 1
    assert store.model_digest(1) == hashlib.sha256(store.load(1)).digest()
    assert store.model_digest(1) == bank.model_digest(svc.model)

    canonical: Schema[Bank] = Schema(
        "canon", model=Bank, digest=lambda m: repr(sorted(m.accounts.items())).encode()
    )
    canonical.command("deposit")(Deposit)
    store2 = MemorySnapshotStore()
    svc2 = make(store=store2, schema=canonical)
    svc2.execute(Deposit("a", 1))
    outcome(svc2.snapshot())
    assert store2.model_digest(1) == hashlib.sha256(b"[('a', 1)]").digest()


def _records(journal: MemoryJournal) -> list[Any]:
    from txjournal import record as rec

    return [r for _o, r in rec.iter_records(b"".join(journal.data), 0, journal.salt)]


def test_audited_queries_are_journaled_and_skipped_by_replay(manual_runner: ManualRunner) -> None:
    import msgpack

    from txjournal.record import KIND_COMMAND, KIND_QUERY

    journal = MemoryJournal()
    svc = make(journal, runner=manual_runner, audit_queries=True)
    svc.execute(Deposit("a", 5))
    manual_runner.release()
    d = svc.query_as("bob", "balance", {"account": "a"})
    assert not d.called  # answers only once its audit record is durable
    manual_runner.release()
    assert outcome(d) == 5
    assert svc.query("total") == 5  # in-process: the value at once, recorded behind it
    manual_runner.release()
    with pytest.raises(UnknownAccount):
        svc.query("balance", account="nobody")  # raised: revealed nothing, not recorded
    assert manual_runner.calls == []
    records = _records(journal)
    assert [(r.seq, r.kind, r.name, r.user) for r in records] == [
        (1, KIND_COMMAND, "deposit", None),
        (2, KIND_QUERY, "balance", "bob"),
        (3, KIND_QUERY, "total", None),
    ]
    assert msgpack.unpackb(records[1].fields) == {"account": "a"}
    # Replay skips audit records; sequence numbers stay dense.
    again = make(journal)
    assert again.query("accounts") == {"a": 5}
    assert again.replayed == 3
    assert outcome(again.execute(Deposit("a", 1))) == 6
    assert _records(journal)[-1].seq == 4


def test_per_query_audit_flag() -> None:
    schema: Schema[Bank] = Schema("audit", model=Bank)
    schema.command("deposit")(Deposit)

    @schema.query("secret", audit=True)
    def secret(model: Bank) -> int:
        return len(model.accounts)

    @schema.query("public")
    def public(model: Bank) -> int:
        return 0

    journal = MemoryJournal()
    svc = make(journal, schema=schema)
    assert outcome(svc.query_as("eve", "public", {})) == 0
    assert outcome(svc.query_as("eve", "secret", {})) == 0
    assert [(r.name, r.user) for r in _records(journal)] == [("secret", "eve")]


def test_audit_refused_after_write_failure(manual_runner: ManualRunner) -> None:
    journal = MemoryJournal()
    svc = make(journal, runner=manual_runner, audit_queries=True)
    journal.fail_next = OSError(errno.EIO, "Input/output error")
    svc.execute(Deposit("a", 1))
    manual_runner.release()
    assert outcome(svc.query_as("bob", "total", {})).check(JournalFailed)


def test_command_too_big_for_a_record_is_refused_before_writing() -> None:
    from txjournal import record as rec

    schema: Schema[list[Any]] = Schema("blobs", model=list)

    @schema.command("put")
    @dataclass
    class Put:
        blob: bytes

        def execute(self, model: list[Any], ctx: Context) -> int:
            model.append(len(self.blob))
            return len(self.blob)

    journal = MemoryJournal()
    svc = make(journal, schema=schema)
    f = outcome(svc.execute(Put(b"x" * rec.MAX_RECORD_SIZE)))
    assert f.check(CommandEncodeError) and "over the limit" in str(f.value)
    assert journal.appends == 0 and svc.model == []
    assert outcome(svc.execute(Put(b"x"))) == 1


def test_logged_time_never_goes_backwards_across_a_clean_restart() -> None:
    journal, store = MemoryJournal(), MemorySnapshotStore()
    clock = Clock()
    clock.advance(5000)
    svc = make(journal, store, clock=clock, schema=clock_schema)
    outcome(svc.execute(Draw()))
    outcome(svc.stopService())  # the snapshot on stop covers the last record
    earlier = Clock()
    earlier.advance(10)  # the wall clock is now behind the journal
    again = make(journal, store, clock=earlier, schema=clock_schema)
    assert again.replayed == 0
    assert outcome(again.execute(Draw()))[1] == 5000.0


def test_records_of_an_unknown_kind_stop_replay() -> None:
    from txjournal import RecoveryError
    from txjournal import record as rec

    journal = MemoryJournal()
    svc = make(journal)
    outcome(svc.execute(Deposit("a", 1)))
    journal.data.append(rec.encode_record(journal.salt, 2, 10, b"future", 1, b"\x80", kind=9))
    journal.next_seq = 3
    with pytest.raises(RecoveryError, match="record 2 .* kind 9, unknown to this version"):
        make(journal)


@pytest.fixture
def gc_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Put the process's garbage-collector settings back after the test."""
    import gc

    import txjournal.service

    # A tuning of its own: services earlier tests left running keep theirs.
    monkeypatch.setattr(txjournal.service, "_gc_tuning", txjournal.service._GCTuning())
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_gc_freezes_the_loaded_model_and_raises_the_first_threshold(gc_settings: Any) -> None:
    import gc

    from txjournal.service import GC_THRESHOLD0

    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    svc = make()
    assert gc.get_threshold() == (GC_THRESHOLD0, 10, 10)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    # The model is among the frozen objects: full passes leave it out.
    gc.collect()
    model = svc.model
    assert all(model is not o for o in gc.get_objects(2))
    svc.stopService()
    # Stopped, it hands them back: garbage cycles among them can go now.
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert any(model is o for o in gc.get_objects(2))


def test_tune_gc_off_leaves_the_collector_alone(gc_settings: Any) -> None:
    import gc

    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    svc = make(tune_gc=False)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert any(svc.model is o for o in gc.get_objects(2))
    svc.stopService()


def test_tune_gc_keeps_a_higher_or_disabled_threshold(gc_settings: Any) -> None:
    import gc

    for threshold in ((100_000, 5, 5), (0, 10, 10)):
        gc.set_threshold(*threshold)
        make().stopService()
        assert gc.get_threshold() == threshold


class Cyclic:
    """A model that refers to itself: only a full collection frees it."""

    def __init__(self) -> None:
        self.me = self


cyclic: Schema[Cyclic] = Schema("cyclic", model=Cyclic)


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-another"])
def test_tune_gc_a_restarted_service_does_not_keep_its_predecessors_model(
    gc_settings: Any, beside: bool
) -> None:
    import weakref

    other = make() if beside else None
    journal, store = MemoryJournal(), MemorySnapshotStore()
    svc = make(journal, store, schema=cyclic, snapshot_on_stop=False)
    first = weakref.ref(svc.model)
    svc.stopService()
    del svc
    again = make(journal, store, schema=cyclic, snapshot_on_stop=False)
    # Frozen again without a full pass, the old model would live for good.
    assert first() is None
    again.stopService()
    if other is not None:
        other.stopService()


def test_tune_gc_is_shared_by_the_services_of_a_process(gc_settings: Any) -> None:
    import gc

    from txjournal.service import GC_THRESHOLD0

    gc.set_threshold(700, 10, 10)
    a, b = make(), make()
    a.stopService()
    # b still runs: its model stays frozen and the threshold raised.
    assert gc.get_threshold() == (GC_THRESHOLD0, 10, 10)
    gc.collect()
    assert all(b.model is not o for o in gc.get_objects(2))
    b.stopService()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (700, 10, 10)


def test_tune_gc_leaves_a_threshold_changed_while_it_ran(gc_settings: Any) -> None:
    import gc

    gc.set_threshold(700, 10, 10)
    svc = make()
    gc.set_threshold(5_000, 10, 10)  # the application's own choice
    svc.stopService()
    assert gc.get_threshold() == (5_000, 10, 10)


@pytest.mark.parametrize("pure", [False, True])
def test_replay_logs_each_command_that_raises_as_it_did_live(
    pure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twisted.logger import Logger

    import txjournal.replaying
    import txjournal.service

    if pure:
        monkeypatch.setattr(txjournal.service, "apply_run", txjournal.replaying._py_apply_run)
    journal, store = MemoryJournal(), MemorySnapshotStore()
    svc = make(journal, store, snapshot_on_stop=False)
    outcome(svc.execute(Deposit("alice", 10)))
    outcome(svc.execute(Withdraw("alice", 50)))  # InsufficientFunds, journaled
    outcome(svc.execute(Withdraw("bob", 1)))  # UnknownAccount
    outcome(svc.stopService())
    events: list[dict[str, Any]] = []
    again = JournalService(
        bank, journal=journal, snapshots=store, reactor=Clock(), runner=sync_runner
    )
    again.log = Logger(observer=events.append)  # type: ignore[misc]
    again.startService()
    raised = [
        (e["seq"], e["name"], type(e["error"]))
        for e in events
        if "error" in e and "as it did live" in e["log_format"]
    ]
    assert raised == [(2, "withdraw", InsufficientFunds), (3, "withdraw", UnknownAccount)]
    assert again.query("accounts") == {"alice": 10}
    outcome(again.stopService())


def test_snapshot_calls_during_a_snapshot_share_the_next_one(manual_runner: ManualRunner) -> None:
    """
    However many ask while one is written, one more is written for all of
    them, at least as new as their call (queueing each on the lock chained
    their releases until the stack overflowed and the lock stayed held).
    """
    store = MemorySnapshotStore()
    svc = make(store=store, runner=manual_runner)
    svc.execute(Deposit("alice", 1))
    manual_runner.release()
    first = svc.snapshot()
    svc.execute(Deposit("alice", 1))  # after the first snapshot's point
    f, args, d = manual_runner.calls.pop(1)  # its append, not the snapshot's write
    maybeDeferred(f, *args).chainDeferred(d)
    later = [svc.snapshot() for _ in range(2000)]
    manual_runner.release()  # the first snapshot's write
    assert outcome(first) == 1
    assert not any(d.called for d in later)
    manual_runner.release()  # the shared one
    assert {outcome(d) for d in later} == {2}
    assert store.list() == [2, 1]
    assert not svc._snapshot_lock.locked
    assert manual_runner.calls == []
    outcome(svc.snapshot())  # nothing new: no write
    assert manual_runner.calls == [] and store.list() == [2, 1]


def test_a_failed_shared_snapshot_fails_every_caller_and_frees_the_lock(
    manual_runner: ManualRunner,
) -> None:
    store = MemorySnapshotStore()
    svc = make(store=store, runner=manual_runner)
    svc.execute(Deposit("alice", 1))
    manual_runner.release()
    first = svc.snapshot()
    svc.execute(Deposit("alice", 1))
    f, args, d = manual_runner.calls.pop(1)
    maybeDeferred(f, *args).chainDeferred(d)
    later = [svc.snapshot() for _ in range(3)]
    manual_runner.release()
    assert outcome(first) == 1
    f, args, d = manual_runner.calls.pop(0)  # the shared snapshot's write: make it fail
    d.errback(Failure(OSError(errno.ENOSPC, "No space left on device")))
    for waiter in later:
        failure = outcome(waiter)
        assert isinstance(failure, Failure) and failure.check(SnapshotError)
    assert not svc._snapshot_lock.locked
    svc.snapshot()
    manual_runner.release()
    assert store.list() == [2, 1]


def test_a_second_start_is_refused_and_leaves_the_running_journal_alone(tmp_path: Any) -> None:
    svc = JournalService(
        bank, datadir=str(tmp_path / "data"), reactor=Clock(), runner=sync_runner,
        snapshot_interval=None,
    )
    svc.startService()
    assert outcome(svc.execute(Deposit("a", 5))) == 5
    with pytest.raises(RuntimeError, match="already running"):
        svc.startService()
    # Still the writer, still holding its lock: nothing was torn down.
    assert outcome(svc.execute(Deposit("a", 1))) == 6
    from txjournal import DataDirLocked

    with pytest.raises(DataDirLocked):
        JournalService(bank, datadir=str(tmp_path / "data"), reactor=Clock()).startService()
    assert outcome(svc.stopService()) is None


def test_a_start_while_stopping_is_refused_until_the_stop_has_finished() -> None:
    runner = ManualRunner()
    journal = MemoryJournal()
    svc = make(journal=journal, runner=runner, snapshot_on_stop=False)
    pending = svc.execute(Deposit("a", 5))
    stopped: list[Any] = []
    svc.stopService().addBoth(stopped.append)
    assert stopped == []  # waits for the command in flight
    with pytest.raises(RuntimeError, match="still stopping"):
        svc.startService()
    runner.release_all()
    assert outcome(pending) == 5
    assert stopped == [None]
    svc.startService()  # now it may
    assert svc.model.accounts == {"a": 5}
    again = svc.execute(Deposit("a", 1))
    runner.release_all()
    assert outcome(again) == 6
