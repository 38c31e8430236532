"""FrameBuffer and DataFramer: the bulk paths' zero-copy framing, against the encoder/decoder."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import (
    FRAME_BUFFER_SIZE,
    FRAMER_ROUND_SIZE,
    DataFramer,
    FrameBuffer,
    FrameDecoder,
)
from qrexec.protocol.messages import Data, ExitStatus, encode

SERVICE_TYPES = (MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_EXIT_CODE)


def feed_in_pieces(
    frames: FrameBuffer, stream: bytes, cuts: list[int]
) -> list[tuple[MsgType, bytes]]:
    """Push ``stream`` through ``frames`` cut at ``cuts``; every frame as (type, payload)."""
    out: list[tuple[MsgType, bytes]] = []
    position = 0
    for cut in [*sorted(cuts), len(stream)]:
        while position < cut:
            space = frames.free_space()
            count = min(len(space), cut - position)
            space[:count] = stream[position : position + count]
            frames.filled(count)
            position += count
            while (frame := frames.next_frame()) is not None:
                kind, start, end = frame
                out.append((kind, bytes(frames.view[start:end])))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 65536), min_size=1, max_size=30),
    seed=st.integers(0, 1000),
    cut_count=st.integers(0, 40),
)
def test_frames_come_out_whole_and_in_order_however_the_bytes_arrive(
    sizes: list[int], seed: int, cut_count: int
) -> None:
    rng = random.Random(seed)
    messages = [
        Data(rng.choice((MsgType.DATA_STDOUT, MsgType.DATA_STDERR)), rng.randbytes(size))
        for size in sizes
    ]
    stream = b"".join(encode(m) for m in [*messages, ExitStatus(7)])
    cuts = [rng.randrange(len(stream) + 1) for _ in range(cut_count)]
    frames = FrameBuffer(3, allowed=SERVICE_TYPES)
    got = feed_in_pieces(frames, stream, cuts)
    expected = [(m.msg_type, m.data) for m in messages]
    assert got[:-1] == expected
    assert got[-1][0] is MsgType.DATA_EXIT_CODE
    assert frames.at_boundary
    frames.close()
    # The same bytes through the reference decoder give the same messages.
    assert [(m.msg_type, m.data) for m in FrameDecoder(3).feed(stream)[:-1]] == expected


def test_a_bad_header_is_refused_before_its_payload_arrives() -> None:
    frames = FrameBuffer(3, allowed=SERVICE_TYPES)
    space = frames.free_space()
    space[:8] = struct.pack("<II", MsgType.DATA_STDOUT, 0xFFFFFFFF)
    frames.filled(8)
    with pytest.raises(RemoteProtocolError, match="above the limit"):
        frames.next_frame()
    with pytest.raises(RemoteProtocolError):  # stays broken
        frames.next_frame()


def test_a_type_not_allowed_on_the_channel_is_refused() -> None:
    frames = FrameBuffer(3, allowed=(MsgType.DATA_STDIN,))
    frames.free_space()[:8] = struct.pack("<II", MsgType.DATA_STDOUT, 1)
    frames.filled(8)
    with pytest.raises(RemoteProtocolError, match="unexpected message"):
        frames.next_frame()


def test_a_stream_that_stops_inside_a_frame_delivers_none_of_it() -> None:
    frames = FrameBuffer(3, allowed=SERVICE_TYPES)
    partial = encode(Data(MsgType.DATA_STDOUT, b"x" * 100))[:50]
    frames.free_space()[: len(partial)] = partial
    frames.filled(len(partial))
    assert frames.next_frame() is None
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        frames.close()


def test_v2_caps_apply_and_the_buffer_must_hold_two_frames() -> None:
    frames = FrameBuffer(2, allowed=SERVICE_TYPES)
    frames.free_space()[:8] = struct.pack("<II", MsgType.DATA_STDOUT, 4097)
    frames.filled(8)
    with pytest.raises(RemoteProtocolError):
        frames.next_frame()
    with pytest.raises(LocalProtocolError):
        FrameBuffer(3, size=1000)
    with pytest.raises(LocalProtocolError):
        FrameBuffer(3).filled(1 << 30)


FRAMER_CASES = [(65536, 1), (65536, 65536), (65536, 200_000), (4096, 4097), (4096, 262144),
                (65536, 262144)]  # fmt: skip


@pytest.mark.parametrize(("chunk", "count"), FRAMER_CASES)
def test_data_framer_output_is_what_the_encoder_makes(chunk: int, count: int) -> None:
    framer = DataFramer(MsgType.DATA_STDIN, chunk)
    data = random.Random(count).randbytes(count)
    out = bytearray()
    position = 0
    while position < count:  # rounds as readv fills them: in order, each slot to the brim
        start = position
        for slot in framer.payloads:
            take = min(len(slot), count - position)
            slot[:take] = data[position : position + take]
            position += take
        out += framer.frames(position - start)
    expected = b"".join(
        encode(Data(MsgType.DATA_STDIN, data[i : i + chunk])) for i in range(0, count, chunk)
    )
    assert bytes(out) == expected


def test_data_framer_starts_with_one_frame_and_grows_after_a_round_read_to_the_brim() -> None:
    framer = DataFramer(MsgType.DATA_STDOUT, 65536)
    assert (len(framer.payloads), framer.capacity) == (1, 65536)
    framer.frames(100)  # a short round: still small
    assert (len(framer.payloads), framer.capacity) == (1, 65536)
    view = framer.frames(65536)  # to the brim: bulk
    kept = bytes(view)
    assert len(framer.payloads) == FRAMER_ROUND_SIZE // 65536
    assert framer.capacity == FRAMER_ROUND_SIZE
    assert bytes(view) == kept  # the last round's frames are not overwritten by the growth


def test_frame_buffer_grows_after_a_receive_that_fills_it_keeping_a_partial_frame() -> None:
    frames = FrameBuffer(3, allowed=SERVICE_TYPES)
    first = frames.free_space()
    assert len(first) == 65536 + 8  # one frame's cap to start with
    whole = encode(Data(MsgType.DATA_STDOUT, b"a" * 1000))
    partial = encode(Data(MsgType.DATA_STDERR, b"b" * 65526 + b"c" * 10))[: len(first) - len(whole)]
    first[: len(whole) + len(partial)] = whole + partial
    frames.filled(len(first))  # every free byte: the next free_space is the full buffer
    frame = frames.next_frame()
    assert frame is not None and frame[0] is MsgType.DATA_STDOUT
    payload = frames.view[frame[1] : frame[2]]
    assert frames.next_frame() is None
    space = frames.free_space()
    assert len(frames.view) == FRAME_BUFFER_SIZE
    assert bytes(payload) == b"a" * 1000  # still what it was: the old buffer lives on
    rest = encode(Data(MsgType.DATA_STDERR, b"b" * 65526 + b"c" * 10))[len(partial) :]
    space[: len(rest)] = rest
    frames.filled(len(rest))
    frame = frames.next_frame()
    assert frame is not None and bytes(frames.view[frame[1] : frame[2]]) == b"b" * 65526 + b"c" * 10
    assert frames.at_boundary


def test_frame_buffer_stays_small_for_a_short_exchange() -> None:
    frames = FrameBuffer(3, allowed=SERVICE_TYPES)
    for _ in range(3):
        message = encode(Data(MsgType.DATA_STDOUT, b"x" * 500))
        frames.free_space()[: len(message)] = message
        frames.filled(len(message))
        assert frames.next_frame() is not None
    assert len(frames.view) == 65536 + 8


def test_data_framer_refuses_what_is_not_a_data_stream_or_does_not_fit() -> None:
    with pytest.raises(LocalProtocolError):
        DataFramer(MsgType.DATA_EXIT_CODE, 65536)
    with pytest.raises(LocalProtocolError):
        DataFramer(MsgType.HELLO, 65536)
    framer = DataFramer(MsgType.DATA_STDOUT, 65536)
    with pytest.raises(LocalProtocolError):
        framer.frames(0)
    with pytest.raises(LocalProtocolError):
        framer.frames(framer.capacity + 1)


def test_frame_buffer_grows_when_a_partial_frame_must_move_to_the_front() -> None:
    # A transport whose receives never fill the buffer (a 64 KiB ring): frames straddle
    # receives, and the first move of a partial frame grows the buffer instead.
    frames = FrameBuffer(3, allowed=SERVICE_TYPES)
    stream = b"".join(encode(Data(MsgType.DATA_STDOUT, bytes([n]) * 40000)) for n in range(6))
    out = []
    position = 0
    while position < len(stream):
        space = frames.free_space()
        count = min(len(space) - 1, 65536, len(stream) - position)  # never fills it
        space[:count] = stream[position : position + count]
        frames.filled(count)
        position += count
        while (frame := frames.next_frame()) is not None:
            out.append(bytes(frames.view[frame[1] : frame[2]]))
    assert out == [bytes([n]) * 40000 for n in range(6)]
    assert len(frames.view) == FRAME_BUFFER_SIZE
