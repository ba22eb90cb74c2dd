"""Protocol sessions: ids, the stage and expiry guards of the server role, and the
single-use state machine of a device role.

Every challenge-response flow (a TMK download, an SE verification, an eSIM deactivation)
has a session that is single use and time limited: a message for the wrong stage, for
another session or after the deadline is refused, and a device role that failed once
refuses every further step. Each protocol names its own error classes for these refusals
(:class:`SessionErrors`), so its peers see the protocol's codes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Generic, TypeVar

from trustfleet.errors import TrustfleetError

SESSION_ID_BYTES = 16
#: a session id on the wire and in URLs: 32 lowercase hex digits (128 random bits)
SESSION_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
SESSION_ID_RULE = "32 lowercase hex digits"

RandomSource = Callable[[int], bytes]
Stage = TypeVar("Stage", bound=StrEnum)
_R = TypeVar("_R")


def new_session_id(random: RandomSource) -> str:
    return random(SESSION_ID_BYTES).hex()


def is_session_id(value: object) -> bool:
    return isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True)
class SessionErrors:
    """A protocol's errors for the kit's refusals."""

    out_of_order: type[TrustfleetError]  # a message for another stage, or after the end
    expired: type[TrustfleetError]  # the session's deadline has passed
    replay: type[TrustfleetError]  # the message belongs to another session


def expired(expires_at: datetime, now: datetime) -> bool:
    """Whether a session ending at ``expires_at`` is over at ``now`` (aware times; a naive
    ``now`` is a caller's bug: ValueError)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now >= expires_at


def expect(
    errors: SessionErrors,
    *,
    stage: StrEnum,
    expected: StrEnum,
    session_id: str,
    message_session_id: str,
    expires_at: datetime,
    now: datetime,
) -> None:
    """The server role's guard before it takes a message: the session is at ``expected``,
    the message is this session's, and the deadline has not passed."""
    if stage is not expected:
        raise errors.out_of_order(f"the session is {stage.value}, not {expected.value}")
    if message_session_id != session_id:
        raise errors.replay()
    if expired(expires_at, now):
        raise errors.expired()


class SingleUseRole(Generic[Stage]):
    """A device role's state machine: each step is allowed at one stage, moves to the next
    stage when it succeeds, and to ``failed`` for good when it raises. Subclasses call
    :meth:`_step`."""

    def __init__(self, initial: Stage, failed: Stage, out_of_order: type[TrustfleetError]) -> None:
        self._stage = initial
        self._failed = failed
        self._out_of_order = out_of_order

    @property
    def stage(self) -> Stage:
        return self._stage

    def _step(self, expected: Stage, next_stage: Stage, step: Callable[[], _R]) -> _R:
        """Run ``step`` if the role is at ``expected``; then it is at ``next_stage``."""
        if self._stage is not expected:
            raise self._out_of_order(f"the session is {self._stage.value}, not {expected.value}")
        try:
            result = step()
        except BaseException:
            self._stage = self._failed
            raise
        self._stage = next_stage
        return result
