"""
The snapshot benchmark's schema, in a module of its own so that the
process a ``snapshot_app`` snapshot starts can import it by name
(``snapmodel:snapschema``; the benchmark script itself runs as
``__main__``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from txjournal import Context, Schema

#: The model the benchmark built in memory; the schema's factory hands it
#: to the service. A snapshot process never calls the factory: it starts
#: from the snapshot the benchmark writes first.
MODEL: list[dict[str, Any]] = []

snapschema: Schema[dict[str, Any]] = Schema("benchsnapshot", model=lambda: MODEL[0])


@snapschema.command("touch")
@dataclass
class Touch:
    """Record that something happened; returns the sequence number."""

    n: int

    def execute(self, model: dict[str, Any], ctx: Context) -> int:
        model["touched"] = self.n
        return ctx.seq
