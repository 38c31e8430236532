"""qrexec socket services, seen from dom0's policy programs (spec §7, "Unix socket" services).

A socket service is a unix socket that the agent (or qrexec-client, for dom0-local calls)
connects to. It first writes the *service descriptor* — the command text after
``QUBESRPC``, e.g. ``policy.Ask+ dom0\\0`` in a VM or ``policy.EvalSimple+qubes.Filecopy vm1
name dom0\\0`` in dom0 — then the caller's stdin, then shuts its writing side down; the
service's reply is read until EOF.

Here: the descriptor codec (pure), the server side (read descriptor and body with caps), and
two ways to *call* such a service: directly over the local socket (GuiVM is dom0) or through
``qrexec-client -d VM DEFAULT:QUBESRPC SERVICE dom0`` (any other GuiVM). Used by the policy
daemon (policy.EvalSimple/EvalGUI server; policy.Ask/Notify client) and by the reference
policy agent. Does not decide anything about policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from qrexec.errors import LocalProtocolError, RemoteProtocolError, TransportBroken
from qrexec.listening import GuardedServer, listen_backlog, request_complete, restrict_socket
from qrexec.unix_address import unix_address

log = logging.getLogger(__name__)

#: The longest descriptor we read: the service name may be ~65000 bytes (spec §8).
MAX_DESCRIPTOR_BYTES: Final = 65536 + 512
#: Most connections of one socket service that have not sent their request yet.
MAX_IDLE_CONNECTIONS: Final = 256


@dataclass(frozen=True, slots=True)
class ServiceDescriptor:
    """``SERVICE+ARG SOURCE`` (in a VM) or ``SERVICE+ARG SOURCE TYPE TARGET`` (in dom0).

    ``argument`` excludes the ``+``; ``has_plus`` tells ``svc`` from ``svc+``.
    """

    service: str
    argument: str
    source: str
    target_type: str | None = None
    target: str | None = None
    has_plus: bool = True

    def encode(self) -> bytes:
        name = self.service + ("+" + self.argument if self.has_plus else "")
        parts = [name, self.source]
        if self.target_type is not None or self.target is not None:
            if self.target_type not in ("name", "keyword") or not self.target:
                raise LocalProtocolError("a dom0 descriptor needs TYPE name|keyword and TARGET")
            parts += [self.target_type, self.target]
        for part in parts:
            if not part or any(not "!" <= ch <= "~" for ch in part):
                raise LocalProtocolError(f"descriptor part {part!r} is empty or not printable")
        return " ".join(parts).encode("ascii") + b"\0"


def parse_descriptor(raw: bytes) -> ServiceDescriptor:
    """Parse a descriptor *without* its terminating NUL."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("service descriptor is not ASCII") from None
    parts = text.split(" ")
    if len(parts) not in (2, 4) or any(not p for p in parts):
        raise RemoteProtocolError(f"service descriptor {text[:128]!r} is not 2 or 4 words")
    for part in parts:
        if any(not "!" <= ch <= "~" for ch in part):
            raise RemoteProtocolError(f"service descriptor word {part[:64]!r} is not printable")
    service, plus, argument = parts[0].partition("+")
    if not service:
        raise RemoteProtocolError("service descriptor has an empty service name")
    if len(parts) == 4:
        if parts[2] not in ("name", "keyword"):
            raise RemoteProtocolError(f"service descriptor target type {parts[2][:32]!r}")
        return ServiceDescriptor(service, argument, parts[1], parts[2], parts[3], bool(plus))
    return ServiceDescriptor(service, argument, parts[1], has_plus=bool(plus))


async def read_service_call(
    reader: asyncio.StreamReader, *, max_body: int
) -> tuple[ServiceDescriptor, bytes]:
    """Server side: read the descriptor, then the body until EOF (at most ``max_body``).

    The caller must apply a timeout: a client that never half-closes would wait forever.
    """
    try:
        raw = await reader.readuntil(b"\0")
    except asyncio.LimitOverrunError:
        raise RemoteProtocolError(
            f"service descriptor longer than {MAX_DESCRIPTOR_BYTES} bytes"
        ) from None
    except asyncio.IncompleteReadError as exc:
        raise RemoteProtocolError(
            f"connection closed after {len(exc.partial)} bytes, inside the service descriptor"
        ) from None
    descriptor = parse_descriptor(raw[:-1])
    body = await read_to_eof(reader, max_body, "service input")
    request_complete()
    return descriptor, body


