"""Errors of the TMK download (both roles) and of the terminal's secure control module.

Every failure a peer or an attacker can cause has its own class and stable ``code``, so the
server's audit log, the API's problem+json and the terminal's display all say *which*
check failed. Messages never carry key material, randoms or MACs.
"""

from __future__ import annotations

from trustfleet.errors import TrustfleetError
from trustfleet.wire import MalformedMessage


class TmkError(TrustfleetError):
    code = "tmk-error"
    status = 400
    title = "The TMK download failed"


# -- message and state-machine errors -----------------------------------------------


class TmkMalformedMessage(TmkError, MalformedMessage):
    code = "tmk-malformed-message"
    title = "The TMK download message is malformed"


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
