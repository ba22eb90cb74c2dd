"""Session tickets: a server role's state, sealed for the device to carry between two
requests, so that a challenge costs the server no storage and any node can take the
answer.

A ticket is ``version || key id || payload || HMAC(label || everything before)`` under a
MAC key that never leaves the key store (HMAC-SHA256: a 32-byte tag). The payload holds no
secret (randoms, identifiers, times): it is authenticated, not encrypted. The key id names
the key, so keys can rotate while older tickets are still out; ``key_for`` answers None for
a key that no longer opens tickets (its identity was revoked). The label separates each
protocol's tickets from any other MAC the key might make.

A ticket proves only that this server issued it. Single use is the caller's: store the
session when the answer comes, keyed by its id, so that a second answer finds it taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trustfleet.errors import InvalidSignature, KeyNotFound, TrustfleetError
from trustfleet.keystore.base import KeyStore

TICKET_VERSION = b"\x01"
KEY_ID_SIZE = 4
TAG_SIZE = 32
HEADER_SIZE = len(TICKET_VERSION) + KEY_ID_SIZE


@dataclass(frozen=True, slots=True)
class TicketKey:
    """The key store MAC key that seals tickets, and the number that names it in them."""

    key_id: int
    handle: str


def seal_ticket(payload: bytes, *, keystore: KeyStore, key: TicketKey, label: bytes) -> bytes:
    body = TICKET_VERSION + key.key_id.to_bytes(KEY_ID_SIZE, "big") + payload
    return body + keystore.mac(key.handle, label + body)


def key_id_of(ticket: bytes) -> int:
    """The number of the key a ticket names (read, not verified: open it first)."""
    return int.from_bytes(ticket[len(TICKET_VERSION) : HEADER_SIZE], "big")


def open_ticket(
    ticket: bytes,
    *,
    keystore: KeyStore,
    key_for: Callable[[int], str | None],
    label: bytes,
    invalid: type[TrustfleetError],
) -> bytes:
    """The payload a ticket sealed, or ``invalid`` if this server did not seal it with a
    key that still opens tickets, or it was altered."""
    if len(ticket) <= HEADER_SIZE + TAG_SIZE or not ticket.startswith(TICKET_VERSION):
        raise invalid()
    body, tag = ticket[:-TAG_SIZE], ticket[-TAG_SIZE:]
    handle = key_for(key_id_of(body))
    if handle is None:
        raise invalid()
    try:
        keystore.mac_verify(handle, label + body, tag)
    except (InvalidSignature, KeyNotFound):
        raise invalid() from None
    return body[HEADER_SIZE:]
