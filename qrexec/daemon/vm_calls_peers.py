"""What a VM-initiated call needs from other dom0 programs, asyncio face.

* :func:`open_unix` - connect a unix socket, also past the sockaddr_un length limit
  (deep test and testbed folders are reached through ``/proc/self/fd``).
* :class:`TargetDaemon` - the client side of another qrexec-daemon's socket (spec §5):
  HELLO(3) both ways, one EXEC_CMDLINE ``{caller domid, 0}`` with ``USER:QUBESRPC ...``,
  and the daemon's ``{target domid, port}`` reply. The connection is kept so that
  :meth:`TargetDaemon.wait_closed` can tell when the call ended (the target daemon closes
  it at CONNECTION_TERMINATED), which is when a disposable is killed.
* :func:`admin_call` - one qubesd admin call (spec §14): ``METHOD+ARG dom0 name DEST``
  (``keyword`` and no ``@`` for keywords), NUL, payload, shut down our writing side, read
  the answer to EOF (at most 65535 bytes): ``0`` NUL answer, or ``2`` NUL error.
  ``admin.vm.Start`` answered with ``QubesVMNotHaltedError`` counts as success.

Every answer from these peers is checked; failures raise :class:`PeerError` naming the
peer and what went wrong. No policy logic here (see :mod:`.vm_calls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from qrexec.errors import ProtocolError, QrexecError
from qrexec.protocol.cmdline import encode_cmdline
from qrexec.protocol.constants import CLIENT_SOCKET_PROTOCOL_VERSION, HEADER_SIZE, MsgType
from qrexec.protocol.framing import check_header
from qrexec.protocol.messages import (
    HEADER,
    ExecParams,
    ExecRequest,
    Hello,
    Message,
    decode_payload,
    encode,
)
from qrexec.protocol.negotiation import negotiate_client_socket
from qrexec.unix_address import unix_address

#: qubesd answers are read up to this size (spec §14).
MAX_ADMIN_ANSWER = 65535
#: How long one step of talking to another daemon may take.
DAEMON_STEP_TIMEOUT = 30.0


class PeerError(QrexecError):
    """Another dom0 program (target daemon, qubesd) failed or answered badly."""


async def open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_unix_connection`` that also reaches over-long paths."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        with unix_address(path) as address:
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock)


async def _read_message(reader: asyncio.StreamReader, allowed: frozenset[MsgType]) -> Message:
    header = await reader.readexactly(HEADER_SIZE)
    msg_type, length = HEADER.unpack(header)
    kind = check_header(msg_type, length, CLIENT_SOCKET_PROTOCOL_VERSION, allowed)
    return decode_payload(kind, await reader.readexactly(length))


class TargetDaemon:
    """One EXEC_CMDLINE request on another daemon's socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> TargetDaemon:
        """Connect and exchange HELLOs; OSError when nothing listens at ``path``."""
        reader, writer = await open_unix(path)
        daemon = cls(reader, writer)
        try:
            async with asyncio.timeout(DAEMON_STEP_TIMEOUT):
                writer.write(encode(Hello(CLIENT_SOCKET_PROTOCOL_VERSION)))
                hello = await _read_message(reader, frozenset({MsgType.HELLO}))
            assert isinstance(hello, Hello)
            negotiate_client_socket(hello.version)
        except (ProtocolError, asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
            daemon.close()
            raise PeerError(f"daemon at {path}: handshake failed: {exc or 'timeout'}") from None
        return daemon

    async def exec_cmdline(self, connect_domain: int, command: str) -> tuple[int, int]:
        """Send EXEC_CMDLINE ``{connect_domain, 0}``; the target's ``(domid, port)``."""
        request = ExecRequest(MsgType.EXEC_CMDLINE, connect_domain, 0, encode_cmdline(command))
        try:
            async with asyncio.timeout(DAEMON_STEP_TIMEOUT):
                self.writer.write(encode(request))
                reply = await _read_message(self.reader, frozenset({MsgType.EXEC_CMDLINE}))
        except (ProtocolError, asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
            raise PeerError(f"target daemon refused the call: {exc or 'timeout'}") from None
        if not isinstance(reply, ExecParams):
            raise PeerError(f"target daemon answered {reply.msg_type.name} with a command")
        return reply.connect_domain, reply.connect_port

    async def wait_closed(self) -> None:
        """Wait until the target daemon closes the socket (the call has ended)."""
        with contextlib.suppress(OSError):
            while await self.reader.read(4096):
                pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def admin_call(
    socket_path: str, method: str, dest: str, payload: bytes = b"", *, timeout: float = 120.0
) -> bytes:
    """One qubesd admin call; the answer on success, :class:`PeerError` otherwise."""
    kind = "keyword" if dest.startswith("@") else "name"
    header = f"{method} dom0 {kind} {dest.removeprefix('@')}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_unix(socket_path)
            try:
                writer.write(header.encode("ascii") + b"\0" + payload)
                await writer.drain()
                writer.write_eof()
                answer = await reader.read(MAX_ADMIN_ANSWER + 1)
                while len(answer) <= MAX_ADMIN_ANSWER and (more := await reader.read(65536)):
                    answer += more
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        raise PeerError(f"qubesd at {socket_path}: {method} {dest}: {exc or 'timeout'}") from None
    if len(answer) > MAX_ADMIN_ANSWER:
        raise PeerError(f"qubesd: {method} {dest}: answer longer than {MAX_ADMIN_ANSWER} bytes")
    code, _, rest = answer.partition(b"\0")
    if code == b"0":
        return rest
    error = rest.split(b"\0", 1)[0].decode("ascii", "replace")
    if method == "admin.vm.Start" and error == "QubesVMNotHaltedError":
        return b""
    detail = rest.replace(b"\0", b" ").decode("ascii", "replace").strip()
    raise PeerError(f"qubesd: {method} {dest} failed: {detail[:200] or 'no answer'}")
