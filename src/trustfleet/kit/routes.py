"""Device routes, declared once.

The few routes a fleet's devices call (a TMK download's steps, and each later capability's
device steps) are the busiest of the server. A capability declares each once, as a plain
handler, with :class:`DeviceRoutes`::

    device = DeviceRoutes(router, roles={Role.DEVICE_GATEWAY})

    @device.post("/downloads/{session_id}/proof", params={"session_id": SESSION_ID})
    def proof(context: AppContext, principal: Principal, params: Mapping[str, str],
              body: bytes) -> DeviceAnswer:
        \"\"\"Step 4-6: a ``tmk-terminal-proof`` in, a ``tmk-key-delivery`` out.\"\"\"
        ...

    device_routes = device.routes   # the module attribute the app factory reads

That one declaration gives both ways the route is served, which answer alike: the device
lane in front of FastAPI (:mod:`trustfleet.server.devicelane`, the fast path) and an
ordinary FastAPI route of the same path, roles and parameter patterns, which documents it
in OpenAPI (its docstring, its request and response media types) and answers when the app
is built without the lane. The handler is database work: it runs right after the token
check, in the same hop (see :func:`trustfleet.server.deps.run_database_work`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response

from trustfleet.server.deps import Principal, context_of, require_role, run_database_work
from trustfleet.server.deps import public as public_route
from trustfleet.server.devicelane import (
    CLIENT_PARAM,
    PUBLIC_CALLER,
    DeviceHandler,
    DeviceRoute,
    answer_in_fastapi,
)
from trustfleet.server.openapi import problem_responses

MESSAGE_MEDIA_TYPE = "application/json"


class DeviceRoutes:
    """A capability's device routes on its ``router`` (whose prefix they share)."""

    def __init__(self, router: APIRouter, *, roles: Iterable[str]) -> None:
        self._router = router
        self._roles = frozenset(str(role) for role in roles)
        self._routes: list[DeviceRoute] = []

    @property
    def routes(self) -> tuple[DeviceRoute, ...]:
        """What the device lane serves (the module's ``device_routes``)."""
        return tuple(self._routes)

    def post(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        request_media_type: str = MESSAGE_MEDIA_TYPE,
        response_media_type: str = MESSAGE_MEDIA_TYPE,
        response_model: Any = None,
        public: bool = False,
        headers: Mapping[str, str] | None = None,
        problems: Iterable[int] = (),
    ) -> Callable[[DeviceHandler], DeviceHandler]:
        """Declare ``handler`` as ``POST <prefix><path>``; ``params`` is the full-match
        pattern of each ``{parameter}`` of the path. The handler's docstring documents the
        route. A ``public`` route takes no API token (its handler authenticates the request
        itself, e.g. a third party's signed webhook); ``headers`` maps extra parameters to
        the request headers they are read from. ``problems`` are the problem statuses the
        handler can answer that the spine cannot infer (:mod:`trustfleet.server.openapi`),
        e.g. a public route's 403."""
        patterns = dict(params or {})
        header_params = {name: header.lower() for name, header in (headers or {}).items()}
        roles = frozenset[str]() if public else self._roles

        def declare(handler: DeviceHandler) -> DeviceHandler:
            full_path = self._router.prefix + path
            self._routes.append(
                DeviceRoute(
                    "POST",
                    full_path,
                    roles,
                    handler,
                    patterns,
                    public=public,
                    headers=header_params,
                )
            )
            endpoint = (
                _public_endpoint(handler, patterns, header_params)
                if public
                else _endpoint(handler, self._roles, patterns)
            )
            response: dict[str, Any] = (
                {"model": response_model}
                if response_model is not None
                else {"content": {response_media_type: {}}}
            )
            self._router.add_api_route(
                path,
                endpoint,
                methods=["POST"],
                dependencies=[Depends(public_route)] if public else None,
                response_class=Response,
                name=handler.__name__.strip("_"),
                description=inspect.getdoc(handler) or "",
                responses={
                    200: {"description": "The device's next message", **response},
                    **problem_responses(*problems),
                },
                openapi_extra={
                    "requestBody": {
                        "required": True,
                        "content": {request_media_type: {"schema": {"type": "object"}}},
                    }
                },
            )
            return handler

        return declare


def _endpoint(
    handler: DeviceHandler, roles: frozenset[str], params: Mapping[str, str]
) -> Callable[..., Any]:
    """A FastAPI endpoint that checks the roles and the path parameters' patterns, then
    answers with ``handler`` (FastAPI reads its parameters from ``__signature__``)."""

    async def endpoint(request: Request, principal: Principal, **_path: str) -> Response:
        return await answer_in_fastapi(request, principal, handler)

    parameters = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter(
            "principal",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[Principal, Depends(require_role(*sorted(roles)))],
        ),
        *(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[str, Path(pattern=f"^{pattern}$")],
            )
            for name, pattern in params.items()
        ),
    ]
    endpoint.__signature__ = inspect.Signature(parameters, return_annotation=Response)  # type: ignore[attr-defined]
    endpoint.__name__ = handler.__name__.strip("_")
    return endpoint


def _public_endpoint(
    handler: DeviceHandler, params: Mapping[str, str], headers: Mapping[str, str]
) -> Callable[..., Any]:
    """The FastAPI endpoint of a public device route: the path parameters' patterns are
    checked, the named headers read, and ``handler`` answers as in the lane."""

    async def endpoint(request: Request, **_path: str) -> Response:
        values = dict(request.path_params)
        for name, header in headers.items():
            values[name] = request.headers.get(header, "")
        values[CLIENT_PARAM] = request.client.host if request.client else ""
        context, body = context_of(request), await request.body()
        work = partial(handler, context, PUBLIC_CALLER, values, body)
        answer = await run_database_work(context, work)
        return Response(answer.body, status_code=answer.status, media_type=answer.media_type)

    parameters = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        *(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[str, Path(pattern=f"^{pattern}$")],
            )
            for name, pattern in params.items()
        ),
    ]
    endpoint.__signature__ = inspect.Signature(parameters, return_annotation=Response)  # type: ignore[attr-defined]
    endpoint.__name__ = handler.__name__.strip("_")
    return endpoint
