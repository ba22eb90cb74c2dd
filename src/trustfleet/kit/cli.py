"""What every verb shares: the global options, the API client, output, one-line errors and
exit codes.

A management verb is a thin client of its capability's API routes, through one client::

    @app.command("list")
    def list_things(status: ... = None) -> None:
        page = api().get("/v1/things", status=status)
        emit(page, lambda: print_things(page["items"]))

:func:`api` talks to a running server when ``--server`` (or ``TRUSTFLEET_ADDR``) is given,
with the token from ``TRUSTFLEET_TOKEN`` or ``trustfleet login``'s file, over TLS verified
against ``--ca-file`` (``TRUSTFLEET_CACERT``) or the system's CAs. Without it, it serves the
same API in this process over the local data directory, as the local principal
(:mod:`trustfleet.server.local`). :func:`emit` prints the API's JSON with ``--output json``
and the verb's text otherwise. :func:`run` runs the Typer app and turns every error into one
line ``error [code]: message`` and an exit code (:data:`EXIT_CODES`); ``--debug`` adds the
traceback. Verbs that need the data directory itself (``init``, ``serve``, master-key
rotation) use :meth:`CliState.context`.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from trustfleet import __version__
from trustfleet.errors import ConfigurationError, TrustfleetError
from trustfleet.kit.client import (
    EXIT_INTERNAL,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ApiClient,
    ApiProblem,
    CliError,
    FileUnreadable,
    NoToken,
    UsageProblem,
    check_server_url,
    local_client,
    remote_client,
    unreachable,
)
from trustfleet.kit.credentials import TOKEN_ENV, token_for
from trustfleet.server.context import AppContext
from trustfleet.settings import Settings, load_settings

__all__ = [
    "EXIT_CODES",
    "EXIT_INTERNAL",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "ApiClient",
    "FileUnreadable",
    "NotInitialised",
    "OutputFormat",
    "UsageProblem",
    "api",
    "checked",
    "console",
    "emit",
    "err_console",
    "http_api",
    "install_global_options",
    "read_input_file",
    "run",
    "server_required",
    "state",
    "wrapping_table",
]

console = Console()
err_console = Console(stderr=True)

#: exit status -> meaning (the README lists them)
EXIT_CODES = {
    0: "success",
    EXIT_REFUSED: "refused: the server or a check said no (4xx problem, tampered audit log,"
    " rejected import rows, a file or port already taken)",
    EXIT_USAGE: "usage: the command line or the set-up is wrong (unknown option, bad value,"
    " missing file, URL without a scheme, data directory not initialised, no token)",
    EXIT_UNREACHABLE: "unreachable: no HTTP answer (connection refused, TLS failure,"
    " untrusted certificate, timeout)",
    EXIT_INTERNAL: "internal: the server answered 5xx, or the CLI failed unexpectedly",
}
GLOBAL_OPTIONS = ("data_dir", "server", "ca_file", "output", "debug")
SERVER_ENV = "TRUSTFLEET_ADDR"
CA_FILE_ENV = "TRUSTFLEET_CACERT"


class NotInitialised(UsageProblem):
    code = "not-initialised"
    title = "The data directory is not initialised"


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass
class CliState:
    """The global options of this invocation, and what is built from them once."""

    data_dir: Path | None = None
    server: str | None = None
    ca_file: Path | None = None
    output: OutputFormat = OutputFormat.TEXT
    debug: bool = False
    _settings: Settings | None = field(default=None, repr=False)
    _context: AppContext | None = field(default=None, repr=False)
    _clients: dict[bool, ApiClient] = field(default_factory=dict, repr=False)
    _local: ApiClient | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.data_dir)
        return self._settings

    @property
    def json_output(self) -> bool:
        return self.output == OutputFormat.JSON

    def context(self) -> AppContext:
        """The app context of the local data directory, which must be initialised unless an
        external database is configured (a node of a shared database, e.g. a second worker)."""
        if self._context is None:
            settings = self.settings
            if not settings.database_url:
                self._require_initialised(settings)
            from trustfleet.server.runner import build_context

            self._context = build_context(settings)
        return self._context

    @staticmethod
    def _require_initialised(settings: Settings) -> None:
        directory = settings.data_dir
        hint = (
            "run `trustfleet init`, or name another directory with --data-dir"
            " (TRUSTFLEET_DATA_DIR), or a running server with --server (TRUSTFLEET_ADDR)"
        )
        if not directory.is_dir():
            raise NotInitialised(f"data directory {directory} does not exist", hint=hint)
        if not settings.initialised:
            raise NotInitialised(
                f"{directory} is not an initialised trustfleet data directory", hint=hint
            )

    def api(self, *, token_required: bool = True) -> ApiClient:
        """The API: remote with ``--server``, else in process over the data directory."""
        if self.server is None:
            return self.local_api()
        client = self._clients.get(token_required)
        if client is None:
            self.server = check_server_url(self.server)
            token = token_for(self.server)
            if token is None and token_required:
                raise NoToken(
                    f"no API token for {self.server}",
                    hint=f"set {TOKEN_ENV}, or run `trustfleet login --server {self.server}`",
                )
            client = remote_client(self.server, token=token, ca_file=self.ca_file)
            self._clients[token_required] = client
        return client

    def local_api(self) -> ApiClient:
        """The API served in this process over the local data directory."""
        if self._local is None:
            from trustfleet.server.app import create_app
            from trustfleet.server.local import in_process

            _quiet_server_logs(self.debug)
            self._local = local_client(in_process(create_app(self.context())))
        return self._local

    def close(self) -> None:
        for client in [*self._clients.values(), *([self._local] if self._local else [])]:
            client.close()
        self._clients.clear()
        self._local = None


state = CliState()


def api(*, token_required: bool = True) -> ApiClient:
    """The API client of this invocation (see the module docstring)."""
    return state.api(token_required=token_required)


def server_required(what: str, *, of: str = "server", hint: str | None = None) -> str:
    """The ``--server`` URL (``TRUSTFLEET_ADDR``) of a verb with no local form (``what``),
    or a usage error saying so."""
    if state.server is None:
        message = f"{what} needs the {of}: give --server URL or set {SERVER_ENV}"
        raise UsageProblem(message, hint=hint)
    return state.server


def http_api() -> httpx.Client:
    """The HTTP client under :func:`api`, for verbs that stream a body, poll while an upload
    runs or read answers themselves; pass its answers to :func:`checked`."""
    return api().http


def checked(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer from :func:`http_api`; an error answer raised as the
    server's problem (its code, its detail)."""
    answer = api().checked(response)
    return answer.json() if answer.content else None


