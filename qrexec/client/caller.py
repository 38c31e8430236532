"""The caller's side of a data vchan, blocking: qrexec-client and qrexec-client-vm share it.

After both HELLOs (:func:`caller_handshake`, ours sent first), the caller:

* sends the prefix data (once), then its input as STDIN chunks of at most the negotiated
  chunk size, then a zero-length STDIN (EOF) - from a second thread, so output keeps
  flowing while input blocks;
* writes STDOUT and STDERR chunks to its outputs (optionally filtered, ``-t``/``-T``) and
  closes an output at its EOF (a socket output is shut down for writing instead);
* on EXIT_CODE sends STDIN EOF if not sent yet, stops reading input and returns the code.

A vchan that ends without an exit code is logged as "vchan connection closed early" and
gives :data:`CLOSED_EARLY_EXIT`. Imports no asyncio; the stream is any
:class:`~qrexec.backends.base.BlockingStream`.
"""

from __future__ import annotations

import _thread
import os
import socket
import stat
import sys
from collections.abc import Callable

from qrexec import trace
from qrexec.errors import ProtocolError, TransportError
from qrexec.lazy_logging import get_logger
from qrexec.pipe_buffers import enlarge_pipe
from qrexec.protocol.constants import HEADER_SIZE, MsgType
from qrexec.protocol.framing import DataFramer, FrameBuffer, FrameDecoder, read_message
from qrexec.protocol.messages import HEADER, Data, ExitStatus, Hello, encode
from qrexec.protocol.negotiation import max_data_chunk, negotiate

TYPE_CHECKING = False  # typing is not imported at run time: the clients load this module
if TYPE_CHECKING:
    from dataclasses import dataclass

    from qrexec.backends.base import BlockingStream
else:
    from qrexec._record import dataclass

log = get_logger(__name__)

#: Exit code when the service side vanished without sending its exit code.
CLOSED_EARLY_EXIT = 255
RECV_SIZE = 256 * 1024
#: Buffers per ``writev`` (POSIX guarantees 16 at least; Linux takes 1024).
WRITEV_MAX = 512
SERVICE_MESSAGE_TYPES = frozenset(
    {MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_EXIT_CODE}
)

_KEEP_CONTROL = {0x07, 0x08, 0x09, 0x0A, 0x0D}
#: ``-t``/``-T``: bytes outside 0x20-0x7E become ``_``, except BEL, BS, TAB, LF and CR.
FILTER_TABLE = bytes(b if 0x20 <= b <= 0x7E or b in _KEEP_CONTROL else ord("_") for b in range(256))


def filter_escapes(data: bytes) -> bytes:
    return data.translate(FILTER_TABLE)


def caller_handshake(stream: BlockingStream, own_version: int) -> int:
    """Send HELLO(own) first, read the service side's, return ``min``."""
    stream.send(encode(Hello(own_version)))
    message = read_message(stream.recv, allowed=(MsgType.HELLO,))
    if not isinstance(message, Hello):
        raise ProtocolError("the data vchan closed before HELLO")
    return negotiate(own_version, message.version)


@dataclass
class CallerIO:
    """Where the caller's input comes from and its output goes.

    ``stdin_fd`` None means no input (EOF at once). ``stdout_fd`` may equal ``stdin_fd``
    for a socket used both ways (``--use-stdin-socket``).
    """

    stdin_fd: int | None
    stdout_fd: int
    stderr_fd: int
    prefix_data: bytes = b""
    filter_stdout: bool = False
    filter_stderr: bool = False
    #: Close (or shut down) our stdout when the service's stdout ends.
    close_stdout_at_eof: bool = True
    #: Set by :func:`run_caller` once it has closed ``stdout_fd``.
    stdout_closed: bool = False
    #: Asked when the input hits EOF: a descriptor to go on reading from, or None to send
    #: STDIN EOF (qrexec-client-vm's SIGUSR1 single-socket mode switches input this way).
    next_input: Callable[[], int | None] | None = None


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except (BrokenPipeError, ConnectionResetError):
            return False
        view = view[written:]
    return True


