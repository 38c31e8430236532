"""Golden byte vectors for every message layout of spec §3.3.

The hex strings below were written by hand from the layout tables (header = type u32 LE,
len u32 LE; then the payload fields in order), not produced by our encoder. ``Z(n)`` is
just ``n`` zero bytes of NUL padding, spelled as hex. Each vector is checked in both
directions: the decoder turns it into the expected message, and the encoder turns the
message (built from plain, unpadded values) back into exactly these bytes.
"""

from __future__ import annotations

import pytest

from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import FrameDecoder, read_message
from qrexec.protocol.messages import (
    ConnectionTerminated,
    Data,
    ExecParams,
    ExecRequest,
    ExitStatus,
    Hello,
    Message,
    ServiceConnect,
    ServiceRefused,
    TriggerService,
    TriggerService3,
    TriggerService4,
    encode,
)


def Z(count: int) -> str:
    """``count`` NUL padding bytes as hex."""
    return "00" * count


def hexbytes(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


# "SOCKET7" = 53 4f 43 4b 45 54 37 ; "vm2" = 76 6d 32 ; "qubes.Foo" = 71 75 62 65 73 2e 46 6f 6f
IDENT_SOCKET7 = "534f434b455437" + Z(25)
TARGET_VM2_32 = "766d32" + Z(29)
TARGET_VM2_64 = "766d32" + Z(61)

# (id, protocol version to decode with, hex, message built from plain values)
GOLDEN: list[tuple[str, int, bytes, Message]] = [
    ("hello-v2", 2, hexbytes("00030000 04000000 02000000"), Hello(2)),
    ("hello-v3", 3, hexbytes("00030000 04000000 03000000"), Hello(3)),
    ("hello-v4", 4, hexbytes("00030000 04000000 04000000"), Hello(4)),
    ("stdin-abc", 2, hexbytes("90010000 03000000 616263"), Data(MsgType.DATA_STDIN, b"abc")),
    ("stdin-eof", 2, hexbytes("90010000 00000000"), Data(MsgType.DATA_STDIN, b"")),
    ("stdout-hi", 3, hexbytes("91010000 02000000 6869"), Data(MsgType.DATA_STDOUT, b"hi")),
    ("stdout-eof", 3, hexbytes("91010000 00000000"), Data(MsgType.DATA_STDOUT, b"")),
    ("stderr-x", 4, hexbytes("92010000 01000000 78"), Data(MsgType.DATA_STDERR, b"x")),
    ("stderr-eof", 4, hexbytes("92010000 00000000"), Data(MsgType.DATA_STDERR, b"")),
    ("exit-0", 2, hexbytes("93010000 04000000 00000000"), ExitStatus(0)),
    ("exit-127", 2, hexbytes("93010000 04000000 7f000000"), ExitStatus(127)),
    ("exit-minus1", 3, hexbytes("93010000 04000000 ffffffff"), ExitStatus(-1)),
    (
        # exec_params{domain 0, port 513 = 0x201} + "user:id\0"
        "exec-cmdline",
        2,
        hexbytes("00020000 10000000", "00000000 01020000", "757365723a696400"),
        ExecRequest(MsgType.EXEC_CMDLINE, 0, 513, b"user:id"),
    ),
    (
        # client -> daemon: domain 0, port 0, "DEFAULT:true\0" (13 bytes) -> len 21 = 0x15
        "just-exec",
        3,
        hexbytes("01020000 15000000", "00000000 00000000", "44454641554c543a7472756500"),
        ExecRequest(MsgType.JUST_EXEC, 0, 0, b"DEFAULT:true"),
    ),
    (
        # the daemon's reply to a client: same type, {domid 5, port 515 = 0x203}
        "exec-cmdline-reply",
        3,
        hexbytes("00020000 08000000 05000000 03020000"),
        ExecParams(MsgType.EXEC_CMDLINE, 5, 515),
    ),
    (
        "just-exec-reply",
        3,
        hexbytes("01020000 08000000 05000000 04020000"),
        ExecParams(MsgType.JUST_EXEC, 5, 516),
    ),
    (
        # exec_params{domain 9, port 514 = 0x202} + ident[32]: len 40 = 0x28
        "service-connect",
        3,
        hexbytes("02020000 28000000", "09000000 02020000", IDENT_SOCKET7),
        ServiceConnect(9, 514, b"SOCKET7"),
    ),
    (
        "service-connect-reply",
        3,
        hexbytes("02020000 08000000 07000000 05020000"),
        ExecParams(MsgType.SERVICE_CONNECT, 7, 517),
    ),
    (
        "service-refused",
        3,
        hexbytes("03020000 20000000", IDENT_SOCKET7),
        ServiceRefused(b"SOCKET7"),
    ),
    (
        # v2: service_name[64] "qubes.Foo", target_domain[32] "vm2", request_id[32]
        "trigger-service-v2",
        2,
        hexbytes(
            "10020000 80000000",
            "71756265732e466f6f" + Z(55),
            TARGET_VM2_32,
            IDENT_SOCKET7,
        ),
        TriggerService(b"qubes.Foo", b"vm2", b"SOCKET7"),
    ),
    (
        "connection-terminated",
        2,
        hexbytes("11020000 08000000 00000000 01020000"),
        ConnectionTerminated(0, 513),
    ),
    (
        # v3: target_domain[64], request_id[32], "qubes.Foo+bar\0" (14): len 110 = 0x6e
        "trigger-service-v3",
        3,
        hexbytes(
            "12020000 6e000000",
            TARGET_VM2_64,
            IDENT_SOCKET7,
            "71756265732e466f6f2b62617200",
        ),
        TriggerService3(b"vm2", b"SOCKET7", b"qubes.Foo+bar"),
    ),
    (
        # v4: source_domain[64] "relay", target_domain[64], request_id[32],
        # "qubes.Foo\0" (10): len 170 = 0xaa
        "trigger-service-v4",
        4,
        hexbytes(
            "13020000 aa000000",
            "72656c6179" + Z(59),
            TARGET_VM2_64,
            IDENT_SOCKET7,
            "71756265732e466f6f00",
        ),
        TriggerService4(b"relay", b"vm2", b"SOCKET7", b"qubes.Foo"),
    ),
    (
        # v4 with no source qube: source_domain is all zeros
        "trigger-service-v4-no-source",
        4,
        hexbytes(
            "13020000 a3000000",
            Z(64),
            "4064697370766d3a6476" + Z(54),
            IDENT_SOCKET7,
            "612b00",
        ),
        TriggerService4(b"", b"@dispvm:dv", b"SOCKET7", b"a+"),
    ),
]


def _padded_fields_equal(decoded: Message, built: Message) -> bool:
    """Compare a decoded message (raw padded fields) with one built from plain values."""
    if type(decoded) is not type(built):
        return False
    for name in decoded.__slots__:
        got, want = getattr(decoded, name), getattr(built, name)
        if isinstance(got, bytes) and isinstance(want, bytes) and len(got) != len(want):
            got = got.rstrip(b"\0")
        if got != want:
            return False
    return True


@pytest.mark.parametrize(
    ("version", "frame", "message"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_encode_matches_hand_written_bytes(version: int, frame: bytes, message: Message) -> None:
    assert encode(message) == frame


@pytest.mark.parametrize(
    ("version", "frame", "message"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_decode_hand_written_bytes(version: int, frame: bytes, message: Message) -> None:
    decoded = FrameDecoder(version).feed(frame)
    assert len(decoded) == 1
    assert _padded_fields_equal(decoded[0], message), decoded[0]
    # Raw fields are kept as received, so re-encoding is byte-exact.
    assert encode(decoded[0]) == frame


@pytest.mark.parametrize(
    ("version", "frame", "message"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_blocking_reader_decodes_hand_written_bytes(
    version: int, frame: bytes, message: Message
) -> None:
    stream = bytearray(frame)

    def recv(size: int) -> bytes:
        chunk = bytes(stream[:1])  # one byte at a time: the worst split
        del stream[:1]
        return chunk

    decoded = read_message(recv, version)
    assert decoded is not None and _padded_fields_equal(decoded, message)
    assert read_message(recv, version) is None


def test_every_message_type_has_a_golden_vector() -> None:
    covered = {g[3].msg_type for g in GOLDEN}
    assert covered == set(MsgType)


def test_trigger_fields_decode_raw_with_padding() -> None:
    """Fixed fields stay raw (padding included) so validation can apply the NUL rules."""
    (decoded,) = FrameDecoder(4).feed(GOLDEN[-2][2])
    assert isinstance(decoded, TriggerService4)
    assert decoded.source_domain == hexbytes("72656c6179" + Z(59))
    assert decoded.request_id == hexbytes(IDENT_SOCKET7)
    assert decoded.service_name == b"qubes.Foo"


def test_short_exit_code_reads_as_255() -> None:
    (decoded,) = FrameDecoder(2).feed(hexbytes("93010000 02000000 0100"))
    assert decoded == ExitStatus(255)
    (empty,) = FrameDecoder(2).feed(hexbytes("93010000 00000000"))
    assert empty == ExitStatus(255)


def test_long_exit_code_uses_first_four_bytes() -> None:
    (decoded,) = FrameDecoder(2).feed(hexbytes("93010000 06000000 02000000 ffff"))
    assert decoded == ExitStatus(2)


def test_refused_echoes_any_32_raw_bytes() -> None:
    """A malformed ident (no NUL) is still echoed byte for byte in SERVICE_REFUSED."""
    raw = b"A" * 32
    assert encode(ServiceRefused(raw)) == hexbytes("03020000 20000000", "41" * 32)
