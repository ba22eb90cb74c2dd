"""Walks the app's routes to find what each one admits."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from trustfleet.server.deps import RoleRequirement, public
from trustfleet.server.routing import iter_api_routes


def api_routes(app: FastAPI) -> list[APIRoute]:
    return list(iter_api_routes(app.routes))


def _calls(dependant: Dependant) -> Iterator[object]:
    yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def role_requirements(route: APIRoute) -> list[RoleRequirement]:
    return [call for call in _calls(route.dependant) if isinstance(call, RoleRequirement)]


def is_public(route: APIRoute) -> bool:
    return any(call is public for call in _calls(route.dependant))


def fill_path(route: APIRoute, value: str = "999999") -> str:
    return re.sub(r"\{[^}]+\}", value, route.path_format)


def protected_calls(app: FastAPI) -> list[tuple[str, str, frozenset[str]]]:
    """(method, url, admitted roles) for every method of every role-guarded route."""
    calls = []
    for route in api_routes(app):
        requirements = role_requirements(route)
        if not requirements:
            continue
        admitted = frozenset.intersection(*(r.roles for r in requirements))
        calls += [(method, fill_path(route), admitted) for method in sorted(route.methods)]
    return calls