def _writev_all(fd: int, views: list[memoryview]) -> bool:
    """Write payloads straight from the receive buffer, several per system call."""
    while views:
        try:
            written = os.writev(fd, views[:WRITEV_MAX])
        except (BrokenPipeError, ConnectionResetError):
            return False
        while views and written >= len(views[0]):
            written -= len(views[0])
            views = views[1:]
        if written:
            views = [views[0][written:], *views[1:]]
    return True


class _InputSender:
    """Sends prefix data, input and STDIN EOF from a thread; the EOF goes out once."""

    def __init__(self, stream: BlockingStream, chunk: int, io: CallerIO) -> None:
        self.stream = stream
        self.chunk = chunk
        self.io = io
        self.lock = _thread.allocate_lock()
        self.eof_sent = False
        self.stopped = False

    def _send(self, data: bytes) -> bool:
        with self.lock:
            if self.stopped or self.eof_sent:
                return False
            self.stream.send(encode(Data(MsgType.DATA_STDIN, data)))
        return True

    def _send_frames(self, frames: memoryview) -> bool:
        with self.lock:
            if self.stopped or self.eof_sent:
                return False
            self.stream.send(frames)
        return True

    def run(self) -> None:
        try:
            prefix = self.io.prefix_data
            for offset in range(0, len(prefix), self.chunk):
                if not self._send(prefix[offset : offset + self.chunk]):
                    return
            fd = self.io.stdin_fd
            # Input is read straight into frames (several per read) and sent as they are.
            # A read that fills a whole frame means bulk input: the pipe is enlarged and
            # the rest spliced (below). Small input (most calls) never loads the modules
            # those need.
            framer = DataFramer(MsgType.DATA_STDIN, self.chunk)
            bulk = False
            while fd is not None and not self.stopped:
                try:
                    count = os.readv(fd, framer.payloads)
                except (ConnectionResetError, OSError) as exc:
                    log.debug("reading input: %s", exc)
                    count = 0
                if not count:
                    fd = self.io.next_input() if self.io.next_input is not None else None
                    continue
                if not self._send_frames(framer.frames(count)):
                    break
                if not bulk and count >= self.chunk:
                    bulk = True
                    enlarge_pipe(fd)
                    # Splicing reads a pipe to its end; with a next input to switch to
                    # (SIGUSR1 single-socket mode) the input is read by hand.
                    if self.io.next_input is None and self._splice_input(fd):
                        break
            self.send_eof()
        except TransportError as exc:
            log.debug("input relay stopped: %s", exc)

    def _splice_input(self, fd: int) -> bool:
        """Input from a pipe, spliced into the vchan socket frame by frame (Linux).

        Each frame's length is what the pipe holds (``FIONREAD``, at most one chunk); its
        header is sent, then the payload moves pipe -> socket inside the kernel. False
        (and nothing read) when this cannot apply: no ``os.splice``, a stream without
        ``splice_from`` (vchan, memory), or input that is not a pipe.
        """
        splice_from = getattr(self.stream, "splice_from", None)
        if splice_from is None or not _splice_works():
            return False
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return False
        except OSError:
            return False
        import fcntl
        import select
        import termios

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        size = bytearray(4)
        header = bytearray(HEADER_SIZE)
        # Each frame is assembled in a pipe of ours (header written, payload spliced behind
        # it) and sent with one splice: the agent wakes once per frame and finds it whole.
        own = _frame_pipe(self.chunk)
        try:
            while not self.stopped:
                fcntl.ioctl(fd, termios.FIONREAD, size)
                available = int.from_bytes(size, sys.byteorder)
                if not available:
                    events = poller.poll()
                    if events and not events[0][1] & select.POLLIN:
                        return True  # hang-up with nothing left: end of input
                    continue
                while available:
                    count = min(available, self.chunk)
                    HEADER.pack_into(header, 0, MsgType.DATA_STDIN, count)
                    with self.lock:
                        if self.stopped or self.eof_sent:
                            return True
                        if own is None:
                            splice_from(header, fd, count)
                        else:
                            _frame_into(own[1], header, fd, count)
                            splice_from(b"", own[0], HEADER_SIZE + count)
                    available -= count
            return True
        finally:
            if own is not None:
                os.close(own[0])
                os.close(own[1])

    def send_eof(self, *, wait: bool = True) -> None:
        """Send STDIN EOF unless already sent; with ``wait`` False, skip if busy."""
        if not self.lock.acquire(blocking=wait):
            return
        try:
            if not self.eof_sent:
                self.eof_sent = True
                self.stream.send(encode(Data(MsgType.DATA_STDIN, b"")))
        except TransportError as exc:
            log.debug("cannot send STDIN EOF: %s", exc)
        finally:
            self.lock.release()


