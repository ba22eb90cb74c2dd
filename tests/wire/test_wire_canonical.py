"""The shared codec: one canonical encoding, and a strict parser that raises the domain's
own malformed-message error for anything a peer could get wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

import pytest

from trustfleet.errors import TrustfleetError
from trustfleet.wire import (
    Alphabet,
    Codec,
    Fields,
    MalformedMessage,
    Message,
    canonical_json,
    transcript,
)


class ToyMalformed(MalformedMessage):
    code = "toy-malformed-message"


URL = Codec(malformed=ToyMalformed, alphabet=Alphabet.URL, version=2, max_size=512)
STANDARD = Codec(malformed=ToyMalformed, alphabet=Alphabet.STANDARD)
_NAME = re.compile(r"[a-z]{1,8}")


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[str] = "toy-hello"
    CODEC: ClassVar[Codec] = URL
    name: str
    nonce: bytes
    at: datetime

    def __post_init__(self) -> None:
        URL.check_text(self.name, "name", _NAME, "1-8 lowercase letters")
        URL.check_bytes(self.nonce, "nonce", 4, 8)
        URL.check_time(self.at, "at")

    def _fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nonce": URL.encode_bytes(self.nonce),
            "at": self.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        return cls(name=fields.text("name"), nonce=fields.blob("nonce"), at=fields.time("at"))


HELLO = Hello("alice", b"\xfb\xff\x00\x01", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


def test_canonical_json_sorts_keys_has_no_whitespace_and_keeps_utf8() -> None:
    assert canonical_json({"b": 1, "a": "Zürich 密钥"}) == '{"a":"Zürich 密钥","b":1}'.encode()


def test_a_message_round_trips_to_the_same_bytes() -> None:
    wire = HELLO.to_json()
    assert (
        wire
        == b'{"at":"2026-01-02T03:04:05Z","name":"alice","nonce":"-_8AAQ","type":"toy-hello","v":2}'
    )
    assert Hello.from_json(wire) == HELLO
    assert Hello.from_json(wire).to_json() == wire


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"\xff{}", id="not utf-8"),
        pytest.param(b"[1]", id="not an object"),
        pytest.param(b'{"a":NaN}', id="nan"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="too deep / too big"),
        pytest.param(b'{"a":1,"a":2}', id="duplicate key"),
        pytest.param(b"x" * 600, id="over the size limit"),
        pytest.param(b'{"a":1', id="truncated"),
    ],
)
def test_the_parser_refuses_what_is_not_one_json_object(text: bytes) -> None:
    with pytest.raises(ToyMalformed):
        URL.load(text)


def _hello(**change: Any) -> bytes:
    obj = {
        "type": "toy-hello",
        "v": 2,
        "name": "alice",
        "nonce": "-_8AAQ",
        "at": "2026-01-02T03:04:05Z",
    }
    obj.update(change)
    return canonical_json({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"type": "toy-bye"}, id="another type"),
        pytest.param({"v": 1}, id="another version"),
        pytest.param({"v": True}, id="version as bool"),
        pytest.param({"name": None}, id="missing field"),
        pytest.param({"extra": 1}, id="unknown field"),
        pytest.param({"name": 7}, id="wrong type"),
        pytest.param({"name": "ALICE"}, id="value out of grammar"),
        pytest.param({"nonce": "-_8AAQ=="}, id="padded base64url"),
        pytest.param({"nonce": "+/8AAQ"}, id="standard alphabet in a url codec"),
        pytest.param({"nonce": "-_8AAR"}, id="non-canonical trailing bits"),
        pytest.param({"nonce": "AA"}, id="too short"),
        pytest.param({"at": "2026-01-02T03:04:05+00:00"}, id="time not in Z form"),
        pytest.param({"at": "2026-02-30T03:04:05Z"}, id="impossible date"),
    ],
)
def test_every_malformed_message_raises_the_domains_error(change: dict[str, Any]) -> None:
    with pytest.raises(ToyMalformed) as caught:
        Hello.from_json(_hello(**change))
    assert isinstance(caught.value, TrustfleetError)
    assert caught.value.code == "toy-malformed-message"
    assert caught.value.status == 400


def test_standard_alphabet_is_padded_and_canonical() -> None:
    assert STANDARD.encode_bytes(b"\xfb\xff") == "+/8="
    assert STANDARD.decode_bytes("+/8=", "x") == b"\xfb\xff"
    for bad in ("+/8", "-_8=", "+/9=", " +/8="):
        with pytest.raises(ToyMalformed):
            STANDARD.decode_bytes(bad, "x")


def test_the_transcript_is_unambiguous() -> None:
    assert transcript(b"ab", b"c") != transcript(b"a", b"bc")
    assert transcript(b"ab", b"") == b"\x00\x00\x00\x02ab\x00\x00\x00\x00"


# =====================================================================================
# A protocol that speaks several versions: each message says its own
# =====================================================================================


class ToyUnsupportedVersion(ToyMalformed):
    code = "toy-unsupported-version"


VERSIONED = Codec(
    malformed=ToyMalformed,
    version=1,
    versions=frozenset({1, 2}),
    unsupported_version=ToyUnsupportedVersion,
)


@dataclass(frozen=True)
class Ping(Message):
    """Version 1 has a name; version 2 adds a tag."""

    TYPE: ClassVar[str] = "toy-ping"
    CODEC: ClassVar[Codec] = VERSIONED
    name: str
    tag: str | None = None
    version: int = 1

    def wire_version(self) -> int:
        return self.version

    def _fields(self) -> dict[str, Any]:
        return {"name": self.name, **({"tag": self.tag} if self.version >= 2 else {})}

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        tag = fields.text("tag") if fields.version >= 2 else None
        return cls(name=fields.text("name"), tag=tag, version=fields.version)


def test_each_message_carries_its_own_version_and_is_parsed_in_it() -> None:
    one, two = Ping("a"), Ping("a", tag="t", version=2)
    assert one.to_json() == b'{"name":"a","type":"toy-ping","v":1}'
    assert two.to_json() == b'{"name":"a","tag":"t","type":"toy-ping","v":2}'
    assert Ping.from_json(one.to_json()) == one
    assert Ping.from_json(two.to_json()) == two
    # the fields of one version are not those of the other
    with pytest.raises(ToyMalformed, match="missing field 'tag'"):
        Ping.from_json(b'{"name":"a","type":"toy-ping","v":2}')
    with pytest.raises(ToyMalformed, match="unknown field"):
        Ping.from_json(b'{"name":"a","tag":"t","type":"toy-ping","v":1}')


def test_a_version_outside_the_codecs_is_its_own_error() -> None:
    with pytest.raises(ToyUnsupportedVersion, match="expected 1, 2"):
        Ping.from_json(b'{"name":"a","type":"toy-ping","v":3}')
    for not_a_version in (b"true", b"2.0", b'"2"'):
        with pytest.raises(ToyMalformed) as caught:
            Ping.from_json(b'{"name":"a","type":"toy-ping","v":' + not_a_version + b"}")
        assert type(caught.value) is ToyMalformed


def test_a_single_version_codec_writes_and_reads_only_its_version() -> None:
    assert HELLO.wire_version() == URL.version == 2
    assert URL.accepted_versions == frozenset({2})
    with pytest.raises(ToyMalformed, match="expected 2"):
        Hello.from_json(_hello(v=3))
