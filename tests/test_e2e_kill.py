"""
The whole product under ``kill -9``: ``twistd -n journal`` in a subprocess,
20 concurrent PB clients doing transfers, SIGKILL at several points, restart,
and the journal checked against what clients sent and were acknowledged.
The checks themselves live in ``examples/crash_demo.py`` (also a script).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from examples import crash_demo


@pytest.mark.timeout(240)
@pytest_twisted.ensureDeferred
async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Any) -> None:
    from twisted.internet import reactor

    report = await crash_demo.run(reactor, str(tmp_path), rounds=5, clients=20, seed=7)
    assert len(report) == 5
    # Every round acknowledged more commands and the journal kept them all.
    acknowledged = [row["acknowledged_total"] for row in report]
    assert acknowledged == sorted(acknowledged) and acknowledged[-1] > acknowledged[0]
    for row in report:
        assert row["acknowledged_total"] <= row["journal_records"] <= row["sent_total"]


@pytest.mark.timeout(240)
@pytest_twisted.ensureDeferred
async def test_kill_9_of_a_postgresql_writer_then_a_new_writer_loses_nothing(tmp_path: Any) -> None:
    """
    The same under load with the journal in PostgreSQL: each round SIGKILLs
    the writer and starts a new one (a standby taking over, bumping the
    writer epoch); every acknowledged command must be in the database.
    """
    from pg_support import scratch_database
    from twisted.internet import reactor

    with scratch_database("txj_kill") as url:
        report = await crash_demo.run(reactor, str(tmp_path), rounds=3, clients=20, seed=11, journal_url=url)
    assert len(report) == 3
    for row in report:
        assert row["acknowledged_total"] <= row["journal_records"] <= row["sent_total"]
    # The data directory held no journal: it was all in PostgreSQL.
    assert not (tmp_path / "bank" / "journal").exists()


@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_failover_under_load_loses_nothing_and_fences_the_old_writer(tmp_path: Any) -> None:
    """
    ``examples/failover_demo.py``: SIGKILL of a writer under 20 PB clients,
    automatic promotion of a replica; then a hung (SIGSTOPped) writer taken
    over by an admin's ``promote`` with take-over and thawed: zero
    acknowledged commands lost, nothing invented, the stale writer refused,
    and the old writer cannot restart while the new one lives.
    """
    import json

    from pg_support import scratch_database
    from twisted.internet import reactor

    from examples import failover_demo

    with scratch_database("txj_failover") as url:
        report = await failover_demo.run(reactor, str(tmp_path), url, clients=20, seed=5)
    print(json.dumps(report))
    first, second = report["round1"], report["round2"]
    assert first["acknowledged_before_kill"] <= first["journal_records_after_promotion"]
    assert second["acknowledged_total"] > first["acknowledged_total"]
    assert second["acknowledged_before_freeze"] <= second["journal_records_after_promotion"]
    assert "ServiceUnavailable" in second["stale_writer_refused_with"]
