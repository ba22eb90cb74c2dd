"""Key store routes: its status, and its keys' public facts with where each lives and where
its operations run (never key material).

``admin`` and ``auditor`` read them; nothing here changes the store. (Master-key rotation and
sealing under a token need the data directory, so they are local verbs:
``trustfleet keystore rotate-master`` and ``trustfleet keystore seal``.)
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from trustfleet.keystore.base import KeyInfo
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, require_role
from trustfleet.server.models import Role

router = APIRouter(prefix="/v1/keystore", tags=["keystore"])

Context = Annotated[AppContext, Depends(get_context)]
Reader = Annotated[Principal, Depends(require_role(Role.ADMIN, Role.AUDITOR))]


class KeyStoreStatusOut(BaseModel):
    backend: str = Field(description="soft or pkcs11")
    reachable: bool
    keys: int | None = Field(description="How many keys it holds (None when unreachable)")
    problem: str | None = Field(description="Why it is not reachable")


class KeyOut(BaseModel):
    handle: str
    algorithm: str
    usage: list[str]
    label: str
    created_at: datetime
    backend: str
    custody: str = Field(
        description="token (an object inside the PKCS#11 token), sealed (a row wrapped under a"
        " key inside the token) or database (a row wrapped under the soft store's master key)"
    )
    exportable: bool
    extractable: bool = Field(
        description="Whether the material can leave its custody at all (exportable or wrappable)"
    )
    token_operations: list[str]
    process_operations: list[str]

    @classmethod
    def of(cls, key: KeyInfo) -> KeyOut:
        return cls(
            handle=key.handle,
            algorithm=key.algorithm.value,
            usage=[f.name.lower() for f in type(key.usage) if f in key.usage and f.name],
            label=key.label,
            created_at=key.created_at,
            backend=key.backend,
            custody=key.custody,
            exportable=key.exportable,
            extractable=key.extractable,
            token_operations=list(key.token_operations),
            process_operations=list(key.process_operations),
        )


class KeysOut(BaseModel):
    backend: str
    keys: list[KeyOut]


@router.get("")
def keystore_status(context: Context, principal: Reader) -> KeyStoreStatusOut:
    """Which backend serves keys, whether it answers now, and how many keys it holds."""
    backend = context.settings.keystore_backend
    try:
        context.keystore.ping()
        count = len(context.keystore.list())
    except Exception as exc:  # the status is the answer: say what failed
        message = getattr(exc, "message", None) or type(exc).__name__
        return KeyStoreStatusOut(backend=backend, reachable=False, keys=None, problem=message)
    return KeyStoreStatusOut(backend=backend, reachable=True, keys=count, problem=None)


@router.get("/keys")
def list_keys(context: Context, principal: Reader) -> KeysOut:
    """Every live key: where it lives, whether it can leave, where its operations run."""
    keys = [KeyOut.of(key) for key in context.keystore.list()]
    return KeysOut(backend=context.keystore.backend, keys=keys)
