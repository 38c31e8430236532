"""Incremental qrexec frame decoder with per-version length caps, and a blocking reader.

:class:`FrameDecoder` is a pure object in the h11 style: :meth:`FrameDecoder.feed` takes
whatever bytes arrived and returns the complete messages they finish. Every header is
checked *before* its payload is buffered, so a hostile peer can never make the decoder
hold more than one frame's cap (8-byte header + the largest payload the negotiated version
allows); :attr:`FrameDecoder.buffered` exposes how much it holds.

Caps (spec §3.3, §3.4), for the payload length ``hdr.len``:

- DATA_STDIN/STDOUT/STDERR and DATA_EXIT_CODE: at most :func:`max_data_chunk` (4096 in v2,
  65536 from v3). DATA_EXIT_CODE may be shorter than 4 bytes (read as status 255) or longer
  (the first 4 bytes count), as upstream's receiver does.
- EXEC_CMDLINE / JUST_EXEC: 8 to 65535 bytes.
- TRIGGER_SERVICE3 / TRIGGER_SERVICE4: the prefix (96 / 160 bytes) plus 1 to 65000 bytes of
  NUL-terminated service name. The 65000 counts every byte after the prefix, NUL included
  (the layout's ``n = hdr.len - prefix``), so the name itself has at most 64999 characters.
- Fixed-size messages must have exactly their size: HELLO 4, SERVICE_REFUSED 32,
  TRIGGER_SERVICE 128, CONNECTION_TERMINATED 8, SERVICE_CONNECT 40 (or 8, the daemon's
  reply to a client).
- Any other type is a :class:`~qrexec.errors.RemoteProtocolError`.

Which message may appear on which channel, and which trigger type a version accepts, is
not checked here unless the caller passes ``allowed`` (see :mod:`.negotiation`).

:func:`read_message` is the blocking counterpart for the per-call clients: it pulls exactly
one message through a ``recv(n)`` callable (:func:`read_exec_params` likewise reads the
headerless record an agent sends to qrexec-client-vm). This module does no I/O itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.protocol.constants import (
    HEADER_SIZE,
    IDENT_SIZE,
    MAX_CMDLINE_LEN,
    MAX_SERVICE_NAME_LEN,
    MIN_PROTOCOL_VERSION,
    MsgType,
)
from qrexec.protocol.messages import (
    EXEC_PARAMS,
    HEADER,
    PEER_INFO,
    TRIGGER_V2_SIZE,
    TRIGGER_V3_PREFIX,
    TRIGGER_V4_PREFIX,
    Hello,
    Message,
    RawFrame,
    decode_payload,
    encode,
)
from qrexec.protocol.negotiation import check_version, max_data_chunk, negotiate

TYPE_CHECKING = False  # typing is not imported at run time: the clients load this module
if TYPE_CHECKING:
    from typing import Final

_DATA_CAPPED: Final = frozenset(
    {MsgType.DATA_STDIN, MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_EXIT_CODE}
)
#: Types whose payload size is fixed: type -> the accepted sizes.
_FIXED_SIZES: Final[dict[MsgType, tuple[int, ...]]] = {
    MsgType.HELLO: (PEER_INFO.size,),
    MsgType.SERVICE_REFUSED: (IDENT_SIZE,),
    MsgType.TRIGGER_SERVICE: (TRIGGER_V2_SIZE,),
    MsgType.CONNECTION_TERMINATED: (EXEC_PARAMS.size,),
    # 40 from the daemon to the agent and from a client; 8 in the daemon's reply.
    MsgType.SERVICE_CONNECT: (EXEC_PARAMS.size + IDENT_SIZE, EXEC_PARAMS.size),
}
#: Variable-size control messages: type -> (smallest, largest) payload.
_RANGES: Final[dict[MsgType, tuple[int, int]]] = {
    MsgType.EXEC_CMDLINE: (EXEC_PARAMS.size, MAX_CMDLINE_LEN),
    MsgType.JUST_EXEC: (EXEC_PARAMS.size, MAX_CMDLINE_LEN),
    MsgType.TRIGGER_SERVICE3: (TRIGGER_V3_PREFIX + 1, TRIGGER_V3_PREFIX + MAX_SERVICE_NAME_LEN),
    MsgType.TRIGGER_SERVICE4: (TRIGGER_V4_PREFIX + 1, TRIGGER_V4_PREFIX + MAX_SERVICE_NAME_LEN),
}
_LARGEST_CONTROL_PAYLOAD: Final = max(high for _, high in _RANGES.values())


def max_payload(version: int) -> int:
    """Largest payload any message may carry under ``version``."""
    return max(_LARGEST_CONTROL_PAYLOAD, max_data_chunk(version))


def max_frame_size(version: int) -> int:
    """One frame's cap: the header plus :func:`max_payload`."""
    return HEADER_SIZE + max_payload(version)


