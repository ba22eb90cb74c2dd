"""A toy domain with one device route, to test the device lane against FastAPI.

``POST /v1/toy/echo/{item}`` (operator): ``{"item", "actor", "size"}``; the body ``fail``
raises a trustfleet error, ``boom`` an unexpected one, ``busy`` the database's 503.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from trustfleet.errors import Conflict
from trustfleet.server.auth import Principal
from trustfleet.server.context import AppContext
from trustfleet.server.deps import require_role
from trustfleet.server.devicelane import DeviceAnswer, DeviceRoute, answer_in_fastapi
from trustfleet.server.models import Role
from trustfleet.store import DatabaseBusy

router = APIRouter(prefix="/v1/toy")
ITEM = "[a-z]{1,8}"


class ToyConflict(Conflict):
    code = "toy-conflict"
    title = "The toy refuses"


def echo(
    context: AppContext, principal: Principal, params: Mapping[str, str], body: bytes
) -> DeviceAnswer:
    if body == b"fail":
        raise ToyConflict("asked to fail")
    if body == b"busy":
        raise DatabaseBusy("the database stayed busy")
    if body == b"boom":
        raise RuntimeError("an unexpected failure")
    answer = {"item": params["item"], "actor": principal.actor, "size": len(body)}
    return DeviceAnswer(json.dumps(answer).encode(), status=201)


device_routes = (
    DeviceRoute(
        "POST", "/v1/toy/echo/{item}", frozenset({Role.OPERATOR.value}), echo, {"item": ITEM}
    ),
)


@router.post("/echo/{item}", status_code=201)
async def echo_route(
    item: Annotated[str, Path(pattern=f"^{ITEM}$")],
    principal: Annotated[Principal, Depends(require_role(Role.OPERATOR))],
    request: Request,
) -> Response:
    return await answer_in_fastapi(request, principal, echo)
