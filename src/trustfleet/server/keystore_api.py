"""Key store route: the keys and where each lives (admin; also ``auditor`` where that role
exists). Never any key material."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from trustfleet.keystore.base import KeyInfo
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, require_role
from trustfleet.server.models import ROLES, Role

router = APIRouter(prefix="/v1/keystore", tags=["keystore"])

Context = Annotated[AppContext, Depends(get_context)]
_READERS = (Role.ADMIN, *(["auditor"] if "auditor" in ROLES else []))
Reader = Annotated[Principal, Depends(require_role(*_READERS))]


class KeyOut(BaseModel):
    handle: str
    algorithm: str
    usage: list[str]
    label: str
    created_at: datetime
    backend: str
    #: token (an object inside the PKCS#11 token), sealed (a row wrapped under a key inside
    #: the token) or database (a row wrapped under the soft store's master key)
    custody: str
    exportable: bool
    #: whether the material can leave its custody at all (exportable, or WRAPPABLE)
    extractable: bool
    token_operations: list[str]
    process_operations: list[str]

    @classmethod
    def of(cls, key: KeyInfo) -> KeyOut:
        return cls(
            handle=key.handle,
            algorithm=key.algorithm.value,
            usage=[flag.name or "" for flag in type(key.usage) if flag and flag in key.usage],
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


@router.get("/keys")
def list_keys(context: Context, principal: Reader) -> KeysOut:
    """Every live key: where it lives, whether it can leave, where its operations run."""
    return KeysOut(
        backend=context.keystore.backend, keys=[KeyOut.of(k) for k in context.keystore.list()]
    )