def payload_limits(msg_type: MsgType, version: int) -> tuple[int, int]:
    """The (smallest, largest) payload length accepted for ``msg_type`` under ``version``."""
    if msg_type in _DATA_CAPPED:
        return 0, max_data_chunk(version)
    fixed = _FIXED_SIZES.get(msg_type)
    if fixed is not None:
        return min(fixed), max(fixed)
    return _RANGES[msg_type]


def check_header(
    msg_type: int,
    length: int,
    version: int,
    allowed: Collection[MsgType] | None = None,
) -> MsgType:
    """Validate a received header before its payload is read; return the type.

    Raises :class:`RemoteProtocolError` naming what was wrong: an unknown type, a type
    not in ``allowed``, or a length outside the limits of that type and version.
    """
    try:
        kind = MsgType(msg_type)
    except ValueError:
        raise RemoteProtocolError(f"unknown message type 0x{msg_type:x}") from None
    if allowed is not None and kind not in allowed:
        raise RemoteProtocolError(f"unexpected message {kind.name} on this channel")
    fixed = _FIXED_SIZES.get(kind)
    if fixed is not None:
        if length not in fixed:
            sizes = " or ".join(str(size) for size in fixed)
            raise RemoteProtocolError(f"{kind.name} payload is {length} bytes, expected {sizes}")
        return kind
    low, high = payload_limits(kind, version)
    if length > high:
        raise RemoteProtocolError(
            f"{kind.name} payload is {length} bytes, above the limit of {high}"
            f" for protocol version {version}"
        )
    if length < low:
        raise RemoteProtocolError(f"{kind.name} payload is {length} bytes, below {low}")
    return kind


def hello_length(header: bytes) -> int:
    """Check that a frame header announces a HELLO; return its payload length.

    The sans-I/O half of reading a peer's HELLO: whoever owns the stream reads exactly
    ``HEADER_SIZE`` bytes, calls this, reads that many bytes and passes them to
    :func:`hello_version`. Anything but a well-formed HELLO is a RemoteProtocolError.
    """
    msg_type, length = HEADER.unpack(header)
    check_header(msg_type, length, MIN_PROTOCOL_VERSION, allowed=(MsgType.HELLO,))
    return int(length)


def hello_version(payload: bytes) -> int:
    """The protocol version a HELLO payload announces."""
    hello = decode_payload(MsgType.HELLO, payload)
    if not isinstance(hello, Hello):
        raise RemoteProtocolError("HELLO payload did not decode as HELLO")
    return hello.version


