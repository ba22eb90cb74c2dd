"""The binding use cases of an app context: what the routes and the CLI verbs call. Cheap
to build; built per request."""

from __future__ import annotations

from trustfleet.binding.fleet import Fleet
from trustfleet.server.context import AppContext


def fleet(context: AppContext) -> Fleet:
    return Fleet(context.db)
