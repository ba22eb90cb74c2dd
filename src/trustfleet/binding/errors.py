"""Errors of SE binding (host side, applet files, transports), with stable codes.

The applet itself never raises at its peer: it answers ISO 7816-4 status words. These are
what the *host* library, the CLI and the emulator raise when a status word, a cryptogram,
a file or a link says something went wrong. Messages never carry credentials or keys.
"""

from __future__ import annotations

from trustfleet.errors import TrustfleetError
from trustfleet.kit.client import NoToken
from trustfleet.wire import MalformedMessage


class SeError(TrustfleetError):
    code = "se-error"
    status = 400
    title = "Secure-element binding failed"


class SeMalformedMessage(SeError, MalformedMessage):
    code = "se-malformed-message"
    title = "A binding message (APDU data) is malformed"


class SeUnsupported(SeError):
    code = "se-unsupported"
    title = "The binding mode or suite is not supported"


class SeRefused(SeError):
    """The SE answered a status word the host did not expect; ``sw`` holds it."""

    code = "se-refused"
    status = 409
    title = "The secure element refused the command"

    def __init__(self, message: str | None = None, *, sw: int = 0) -> None:
        super().__init__(message, sw=sw)
        self.sw = sw


class SeNotSelected(SeRefused):
    code = "se-applet-missing"
    title = "The card has no trustfleet binding applet"


class SeAlreadyLocked(SeRefused):
    code = "se-already-locked"
    title = "The secure element is bound and locked; it cannot be registered again"


class SeNotVerified(SeRefused):
    code = "se-not-verified"
    status = 403
    title = "The secure element refuses its services until the binding is verified"


class SeVerificationFailed(SeRefused):
    code = "se-verification-failed"
    status = 403
    title = "The secure element rejected this host's binding proof"

    def __init__(self, message: str | None = None, *, sw: int = 0, tries_left: int = 0):
        super().__init__(message, sw=sw)
        self.tries_left = tries_left


class SeBlocked(SeRefused):
    code = "se-blocked"
    status = 403
    title = "The secure element is blocked after too many failed verifications"


class SeBoundElsewhere(SeError):
    code = "se-bound-elsewhere"
    status = 403
    title = "The secure element is locked to another host (this host holds no credential for it)"


class SeNotBound(SeError):
    code = "se-not-bound"
    status = 409
    title = "This host has not bound the secure element yet (run `trustfleet se bind`)"


class SeCardCryptogramInvalid(SeError):
    code = "se-card-cryptogram-invalid"
    status = 403
    title = "The secure element's cryptogram does not verify: it is not the SE this host paired"


class SePairingFailed(SeError):
    code = "se-pairing-failed"
    status = 403
    title = "The pairing confirmation from the secure element does not verify"


class SeSecureMessagingFailed(SeError):
    code = "se-secure-messaging-failed"
    status = 403
    title = "A secure-messaging MAC does not verify; the session is closed"


class SeTransportError(SeError):
    code = "se-transport-error"
    status = 502
    title = "The link to the secure element failed"


class SeHostStoreError(SeError):
    code = "se-host-store-error"
    status = 500
    title = "The host's binding store failed"


class SeHostStoreUnreadable(SeHostStoreError):
    code = "se-host-store-unreadable"
    title = "The host's binding store is corrupt or the host key is wrong"


class SeHostStoreExists(SeHostStoreError):
    code = "se-host-store-exists"
    status = 409
    title = "A host key or binding store already exists at that path"


class SeNvUnreadable(SeError):
    code = "se-nv-unreadable"
    status = 500
    title = "The secure element's non-volatile state is missing or corrupt"


class SeNvExists(SeError):
    code = "se-nv-exists"
    status = 409
    title = "A secure element already exists at that path"


# -- the fleet view (server) and its clients --------------------------------------------


class SeUnknownElement(SeError):
    code = "se-unknown-element"
    status = 404
    title = "No host has reported this secure element"


class SeUnknownFlag(SeError):
    code = "se-unknown-flag"
    status = 404
    title = "No fleet flag has that id"


class SeFlagAlreadyAcknowledged(SeError):
    code = "se-flag-already-acknowledged"
    status = 409
    title = "The flag has been acknowledged already"


class SeReportIdReused(SeError):
    code = "se-report-id-reused"
    status = 409
    title = "The report id was used already for another report"


class SeTokenMissing(SeError, NoToken):  # the CLI exits 2, as for any missing token
    code = "se-token-missing"
    status = 400
    title = "Set TRUSTFLEET_TOKEN to an API token of the right role"
