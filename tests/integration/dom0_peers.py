"""Fake peers for the dom0 side of VM → dom0 calls, speaking raw bytes (spec §15.1).

* :class:`FakeSourceDaemon` - the calling VM's daemon socket ``qrexec.<SRCID>`` as
  ``qrexec-client -d dom0 -c`` sees it: HELLO(3), records the client's request bytes,
  answers with whatever the test scripts (by default SERVICE_CONNECT len 8 ``{SRCID,
  port}``), then keeps the connection until the client closes it; an empty answer closes
  the connection at once (EOF instead of an answer).
* :class:`FakeVmCaller` - qrexec-client-vm's end of the data vchan: vchan *server* of
  ``(0, port)`` in the VM's domain, sends its HELLO first, then lets the test send STDIN and
  read the dom0 side's reply stream as raw bytes and as messages.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

from qrexec.backends.socket import SocketBackend, SocketStream
from qrexec.daemon.clients import bind_unix
from qrexec.errors import TransportError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import Data, ExecParams, Hello, Message, encode

#: The data port the fake daemon hands out.
PORT = 513


def frame(msg_type: int, payload: bytes) -> bytes:
    return struct.pack("<II", msg_type, len(payload)) + payload


def stdin(data: bytes) -> bytes:
    return encode(Data(MsgType.DATA_STDIN, data))


def eof(kind: MsgType) -> bytes:
    """A zero-length data message: EOF of that stream, 8 bytes."""
    return struct.pack("<II", kind, 0)


def exit_code(code: int) -> bytes:
    return struct.pack("<IIi", MsgType.DATA_EXIT_CODE, 4, code)


class FakeSourceDaemon:
    """The calling VM's daemon socket, for one client."""

    def __init__(
        self,
        socket_dir: Path,
        srcid: int | str,
        reply: bytes | None = None,
        *,
        close_after_reply: bool = False,
        close_delay: float = 0.0,
    ) -> None:
        self.srcid = srcid
        self.close_after_reply = close_after_reply
        self.close_delay = close_delay
        #: time.monotonic() when the client connected, and when the connection ended.
        self.accepted_at = 0.0
        self.ended_at = 0.0
        self.conn: socket.socket | None = None
        #: Another fake daemon whose client connection is probed when ours connects.
        self.watch: FakeSourceDaemon | None = None
        #: Whether, when our client connected, the watched one's client had closed.
        self.watched_was_closed: bool | None = None
        self.reply = (
            reply
            if reply is not None
            else encode(ExecParams(MsgType.SERVICE_CONNECT, int(srcid), PORT))
        )
        self.request = b""
        self.client_hello = b""
        self.closed_by_client = threading.Event()
        self._server = bind_unix(str(socket_dir / f"qrexec.{srcid}"))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _recv_exactly(self, conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _serve(self) -> None:
        with self._server:
            self._server.settimeout(60)
            conn, _ = self._server.accept()
        self.accepted_at = time.monotonic()
        self.conn = conn
        if self.watch is not None:
            self.watched_was_closed = self.watch.client_closed()
        with conn:
            conn.sendall(encode(Hello(3)))
            self.client_hello = self._recv_exactly(conn, 12)
            header = self._recv_exactly(conn, 8)
            (length,) = struct.unpack_from("<I", header, 4) if len(header) == 8 else (0,)
            self.request = header + self._recv_exactly(conn, length)
            if self.reply:
                conn.sendall(self.reply)
            if not self.reply or self.close_after_reply:
                time.sleep(self.close_delay)
                self.ended_at = time.monotonic()
                return
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass
            self.ended_at = time.monotonic()
            self.closed_by_client.set()

    def client_closed(self) -> bool:
        """Whether our client has closed its end (peeked, without consuming)."""
        if self.conn is None:
            return False
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)


class FakeVmCaller:
    """qrexec-client-vm's end of the data vchan of a VM → dom0 call."""

    def __init__(self, vchan_dir: Path, vm_domid: int, port: int = PORT) -> None:
        self.backend = SocketBackend(vm_domid, vchan_dir)
        self.port = port
        self.stream: SocketStream | None = None
        self.raw = b""

    def accept(self, timeout: float = 30, hello: int = 4) -> None:
        """Listen, take dom0's connection, send our HELLO first (as the C VM side)."""
        listener = self.backend.listen(0, self.port)
        try:
            self.stream = listener.accept(timeout)
        finally:
            listener.close()
        self.stream.send(encode(Hello(hello)))

    def send(self, data: bytes) -> None:
        """Send raw bytes; a dom0 side that already finished and closed is not an error
        (a real qrexec-client-vm's late STDIN EOF meets the same)."""
        assert self.stream is not None
        with contextlib.suppress(TransportError):
            self.stream.send(data)

    def read_until(self, wanted: bytes, limit: int = 1 << 20) -> bytes:
        """Read until the raw reply stream contains ``wanted`` (or ends); the stream."""
        assert self.stream is not None
        while wanted not in self.raw and len(self.raw) < limit:
            chunk = self.stream.recv(65536)
            if not chunk:
                break
            self.raw += chunk
        return self.raw

    def read_all(self) -> bytes:
        """Everything dom0 sends until it closes the vchan."""
        assert self.stream is not None
        while chunk := self.stream.recv(65536):
            self.raw += chunk
        return self.raw

    def messages(self) -> list[Message]:
        """The reply stream as messages, adjacent data chunks of one stream merged (chunk
        boundaries depend on scheduling; EOFs and order do not)."""
        decoder = FrameDecoder(4)
        merged: list[Message] = []
        for message in decoder.feed(self.raw):
            last = merged[-1] if merged else None
            if (
                isinstance(message, Data)
                and isinstance(last, Data)
                and message.data
                and last.data
                and last.msg_type is message.msg_type
            ):
                merged[-1] = Data(message.msg_type, last.data + message.data)
            else:
                merged.append(message)
        return merged

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
