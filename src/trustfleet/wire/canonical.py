"""The canonical JSON codec of protocol messages and of everything hashed as JSON.

One encoding, so that equal values give equal bytes wherever they are signed, MACed,
chained or compared: object keys sorted, no whitespace, UTF-8 (non-ASCII characters as
themselves, not ``\\u`` escapes), bytes as base64, times as RFC 3339 UTC in whole seconds.

And one strict parser, for bytes that came from a peer: valid UTF-8 JSON whose top level
is an object, no duplicate keys, no ``NaN``/``Infinity``, a size limit, every field read
exactly once with its type and range checked (:class:`Fields`), base64 only in its one
canonical form. Anything else raises the codec's :class:`MalformedMessage` subclass, so a
peer learns the domain's own code (``tmk-malformed-message``...).

A protocol declares its messages as :class:`Message` subclasses that share one
:class:`Codec`: the domain's error, its base64 alphabet and its protocol version(s). A
protocol that speaks several versions lists them (``versions``); each message then says
its own (:meth:`Message.wire_version`), and its parser reads the version the peer sent
(:attr:`Fields.version`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, NoReturn, Self

from trustfleet.wire.errors import MalformedMessage

DEFAULT_MAX_SIZE = 64 * 1024
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_QUOTED_MAX = 40


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The canonical encoding of a JSON object (see the module docstring)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_time(value: datetime) -> str:
    """RFC 3339 UTC in whole seconds: ``2025-01-31T12:00:00Z``."""
    return value.astimezone(UTC).strftime(TIME_FORMAT)


def quoted(name: str) -> str:
    """A peer-chosen string, cut short for an error message."""
    return repr(name[:_QUOTED_MAX] + ("…" if len(name) > _QUOTED_MAX else ""))


class Alphabet(StrEnum):
    """How a protocol writes bytes. Each value has exactly one accepted encoding."""

    STANDARD = "base64"  # RFC 4648 section 4, with padding
    URL = "base64url"  # RFC 4648 section 5, without padding


@dataclass(frozen=True)
class Codec:
    """One protocol's encoding rules: its malformed-message error, its base64 alphabet,
    its version number (the ``v`` field of every message) and its size limit.

    ``versions`` are the versions a parser accepts when the protocol speaks more than one
    (empty: only ``version``); ``unsupported_version`` is the error of a well-formed
    version number outside them (the malformed-message error when None)."""

    malformed: type[MalformedMessage] = MalformedMessage
    alphabet: Alphabet = Alphabet.URL
    version: int = 1
    max_size: int = DEFAULT_MAX_SIZE
    versions: frozenset[int] = frozenset()
    unsupported_version: type[MalformedMessage] | None = None

    @property
    def accepted_versions(self) -> frozenset[int]:
        return self.versions or frozenset({self.version})

    def fail(self, message: str) -> NoReturn:
        raise self.malformed(message)

    # -- bytes and times -----------------------------------------------------------------

    def encode_bytes(self, value: bytes) -> str:
        if self.alphabet is Alphabet.STANDARD:
            return base64.b64encode(value).decode("ascii")
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")

    def decode_bytes(self, text: object, name: str) -> bytes:
        if not isinstance(text, str):
            self.fail(f"{name} must be a {self.alphabet.value} string")
        try:
            raw = text.encode("ascii")
            if self.alphabet is Alphabet.STANDARD:
                value = base64.b64decode(raw, validate=True)
            else:
                if b"=" in raw or b"+" in raw or b"/" in raw:
                    raise binascii.Error("not base64url without padding")
                value = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            self.fail(f"{name} is not valid {self.alphabet.value}")
        if self.encode_bytes(value) != text:  # one encoding per value: canonical form only
            self.fail(f"{name} is not canonical {self.alphabet.value}")
        return value

    def parse_time(self, text: object, name: str) -> datetime:
        if not isinstance(text, str) or not _TIME_PATTERN.fullmatch(text):
            self.fail(f"{name} must be an RFC 3339 UTC time like 2025-01-31T12:00:00Z")
        try:
            return datetime.fromisoformat(text)  # the pattern admits only UTC ("Z")
        except ValueError:
            self.fail(f"{name} is not a valid time")

    # -- checks a message makes of its own values -----------------------------------------

    def check_bytes(self, value: object, name: str, low: int, high: int) -> None:
        if not isinstance(value, bytes) or not low <= len(value) <= high:
            self.fail(f"{name} must be {low}..{high} bytes")

    def check_text(self, value: object, name: str, pattern: re.Pattern[str], rule: str) -> None:
        """``value`` must fully match ``pattern``; ``rule`` says what that is, in words."""
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.fail(f"{name} must be {rule}")

    def check_time(self, value: object, name: str) -> None:
        if (
            not isinstance(value, datetime)
            or value.utcoffset() != timedelta(0)
            or value.microsecond != 0
        ):
            self.fail(f"{name} must be an aware UTC datetime in whole seconds")

    # -- parsing -------------------------------------------------------------------------

    def load(self, data: bytes | str) -> dict[str, Any]:
        """A JSON object from a peer, strictly: UTF-8, no duplicate keys, no NaN."""
        if not isinstance(data, bytes | str):
            self.fail("a message must be JSON text")
        if len(data) > self.max_size:
            self.fail(f"a message must not exceed {self.max_size} bytes")
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
            loaded = json.loads(
                text, object_pairs_hook=self._unique_keys, parse_constant=self._no_constant
            )
        except (ValueError, RecursionError):  # bad UTF-8 or JSON, too deep, too long a number
            self.fail("the message is not valid JSON")
        if not isinstance(loaded, dict):
            self.fail("a message must be a JSON object")
        return loaded

    def _unique_keys(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                self.fail(f"duplicate field {quoted(key)}")
            result[key] = value
        return result

    def _no_constant(self, name: str) -> Any:
        self.fail(f"{name} is not valid JSON")

    def fields(self, data: bytes | str | dict[str, Any], message_type: str | None) -> Fields:
        """Typed access to a message's fields; with ``message_type``, its ``type`` and
        ``v`` fields must say that message in one of this codec's versions (then
        :attr:`Fields.version` is it)."""
        obj = data if isinstance(data, dict) else self.load(data)
        fields = Fields(obj, self)
        if message_type is not None:
            if fields.take("type") != message_type:
                self.fail(f"expected a {message_type} message")
            version = fields.take("v")
            accepted = self.accepted_versions
            expected = ", ".join(str(v) for v in sorted(accepted))
            if type(version) is not int:
                self.fail(f"the protocol version must be an integer ({expected})")
            if version not in accepted:
                error = self.unsupported_version or self.malformed
                raise error(f"unsupported protocol version, expected {expected}")
            fields.version = version
        return fields


class Fields:
    """Typed, exhaustive access to a decoded JSON object: every field is read exactly once,
    and :meth:`done` refuses fields nobody read."""

    def __init__(self, obj: dict[str, Any], codec: Codec) -> None:
        self._obj = obj
        self._codec = codec
        self._seen: set[str] = set()
        #: the message's protocol version (``v``), once :meth:`Codec.fields` checked it
        self.version = codec.version

    def take(self, name: str) -> Any:
        if name not in self._obj:
            self._codec.fail(f"missing field {name!r}")
        self._seen.add(name)
        return self._obj[name]

    def is_null(self, name: str) -> bool:
        """True (and the field read) when ``name`` is present and ``null``."""
        if name in self._obj and self._obj[name] is None:
            self._seen.add(name)
            return True
        return False

    def text(self, name: str) -> str:
        value = self.take(name)
        if not isinstance(value, str):
            self._codec.fail(f"{name} must be a string")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.take(name)
        if type(value) is not int or not low <= value <= high:
            self._codec.fail(f"{name} must be an integer in {low}..{high}")
        return value

    def choice(self, name: str, allowed: Mapping[str, Any] | frozenset[str]) -> str:
        value = self.take(name)
        if not isinstance(value, str) or value not in allowed:
            self._codec.fail(f"{name} must be one of {', '.join(sorted(allowed))}")
        return value

    def blob(self, name: str) -> bytes:
        return self._codec.decode_bytes(self.take(name), name)

    def blob_list(self, name: str, max_items: int) -> tuple[bytes, ...]:
        value = self.take(name)
        if not isinstance(value, list) or len(value) > max_items:
            self._codec.fail(f"{name} must be a list of at most {max_items} items")
        return tuple(self._codec.decode_bytes(item, name) for item in value)

    def time(self, name: str) -> datetime:
        return self._codec.parse_time(self.take(name), name)

    def done(self) -> None:
        unknown = set(self._obj) - self._seen
        if unknown:
            names = ", ".join(quoted(name) for name in sorted(unknown)[:5])
            self._codec.fail(f"unknown field(s): {names}")


class Message:
    """A protocol message: a frozen dataclass whose subclass sets :attr:`TYPE` and
    :attr:`CODEC` and writes :meth:`_fields` (values already encoded) and
    :meth:`_from_fields`. On the wire it is ``{"type": TYPE, "v": version, ...fields}``
    in canonical JSON; :meth:`from_json` parses strictly. A message of a protocol with
    several versions overrides :meth:`wire_version` and reads :attr:`Fields.version`."""

    TYPE: ClassVar[str]
    CODEC: ClassVar[Codec]

    def wire_version(self) -> int:
        """The ``v`` of this message: the codec's version unless the message has its own."""
        return self.CODEC.version

    def _fields(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        raise NotImplementedError

    def to_json(self) -> bytes:
        """The canonical encoding: equal messages encode to equal bytes."""
        return canonical_json({"type": self.TYPE, "v": self.wire_version(), **self._fields()})

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Strict parse; anything but a well-formed message raises the codec's error."""
        codec = cls.CODEC
        fields = codec.fields(data, cls.TYPE)
        try:
            message = cls._from_fields(fields)
        except MalformedMessage:
            raise
        except (TypeError, ValueError):  # a value check the message makes itself
            codec.fail(f"the {cls.TYPE} message is not valid")
        fields.done()
        return message
