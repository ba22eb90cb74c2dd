"""Imports every module that defines tables, so ``Base.metadata`` is complete."""

from __future__ import annotations

import importlib
from types import ModuleType

MODEL_MODULES = (
    "trustfleet.binding.models",
    "trustfleet.keystore.models",
    "trustfleet.kit.outbox.models",
    "trustfleet.keysync.models",
    "trustfleet.pki.models",
    "trustfleet.server.models",
    "trustfleet.tmk.models",
)


def import_if_present(name: str) -> ModuleType | None:
    """Import ``name``; None only when the module itself (or its package) does not exist.

    An import error raised from *inside* an existing module propagates: a broken domain must
    fail loudly, only a domain that has not been written yet is skipped.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            return None
        raise


def import_all_models() -> None:
    for name in MODEL_MODULES:
        import_if_present(name)
