"""Property tests of the frame decoder: hostile input, arbitrary splits, round trips.

Whatever bytes arrive, in whatever pieces, the decoder either returns messages or raises
one of our ProtocolError subclasses, and it never holds more than one frame's cap.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrexec.errors import ProtocolError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import FrameDecoder, max_frame_size, read_message
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
    decode_payload,
    encode,
)

VERSIONS = st.sampled_from([2, 3, 4])
u32 = st.integers(min_value=0, max_value=2**32 - 1)
i32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def text_field(max_size: int) -> st.SearchStrategy[bytes]:
    """A field value: any bytes but NUL, shorter than its field."""
    return st.binary(max_size=max_size).map(lambda b: b.replace(b"\0", b"x"))


def nonempty_field(max_size: int) -> st.SearchStrategy[bytes]:
    return text_field(max_size).map(lambda b: b or b"s")


def messages(version: int) -> st.SearchStrategy[Message]:
    chunk = 4096 if version == 2 else 65536
    data_types = st.sampled_from([MsgType.DATA_STDIN, MsgType.DATA_STDOUT, MsgType.DATA_STDERR])
    exec_types = st.sampled_from([MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC])
    return st.one_of(
        st.builds(Hello, st.integers(min_value=version, max_value=2**32 - 1)),
        st.builds(Data, data_types, st.binary(max_size=min(chunk, 9000))),
        st.builds(ExitStatus, i32),
        st.builds(ExecRequest, exec_types, u32, u32, text_field(300)),
        st.builds(ExecParams, exec_types | st.just(MsgType.SERVICE_CONNECT), u32, u32),
        st.builds(ServiceConnect, u32, u32, text_field(31)),
        st.builds(ServiceRefused, text_field(31)),
        st.builds(ConnectionTerminated, u32, u32),
        st.builds(TriggerService, text_field(63), text_field(31), text_field(31)),
        st.builds(TriggerService3, text_field(63), text_field(31), text_field(300)),
        st.builds(TriggerService4, text_field(63), text_field(63), text_field(31), text_field(300)),
    )


def normalised(message: Message) -> Message:
    """A decoded message's raw fixed fields back to plain values (padding stripped)."""
    return decode_payload(message.msg_type, encode(message)[8:])


@st.composite
def hostile_stream(draw: st.DrawFn) -> bytes:
    """Valid frames, frames with a known type but any length, truncations and garbage."""
    version = 4
    parts: list[bytes] = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        kind = draw(st.integers(min_value=0, max_value=4))
        if kind == 0:
            parts.append(encode(draw(messages(version))))
        elif kind == 1:
            msg_type = draw(st.sampled_from(list(MsgType)))
            length = draw(st.one_of(st.integers(0, 300), u32))
            parts.append(struct.pack("<II", msg_type, length) + draw(st.binary(max_size=400)))
        elif kind == 2:
            frame = encode(draw(messages(version)))
            parts.append(frame[: draw(st.integers(0, len(frame)))])
        elif kind == 3:
            parts.append(draw(st.binary(max_size=64)))
        else:
            # Oversize: a length past every cap, then more bytes than one frame's cap, as a
            # peer trying to make us buffer without bound would send.
            msg_type = draw(st.sampled_from(list(MsgType)))
            length = draw(st.integers(min_value=max_frame_size(4), max_value=2**32 - 1))
            filler = draw(st.binary(min_size=1, max_size=8)) * (max_frame_size(4) // 4)
            parts.append(struct.pack("<II", msg_type, length) + filler)
    return b"".join(parts)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_stream(), st.lists(st.integers(min_value=0), max_size=12), VERSIONS, st.booleans())
def test_hostile_input_only_raises_protocol_errors(
    data: bytes, cuts: list[int], version: int, negotiate: bool
) -> None:
    decoder = FrameDecoder(version, own_version=4 if negotiate else None)
    for piece in split(data, cuts):
        try:
            decoder.feed(piece)
        except ProtocolError:
            assert decoder.buffered == 0
            return
        assert decoder.buffered <= decoder.max_buffered
        assert decoder.buffered <= max_frame_size(decoder.version)
    try:
        decoder.close()
    except ProtocolError:
        assert not decoder.at_boundary


@settings(max_examples=200)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=12), VERSIONS)
def test_random_bytes_only_raise_protocol_errors(
    data: bytes, cuts: list[int], version: int
) -> None:
    decoder = FrameDecoder(version)
    try:
        for piece in split(data, cuts):
            decoder.feed(piece)
            assert decoder.buffered <= decoder.max_buffered
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(st.data(), VERSIONS)
def test_any_split_yields_the_same_messages(data: st.DataObject, version: int) -> None:
    sent = data.draw(st.lists(messages(version), min_size=1, max_size=5))
    stream = b"".join(encode(m) for m in sent)
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=20))
    decoder = FrameDecoder(version)
    received: list[Message] = []
    for piece in split(stream, cuts):
        received += decoder.feed(piece)
        assert decoder.buffered <= decoder.max_buffered
    decoder.close()
    assert [normalised(m) for m in received] == [normalised(m) for m in sent]


@settings(max_examples=300)
@given(st.data(), VERSIONS)
def test_round_trip(data: st.DataObject, version: int) -> None:
    message = data.draw(messages(version))
    frame = encode(message)
    (decoded,) = FrameDecoder(version).feed(frame)
    assert encode(decoded) == frame
    assert normalised(decoded) == normalised(message)
    remaining = bytearray(frame)

    def recv(size: int) -> bytes:
        chunk = bytes(remaining[:size])
        del remaining[:size]
        return chunk

    assert read_message(recv, version) == decoded


def test_split_at_every_byte_of_a_mixed_stream() -> None:
    """Deterministic: every single cut point, and byte-by-byte, of a stream of all types."""
    sent: list[Message] = [
        Hello(3),
        Data(MsgType.DATA_STDIN, b"in"),
        Data(MsgType.DATA_STDIN, b""),
        ExecRequest(MsgType.EXEC_CMDLINE, 0, 513, b"user:true"),
        ExecParams(MsgType.JUST_EXEC, 5, 514),
        ServiceConnect(3, 515, b"SOCKET9"),
        ServiceRefused(b"SOCKET9"),
        ConnectionTerminated(0, 513),
        TriggerService(b"svc", b"vm", b"id"),
        TriggerService3(b"vm", b"id", b"svc+arg"),
        TriggerService4(b"src", b"vm", b"id", b"svc"),
        Data(MsgType.DATA_STDOUT, b"out" * 100),
        Data(MsgType.DATA_STDERR, b""),
        ExitStatus(42),
    ]
    stream = b"".join(encode(m) for m in sent)
    expected = [normalised(m) for m in sent]
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(3)
        received = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [normalised(m) for m in received] == expected
    decoder = FrameDecoder(3)
    received = []
    for offset in range(len(stream)):
        received += decoder.feed(stream[offset : offset + 1])
        assert decoder.buffered <= decoder.max_buffered
    assert [normalised(m) for m in received] == expected


def test_oversize_stream_never_grows_the_buffer() -> None:
    """Megabytes of max-size chunks, fed in odd pieces, keep the buffer under one frame."""
    chunk = encode(Data(MsgType.DATA_STDOUT, b"q" * 4096))
    stream = chunk * 300
    decoder = FrameDecoder(2)
    count = 0
    high_water = 0
    for offset in range(0, len(stream), 7777):
        count += len(decoder.feed(stream[offset : offset + 7777]))
        high_water = max(high_water, decoder.buffered)
    assert count == 300
    assert high_water <= 8 + 4096
