"""The OpenAPI document is the truth: every response a route can give is declared.

FastAPI documents what a route returns when it succeeds and its request body; the errors
come from the spine, so the spine declares them, once, after the app is built
(:func:`install_openapi`). :func:`complete_openapi` reads each operation and adds the
problems it can answer, all ``application/problem+json`` with the shared
``ProblemDetails`` schema:

========================================  ===============================================
the operation                             declares
========================================  ===============================================
takes an API token (``security``)         401 (no valid token), 403 (the role may not)
has path or query parameters              422 (type, pattern, range)
takes path, query or body input           400 (``invalid-input`` and the domain's codes),
                                          404 (it names something that does not exist)
has a request body                        400 (malformed), 413, 415, 422
changes state (POST, PUT, PATCH, DELETE)  409 (conflicts with the current state)
any                                       5XX (``internal-error``, a dependency down)
========================================  ===============================================

A route declares what the spine cannot know in its ``responses`` (a public webhook's 401 or
403, a 410, a 502 from a device); :func:`problem_responses` spells them. Whatever the
route declares keeps its description; its content becomes problem+json. FastAPI's own 422
(``HTTPValidationError``, ``application/json``) is replaced: the app answers validation
errors as problems (:mod:`trustfleet.server.problems`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from trustfleet.server.deps import RoleRequirement
from trustfleet.server.problems import PROBLEM_MEDIA_TYPE
from trustfleet.server.routing import iter_api_routes

PROBLEM_SCHEMA = "ProblemDetails"
#: the roles a guarded operation admits (its description says so too)
ROLES_EXTENSION = "x-roles"
PROBLEM_REF = {"$ref": f"#/components/schemas/{PROBLEM_SCHEMA}"}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_CHANGES_STATE = frozenset({"post", "put", "patch", "delete"})
#: FastAPI's validation error schemas, unused once every 422 is a problem
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")

PROBLEM_DETAILS_SCHEMA: dict[str, Any] = {
    "title": "ProblemDetails",
    "description": "An RFC 9457 problem; `code` is the stable machine code "
    "(`type` is `urn:trustfleet:problem:<code>`).",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {
            "description": "The fields that do not match the schema (422 only)",
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}

#: what each problem status means, when the route gives no description of its own
PROBLEM_DESCRIPTIONS: Mapping[str, str] = {
    "400": "The request could not be understood: malformed JSON (`malformed-json`) or an "
    "invalid value (`invalid-input`, `invalid-cursor`, the capability's own codes)",
    "401": "No valid API token: missing, malformed, unknown, revoked or expired "
    "(`authentication-required`)",
    "403": "The token's role may not do this (`forbidden`), or the capability refuses "
    "the caller (its own codes)",
    "404": "The request names something that does not exist (`not-found`, the "
    "capability's own codes)",
    "409": "Conflicts with the current state (`conflict`, the capability's own codes)",
    "410": "Gone: no longer available",
    "413": "The request body is over the limit (`body-too-large`)",
    "415": "The content type is not one of the request body's (`unsupported-media-type`)",
    "422": "The request does not match the schema (`invalid-request`, with `errors`)",
    "502": "A device or remote party answered wrongly",
    "503": "A dependency of this node is not reachable",
    "5XX": "The server failed (`internal-error`, logged under the request id) or a "
    "dependency is not reachable",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the problems a route can give that the spine cannot infer."""
    return {
        status: {"description": PROBLEM_DESCRIPTIONS.get(str(status), "A problem")}
        for status in statuses
    }


def _is_problem_status(status: str) -> bool:
    return status[:1] in ("4", "5")


def inferred_statuses(method: str, operation: Mapping[str, Any]) -> set[str]:
    """The problem statuses every operation of this shape can give (the module's table)."""
    statuses = {"5XX"}
    parameters = operation.get("parameters", ())
    where = {parameter.get("in") for parameter in parameters}
    has_body = "requestBody" in operation
    if operation.get("security"):
        statuses |= {"401", "403"}
    if "path" in where or "query" in where:
        statuses |= {"422"}
    if where & {"path", "query"} or has_body:
        statuses |= {"400", "404"}
    if has_body:
        statuses |= {"400", "413", "415", "422"}
    if method in _CHANGES_STATE:
        statuses |= {"409"}
    return statuses


def _sort_key(status: str) -> tuple[int, str]:
    return (int(status[0]), status)


def complete_operation(method: str, operation: dict[str, Any]) -> None:
    """Declare the problems ``operation`` can give (see the module's table)."""
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status in inferred_statuses(method, operation):
        responses.setdefault(status, {})
    for status, response in responses.items():
        if not _is_problem_status(status):
            continue
        described = response.get("description")
        if not described or described == "Validation Error":
            response["description"] = PROBLEM_DESCRIPTIONS.get(status, "A problem")
        response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": dict(PROBLEM_REF)}}
    operation["responses"] = dict(
        sorted(
            responses.items(),
            key=lambda item: _sort_key(item[0]) if item[0][0].isdigit() else (9, item[0]),
        )
    )


def _refers_to(node: Any, names: Iterable[str]) -> bool:
    refs = {f"#/components/schemas/{name}" for name in names}
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("$ref") in refs:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def complete_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (FastAPI's document) with every operation's problems declared; changed in
    place and returned."""
    for path_item in schema.get("paths", {}).values():
        for method in _METHODS:
            if method in path_item:
                complete_operation(method, path_item[method])
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas[PROBLEM_SCHEMA] = PROBLEM_DETAILS_SCHEMA
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        others = {key: value for key, value in schema.items() if key != "components"}
        rest = {
            key: value for key, value in schemas.items() if key not in _FASTAPI_VALIDATION_SCHEMAS
        }
        if name in schemas and not _refers_to([others, rest], _FASTAPI_VALIDATION_SCHEMAS):
            del schemas[name]
    return schema


def _calls(dependant: Dependant) -> Iterator[object]:
    yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def admitted_roles(route: APIRoute) -> frozenset[str] | None:
    """The roles ``route`` admits (every role requirement's), None for a public route."""
    requirements = [call for call in _calls(route.dependant) if isinstance(call, RoleRequirement)]
    if not requirements:
        return None
    return frozenset.intersection(*(requirement.roles for requirement in requirements))


def declare_roles(schema: dict[str, Any], routes: Iterable[APIRoute]) -> None:
    """Name the roles each guarded operation admits: ``x-roles`` and a line of its
    description."""
    paths = schema.get("paths", {})
    for route in routes:
        roles = admitted_roles(route)
        if roles is None or route.path_format not in paths:
            continue
        for method in route.methods or ():
            operation = paths[route.path_format].get(method.lower())
            if operation is None:
                continue
            operation[ROLES_EXTENSION] = sorted(roles)
            line = "Roles: " + ", ".join(f"`{role}`" for role in sorted(roles)) + "."
            description = operation.get("description", "")
            operation["description"] = f"{description}\n\n{line}" if description else line


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) the completed document."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = complete_openapi(base())
            declare_roles(schema, iter_api_routes(app.routes))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
