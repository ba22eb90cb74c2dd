"""Marks routes whose body may exceed ``max_body_bytes`` (streamed bulk imports)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__trustfleet_streamed_import__"


def streamed_import(endpoint: F) -> F:
    """Let this endpoint receive up to ``settings.max_import_bytes`` instead of
    ``max_body_bytes``. It should read ``request.stream()`` rather than buffer the body.

    Put it under the route decorator::

        @router.post("/v1/keys/import")
        @streamed_import
        async def import_keys(request: Request) -> ...: ...
    """
    setattr(endpoint, _MARK, True)
    return endpoint


def is_streamed_import(endpoint: object) -> bool:
    return getattr(endpoint, _MARK, False) is True