def _quiet_server_logs(debug: bool) -> None:
    """The in-process server's log lines go to standard error only with ``--debug``; its
    errors reach the user as the problems it answers."""
    if debug:
        from trustfleet.server.logging import configure_logging

        configure_logging("INFO")
        return
    trustfleet_logs = logging.getLogger("trustfleet")
    trustfleet_logs.addHandler(logging.NullHandler())
    trustfleet_logs.propagate = False


def emit(data: Any, text: Callable[[], None]) -> None:
    """``data`` (the API's JSON) with ``--output json``, else ``text()``."""
    if state.json_output:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    else:
        text()


def wrapping_table(*headers: str, show_header: bool = True) -> Table:
    """A table whose cells wrap rather than being cut with an ellipsis: nothing a verb
    prints is ever shortened to fit the terminal (``--output json`` for scripts)."""
    made = Table(*headers, show_header=show_header)
    for column in made.columns:
        column.overflow = "fold"
    return made


def read_input_file(path: Path, what: str, *, probe: bool = False) -> bytes:
    """The bytes of a file named on the command line, or a one-line usage error naming it;
    with ``probe``, only check that it can be opened (and answer nothing)."""
    try:
        if probe:
            with path.open("rb"):
                return b""
        return path.read_bytes()
    except FileNotFoundError:
        raise FileUnreadable(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise FileUnreadable(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise FileUnreadable(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


# -- global options ----------------------------------------------------------------------


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"trustfleet {__version__}\n")
        raise typer.Exit()


def install_global_options(app: typer.Typer) -> None:
    """The root callback with the global options. :func:`run` also accepts them after the
    verb (``trustfleet token list -o json``)."""

    @app.callback()
    def _global(
        data_dir: Annotated[
            Path | None,
            typer.Option(
                "--data-dir",
                envvar="TRUSTFLEET_DATA_DIR",
                help="Data directory for local use (default: the user's data directory).",
            ),
        ] = None,
        server: Annotated[
            str | None,
            typer.Option(
                "--server",
                envvar=SERVER_ENV,
                help="URL of a running server (http:// or https://); default: the local"
                " data directory.",
            ),
        ] = None,
        ca_file: Annotated[
            Path | None,
            typer.Option(
                "--ca-file",
                envvar=CA_FILE_ENV,
                help="CA certificate (PEM) to verify an https:// server against (default:"
                " the system's CAs).",
            ),
        ] = None,
        output: Annotated[
            OutputFormat,
            typer.Option(
                "--output",
                "-o",
                envvar="TRUSTFLEET_OUTPUT",
                help="text, or json: the API's fields, for scripts.",
            ),
        ] = OutputFormat.TEXT,
        debug: Annotated[
            bool, typer.Option("--debug", help="Show the traceback of an error.")
        ] = False,
        version: Annotated[
            bool,
            typer.Option(
                "--version", is_eager=True, callback=_show_version, help="Print the version."
            ),
        ] = False,
    ) -> None:
        state.data_dir, state.server, state.ca_file = data_dir, server, ca_file
        state.output, state.debug = output, debug


def _store_global(_ctx: Any, param: Any, value: Any) -> Any:
    if value is not None and value is not False:
        setattr(state, param.name, value)
    return value


def _commands(command: Any) -> Iterator[Any]:
    yield command
    for sub in getattr(command, "commands", {}).values():
        yield from _commands(sub)


def _prepare(command: Any) -> None:
    """Every verb also takes the global options (after the verb), and help shows no
    ``<bool>`` label for flags."""
    globals_ = [p for p in command.params if p.name in GLOBAL_OPTIONS]
    for sub in _commands(command):
        if sub is not command and not hasattr(sub, "commands"):
            taken = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)}
            for option in globals_:
                if taken & {*option.opts, *option.secondary_opts}:
                    continue
                leaf = copy.copy(option)
                leaf.expose_value = False
                leaf.callback = _store_global
                leaf.envvar = None
                leaf.default = False if option.is_flag else None
                leaf.show_default = False
                leaf.rich_help_panel = "Global options"
                sub.params.append(leaf)
        help_option = sub.get_help_option(typer.Context(sub, info_name=sub.name))
        for param in [*sub.params, *([help_option] if help_option else [])]:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""


