"""Every error of the TMK capability: the download (both roles), the terminal registry and
its states, working keys, the key server's identity, and the terminal's secure control
module. All derive from :class:`TmkError`; each condition has one class and one stable
``code`` (the list is in docs/tmk.md), so the server's audit log, the API's problem+json
and the terminal's display all say *which* check failed. Messages never carry key
material, randoms or MACs.
"""

from __future__ import annotations

from trustfleet.errors import Conflict, InvalidInput, NotFound, TrustfleetError
from trustfleet.wire import MalformedMessage


class TmkError(TrustfleetError):
    code = "tmk-error"
    status = 400
    title = "The TMK download failed"


# -- message and state-machine errors -----------------------------------------------


class TmkMalformedMessage(TmkError, MalformedMessage):
    code = "tmk-malformed-message"
    title = "The TMK download message is malformed"


class TmkUnsupportedVersion(TmkMalformedMessage):
    """A message in a protocol version the receiver does not speak, or (the key server) a
    download request in a version it is configured to refuse."""

    code = "tmk-unsupported-version"
    title = "The TMK download protocol version is not supported"


class TmkVersionMismatch(TmkError):
    """A message in another protocol version than its session's: on the terminal, a
    challenge that answers its request in another version (a downgrade attempt)."""

    code = "tmk-version-mismatch"
    title = "The message is in another protocol version than its TMK download session"


class TmkOutOfOrder(TmkError):
    code = "tmk-out-of-order"
    status = 409
    title = "The message does not fit the current step of the TMK download session"


class TmkSessionExpired(TmkError):
    code = "tmk-session-expired"
    status = 410
    title = "The TMK download session has expired"


class TmkReplay(TmkError):
    code = "tmk-replay"
    status = 409
    title = "The message belongs to another TMK download session"


class TmkUnsupportedSuite(TmkError):
    code = "tmk-unsupported-suite"
    title = "The suite or key algorithm is not supported for TMK download"


# -- authentication errors ----------------------------------------------------------


class TmkUntrustedServerCertificate(TmkError):
    code = "tmk-untrusted-server-certificate"
    status = 403
    title = "The key server's work certificate does not chain to the terminal's root"


class TmkRevokedServerCertificate(TmkUntrustedServerCertificate):
    code = "tmk-revoked-server-certificate"
    title = "The key server's work certificate (or its issuer) is revoked"


class TmkBadServerSignature(TmkError):
    code = "tmk-bad-server-signature"
    status = 403
    title = "The key server's signature over the challenge does not verify"


class TmkBadDeliverySignature(TmkError):
    code = "tmk-bad-delivery-signature"
    status = 403
    title = "The key server's signature over the key delivery does not verify"


class TmkInvalidTicket(TmkError):
    code = "tmk-invalid-ticket"
    status = 403
    title = "The session ticket was not issued by this key server, or was altered"


class TmkBadTerminalProof(TmkError):
    code = "tmk-bad-terminal-proof"
    status = 403
    title = "The terminal's proof does not verify under the key registered for its SN"


# -- key transport errors -----------------------------------------------------------


class TmkUnwrapFailed(TmkError):
    code = "tmk-unwrap-failed"
    title = "The wrapped TMK does not decrypt for this terminal and session"


class TmkKcvMismatch(TmkError):
    code = "tmk-kcv-mismatch"
    title = "The delivered TMK does not match its key check value"


class TmkBadConfirmation(TmkError):
    code = "tmk-bad-confirmation"
    status = 403
    title = "The terminal's confirmation MAC does not verify under the delivered TMK"


# -- the terminal and its state on the server -----------------------------------------


class TmkUnknownTerminal(TmkError, NotFound):
    code = "tmk-unknown-terminal"
    status = 404
    title = "No terminal is registered with that SN"


class TmkInvalidTerminalRecord(TmkError, InvalidInput):
    code = "tmk-invalid-terminal-record"
    title = "The terminal record is not valid"


class TmkTerminalAlreadyRegistered(TmkError, Conflict):
    code = "tmk-terminal-already-registered"
    status = 409
    title = "A terminal with that SN is registered with another key"


class TmkTerminalStateConflict(TmkError, Conflict):
    code = "tmk-terminal-state-conflict"
    status = 409
    title = "The terminal's status does not allow this change"


class TmkTerminalSuspended(TmkError):
    code = "tmk-terminal-suspended"
    status = 403
    title = "The terminal is suspended"


class TmkTerminalRevoked(TmkError):
    code = "tmk-terminal-revoked"
    status = 403
    title = "The terminal is revoked"


class TmkSessionNotFound(TmkError):
    code = "tmk-session-not-found"
    status = 404
    title = "No TMK download session has that id"


class TmkDownloadNotAllowed(TmkError):
    code = "tmk-download-not-allowed"
    status = 409
    title = "The terminal has an active TMK; a new download needs an operator's rotate-tmk"


class TmkTerminalAborted(TmkError):
    code = "tmk-terminal-aborted"
    status = 409
    title = "The terminal reported that the download failed on its side"


class TmkNoActiveTmk(TmkError):
    code = "tmk-no-active-tmk"
    status = 409
    title = "The terminal has no active TMK"


class TmkNoWorkingKey(TmkError):
    code = "tmk-no-working-key"
    status = 409
    title = "The terminal has no active working key of that usage"


class TmkIdentityNotInitialised(TmkError, NotFound):
    code = "tmk-identity-not-initialised"
    status = 404
    title = "The key server has no work certificate yet"


# -- the terminal's view of the server ------------------------------------------------


class TmkServerRefused(TmkError):
    """The key server answered a step with an error (its problem code is ``remote_code``)."""

    code = "tmk-server-refused"
    status = 502
    title = "The key server refused the request"

    def __init__(self, remote_code: str, detail: str, http_status: int) -> None:
        super().__init__(f"the key server refused: [{remote_code}] {detail}")
        self.remote_code = remote_code
        self.http_status = http_status


class TmkWorkingKeyRefused(TmkError):
    code = "tmk-working-key-refused"
    title = "The working key block does not check out against the terminal's TMK"


# -- secure control module ----------------------------------------------------------


class ScmError(TmkError):
    code = "tmk-scm-error"
    status = 500
    title = "The terminal's secure control module failed"


class ScmUnreadable(ScmError):
    code = "tmk-scm-unreadable"
    title = "The secure control module file is corrupt or the device key is wrong"


class ScmNoTmk(ScmError):
    code = "tmk-scm-no-tmk"
    status = 409
    title = "No terminal master key is installed in the secure control module"


class ScmExists(ScmError):
    code = "tmk-scm-exists"
    status = 409
    title = "A secure control module file already exists at that path"


def error_for_code(code: str) -> type[TmkError]:
    """The :class:`TmkError` class whose ``code`` is ``code`` (``TmkError`` itself for a
    code no class has): what a repeated request is refused with again, from the code the
    server stored when it refused the first copy."""
    pending: list[type[TmkError]] = [TmkError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return TmkError
