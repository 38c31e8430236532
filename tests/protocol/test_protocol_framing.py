"""Frame decoder: per-version caps, exact sizes, errors, HELLO switch, blocking reader."""

from __future__ import annotations

import struct

import pytest

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import (
    FrameDecoder,
    encode_checked,
    max_frame_size,
    read_exec_params,
    read_message,
)
from qrexec.protocol.messages import (
    Data,
    ExecRequest,
    ExitStatus,
    Hello,
    TriggerService3,
    TriggerService4,
    encode,
)


def header(msg_type: int, length: int) -> bytes:
    return struct.pack("<II", msg_type, length)


@pytest.mark.parametrize(
    ("version", "size", "ok"),
    [
        (2, 4096, True),
        (2, 4097, False),
        (3, 65536, True),
        (3, 65537, False),
        (4, 65536, True),
        (4, 65537, False),
    ],
)
@pytest.mark.parametrize(
    "msg_type",
    [MsgType.DATA_STDIN, MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_EXIT_CODE],
)
def test_data_chunk_cap_per_version(version: int, size: int, ok: bool, msg_type: MsgType) -> None:
    decoder = FrameDecoder(version)
    if ok:
        (message,) = decoder.feed(header(msg_type, size) + b"\1" * size)
        assert message.msg_type == msg_type
    else:
        # Refused from the header alone: the payload never needs to arrive.
        with pytest.raises(RemoteProtocolError, match="above the limit"):
            decoder.feed(header(msg_type, size))


@pytest.mark.parametrize("msg_type", [MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC])
def test_cmdline_cap_is_65535_total(msg_type: MsgType) -> None:
    command = b"u:" + b"x" * (65535 - 8 - 3)
    frame = encode(ExecRequest(msg_type, 0, 0, command))
    assert len(frame) == 8 + 65535
    (message,) = FrameDecoder(2).feed(frame)
    assert isinstance(message, ExecRequest) and message.command == command
    with pytest.raises(RemoteProtocolError, match="above the limit of 65535"):
        FrameDecoder(4).feed(header(msg_type, 65536))
    with pytest.raises(RemoteProtocolError, match="below 8"):
        FrameDecoder(4).feed(header(msg_type, 7))


@pytest.mark.parametrize(
    ("msg_type", "prefix"), [(MsgType.TRIGGER_SERVICE3, 96), (MsgType.TRIGGER_SERVICE4, 160)]
)
def test_trigger_service_name_cap_is_65000(msg_type: MsgType, prefix: int) -> None:
    name = b"s" * 64999  # + NUL = 65000 bytes after the prefix
    message: TriggerService3 | TriggerService4
    if msg_type is MsgType.TRIGGER_SERVICE3:
        message = TriggerService3(b"vm", b"id", name)
    else:
        message = TriggerService4(b"", b"vm", b"id", name)
    frame = encode(message)
    assert len(frame) == 8 + prefix + 65000
    (decoded,) = FrameDecoder(3).feed(frame)
    assert isinstance(decoded, type(message)) and decoded.service_name == name
    with pytest.raises(RemoteProtocolError, match="above the limit"):
        FrameDecoder(4).feed(header(msg_type, prefix + 65001))
    with pytest.raises(RemoteProtocolError, match="below"):
        FrameDecoder(4).feed(header(msg_type, prefix))


@pytest.mark.parametrize(
    ("msg_type", "good", "bad"),
    [
        (MsgType.HELLO, [4], [0, 3, 5, 8]),
        (MsgType.SERVICE_REFUSED, [32], [0, 31, 33]),
        (MsgType.TRIGGER_SERVICE, [128], [0, 127, 129]),
        (MsgType.CONNECTION_TERMINATED, [8], [0, 7, 9, 40]),
        (MsgType.SERVICE_CONNECT, [8, 40], [0, 7, 9, 39, 41]),
    ],
)
def test_fixed_size_messages_must_match_exactly(
    msg_type: MsgType, good: list[int], bad: list[int]
) -> None:
    for size in good:
        # A payload of zeros fits every fixed layout (a zero ident/field is well-formed).
        assert len(FrameDecoder(4).feed(header(msg_type, size) + bytes(size))) == 1
    for size in bad:
        with pytest.raises(RemoteProtocolError, match=f"{msg_type.name} payload is {size} bytes"):
            FrameDecoder(4).feed(header(msg_type, size))


