"""What every verb shares: the chosen data directory, settings and the app context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from trustfleet.server.context import AppContext
from trustfleet.settings import Settings, load_settings

console = Console()
err_console = Console(stderr=True)


@dataclass
class CliState:
    data_dir: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)
    _context: AppContext | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.data_dir)
        return self._settings

    def context(self) -> AppContext:
        """The app context of an initialised data directory (migrations applied)."""
        if self._context is None:
            from trustfleet.server.runner import build_context

            self._context = build_context(self.settings)
        return self._context


state = CliState()
