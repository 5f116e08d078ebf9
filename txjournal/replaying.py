"""
Start-up replay's inner loop: applying runs of decoded records to the model.

Replay spends most of its time per record, so the common case (a query
audit record, or a command of the current version whose fields unpack to a
map that its class accepts) is applied in one tight loop, in C where the
extension ``txjournal._speedups`` is built; :func:`_py_apply_run` here is the
reference it must agree with and the fallback. Anything else stops the run
*before* that record, and the service handles it the slow way, which
upgrades old versions, skips retired names and words the errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from txjournal.record import KIND_COMMAND, KIND_QUERY, RecordTuple

#: ``name -> (class, version)`` of the commands the fast path may build.
Plan = dict[str, tuple[type, int]]
#: ``(seq, name, exception)`` of each command that raised (as it did live).
Raised = list[tuple[int, str, Exception]]


def _py_apply_run(
    records: list[RecordTuple],
    start: int,
    plan: Plan,
    context: Callable[[int, int, int, str | None], Any],
    journal_id: int,
    model: Any,
    unpackb: Callable[[bytes], Any],
    /,
) -> tuple[int, Raised | None]:
    """
    Apply ``records[start:]`` in order while each is a plain case; return
    the index of the first one that is not (``len(records)`` if none) and
    what the commands applied raised, or ``None`` if none did.

    ``unpackb`` is called with the fields alone: ``msgpack.unpackb``'s
    defaults refuse map keys other than strings, which the slow path then
    decodes as it always did. Building a command that fails stops the run
    before its record: the slow path builds it again and reports why.
    """
    raised: Raised | None = None
    i = start
    n = len(records)
    while i < n:
        seq, time_ns, name, version, kind, user, fields = records[i]
        if kind != KIND_COMMAND:
            if kind == KIND_QUERY:
                i += 1  # an audit record: nothing to apply
                continue
            break
        entry = plan.get(name)
        if entry is None or entry[1] != version:
            break
        try:
            values = unpackb(fields)
        except Exception:
            break
        if type(values) is not dict:
            break
        try:
            command = entry[0](**values)
        except Exception:
            break
        try:
            command.execute(model, context(seq, time_ns, journal_id, user))
        except Exception as e:
            # Part of history: the live run failed the same way.
            if raised is None:
                raised = []
            raised.append((seq, name, e))
        i += 1
    return i, raised


#: Whether :func:`apply_run` is the C version.
SPEEDUPS = False
apply_run = _py_apply_run
if not os.environ.get("TXJOURNAL_PURE_PYTHON"):
    try:
        from txjournal import _speedups
    except ImportError:  # pragma: no cover - built with the package
        pass
    else:
        apply_run = _speedups.apply_run
        SPEEDUPS = True