def _close_output(fd: int) -> None:
    if _is_socket(fd):
        try:
            socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.debug("shutdown of the output socket: %s", exc)
        return
    try:
        os.close(fd)
    except OSError as exc:
        log.debug("closing output: %s", exc)


def run_caller(stream: BlockingStream, version: int, io: CallerIO) -> int:
    """Run the data phase; the service's exit code (or :data:`CLOSED_EARLY_EXIT`).

    Output payloads are written from the receive buffer itself, consecutive chunks of one
    stream in one ``writev``.
    """
    chunk = max_data_chunk(version)
    sender = _InputSender(stream, chunk, io)
    # The low-level _thread, not threading: the same thread, without threading's start-up
    # cost in every per-call client. Nobody joins it; it stops with the call.
    _thread.start_new_thread(sender.run, ())
    frames = FrameBuffer(version, allowed=SERVICE_MESSAGE_TYPES)
    outputs = {MsgType.DATA_STDOUT: io.stdout_fd, MsgType.DATA_STDERR: io.stderr_fd}
    filters = {MsgType.DATA_STDOUT: io.filter_stdout, MsgType.DATA_STDERR: io.filter_stderr}
    open_outputs = {MsgType.DATA_STDOUT: True, MsgType.DATA_STDERR: True}
    if trace.ON:
        trace.point("client.hello", call=trace.CLI_CALL, version=version)
    seen_first = False
    pending: list[memoryview] = []
    pending_kind = MsgType.DATA_STDOUT

    enlarged: set[int] = set()
    # Bulk output (a frame of the largest size) on a transport that can splice: read up to
    # the next frame boundary, then go on frame by frame with the payloads spliced.
    can_splice = hasattr(os, "splice") and hasattr(stream, "splice_into")
    switching = False

    def flush() -> None:
        if not pending:
            return
        fd = outputs[pending_kind]
        # A whole frame's worth at once means bulk output: grow the pipe (once).
        if fd not in enlarged and sum(map(len, pending)) >= chunk:
            enlarged.add(fd)
            enlarge_pipe(fd)
        if not _writev_all(fd, pending):
            open_outputs[pending_kind] = False
        pending.clear()

    try:
        while True:
            space = frames.free_space()
            if switching:
                need = frames.frame_remainder()
                pipe = None if need or not _splice_works() else _frame_pipe(chunk)
                if pipe is None and not need:
                    switching = can_splice = False  # no pipe large enough: keep copying
                elif pipe is not None:
                    spliced = _SplicedOutput(stream, version, io, outputs, open_outputs)
                    code = spliced.run(pipe)
                    if code is not None:
                        sender.stopped = True
                        sender.send_eof(wait=False)
                        return code
                    log.warning("vchan connection closed early")
                    return CLOSED_EARLY_EXIT
                else:
                    space = space[:need]
            count = stream.recv_into(space)
            if not count:
                frames.close()
                log.warning("vchan connection closed early")
                return CLOSED_EARLY_EXIT
            frames.filled(count)
            view = frames.view  # a new buffer once the stream turned out bulk
            try:
                while (frame := frames.next_frame()) is not None:
                    kind, start, end = frame
                    if kind is MsgType.DATA_EXIT_CODE:
                        flush()
                        message = frames.message(kind, start, end)
                        assert isinstance(message, ExitStatus)
                        if trace.ON:
                            trace.point("client.exit_code", call=trace.CLI_CALL, code=message.code)
                        sender.stopped = True
                        sender.send_eof(wait=False)
                        return message.code
                    if not open_outputs[kind]:
                        continue
                    if kind is not pending_kind:
                        flush()
                        pending_kind = kind
                    if start == end:
                        flush()
                        if trace.ON:
                            trace.point("client.eof", call=trace.CLI_CALL, stream=kind.name)
                        open_outputs[kind] = False
                        if kind is MsgType.DATA_STDOUT and io.close_stdout_at_eof:
                            _close_output(outputs[kind])
                            io.stdout_closed = True
                        continue
                    if not seen_first and trace.ON:
                        trace.point("client.output.first_byte", call=trace.CLI_CALL)
                    seen_first = True
                    if filters[kind]:
                        pending.append(memoryview(filter_escapes(bytes(view[start:end]))))
                    else:
                        pending.append(view[start:end])
                    if can_splice and end - start == chunk:
                        switching = True
            finally:
                # Whole frames before a bad one are still delivered, in order.
                flush()
    except ProtocolError as exc:
        log.warning("service side broke the data protocol: %s", exc)
        return CLOSED_EARLY_EXIT
    except TransportError as exc:
        log.warning("vchan connection closed early: %s", exc)
        return CLOSED_EARLY_EXIT
    finally:
        sender.stopped = True


