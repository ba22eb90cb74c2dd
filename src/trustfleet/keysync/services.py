"""The key-sync use cases of an app context: what the routes call. Cheap to build; built
per request."""

from __future__ import annotations

import functools
import threading
from typing import Any

from trustfleet.keysync.imports import KeyImports
from trustfleet.keysync.registration import M2mRange, Platforms, Registrations, parse_ranges
from trustfleet.keysync.sync import KeySync, send_reply
from trustfleet.keysync.vault import Vault
from trustfleet.server.context import AppContext


@functools.lru_cache(maxsize=8)
def _ranges(text: str) -> tuple[M2mRange, ...]:
    return parse_ranges(text)


def vault(context: AppContext) -> Vault:
    return Vault(context.db, context.keystore)


def imports(context: AppContext) -> KeyImports:
    return KeyImports(context.db, vault(context))


def registrations(context: AppContext) -> Registrations:
    return Registrations(context.db, ranges=_ranges(context.settings.keysync_m2m_ranges))


def platforms(context: AppContext) -> Platforms:
    return Platforms(context.db, context.keystore)


def _reply_in_background(gateway: Any, to: str, text: str) -> None:
    """Reply SMS leave on their own thread: the webhook's answer does not wait for them."""
    threading.Thread(target=send_reply, args=(gateway, to, text), daemon=True).start()


def key_sync(context: AppContext) -> KeySync:
    return KeySync(
        context.db, vault(context), reply=_reply_in_background, refusals=context.refusals
    )
