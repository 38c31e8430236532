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
from qrexec.protocol.constants import VCHAN_CONTROL_PORT
from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import Hello, Message, encode


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

    def _read_all(self) -> None:
        try:
            while True:
                message = read_message(self.stream.recv, self.version)
                self._queue.put(message)
                if message is None:
                    return
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