class FrameDecoder:
    """Turns a byte stream into messages, checking every length against the caps.

    ``version`` is the negotiated protocol version (2 until HELLO says otherwise). When
    ``own_version`` is given, a received HELLO switches the decoder to
    ``negotiate(own_version, peer)`` at once, so that a peer's first large chunk sent in
    the same segment as its HELLO is judged by the right cap. ``allowed`` restricts the
    accepted message types (anything else is a remote protocol error); ``raw_types`` are
    returned undecoded as :class:`RawFrame` once their header passed the length checks.

    After a :class:`RemoteProtocolError` the decoder stays broken: the stream position is
    lost, so every later call raises the same error. Messages completed earlier in the
    failing chunk are dropped with it: the connection is going to be dropped anyway.
    """

    def __init__(
        self,
        version: int = MIN_PROTOCOL_VERSION,
        *,
        own_version: int | None = None,
        allowed: Collection[MsgType] | None = None,
        raw_types: Collection[MsgType] = (),
    ) -> None:
        self._version = check_version(version)
        #: Types returned as :class:`RawFrame` (header checks still apply, no decoding).
        self._raw_types = frozenset(raw_types)
        self._own_version = None if own_version is None else check_version(own_version)
        self._allowed = None if allowed is None else frozenset(allowed)
        self._buffer = bytearray()
        self._type: MsgType | None = None
        self._length = 0
        self._error: RemoteProtocolError | None = None

    @property
    def version(self) -> int:
        """The protocol version whose caps apply now."""
        return self._version

    def set_version(self, version: int) -> None:
        """Apply the caps of ``version`` from the next header on (call after HELLO)."""
        self._version = check_version(version)

    def set_allowed(self, allowed: Collection[MsgType] | None) -> None:
        """Change the accepted message types from the next header on (None = all)."""
        self._allowed = None if allowed is None else frozenset(allowed)

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress; never above :attr:`max_buffered`."""
        return len(self._buffer)

    @property
    def max_buffered(self) -> int:
        """The most this decoder can hold under its current version (one frame's cap)."""
        return max_frame_size(self._version)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for the peer to stop)."""
        return self._type is None and not self._buffer

    def close(self) -> None:
        """Declare end of stream; raises if the peer stopped in the middle of a frame."""
        if self._error is not None:
            raise self._error
        if not self.at_boundary:
            what = "header" if self._type is None else f"{self._type.name} payload"
            raise RemoteProtocolError(f"stream ended in the middle of a {what}")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Consume ``data`` and return every message it completes, in order."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(memoryview(data).cast("B"))
        except RemoteProtocolError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise

    def _feed(self, view: memoryview) -> list[Message]:
        messages: list[Message] = []
        pos = 0
        end = len(view)
        buffer = self._buffer
        while True:
            if self._type is None:
                if not buffer and end - pos >= HEADER_SIZE:
                    msg_type, length = HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(buffer), end - pos)
                    buffer += view[pos : pos + take]
                    pos += take
                    if len(buffer) < HEADER_SIZE:
                        return messages
                    msg_type, length = HEADER.unpack(buffer)
                    buffer.clear()
                self._type = check_header(msg_type, length, self._version, self._allowed)
                self._length = length
            kind = self._type
            if not buffer and end - pos >= self._length:
                payload = bytes(view[pos : pos + self._length])
                pos += self._length
            else:
                take = min(self._length - len(buffer), end - pos)
                buffer += view[pos : pos + take]
                pos += take
                if len(buffer) < self._length:
                    return messages
                payload = bytes(buffer)
                buffer.clear()
            self._type = None
            if kind in self._raw_types:
                message: Message = RawFrame(kind, payload)
            else:
                message = decode_payload(kind, payload)
            if kind is MsgType.HELLO and self._own_version is not None:
                self._version = negotiate(self._own_version, PEER_INFO.unpack(payload)[0])
            messages.append(message)


#: A :class:`FrameBuffer`'s full size: a few frames per refill, and at least two frames'
#: caps. It starts at one frame's cap (room enough for any partial frame moved to the
#: front) and grows to this size once a receive fills all the free space: a call that
#: moves a few bytes never allocates (and faults in) half a megabyte.
FRAME_BUFFER_SIZE = 512 * 1024
#: How much input one :class:`DataFramer` round carries (as several frames) once the
#: stream has shown itself to be bulk: the first round is one frame.
FRAMER_ROUND_SIZE = 256 * 1024


class FrameBuffer:
    """A receive buffer that hands out whole frames as views into itself, copying nothing.

    The bulk paths' counterpart of :class:`FrameDecoder`: the caller receives straight into
    :meth:`free_space` (``recv_into``), reports the count with :meth:`filled`, then takes
    frames with :meth:`next_frame` as ``(type, start, end)``: the payload is
    ``view[start:end]``, valid until the next :meth:`free_space` (which may move a partial
    frame to the front). Every header is checked (:func:`check_header`) as soon as its
    8 bytes are there, before its payload is waited for, so the buffer never holds more
    than what a correct peer may send, and a frame is handed out only once it is whole (a
    peer that stops inside a frame has none of it delivered, as with the decoder). After a
    :class:`RemoteProtocolError` the buffer stays broken. Does no I/O.

    The buffer starts at one frame's cap and is replaced by one of ``size`` bytes (pending
    bytes copied over) at the first :meth:`free_space` after a receive that filled all the
    free space, or that must move a partial frame to the front; :attr:`view` then names
    the new buffer, so read it after :meth:`filled`.
    Views handed out earlier keep the old buffer alive: nothing they show is overwritten.
    """

    def __init__(
        self,
        version: int,
        *,
        allowed: Collection[MsgType] | None = None,
        size: int = FRAME_BUFFER_SIZE,
    ) -> None:
        self._version = check_version(version)
        if size < 2 * max_frame_size(self._version):
            raise LocalProtocolError(f"a frame buffer of {size} bytes is below two frames")
        self._allowed = None if allowed is None else frozenset(allowed)
        self._size = size
        self._buffer = bytearray(max_frame_size(self._version))
        self.view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._grow = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return self._end - self._start

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending."""
        return self._start == self._end

    def free_space(self) -> memoryview:
        """Where the next received bytes go (never empty); invalidates earlier payloads."""
        if self._grow:
            # Bulk: the full-size buffer, with the pending partial frame (if any) in front.
            self._grow = False
            pending = self._end - self._start
            buffer = bytearray(self._size)
            buffer[:pending] = self.view[self._start : self._end]
            self._buffer, self.view = buffer, memoryview(buffer)
            self._start, self._end = 0, pending
        elif self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._end < max_frame_size(self._version):
            # Only a partial frame is left: move it to the front (at most one frame's cap).
            # Frames that straddle receives mean a stream, not a few messages: a small
            # buffer grows here too (a transport whose receives never fill it - a 64 KiB
            # vchan ring - would otherwise move a partial frame at almost every receive).
            pending = self._end - self._start
            if len(self._buffer) < self._size:
                buffer = bytearray(self._size)
                buffer[:pending] = self.view[self._start : self._end]
                self._buffer, self.view = buffer, memoryview(buffer)
            else:
                self._buffer[:pending] = self.view[self._start : self._end]
            self._start, self._end = 0, pending
        return self.view[self._end :]

    def filled(self, count: int) -> None:
        """``count`` bytes were received into :meth:`free_space`."""
        free = len(self._buffer) - self._end
        if not 0 <= count <= free:
            raise LocalProtocolError(f"filled({count}) is beyond the free space")
        if count == free and len(self._buffer) < self._size:
            self._grow = True
        self._end += count

    def next_frame(self) -> tuple[MsgType, int, int] | None:
        """The next whole frame as ``(type, payload start, payload end)``, or None for now."""
        if self._error is not None:
            raise self._error
        available = self._end - self._start
        if available < HEADER_SIZE:
            return None
        msg_type, length = HEADER.unpack_from(self._buffer, self._start)
        try:
            kind = check_header(msg_type, length, self._version, self._allowed)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        if available - HEADER_SIZE < length:
            return None
        start = self._start + HEADER_SIZE
        self._start = start + length
        return kind, start, start + length

    def frame_remainder(self) -> int:
        """Bytes still to receive to end the partial frame in front (0 at a boundary).

        Call after :meth:`next_frame` returned None. A receiver that asks for no more than
        this reaches a frame boundary, where it may go on reading frame by frame.
        """
        available = self._end - self._start
        if available < HEADER_SIZE:
            return HEADER_SIZE - available if available else 0
        _, length = HEADER.unpack_from(self._buffer, self._start)
        return int(HEADER_SIZE + length - available)

    def message(self, kind: MsgType, start: int, end: int) -> Message:
        """Decode a frame that :meth:`next_frame` returned (for the small control messages)."""
        return decode_payload(kind, bytes(self.view[start:end]))

    def close(self) -> None:
        """Declare end of stream; raises if the peer stopped in the middle of a frame."""
        if self._error is not None:
            raise self._error
        if self._start != self._end:
            raise RemoteProtocolError(
                f"stream ended in the middle of a frame ({self._end - self._start} bytes of it)"
            )