async def read_to_eof(reader: asyncio.StreamReader, limit: int, what: str) -> bytes:
    """Read until EOF, refusing more than ``limit`` bytes (never buffers more)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise RemoteProtocolError(f"{what} is longer than {limit} bytes")
        chunks.append(chunk)


async def call_local_socket_service(
    socket_path: str, descriptor: ServiceDescriptor, body: bytes, *, max_reply: int
) -> bytes:
    """Call a socket service on this host, as qrexec-client does for dom0-local calls."""
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=65536)
    except OSError as exc:
        raise TransportBroken(f"cannot connect to {socket_path}: {exc.strerror}") from exc
    try:
        writer.write(descriptor.encode() + body)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await read_to_eof(reader, max_reply, f"reply of {descriptor.service}")
    except (ConnectionError, BrokenPipeError) as exc:
        raise TransportBroken(f"{socket_path}: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def qrexec_client_command(
    qrexec_client: str, domain: str, service: str, source: str = "dom0"
) -> list[str]:
    """The qrexec-client invocation that calls ``service`` in ``domain`` (spec §6.4):
    ``qrexec-client -d GUIVM DEFAULT:QUBESRPC policy.Ask dom0``. The daemon socket
    directory comes from the environment (QREXEC_DAEMON_SOCKET_DIR), as for any caller."""
    for word, what in ((domain, "domain"), (service, "service"), (source, "source")):
        if not word or any(not "!" <= ch <= "~" for ch in word):
            raise LocalProtocolError(f"{what} {word!r} cannot go on a qrexec command line")
    return [qrexec_client, "-d", domain, f"DEFAULT:QUBESRPC {service} {source}"]


async def call_via_qrexec_client(argv: list[str], body: bytes, *, max_reply: int) -> bytes:
    """Run ``argv`` (from :func:`qrexec_client_command`), feed ``body``, return its stdout.

    A non-zero exit (service missing, domain down, refused) is a TransportBroken.
    Cancellation kills the child, so a prompt that times out leaves nothing behind.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        raise TransportBroken(f"cannot run {argv[0]}: {exc.strerror}") from exc
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with contextlib.suppress(ConnectionError):
            proc.stdin.write(body)
            await proc.stdin.drain()
            proc.stdin.close()
        reply = await read_to_eof(proc.stdout, max_reply, f"output of {argv[0]}")
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        raise TransportBroken(f"{' '.join(argv)} exited with {code}")
    return reply


ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def start_unix_service(
    path: str, handler: ConnectionHandler, *, max_idle: int = MAX_IDLE_CONNECTIONS
) -> GuardedServer:
    """Listen on ``path`` with mode 0660, group ``qubes`` when that group exists (spec §8).

    The socket is bound, given its mode and listening under a temporary name in the same
    directory, then renamed into place: whoever sees ``path`` appear (a testbed waiting for
    it, a client) can connect at once and never meets a socket with the wrong mode. A stale
    socket left by a dead process is replaced; any other kind of file at ``path`` is an
    error (we never delete what is not a socket). At most ``max_idle`` connections may be
    waiting for their request (:mod:`qrexec.listening`; handlers call
    :func:`~qrexec.listening.request_complete`), with the kernel's full backlog.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".sock-{os.getpid()}-{next(_temporary_names)}")
    remove_socket(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_address(temporary) as address:
            sock.bind(address)
        restrict_socket(temporary)
        sock.listen(listen_backlog())
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        remove_socket(temporary)
        raise
    server = GuardedServer(
        sock, handler, what=f"socket {path}", max_idle=max_idle, limit=MAX_DESCRIPTOR_BYTES
    )
    server.start()
    return server


_temporary_names = itertools.count()


def remove_socket(path: str) -> None:
    """Remove our socket file at exit (only if it is still a socket)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


class ConnectionTracker:
    """Wraps connection handlers so that shutting down also ends the connections in flight
    (``Server.close`` in Python 3.11 leaves them running): each is cancelled, which closes
    its socket through the handler's own cleanup, so no client waits forever."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def wrap(self, handler: ConnectionHandler) -> ConnectionHandler:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await handler(reader, writer)
            finally:
                self._tasks.discard(task)

        return tracked

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
