"""Undecoded triggers and R4.3's refusal rules for their name tail (spec §15.2).

The daemon's frame decoder hands TRIGGER_SERVICE3/4 over as :class:`RawFrame` (lengths
already checked); :func:`validate_trigger_frame` then refuses what R4.3 refuses - with the
request-id bytes to echo - and sanitises what it sanitises.
"""

from __future__ import annotations

import struct

import pytest

from qrexec.errors import InvalidField, RemoteProtocolError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.fields import validate_trigger_frame
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import RawFrame, encode

IDENT = b"SOCKET7".ljust(32, b"\0")


def v3(tail: bytes, target: bytes = b"vm1".ljust(64, b"\0"), ident: bytes = IDENT) -> RawFrame:
    return RawFrame(MsgType.TRIGGER_SERVICE3, target + ident + tail)


def v4(tail: bytes, source: bytes = b"\0" * 64, ident: bytes = IDENT) -> RawFrame:
    return RawFrame(MsgType.TRIGGER_SERVICE4, source + b"vm1".ljust(64, b"\0") + ident + tail)


def test_decoder_returns_raw_types_undecoded_after_length_checks() -> None:
    payload = b"vm1".ljust(64, b"\0") + IDENT + b"a\0a"
    frame = struct.pack("<II", MsgType.TRIGGER_SERVICE3, len(payload)) + payload
    raw_types = (MsgType.TRIGGER_SERVICE3,)
    assert FrameDecoder(3, raw_types=raw_types).feed(frame) == [
        RawFrame(MsgType.TRIGGER_SERVICE3, payload)
    ]
    with pytest.raises(RemoteProtocolError):
        FrameDecoder(3).feed(frame)  # the ordinary decoder rejects the layout
    too_short = struct.pack("<II", MsgType.TRIGGER_SERVICE3, 96) + b"\0" * 96
    with pytest.raises(RemoteProtocolError):
        FrameDecoder(3, raw_types=raw_types).feed(too_short)


def test_raw_frame_encodes_verbatim() -> None:
    frame = RawFrame(MsgType.SERVICE_CONNECT, struct.pack("<II", 2, 600) + b"id3\0")
    assert encode(frame) == bytes.fromhex("02020000 0c000000 02000000 58020000 69643300")


@pytest.mark.parametrize(
    "tail",
    [b"a", b"\0", b"\0\0", b"\0a\0", b"a\0\0", b"a\0a\0", b"a\0a", b"+\0", b"+a\0"],
)
@pytest.mark.parametrize("build", [v3, v4])
def test_name_tail_refusals_carry_the_ident(tail: bytes, build: object) -> None:
    assert callable(build)
    with pytest.raises(InvalidField) as info:
        validate_trigger_frame(build(tail))
    assert info.value.ident == IDENT


def test_refusal_echoes_an_invalid_ident_as_received() -> None:
    bad = b"\xff" * 32
    with pytest.raises(InvalidField) as info:
        validate_trigger_frame(v4(b"a", ident=bad))
    assert info.value.ident == bad


def test_sanitising_never_refuses() -> None:
    request = validate_trigger_frame(
        v4(b"a/b c\xff+x y\0", source=b"s" * 63 + b"!", ident=b"\0" * 32)
    )
    assert (request.service, request.source, request.ident) == ("a_b_c_+x_y", "s" * 63, "")
    full_target = validate_trigger_frame(v3(b"svc\0", target=b"t" * 63 + b"x"))
    assert full_target.target == "t" * 63
    assert validate_trigger_frame(v3(b"svc\0", target=b"\0" * 64)).target == ""