class DataFramer:
    """Builds DATA frames of one type in place, so input is read straight into frames.

    :attr:`payloads` are the payload areas of up to :data:`FRAMER_ROUND_SIZE` bytes of
    consecutive frames, each ``chunk`` bytes long with room for its header before it: a
    ``readv`` into them fills them in order, and :meth:`frames` then writes the headers
    around the ``count`` bytes read and returns one contiguous view ready for one ``send``
    - no ``bytes`` per frame, no copy between the read and the send. The view is valid
    until the next round. Does no I/O.

    The first round is one frame; a round read to the brim (:attr:`capacity` bytes) makes
    the next ones full size, so a stream of a few bytes costs one frame's buffer. Read
    :attr:`payloads` and :attr:`capacity` anew each round.
    """

    def __init__(self, kind: MsgType, chunk: int, round_size: int = FRAMER_ROUND_SIZE) -> None:
        if kind not in _DATA_CAPPED or kind is MsgType.DATA_EXIT_CODE:
            raise LocalProtocolError(f"{kind.name} is not a data stream")
        if chunk <= 0:
            raise LocalProtocolError(f"chunk size must be positive, not {chunk}")
        self._kind = int(kind)
        self._chunk = chunk
        self._stride = HEADER_SIZE + chunk
        self._full_count = max(1, round_size // chunk)
        self._grow = False
        self._layout(1)

    def _layout(self, count: int) -> None:
        self._count = count
        self._buffer = bytearray(count * self._stride)
        self._view = memoryview(self._buffer)
        self._payloads = [
            self._view[i * self._stride + HEADER_SIZE : (i + 1) * self._stride]
            for i in range(count)
        ]
        #: The most :meth:`frames` can wrap in this round.
        self.capacity = count * self._chunk

    @property
    def payloads(self) -> list[memoryview]:
        """Where this round's input goes (a new, larger set after a round read to the brim)."""
        if self._grow:
            self._grow = False
            self._layout(self._full_count)
        return self._payloads

    def frames(self, count: int) -> memoryview:
        """Headers around the ``count`` bytes just read into :attr:`payloads`; the frames."""
        if not 0 < count <= self.capacity:
            raise LocalProtocolError(f"{count} bytes do not fit this framer's round")
        if count == self.capacity and self._count < self._full_count:
            self._grow = True  # read to the brim: bulk input, full rounds from now on
        full, rest = divmod(count, self._chunk)
        pack_into, kind, chunk, stride = HEADER.pack_into, self._kind, self._chunk, self._stride
        for index in range(full):
            pack_into(self._buffer, index * stride, kind, chunk)
        if rest:
            pack_into(self._buffer, full * stride, kind, rest)
            return self._view[: full * stride + HEADER_SIZE + rest]
        return self._view[: full * stride]


def encode_checked(message: Message, version: int) -> bytes:
    """Encode ``message`` after checking it against the caps of ``version``.

    Raises :class:`LocalProtocolError` for a message a correct peer would reject (for
    instance a 64 KiB chunk on a v2 stream, or a command line above 65535 bytes).
    """
    frame = encode(message)
    msg_type, length = HEADER.unpack_from(frame)
    try:
        check_header(msg_type, length, version)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"refusing to send: {exc}") from None
    return frame


