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

import os
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from qrexec.backends.base import BlockingStream
from qrexec.errors import ProtocolError, TransportError
from qrexec.lazy_logging import get_logger
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import FrameDecoder, read_message
from qrexec.protocol.messages import Data, ExitStatus, Hello, encode
from qrexec.protocol.negotiation import max_data_chunk, negotiate

log = get_logger(__name__)

#: Exit code when the service side vanished without sending its exit code.
CLOSED_EARLY_EXIT = 255
RECV_SIZE = 256 * 1024
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


class _InputSender:
    """Sends prefix data, input and STDIN EOF from a thread; the EOF goes out once."""

    def __init__(self, stream: BlockingStream, chunk: int, io: CallerIO) -> None:
        self.stream = stream
        self.chunk = chunk
        self.io = io
        self.lock = threading.Lock()
        self.eof_sent = False
        self.stopped = False

    def _send(self, data: bytes) -> bool:
        with self.lock:
            if self.stopped or self.eof_sent:
                return False
            self.stream.send(encode(Data(MsgType.DATA_STDIN, data)))
        return True

    def run(self) -> None:
        try:
            prefix = self.io.prefix_data
            for offset in range(0, len(prefix), self.chunk):
                if not self._send(prefix[offset : offset + self.chunk]):
                    return
            fd = self.io.stdin_fd
            while fd is not None and not self.stopped:
                try:
                    data = os.read(fd, self.chunk)
                except (ConnectionResetError, OSError) as exc:
                    log.debug("reading input: %s", exc)
                    data = b""
                if not data:
                    fd = self.io.next_input() if self.io.next_input is not None else None
                    continue
                if not self._send(data):
                    break
            self.send_eof()
        except TransportError as exc:
            log.debug("input relay stopped: %s", exc)

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
    """Run the data phase; the service's exit code (or :data:`CLOSED_EARLY_EXIT`)."""
    sender = _InputSender(stream, max_data_chunk(version), io)
    thread = threading.Thread(target=sender.run, name="qrexec-stdin", daemon=True)
    thread.start()
    decoder = FrameDecoder(version, allowed=SERVICE_MESSAGE_TYPES)
    outputs = {MsgType.DATA_STDOUT: io.stdout_fd, MsgType.DATA_STDERR: io.stderr_fd}
    filters = {MsgType.DATA_STDOUT: io.filter_stdout, MsgType.DATA_STDERR: io.filter_stderr}
    open_outputs = {MsgType.DATA_STDOUT: True, MsgType.DATA_STDERR: True}
    try:
        while True:
            data = stream.recv(RECV_SIZE)
            if not data:
                decoder.close()
                log.warning("vchan connection closed early")
                return CLOSED_EARLY_EXIT
            for message in decoder.feed(data):
                if isinstance(message, ExitStatus):
                    sender.stopped = True
                    sender.send_eof(wait=False)
                    return message.code
                assert isinstance(message, Data)
                kind = message.msg_type
                if not open_outputs[kind]:
                    continue
                if message.is_eof:
                    open_outputs[kind] = False
                    if kind is MsgType.DATA_STDOUT and io.close_stdout_at_eof:
                        _close_output(outputs[kind])
                        io.stdout_closed = True
                    continue
                payload = filter_escapes(message.data) if filters[kind] else message.data
                if not _write_all(outputs[kind], payload):
                    open_outputs[kind] = False
    except ProtocolError as exc:
        log.warning("service side broke the data protocol: %s", exc)
        return CLOSED_EARLY_EXIT
    except TransportError as exc:
        log.warning("vchan connection closed early: %s", exc)
        return CLOSED_EARLY_EXIT
    finally:
        sender.stopped = True


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
