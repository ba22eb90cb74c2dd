"""Imports every module that defines tables, so ``Base.metadata`` is complete."""

from __future__ import annotations

import importlib

MODEL_MODULES = (
    "trustfleet.keystore.models",
    "trustfleet.pki.models",
    "trustfleet.server.models",
)


def import_all_models() -> None:
    for name in MODEL_MODULES:
        importlib.import_module(name)