def read_message(
    recv: Callable[[int], bytes],
    version: int = MIN_PROTOCOL_VERSION,
    *,
    allowed: Collection[MsgType] | None = None,
) -> Message | None:
    """Read exactly one message through ``recv`` (blocking), for the per-call clients.

    ``recv(n)`` returns at most ``n`` bytes and ``b""`` at end of stream (a socket's
    ``recv`` or a vchan's partial ``read``). Returns None when the stream ends cleanly
    before the first header byte; an end inside a frame is a RemoteProtocolError. Never
    reads past the message, so the rest of the stream is left for the caller.
    """
    header = _recv_exactly(recv, HEADER_SIZE, eof_ok=True)
    if header is None:
        return None
    msg_type, length = HEADER.unpack(header)
    kind = check_header(msg_type, length, version, allowed)
    payload = _recv_exactly(recv, length, eof_ok=False) if length else b""
    if payload is None:  # pragma: no cover - eof_ok=False never returns None
        raise RemoteProtocolError(f"stream ended inside a {kind.name} payload")
    return decode_payload(kind, payload)


def read_exec_params(recv: Callable[[int], bytes]) -> tuple[int, int] | None:
    """Read the bare 8-byte exec_params record (no header) an agent writes to a
    qrexec-client-vm socket once the call is allowed: ``(connect_domain, connect_port)``.

    Returns None when the agent closes the socket first, which is how a refusal arrives
    (spec §4 (iv)); a record cut short is a RemoteProtocolError.
    """
    raw = _recv_exactly(recv, EXEC_PARAMS.size, eof_ok=True)
    if raw is None:
        return None
    domain, port = EXEC_PARAMS.unpack(raw)
    return int(domain), int(port)


def _recv_exactly(recv: Callable[[int], bytes], size: int, *, eof_ok: bool) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = recv(size - len(chunks))
        if not chunk:
            if eof_ok and not chunks:
                return None
            raise RemoteProtocolError(
                f"stream ended after {len(chunks)} of {size} bytes of a message"
            )
        if len(chunk) > size - len(chunks):
            raise LocalProtocolError("recv returned more bytes than asked for")
        chunks += chunk
    return bytes(chunks)
