"""The app factory: the spine's routes, every domain's router, error mapping, middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from types import ModuleType

import anyio.to_thread
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from trustfleet import __version__
from trustfleet.models import import_if_present
from trustfleet.server.api import router as spine_router
from trustfleet.server.audit_trail import install_audit_trail
from trustfleet.server.ca_api import router as ca_router
from trustfleet.server.context import AppContext
from trustfleet.server.devicelane import DeviceLane, DeviceRoute
from trustfleet.server.docs import install_docs
from trustfleet.server.keystore_api import router as keystore_router
from trustfleet.server.limits import is_streamed_import
from trustfleet.server.metrics import Metrics
from trustfleet.server.middleware import (
    BodyLimitMiddleware,
    OptionsMiddleware,
    RequestContextMiddleware,
)
from trustfleet.server.openapi import install_openapi
from trustfleet.server.problems import install_problem_handlers
from trustfleet.server.routing import iter_api_routes

log = logging.getLogger("trustfleet.server")

#: Each module exposes ``router`` (an APIRouter). A module not written yet is skipped;
#: one that exists but fails to import stops the app from starting.
DOMAIN_ROUTERS = (
    "trustfleet.binding.api",
    "trustfleet.keysync.api",
    "trustfleet.deactivation.api",
    "trustfleet.meter.api",
    "trustfleet.tmk.api",
    "trustfleet.kit.outbox.api",
)


def _domain_modules(names: Sequence[str]) -> Iterator[ModuleType]:
    for name in names:
        module = import_if_present(name)
        if module is None:
            log.debug("domain router %s is not present; skipped", name)
            continue
        yield module


def load_domain_routers(names: Sequence[str]) -> list[APIRouter]:
    routers = []
    for module in _domain_modules(names):
        router = getattr(module, "router", None)
        if not isinstance(router, APIRouter):
            raise TypeError(f"{module.__name__}.router must be a fastapi.APIRouter")
        routers.append(router)
    return routers


def load_device_routes(names: Sequence[str]) -> list[DeviceRoute]:
    """The domains' ``device_routes`` (optional): served by the device lane."""
    routes: list[DeviceRoute] = []
    for module in _domain_modules(names):
        declared = getattr(module, "device_routes", ())
        if not all(isinstance(route, DeviceRoute) for route in declared):
            raise TypeError(f"{module.__name__}.device_routes must hold DeviceRoute objects")
        routes += declared
    return routes


def _body_limit(app: FastAPI, context: AppContext) -> Callable[[Scope], int]:
    """The request's body limit: ``max_import_bytes`` on streamed-import routes, else
    ``max_body_bytes``. Streamed-import routes are found once, on the first request."""
    large: list[APIRoute] | None = None

    def limit_for(scope: Scope) -> int:
        nonlocal large
        if large is None:
            large = [r for r in iter_api_routes(app.routes) if is_streamed_import(r.endpoint)]
        path = scope.get("path", "")
        if any(
            route.path_regex.match(path) and route.matches(scope)[0] is Match.FULL
            for route in large
        ):
            return context.settings.max_import_bytes
        return context.settings.max_body_bytes

    return limit_for


def create_app(
    context: AppContext,
    *,
    domain_routers: Sequence[str] = DOMAIN_ROUTERS,
    device_lane: bool = True,
) -> FastAPI:
    """A FastAPI app serving ``context``. Holds no per-session state: any node can serve
    any request, so several apps (processes, hosts) may share one database.

    With ``device_lane`` (the default) the domains' device routes are answered by
    :class:`~trustfleet.server.devicelane.DeviceLane` in front of the FastAPI stack;
    without it, by their FastAPI routes (same handlers, same answers)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:  # the counts of refusals not audited one by one are written on the way out
            await anyio.to_thread.run_sync(context.refusals.close)

    app = FastAPI(
        lifespan=lifespan,
        title="trustfleet",
        version=__version__,
        description="Lifecycle trust for fleets of IoT devices and payment terminals.",
        docs_url=None,  # served from this server's own assets: install_docs
        redoc_url=None,
    )
    install_docs(app)
    install_audit_trail(context)
    app.state.context = context
    metrics = Metrics()
    metrics.watch_audit(context.db)
    app.state.metrics = metrics
    install_problem_handlers(app)
    # routes are matched in order, each costing a few µs: the domains' device-facing
    # routes (the busiest) come before the spine's
    for router in load_domain_routers(domain_routers):
        app.include_router(router)
    app.include_router(ca_router)
    app.include_router(keystore_router)
    app.include_router(spine_router)
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, limit_for=_body_limit(app, context))
    app.add_middleware(OptionsMiddleware, routes=app.routes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    if device_lane:  # outermost
        routes = load_device_routes(domain_routers)
        app.add_middleware(DeviceLane, context=context, metrics=metrics, routes=routes)
    return app
