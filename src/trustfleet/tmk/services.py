"""The TMK use cases of an app context: what the routes and the CLI verbs call. Cheap to
build; built per request."""

from __future__ import annotations

from datetime import timedelta

from trustfleet.pki.service import PkiService
from trustfleet.server.context import AppContext
from trustfleet.tmk.downloads import Downloads
from trustfleet.tmk.identity import IdentityService
from trustfleet.tmk.protocol import PROTOCOL_VERSIONS
from trustfleet.tmk.terminals import Terminals
from trustfleet.tmk.working_keys import WorkingKeys


def identity(context: AppContext) -> IdentityService:
    pki = PkiService(context.db, context.keystore)
    return IdentityService(context.db, context.keystore, pki)


def downloads(context: AppContext) -> Downloads:
    settings = context.settings
    ttl = timedelta(seconds=settings.tmk_session_seconds)
    versions = {v for v in PROTOCOL_VERSIONS if v >= settings.tmk_min_protocol_version}
    return Downloads(
        context.db, context.keystore, identity(context), session_ttl=ttl, versions=versions
    )


def terminals(context: AppContext) -> Terminals:
    return Terminals(context.db, context.keystore)


def working_keys(context: AppContext) -> WorkingKeys:
    return WorkingKeys(context.db, context.keystore)
