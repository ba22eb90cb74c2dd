"""The reference M2M terminal (``trustfleet emulate m2m``): it holds its keys, composes its
key-sync requests (counter and MAC, protocol.py) and sends them by SMS, posted to a
gateway's webhook signed as the gateway would sign it, or over HTTP through a device
gateway. It also writes its factory record: CSV rows, or a signed manifest line.

This is an emulator: its keys sit in ``terminal.json`` (mode 0600) in its directory, where
a real terminal keeps them inside its crypto hardware.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.keysync import protocol
from trustfleet.keysync.errors import KeysyncServerRefused
from trustfleet.keysync.sync import twilio_signature
from trustfleet.wire import canonical_json

STATE_FILE = "terminal.json"
SYNC_PATH = "/v1/keysync/sync-requests"


@dataclass
class HeldKey:
    key_id: str
    key_hex: str
    algorithm: str
    application_id: str | None = None
    label: str = ""
    counter: int = 0

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.key_hex)

    def __repr__(self) -> str:  # never the key
        return f"HeldKey({self.key_id!r}, {self.algorithm}, app={self.application_id!r})"


@dataclass
class M2mTerminal:
    directory: Path
    terminal_id: str
    mdn: str
    keys: list[HeldKey] = field(default_factory=list)

    # -- factory and storage --------------------------------------------------------

    @classmethod
    def factory(
        cls,
        directory: Path,
        terminal_id: str,
        mdn: str,
        applications: list[str | None],
        *,
        algorithm: KeyAlgorithm = KeyAlgorithm.AES_128,
    ) -> M2mTerminal:
        """A terminal with one fresh key per entry of ``applications`` (None: a key not
        tied to an application), random key IDs."""
        directory.mkdir(parents=True, exist_ok=False)
        length = protocol.KEY_LENGTHS[algorithm][0]
        keys = [
            HeldKey(secrets.token_hex(8), secrets.token_bytes(length).hex(), algorithm.value, app)
            for app in applications
        ]
        terminal = cls(directory, terminal_id, mdn, keys)
        terminal.save()
        return terminal

    @classmethod
    def open(cls, directory: Path) -> M2mTerminal:
        state = json.loads((directory / STATE_FILE).read_text())
        keys = [HeldKey(**k) for k in state["keys"]]
        return cls(directory, state["terminal_id"], state["mdn"], keys)

    def save(self) -> None:
        state = {
            "terminal_id": self.terminal_id,
            "mdn": self.mdn,
            "keys": [asdict(k) for k in self.keys],
        }
        path = self.directory / STATE_FILE
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle)
        os.replace(temporary, path)

    def csv_rows(self, *, header: bool = True) -> str:
        lines = ["terminal_id,key_id,key,application_id,label,algorithm"] if header else []
        for k in self.keys:
            lines.append(
                f"{self.terminal_id},{k.key_id},{k.key_hex},{k.application_id or ''},"
                f"{k.label},{k.algorithm}"
            )
        return "\n".join(lines) + "\n"

    def manifest_line(
        self,
        signing_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
        *,
        kid: str,
        import_key: x25519.X25519PublicKey,
    ) -> str:
        """This terminal's record, signed by its manufacturer, each key sealed to the key
        management platform's import key."""
        keys = [
            protocol.ManifestKey(
                key_id=k.key_id,
                sealed_key=protocol.seal_manifest_key(
                    k.key,
                    import_key=import_key,
                    kid=kid,
                    terminal_id=self.terminal_id,
                    key_id=k.key_id,
                ),
                application_id=k.application_id,
                label=k.label or None,
                algorithm=k.algorithm,
            )
            for k in self.keys
        ]
        return protocol.sign_manifest_record(
            signing_key, kid=kid, terminal_id=self.terminal_id, keys=keys
        )

    # -- requests -------------------------------------------------------------------

    def held(self, key_id: str | None = None, application_id: str | None = None) -> HeldKey:
        for k in self.keys:
            if (key_id is None or k.key_id == key_id) and (
                application_id is None or k.application_id in (application_id, None)
            ):
                return k
        raise KeyError("the terminal holds no such key")

    def next_request(
        self,
        *,
        key_id: str | None = None,
        application_id: str | None = None,
        name_application: bool | None = None,
    ) -> protocol.SyncRequest:
        """The next request for a key (its counter moves on and is saved first). The
        application ID is named when the terminal holds several keys, unless told."""
        held = self.held(key_id, application_id)
        held.counter += 1
        self.save()
        named = name_application if name_application is not None else len(self.keys) > 1
        app = (application_id or held.application_id) if named else None
        return protocol.compose_request(
            held.key,
            KeyAlgorithm(held.algorithm),
            mdn=self.mdn,
            key_id=held.key_id,
            counter=held.counter,
            application_id=app,
        )

    def sms_form(
        self, request: protocol.SyncRequest, *, to: str, message_sid: str | None = None
    ) -> list[tuple[str, str]]:
        """The form fields an SMS gateway posts for this SMS (Twilio's names)."""
        return [
            ("MessageSid", message_sid or "SM" + secrets.token_hex(16)),
            ("AccountSid", "AC" + "0" * 32),
            ("From", self.mdn),
            ("To", to),
            ("Body", request.to_text()),
            ("NumMedia", "0"),
        ]


def post_sms(
    client: httpx.Client,
    webhook_url: str,
    form: list[tuple[str, str]],
    *,
    gateway_secret: str,
    signed_url: str | None = None,
) -> httpx.Response:
    """Post an inbound SMS to a webhook as the gateway does: form-encoded and signed
    (``X-Twilio-Signature`` over the URL the gateway believes it calls)."""
    signature = twilio_signature(gateway_secret.encode(), signed_url or webhook_url, form)
    return client.post(
        webhook_url,
        data=dict(form),
        headers={"X-Twilio-Signature": signature},
    )


def sync_over_http(
    client: httpx.Client, token: str, terminal: M2mTerminal, request: protocol.SyncRequest
) -> dict[str, str]:
    """A device gateway's key-sync request for an IP-connected terminal."""
    body = canonical_json(
        {"type": "keysync-sync-request", "v": 1, "mdn": terminal.mdn, "request": request.to_text()}
    )
    response = client.post(
        SYNC_PATH,
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    if response.status_code >= 400:
        problem = response.json()
        raise KeysyncServerRefused(
            str(problem.get("code")), str(problem.get("detail")), response.status_code
        )
    result: dict[str, str] = response.json()
    return result
