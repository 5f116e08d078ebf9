"""
How a whole model becomes snapshot bytes.

Snapshots are the service's own files (mode 0600 in a 0700 directory), never
data a client sent, so pickle is acceptable here and only here: it is the one
serializer that handles an arbitrary Python model. Commands never use it.
"""

from __future__ import annotations

import pickle

from zope.interface import implementer

from txjournal.interfaces import ISnapshotSerializer


@implementer(ISnapshotSerializer)
class PickleSerializer:
    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, model: object) -> bytes:
        return pickle.dumps(model, protocol=self.protocol)

    def loads(self, data: bytes) -> object:
        return pickle.loads(data)
