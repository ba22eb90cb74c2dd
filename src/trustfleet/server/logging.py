"""JSON-lines logs with secrets masked.

One JSON object per line on standard error: ``ts``, ``level``, ``logger``, ``msg`` and, inside
a request, ``request_id``, ``method`` and ``path`` (the access line adds ``status`` and
``duration_ms``). :class:`RedactionFilter` runs on the handler, so it also covers records
propagated from third-party loggers (uvicorn, SQLAlchemy): values of keys named like
key/secret/token/pin/password/private are masked, and so are long hex or base64 blobs and
anything shaped like an API token.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

REDACTED = "[redacted]"
MAX_TEXT_CHARS = 16_384


@dataclass(frozen=True)
class RequestLogContext:
    request_id: str
    method: str
    path: str


#: Set by the request middleware for the duration of one request (task-local).
request_log_context: ContextVar[RequestLogContext | None] = ContextVar(
    "trustfleet_request_log_context", default=None
)

_SENSITIVE_NAME = re.compile(r"key|secret|token|pin|passw|private|credential", re.IGNORECASE)
# names that contain a sensitive word but only ever carry identifiers
_HARMLESS_NAME = re.compile(r"(_id|_ids|_handle|_label|_backend|_count|_type)$", re.IGNORECASE)
# Any name=value or "name": value pair; the name is judged in Python. (A keyword inside the
# pattern, between two unbounded runs, backtracks cubically on long words.)
_KEY_VALUE = re.compile(
    r"""(?P<name>[A-Za-z0-9_.-]{1,64})"""
    r"""(?P<sep>["']?[ \t]*[:=][ \t]*["']?)"""
    r"""(?P<value>[^\s"',;&}\]]{1,64})"""
)
_VALUE_RUN = re.compile(r"""[^\s"',;&}\]]*""")
_API_TOKEN = re.compile(r"tf_[A-Za-z0-9_-]{16,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_HEX_BLOB = re.compile(r"(?<![0-9A-Za-z])(?:0x)?[0-9A-Fa-f]{33,}(?![0-9A-Za-z])")
_BASE64_BLOB = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{44,}={0,2}")
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|$)", re.DOTALL)

# attributes every LogRecord has; anything else came in through ``extra=``
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def is_sensitive_name(name: str) -> bool:
    return bool(_SENSITIVE_NAME.search(name)) and not _HARMLESS_NAME.search(name)


def _mask_pairs(text: str) -> str:
    """Mask the value of every pair with a sensitive name. A pair with a harmless name is
    skipped only up to its value, which may itself hold a pair (``config: password=x``)."""
    parts, pos = [], 0
    while match := _KEY_VALUE.search(text, pos):
        value_at = match.start("value")
        parts.append(text[pos:value_at])
        if is_sensitive_name(match["name"]):
            parts.append(REDACTED)
            value_run = _VALUE_RUN.match(text, value_at)
            pos = value_run.end() if value_run else match.end()
        else:
            pos = value_at
    parts.append(text[pos:])
    return "".join(parts)


def _mask_base64(match: re.Match[str]) -> str:
    blob = match[0]
    # a long run of letters only (or a path-like word) is prose, not key material
    looks_random = any(c.isdigit() for c in blob) and any(c.isupper() for c in blob)
    return REDACTED if looks_random else blob


def redact_text(text: str) -> str:
    """Mask secrets in free text: token-shaped strings, name=value pairs with a sensitive
    name, PEM blocks and long hex or base64 blobs. Text beyond ``MAX_TEXT_CHARS`` is cut."""
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + "…[truncated]"
    text = _PEM_BLOCK.sub(REDACTED, text)
    text = _API_TOKEN.sub("tf_" + REDACTED, text)
    text = _BEARER.sub(lambda m: m[1] + REDACTED, text)
    text = _mask_pairs(text)
    text = _HEX_BLOB.sub(REDACTED, text)
    return _BASE64_BLOB.sub(_mask_base64, text)


def redact_value(name: str, value: Any) -> Any:
    """Mask ``value`` entirely when ``name`` is sensitive, else mask secrets inside it."""
    if is_sensitive_name(name):
        return REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {str(k): redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value("", v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(str(value))


class RedactionFilter(logging.Filter):
    """Rewrites each record in place: the message is rendered and redacted, ``extra``
    fields are masked by name and content, exception text is redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string must not lose the record
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        for name in set(vars(record)) - _STANDARD_ATTRS:
            setattr(record, name, redact_value(name, getattr(record, name)))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = request_log_context.get()
        if context is not None:
            entry.update(
                request_id=context.request_id,
                method=context.method,
                path=redact_text(context.path),
            )
        for name in set(vars(record)) - _STANDARD_ATTRS:
            entry[name] = _jsonable(getattr(record, name))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float | list | dict):
        return value
    return str(value)


_HANDLER_MARK = "trustfleet_json_handler"


def configure_logging(level: str | int = "INFO", stream: Any = None) -> logging.Handler:
    """Send every log record to ``stream`` (standard error) as redacted JSON lines.

    Idempotent: a handler installed by an earlier call is replaced, not duplicated.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # uvicorn's own access log would duplicate ours (and log query strings)
    logging.getLogger("uvicorn.access").disabled = True
    return handler