class _SplicedOutput:
    """The rest of the data phase frame by frame, payloads moved by ``splice``.

    Entered at a frame boundary once output is bulk. Each header is received and checked
    as :class:`~qrexec.protocol.framing.FrameBuffer` checks it; a DATA payload goes from
    the socket into a pipe of ours and, once the whole frame is there, on to its output
    (spliced to a pipe or socket, else read and written: a terminal, a filter). Only whole
    frames are delivered, as on the copying path.
    """

    def __init__(
        self,
        stream: BlockingStream,
        version: int,
        io: CallerIO,
        outputs: dict[MsgType, int],
        open_outputs: dict[MsgType, bool],
    ) -> None:
        self.stream = stream
        self.version = version
        self.io = io
        self.outputs = outputs
        self.open_outputs = open_outputs
        self.filters = {
            MsgType.DATA_STDOUT: io.filter_stdout,
            MsgType.DATA_STDERR: io.filter_stderr,
        }
        self.spliceable = {
            kind: not self.filters[kind] and (_is_socket(fd) or _is_pipe(fd))
            for kind, fd in outputs.items()
        }

    def _recv_exactly(self, view: memoryview) -> bool:
        got = 0
        while got < len(view):
            count = self.stream.recv_into(view[got:])
            if not count:
                if got:
                    raise ProtocolError("stream ended in the middle of a frame")
                return False
            got += count
        return True

    def run(self, pipe: tuple[int, int]) -> int | None:
        """The exit code; None when the stream ends without one. Closes ``pipe``."""
        from qrexec.protocol.framing import check_header
        from qrexec.protocol.messages import decode_payload

        for fd in self.outputs.values():
            enlarge_pipe(fd)
        read_end, write_end = pipe
        header = bytearray(HEADER_SIZE)
        try:
            while True:
                if not self._recv_exactly(memoryview(header)):
                    return None
                msg_type, length = HEADER.unpack(header)
                kind = check_header(msg_type, length, self.version, SERVICE_MESSAGE_TYPES)
                if kind is MsgType.DATA_EXIT_CODE:
                    payload = bytearray(length)
                    if length and not self._recv_exactly(memoryview(payload)):
                        raise ProtocolError("stream ended in the middle of a frame")
                    message = decode_payload(kind, bytes(payload))
                    assert isinstance(message, ExitStatus)
                    if trace.ON:
                        trace.point("client.exit_code", call=trace.CLI_CALL, code=message.code)
                    return message.code
                if not length:
                    self._eof(kind)
                    continue
                moved = 0
                while moved < length:
                    try:
                        count = self.stream.splice_into(write_end, length - moved)  # type: ignore[attr-defined]
                    except BlockingIOError:
                        # The pipe is out of slots (a peer sending tiny pieces): this
                        # frame goes through our memory.
                        self._deliver_copied(kind, read_end, moved, length)
                        break
                    if not count:
                        raise ProtocolError("stream ended in the middle of a frame")
                    moved += count
                else:
                    self._deliver(kind, read_end, length)
        finally:
            os.close(read_end)
            os.close(write_end)

    def _eof(self, kind: MsgType) -> None:
        if not self.open_outputs[kind]:
            return
        if trace.ON:
            trace.point("client.eof", call=trace.CLI_CALL, stream=kind.name)
        self.open_outputs[kind] = False
        if kind is MsgType.DATA_STDOUT and self.io.close_stdout_at_eof:
            _close_output(self.outputs[kind])
            self.io.stdout_closed = True

    def _deliver_copied(self, kind: MsgType, pipe_fd: int, moved: int, length: int) -> None:
        """The ``moved`` bytes in the pipe and the rest of the frame from the vchan, whole,
        then to the output of ``kind``."""
        data = bytearray()
        while len(data) < moved:
            data += os.read(pipe_fd, moved - len(data))
        rest = bytearray(length - moved)
        if not self._recv_exactly(memoryview(rest)):
            raise ProtocolError("stream ended in the middle of a frame")
        data += rest
        if self.open_outputs[kind]:
            if self.filters[kind]:
                data = bytearray(filter_escapes(bytes(data)))
            if not _write_all(self.outputs[kind], bytes(data)):
                self.open_outputs[kind] = False

    def _deliver(self, kind: MsgType, pipe_fd: int, count: int) -> None:
        """Move the ``count`` bytes in the pipe to the output of ``kind`` (or drop them)."""
        fd = self.outputs[kind]
        if self.open_outputs[kind] and self.spliceable[kind]:
            try:
                while count:
                    count -= os.splice(pipe_fd, fd, count)
            except (BrokenPipeError, ConnectionResetError):
                self.open_outputs[kind] = False
        data = b""
        while count:  # not spliceable, or its reader left: through our hands
            chunk = os.read(pipe_fd, count)
            count -= len(chunk)
            data += chunk
        if data and self.open_outputs[kind]:
            if self.filters[kind]:
                data = filter_escapes(data)
            if not _write_all(fd, data):
                self.open_outputs[kind] = False


