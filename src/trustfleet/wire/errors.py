"""The error of a message that does not parse."""

from __future__ import annotations

from trustfleet.errors import InvalidInput


class MalformedMessage(InvalidInput):
    """A protocol message that is not what its grammar allows: bad JSON or UTF-8, a
    duplicate, missing, unknown or mistyped field, a value out of range, non-canonical
    base64. Each domain derives its own (``tmk-malformed-message``, ...) so its peers see
    the domain's code."""

    code = "malformed-message"
    title = "The message is malformed"
