"""Walking the app's routes: every APIRoute, and the methods a path allows.

``OPTIONS`` and ``405 Method Not Allowed`` answer with an ``Allow`` header listing every
method of the path, whichever route serves each (FastAPI makes one route per method).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

#: answered for every known path, by :class:`trustfleet.server.middleware.OptionsMiddleware`
OPTIONS = "OPTIONS"


def iter_routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, however routers were included. Recent FastAPI keeps an included router
    as one entry (its routes stay on the original router); older versions copy them.
    Routers are included without prefix or dependencies, so the original routes are the
    served ones."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if isinstance(included, APIRouter):
            yield from iter_routes(included.routes)
        else:
            yield route


def iter_api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, however routers were included."""
    for route in iter_routes(routes):
        if isinstance(route, APIRoute):
            yield route


def allowed_methods(routes: Sequence[BaseRoute], path: str) -> frozenset[str] | None:
    """The methods of ``path`` (``OPTIONS`` among them), None when no route has it.

    As in OpenAPI, a concrete path wins over a templated one that also matches it: the
    methods of ``/v1/tmk/terminals/import`` are its own, not also those of
    ``/v1/tmk/terminals/{sn}``. Mounts (the docs' static files) answer for themselves."""
    by_parameters: dict[int, set[str]] = {}
    for route in iter_routes(routes):
        regex = getattr(route, "path_regex", None)
        route_methods = getattr(route, "methods", None)
        if regex is None or route_methods is None or not regex.match(path):
            continue
        parameters = len(getattr(route, "param_convertors", {}))
        by_parameters.setdefault(parameters, set()).update(route_methods)
    if not by_parameters:
        return None
    return frozenset({*by_parameters[min(by_parameters)], OPTIONS})


def allow_header(methods: frozenset[str]) -> str:
    return ", ".join(sorted(methods))