# -- errors ------------------------------------------------------------------------------


def _one_line(code: str, message: str, hint: str | None) -> str:
    line = f"error [{code}]: {message}" + (f" (hint: {hint})" if hint else "")
    return " ".join(line.split())


def describe(exc: BaseException) -> tuple[str, str, str | None, int]:
    """(code, message, hint, exit status) of an error."""
    if isinstance(exc, ApiProblem):
        hint = exc.extra.get("hint")
        status = EXIT_INTERNAL if exc.problem_status >= 500 else EXIT_REFUSED
        return exc.problem_code, exc.message, hint, status
    if isinstance(exc, httpx.TransportError):
        exc = unreachable(exc)
    if isinstance(exc, TrustfleetError):
        hint = exc.extra.get("hint")
        if isinstance(exc, CliError):
            status = exc.exit_code
        elif isinstance(exc, ConfigurationError):
            status = EXIT_USAGE
        else:  # an error carrying a server's answer (http_status) is classed by that answer
            remote = getattr(exc, "http_status", None)
            http_status = remote if isinstance(remote, int) else exc.status
            status = EXIT_INTERNAL if http_status >= 500 else EXIT_REFUSED
        return exc.code, exc.message, hint, status
    if isinstance(exc, OSError) and exc.filename is not None:
        return "file-error", f"{exc.filename}: {exc.strerror or exc}", None, EXIT_USAGE
    return (
        "internal-error",
        f"unexpected {type(exc).__name__}: {exc}",
        "run again with --debug for the traceback",
        EXIT_INTERNAL,
    )


def _usage_line(exc: typer.TyperException) -> str:
    message = exc.format_message().replace("Value error, ", "")
    ctx = getattr(exc, "ctx", None)
    hint = f"see `{ctx.command_path} --help`" if ctx is not None else None
    return _one_line("usage-error", message, hint)


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line on standard error; its exit status."""
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130
    if isinstance(exc, typer.TyperException):  # the command line's own errors
        if type(exc).__name__ == "NoArgsIsHelpError":
            return EXIT_USAGE  # the help was printed
        sys.stderr.write(_usage_line(exc) + "\n")
        return EXIT_USAGE
    if isinstance(exc, typer.Abort):
        sys.stderr.write("aborted\n")
        return EXIT_REFUSED
    if state.debug:
        traceback.print_exception(exc, file=sys.stderr)
    code, message, hint, status = describe(exc)
    sys.stderr.write(_one_line(code, message, hint) + "\n")
    return status


def run(app: typer.Typer, args: Sequence[str] | None = None) -> int:
    """Run the CLI; its exit status (errors printed as one line each)."""
    command = typer.main.get_command(app)
    _prepare(command)
    try:
        try:
            result = command.main(args=args, prog_name="trustfleet", standalone_mode=False)
        finally:
            state.close()
    except SystemExit:
        raise
    except BaseException as exc:  # every error ends here as one line and an exit status
        return report(exc)
    return result if isinstance(result, int) else 0
