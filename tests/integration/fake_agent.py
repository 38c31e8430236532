"""A scripted stand-in for a VM's qrexec-agent that speaks raw bytes to a real daemon.

It listens as the vchan server of (dom0, 512) over the socket backend, like a real
agent, so a real ``qrexec-daemon`` connects to it; tests then send any bytes they like
(well-formed or hostile) and read what the daemon answers.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from qrexec.backends.socket import SocketBackend, SocketStream
from qrexec.errors import RemoteProtocolError
from qrexec.protocol.constants import HEADER_SIZE, VCHAN_CONTROL_PORT, MsgType
from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import HEADER, Hello, Message, RawFrame, decode_payload, encode


class RawControl:
    """One control connection from the daemon's point of view: the agent's end.

    A background thread reads the daemon's messages into a queue once HELLO is done, so
    a read that timed out never swallows a later message.
    """

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.version = 2
        self._queue: queue.Queue[Message | BaseException | None] = queue.Queue()

    def send_raw(self, data: bytes) -> None:
        self.stream.send(data)

    def send(self, message: Message) -> None:
        self.stream.send(encode(message))

    def hello(self, version: int = 4) -> int:
        """Send our HELLO first (as agents do) and return the daemon's answer."""
        self.send(Hello(version))
        reply = read_message(self.stream.recv, 2)
        assert isinstance(reply, Hello), reply
        self.version = min(version, reply.version)
        self.start_reading()
        return reply.version

    def start_reading(self) -> None:
        """Queue the daemon's messages from now on (done by :meth:`hello`)."""
        threading.Thread(target=self._read_all, daemon=True).start()

    def _recv_exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self.stream.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _read_all(self) -> None:
        """Frames as the daemon sent them: decoded when their layout is the usual one,
        else kept as :class:`RawFrame` (a client's SERVICE_CONNECT forwarded verbatim may
        have any length, spec §15.3)."""
        try:
            while True:
                header = self._recv_exactly(HEADER_SIZE)
                if header is None:
                    self._queue.put(None)
                    return
                msg_type, length = HEADER.unpack(header)
                payload = self._recv_exactly(length) if length else b""
                if payload is None:
                    raise RemoteProtocolError("the daemon closed inside a frame")
                try:
                    message: Message = decode_payload(msg_type, payload)
                except RemoteProtocolError:
                    message = RawFrame(MsgType(msg_type), payload)
                self._queue.put(message)
        except BaseException as exc:  # handed to the test thread
            self._queue.put(exc)

    def read(self, timeout: float) -> Message | None:
        """The daemon's next message; None when it closed the connection.

        Raises TimeoutError when nothing arrives in time.
        """
        try:
            result = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the daemon sent nothing") from None
        if isinstance(result, BaseException):
            raise result
        return result

    def is_dropped(self, timeout: float = 10) -> bool:
        """True when the daemon closes this connection within ``timeout``."""
        try:
            while True:
                if self.read(timeout) is None:
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.stream.close()


class FakeAgent:
    """Accepts the daemon's control connections for domain ``domid``."""

    def __init__(self, vchan_dir: Path, domid: int) -> None:
        self.backend = SocketBackend(domid, vchan_dir)

    def accept(self, timeout: float = 30) -> RawControl:
        listener = self.backend.listen(0, VCHAN_CONTROL_PORT)
        try:
            return RawControl(listener.accept(timeout))
        finally:
            listener.close()
