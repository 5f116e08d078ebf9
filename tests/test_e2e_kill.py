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
