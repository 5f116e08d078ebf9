"""
The ``twistd journal`` dropin. Keep it a one-liner that imports nothing but
``ServiceMaker``: importing the reactor here would break ``twistd -r``.
"""

from twisted.application.service import ServiceMaker

journal = ServiceMaker(
    "txjournal",
    "txjournal.tap",
    "Serve a txjournal model over Perspective Broker",
    "journal",
)
