"""Talking to a qrexec-daemon over its unix socket, blocking (spec §5), for the clients.

``qrexec.<DEST>`` in the socket folder (DEST is a domain id, a name or ``uuid:UUID``).
Both sides send HELLO(3) (we send ours first); then one request - EXEC_CMDLINE,
JUST_EXEC or SERVICE_CONNECT - and, when it had port 0, the daemon's reply with the
VM's domain id and the data port. The daemon closes the socket when the agent reports
the end of that connection, which :func:`wait_closed` waits for (``-W``).

Imports no asyncio.
"""

from __future__ import annotations

import os
import socket

from qrexec.errors import ProtocolError, QrexecError
from qrexec.protocol.constants import CLIENT_SOCKET_PROTOCOL_VERSION, MsgType
from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import ExecParams, Hello, Message, encode
from qrexec.protocol.negotiation import negotiate_client_socket
from qrexec.unix_address import unix_address

DEFAULT_SOCKET_DIR = "/var/run/qubes"
SOCKET_DIR_ENV = "QREXEC_DAEMON_SOCKET_DIR"


class DaemonUnreachable(QrexecError):
    """No daemon listens for that domain (not running, or its agent is away)."""


def daemon_socket_path(socket_dir: str, dest: str) -> str:
    if "/" in dest or not dest:
        raise DaemonUnreachable(f"{dest!r} is not a domain name")
    return os.path.join(socket_dir, f"qrexec.{dest}")


def connect_unix(sock: socket.socket, path: str) -> None:
    """``connect`` that also works for paths longer than a sockaddr_un holds."""
    with unix_address(path) as address:
        sock.connect(address)


class DaemonConnection:
    """One request on a daemon socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def open(cls, socket_dir: str, dest: str) -> DaemonConnection:
        path = daemon_socket_path(socket_dir, dest)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connect_unix(sock, path)
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(
                f"cannot connect to the qrexec daemon at {path}: {exc}"
            ) from None
        connection = cls(sock)
        try:
            connection._handshake()
        except BaseException:
            sock.close()
            raise
        return connection

    def _read(self, allowed: frozenset[MsgType]) -> Message:
        message = read_message(self.sock.recv, CLIENT_SOCKET_PROTOCOL_VERSION, allowed=allowed)
        if message is None:
            raise ProtocolError("the daemon closed the connection")
        return message

    def _handshake(self) -> None:
        self.sock.sendall(encode(Hello(CLIENT_SOCKET_PROTOCOL_VERSION)))
        hello = self._read(frozenset({MsgType.HELLO}))
        assert isinstance(hello, Hello)
        negotiate_client_socket(hello.version)

    def request(self, message: Message, *, expect_reply: bool = True) -> ExecParams | None:
        """Send the one request; the daemon's {domain, port} reply when one is expected."""
        self.sock.sendall(encode(message))
        if not expect_reply:
            return None
        reply = self._read(frozenset({message.msg_type}))
        if not isinstance(reply, ExecParams):
            raise ProtocolError(f"unexpected reply {reply.msg_type.name} from the daemon")
        return reply

    def wait_closed(self) -> None:
        """Block until the daemon closes the socket (the connection ended)."""
        while True:
            try:
                if not self.sock.recv(4096):
                    return
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
