"""Every error of the key-sync capability, under :class:`KeysyncError`, one class and one
stable code per condition (listed in docs/keysync.md). A refused key-sync request is
audited with its code; messages never carry key material, MACs or secrets."""

from __future__ import annotations

from trustfleet.errors import Conflict, Forbidden, InvalidInput, NotFound, TrustfleetError
from trustfleet.wire import MalformedMessage


class KeysyncError(TrustfleetError):
    code = "keysync-error"
    status = 400
    title = "The key-sync request failed"


class KeysyncMalformedMessage(KeysyncError, MalformedMessage):
    code = "keysync-malformed-request"
    title = "The key-sync request does not follow its grammar"


# -- the key-sync request, in the order it is checked -----------------------------------


class KeysyncBadGatewaySignature(KeysyncError, Forbidden):
    code = "keysync-bad-gateway-signature"
    status = 403
    title = "The SMS gateway's request signature does not verify"


class KeysyncUnknownGateway(KeysyncError, Forbidden):
    code = "keysync-unknown-gateway"
    status = 403
    title = "No SMS gateway is registered under that name"


class KeysyncInvalidMdn(KeysyncError, InvalidInput):
    code = "keysync-invalid-mdn"
    title = "The MDN is not an acceptable mobile number"


class KeysyncUnregisteredMdn(KeysyncError):
    code = "keysync-unregistered-mdn"
    status = 403
    title = "The MDN is not registered for any application"


class KeysyncUnknownKeyId(KeysyncError):
    code = "keysync-unknown-key-id"
    status = 404
    title = "No imported key has that key ID"


class KeysyncBadMac(KeysyncError):
    code = "keysync-bad-mac"
    status = 403
    title = "The request's MAC does not verify under the terminal's key"


class KeysyncReplayedCounter(KeysyncError):
    code = "keysync-replayed-counter"
    status = 409
    title = "The request's counter is not above the last one accepted for that key"


class KeysyncKeyOfAnotherTerminal(KeysyncError):
    code = "keysync-key-of-another-terminal"
    status = 403
    title = "The key ID belongs to a terminal other than the one this MDN is bound to"


class KeysyncApplicationIdRequired(KeysyncError):
    code = "keysync-application-id-required"
    status = 400
    title = "The terminal holds several keys: the request must name the application ID"


class KeysyncApplicationNotRegistered(KeysyncError):
    code = "keysync-application-not-registered"
    status = 403
    title = "The MDN is not registered for that application ID"


class KeysyncKeyApplicationMismatch(KeysyncError):
    code = "keysync-key-application-mismatch"
    status = 403
    title = "The key was imported for another application ID"


class KeysyncNoPlatform(KeysyncError):
    code = "keysync-no-platform"
    status = 409
    title = "No application platform is registered for that application ID"


# -- management --------------------------------------------------------------------------


class KeysyncUnknownFormat(KeysyncError, InvalidInput):
    code = "keysync-unknown-format"
    status = 415
    title = "The import's format is not CSV, JSON Lines or a signed manifest"


class KeysyncInvalidImport(KeysyncError, InvalidInput):
    code = "keysync-invalid-import"
    title = "The import file cannot be read"


class KeysyncImportConflict(KeysyncError, Conflict):
    code = "keysync-import-conflict"
    status = 409
    title = "An import with that ID exists with other content, or is running elsewhere"


class KeysyncUnknownImport(KeysyncError, NotFound):
    code = "keysync-unknown-import"
    status = 404
    title = "No import has that ID"


class KeysyncInvalidRecord(KeysyncError, InvalidInput):
    code = "keysync-invalid-record"
    title = "The record is not valid"


class KeysyncNotFound(KeysyncError, NotFound):
    code = "keysync-not-found"
    status = 404
    title = "Not found"


class KeysyncUnknownSigner(KeysyncError):
    code = "keysync-unknown-signer"
    status = 403
    title = "No manufacturer signing key has that key ID"


# -- the terminal's and the platform's side ----------------------------------------------


class KeysyncServerRefused(KeysyncError):
    """The key management platform refused a request (``remote_code``)."""

    code = "keysync-server-refused"
    status = 502
    title = "The key management platform refused the request"

    def __init__(self, remote_code: str, detail: str, http_status: int) -> None:
        super().__init__(f"the server refused: [{remote_code}] {detail}")
        self.remote_code = remote_code
        self.http_status = http_status


class KeysyncPayloadInvalid(KeysyncError):
    code = "keysync-payload-invalid"
    title = "The delivered payload does not open for this platform and delivery"