def _frame_into(pipe_fd: int, header: bytearray, source_fd: int, count: int) -> None:
    """Write ``header`` into the pipe, then splice ``count`` bytes of ``source_fd`` (a pipe
    that holds them, ``FIONREAD``) behind it."""
    os.write(pipe_fd, header)
    while count:
        moved = os.splice(source_fd, pipe_fd, count)
        if not moved:  # cannot happen: FIONREAD counted these bytes
            raise TransportError("the input pipe ran dry inside a frame")
        count -= moved


def _splice_works() -> bool:
    """``os.splice`` works here (asked once per process, only when input or output turns
    bulk: a plain call never loads the module)."""
    from qrexec.splice_support import splice_works

    return splice_works()


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _frame_pipe(chunk: int) -> tuple[int, int] | None:
    """A blocking pipe that holds four frames or more (1 MiB asked), else None: a frame
    spliced into a smaller one could fill it, and nobody would empty it."""
    import fcntl

    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    enlarge_pipe(write_end)
    if fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) >= 4 * (chunk + HEADER_SIZE):
        return read_end, write_end
    os.close(read_end)
    os.close(write_end)
    return None


def read_exit_code(stream: BlockingStream, version: int) -> int:
    """For JUST_EXEC (``-e``): ignore any output, return the exit code."""
    decoder = FrameDecoder(version, allowed=SERVICE_MESSAGE_TYPES)
    try:
        while data := stream.recv(RECV_SIZE):
            for message in decoder.feed(data):
                if isinstance(message, ExitStatus):
                    return message.code
    except (ProtocolError, TransportError) as exc:
        log.warning("data vchan failed: %s", exc)
    log.warning("vchan connection closed early")
    return CLOSED_EARLY_EXIT
