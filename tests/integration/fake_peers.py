"""Raw-byte peers for driving our agent and qrexec-client-vm over the socket transport.

* :class:`FakeDaemon` plays dom0's qrexec-daemon against a real ``qrexec-agent``: it
  connects as client of the agent's control vchan (port 512), and serves data vchans
  as dom0 would (server of ``(agent domain, port)``).
* :class:`FakeTriggerAgent` plays a VM's agent against a real ``qrexec-client-vm``: it
  listens on the trigger socket and answers with 8 bytes (or closes).

Everything is plain sockets with timeouts, so a test can also assert that *nothing*
arrives, and every byte read is kept exactly as sent (``Frame``).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from qrexec.backends.socket import SocketBackend, connect_once
from qrexec.protocol.constants import MsgType

HEADER = struct.Struct("<II")
HELLO_V4 = HEADER.pack(MsgType.HELLO, 4) + struct.pack("<I", 4)


@dataclass(frozen=True)
class Frame:
    """One message as received: its type and raw payload."""

    type: int
    payload: bytes

    @property
    def raw(self) -> bytes:
        return HEADER.pack(self.type, len(self.payload)) + self.payload


def frame(msg_type: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(msg_type, len(payload)) + payload


def params(domain: int, port: int) -> bytes:
    return struct.pack("<II", domain, port)


def exit_frame(code: int) -> bytes:
    return frame(MsgType.DATA_EXIT_CODE, struct.pack("<i", code))


class Peer:
    """One connected socket, read frame by frame with a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, size: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"only {len(self._buffer)} of {size} bytes arrived")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"only {len(self._buffer)} of {size} bytes arrived") from None
            except ConnectionResetError:
                data = b""
            if not data:
                return False
            self._buffer += data
        return True

    def read_bytes(self, size: int, timeout: float = 20) -> bytes | None:
        """Exactly ``size`` bytes, or None at EOF."""
        if not self._fill(size, timeout):
            return None
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def read(self, timeout: float = 20) -> Frame | None:
        """The next frame; None when the peer closed (a partial frame is an error)."""
        if not self._fill(HEADER.size, timeout):
            assert not self._buffer, f"closed inside a header: {self._buffer!r}"
            return None
        msg_type, length = HEADER.unpack(self._buffer[: HEADER.size])
        if not self._fill(HEADER.size + length, timeout):
            raise AssertionError("closed inside a frame")
        payload = self._buffer[HEADER.size : HEADER.size + length]
        self._buffer = self._buffer[HEADER.size + length :]
        return Frame(msg_type, payload)

    def read_until_close(self, timeout: float = 20) -> list[Frame]:
        frames = []
        while (got := self.read(timeout)) is not None:
            frames.append(got)
        return frames

    def is_closed(self, timeout: float = 20) -> bool:
        """True when the peer closes without sending anything first."""
        return self._fill(1, timeout) is False

    def silent_for(self, seconds: float) -> bool:
        """True when nothing arrives (and no close) for ``seconds``."""
        try:
            self._fill(len(self._buffer) + 1, seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def connect_vchan(backend: SocketBackend, remote: int, port: int, timeout: float = 30) -> Peer:
    """Connect as vchan client of ``(remote, port)``, retrying until the server is up."""
    path = backend.client_path(remote, port)
    deadline = time.monotonic() + timeout
    while (sock := connect_once(path)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no vchan server at {path}")
        time.sleep(0.01)
    return Peer(sock)


class VchanServer:
    """A vchan server socket of ``(remote, port)``; :meth:`accept` gives the peer."""

    def __init__(self, backend: SocketBackend, remote: int, port: int) -> None:
        self.path = backend.server_path(remote, port)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(1)

    def accept(self, timeout: float = 30) -> Peer:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        self.sock.close()
        self.path.unlink(missing_ok=True)
        return Peer(conn)


class FakeDaemon:
    """dom0's daemon for the agent of domain ``domid``, speaking raw bytes."""

    def __init__(self, vchan_dir: Path, domid: int) -> None:
        self.backend = SocketBackend(0, vchan_dir)
        self.domid = domid
        self.control: Peer | None = None

    def connect(self, version: int = 4) -> Peer:
        """Connect the control vchan and do the HELLOs (the agent sends first)."""
        control = connect_vchan(self.backend, self.domid, 512)
        hello = control.read()
        assert hello is not None and hello.type == MsgType.HELLO, hello
        control.send(HEADER.pack(MsgType.HELLO, 4) + struct.pack("<I", version))
        self.control = control
        return control

    def serve_data(self, port: int) -> VchanServer:
        return VchanServer(self.backend, self.domid, port)

    def call(self, msg_type: int, cmdline: bytes, port: int = 513) -> Peer:
        """Send EXEC_CMDLINE/JUST_EXEC for ``cmdline`` (NUL added) and take the data
        vchan the agent connects, HELLOs done (the agent sends first)."""
        assert self.control is not None
        server = self.serve_data(port)
        self.control.send(frame(msg_type, params(0, port) + cmdline + b"\0"))
        data = server.accept()
        hello = data.read()
        assert hello is not None and hello.type == MsgType.HELLO, hello
        data.send(HELLO_V4)
        return data


class FakeTriggerAgent:
    """The trigger socket of a VM's agent, for one qrexec-client-vm at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)

    def accept(self, timeout: float = 30) -> Peer:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        return Peer(conn)

    def close(self) -> None:
        self.sock.close()
