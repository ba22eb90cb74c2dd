"""Shared encodings: the canonical JSON codec of protocol messages, the length-prefixed
transcript that signatures and MACs cover, and the malformed-message error every domain's
own derives from.

Below the key store and the domains: pure functions and small typed objects, no I/O.
"""

from trustfleet.wire.canonical import (
    Alphabet,
    Codec,
    Fields,
    Message,
    canonical_json,
    format_time,
)
from trustfleet.wire.errors import MalformedMessage
from trustfleet.wire.times import as_utc, utc_seconds, utcnow
from trustfleet.wire.transcript import transcript

__all__ = [
    "Alphabet",
    "Codec",
    "Fields",
    "MalformedMessage",
    "Message",
    "as_utc",
    "canonical_json",
    "format_time",
    "transcript",
    "utc_seconds",
    "utcnow",
]