@pytest.mark.parametrize("msg_type", [0, 1, 0x18F, 0x194, 0x204, 0x20F, 0x214, 0x301, 2**32 - 1])
def test_unknown_type_is_a_remote_error(msg_type: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        FrameDecoder(4).feed(header(msg_type, 0))


def test_layout_errors_are_remote_errors() -> None:
    no_nul = header(MsgType.EXEC_CMDLINE, 10) + bytes(8) + b"ab"
    with pytest.raises(RemoteProtocolError, match="not NUL-terminated"):
        FrameDecoder(2).feed(no_nul)
    inner_nul = header(MsgType.TRIGGER_SERVICE3, 99) + bytes(96) + b"a\0\0"
    with pytest.raises(RemoteProtocolError, match="NUL byte before its terminator"):
        FrameDecoder(3).feed(inner_nul)


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = FrameDecoder(2)
    with pytest.raises(RemoteProtocolError) as first:
        decoder.feed(header(0x999, 0))
    with pytest.raises(RemoteProtocolError) as second:
        decoder.feed(encode(Hello(2)))
    assert second.value is first.value
    assert decoder.buffered == 0


def test_allowed_types_restrict_the_channel() -> None:
    decoder = FrameDecoder(3, allowed={MsgType.HELLO, MsgType.CONNECTION_TERMINATED})
    assert decoder.feed(encode(Hello(3))) == [Hello(3)]
    with pytest.raises(RemoteProtocolError, match="unexpected message DATA_STDOUT"):
        decoder.feed(encode(Data(MsgType.DATA_STDOUT, b"x")))


def test_set_allowed_changes_from_next_header() -> None:
    decoder = FrameDecoder(3, allowed={MsgType.HELLO})
    decoder.feed(encode(Hello(3)))
    decoder.set_allowed(None)
    assert decoder.feed(encode(ExitStatus(0))) == [ExitStatus(0)]


def test_hello_switches_caps_within_the_same_chunk() -> None:
    """A v3 peer may send HELLO and a 64 KiB chunk in one segment."""
    big = Data(MsgType.DATA_STDOUT, b"z" * 65536)
    stream = encode(Hello(3)) + encode(big)
    decoder = FrameDecoder(own_version=4)
    assert decoder.version == 2
    assert decoder.feed(stream) == [Hello(3), big]
    assert decoder.version == 3


def test_hello_from_v2_peer_keeps_v2_caps() -> None:
    decoder = FrameDecoder(own_version=4)
    decoder.feed(encode(Hello(2)))
    assert decoder.version == 2
    with pytest.raises(RemoteProtocolError, match="limit of 4096"):
        decoder.feed(header(MsgType.DATA_STDIN, 4097))


def test_hello_below_2_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="at least 2"):
        FrameDecoder(own_version=4).feed(encode(Hello(1)))


def test_own_version_caps_the_switch() -> None:
    decoder = FrameDecoder(own_version=2)
    decoder.feed(encode(Hello(4)))
    assert decoder.version == 2


def test_set_version_and_invalid_version() -> None:
    decoder = FrameDecoder(2)
    decoder.set_version(4)
    assert decoder.version == 4
    assert decoder.max_buffered == max_frame_size(4)
    with pytest.raises(LocalProtocolError):
        decoder.set_version(5)
    with pytest.raises(LocalProtocolError):
        FrameDecoder(1)


def test_partial_frames_and_close() -> None:
    frame = encode(Data(MsgType.DATA_STDIN, b"hello"))
    decoder = FrameDecoder(2)
    assert decoder.feed(frame[:3]) == []
    assert decoder.buffered == 3 and not decoder.at_boundary
    with pytest.raises(RemoteProtocolError, match="middle of a header"):
        decoder.close()
    decoder = FrameDecoder(2)
    assert decoder.feed(frame[:10]) == []
    assert decoder.buffered == 2
    with pytest.raises(RemoteProtocolError, match="middle of a DATA_STDIN payload"):
        decoder.close()
    assert decoder.feed(frame[10:]) == [Data(MsgType.DATA_STDIN, b"hello")]
    assert decoder.at_boundary
    decoder.close()


def test_max_frame_size_per_version() -> None:
    # v2: the command line (65535) is the largest payload; v3+: a 64 KiB data chunk.
    assert max_frame_size(2) == 8 + 65535
    assert max_frame_size(3) == 8 + 65536
    assert max_frame_size(4) == 8 + 65536


def test_feed_accepts_bytearray_and_memoryview() -> None:
    frame = encode(Hello(4))
    assert FrameDecoder(4).feed(bytearray(frame)) == [Hello(4)]
    assert FrameDecoder(4).feed(memoryview(frame)) == [Hello(4)]


def test_encode_checked_refuses_what_the_peer_would_reject() -> None:
    chunk = Data(MsgType.DATA_STDOUT, b"a" * 4097)
    assert encode_checked(chunk, 3) == encode(chunk)
    with pytest.raises(LocalProtocolError, match="limit of 4096"):
        encode_checked(chunk, 2)
    long_cmd = ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:" + b"x" * 65530)
    with pytest.raises(LocalProtocolError, match="limit of 65535"):
        encode_checked(long_cmd, 4)


def test_read_message_reads_exactly_one_message() -> None:
    stream = encode(Hello(3)) + encode(ExitStatus(3))
    remaining = bytearray(stream)

    def recv(size: int) -> bytes:
        chunk = bytes(remaining[:size])
        del remaining[:size]
        return chunk

    assert read_message(recv, 3) == Hello(3)
    assert bytes(remaining) == encode(ExitStatus(3))
    assert read_message(recv, 3) == ExitStatus(3)
    assert read_message(recv, 3) is None


def test_read_message_truncated_and_capped() -> None:
    frame = encode(Data(MsgType.DATA_STDOUT, b"abcdef"))
    for cut in range(1, len(frame)):
        remaining = bytearray(frame[:cut])

        def recv(size: int, remaining: bytearray = remaining) -> bytes:
            chunk = bytes(remaining[:size])
            del remaining[:size]
            return chunk

        with pytest.raises(RemoteProtocolError, match="stream ended"):
            read_message(recv, 3)

    asked: list[int] = []

    def oversize(size: int) -> bytes:
        asked.append(size)
        return header(MsgType.DATA_STDOUT, 70000)[:size]

    with pytest.raises(RemoteProtocolError, match="above the limit"):
        read_message(oversize, 4)
    assert asked == [8]  # the payload was never requested


def test_read_message_allowed_types() -> None:
    frame = encode(Hello(3))
    with pytest.raises(RemoteProtocolError, match="unexpected message HELLO"):
        read_message(lambda n: frame[:n], 3, allowed={MsgType.EXEC_CMDLINE})


def test_read_exec_params() -> None:
    # domain 9, port 515 (0x203), as written by hand
    record = bytearray(bytes.fromhex("09000000 03020000"))

    def recv(size: int) -> bytes:
        chunk = bytes(record[:1])
        del record[:1]
        return chunk

    assert read_exec_params(recv) == (9, 515)
    assert read_exec_params(recv) is None  # closed without a record: refused
    short = bytearray(b"abc")

    def recv_short(size: int) -> bytes:
        chunk = bytes(short[:size])
        del short[:size]
        return chunk

    with pytest.raises(RemoteProtocolError, match="after 3 of 8 bytes"):
        read_exec_params(recv_short)
