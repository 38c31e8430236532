"""The daemon's unix socket for local clients (qrexec-client, policy children): spec §5.

Socket ``<socket_dir>/qrexec.<domid>`` plus the links ``qrexec.<name>`` and
``qrexec.uuid:<uuid>``; all exist only while the agent is connected.

Per client: the daemon sends HELLO(3), the client answers HELLO(>= 3), then sends exactly
one message:

* EXEC_CMDLINE / JUST_EXEC: ``DEFAULT:`` is replaced by the default user. With port 0 the
  daemon allocates a data port for ``connect_domain`` (§3.5) and replies with the same
  type and ``{its VM's domid, port}``; a non-zero port must be in 513..768 and gets no
  reply. The message goes to the agent with the port filled in.
* SERVICE_CONNECT (spec §15.3): its payload is 9..65535 bytes ending in NUL (else the
  client is dropped); it is accepted only when its ident - compared up to its first NUL,
  so ``id3\0`` and a NUL-padded ``id3`` are the same - names a VM-initiated request that
  is still pending (:class:`~qrexec.daemon.pending.PendingRequests`, i.e. its policy
  decision and call are still running and nothing answered it yet), which it claims, so
  the call's own outcome no longer refuses it. A port outside 0 and 513..768 drops the
  client before anything is claimed. It is forwarded to the agent **verbatim** (same
  length, the client's ident bytes) with the allocated port filled in. An unmatched one
  closes the client with no reply and nothing reaches the agent.

The client is then kept until CONNECTION_TERMINATED for that (domain, port) arrives from
the agent, and its socket is closed then (what ``qrexec-client -W`` waits for). A byte
from the client after its message is logged as unexpected and the client dropped.

Limits: at most ``max_clients`` clients holding a request, and at most
:data:`MAX_IDLE_CLIENTS` (or ``max_clients`` if lower) that have not sent theirs yet, the
oldest of which is dropped for a newcomer (:mod:`qrexec.listening`); a message whose
payload would take the bytes buffered from clients past ``max_buffered`` is refused
(client dropped); no free port is a clean refusal too. A client that does not finish its
handshake and message within :data:`CLIENT_REQUEST_TIMEOUT` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Protocol

from qrexec.daemon.config import DaemonConfig
from qrexec.daemon.pending import PendingRequests
from qrexec.daemon.ports import PortAllocator, is_data_port
from qrexec.errors import ProtocolError, RemoteProtocolError
from qrexec.listening import GuardedServer, listen_backlog, request_complete, restrict_socket
from qrexec.protocol.cmdline import decode_cmdline, encode_cmdline, replace_default_user
from qrexec.protocol.constants import (
    CLIENT_SOCKET_PROTOCOL_VERSION,
    HEADER_SIZE,
    IDENT_SIZE,
    MAX_CMDLINE_LEN,
    MsgType,
)
from qrexec.protocol.framing import check_header
from qrexec.protocol.messages import (
    EXEC_PARAMS,
    HEADER,
    ExecParams,
    ExecRequest,
    Hello,
    Message,
    RawFrame,
    ServiceRefused,
    decode_payload,
    encode,
)
from qrexec.protocol.negotiation import negotiate_client_socket
from qrexec.unix_address import unix_address


class AgentLink(Protocol):
    """What the client server needs of its daemon (:class:`qrexec.daemon.core.Daemon`).

    A protocol rather than an import, so the daemon can own its client server without the
    two modules importing each other.
    """

    config: DaemonConfig
    generation: int
    pending: PendingRequests
    ports: PortAllocator

    async def send_to_agent(self, message: Message, generation: int | None = None) -> bool:
        """Send one message to the agent of ``generation``; False when it is gone."""
        ...


log = logging.getLogger(__name__)

CLIENT_REQUEST_TIMEOUT = 60.0
#: Most clients that have not sent their request yet; the oldest is dropped beyond it.
MAX_IDLE_CLIENTS = 64
CLIENT_MESSAGE_TYPES = frozenset({MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC, MsgType.SERVICE_CONNECT})


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path``, even past the sockaddr_un length limit.

    It is bound under a temporary name, given mode 0660 (group ``qubes`` when that group
    exists) whatever the umask, and renamed into place once listening, so a client that
    sees the file never gets "connection refused" nor a socket with the wrong mode.
    """
    folder, name = os.path.split(path)
    temporary = f".{name}.{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=folder_fd)
            with unix_address(os.path.join(folder, temporary)) as address:
                sock.bind(address)
            restrict_socket(temporary, dir_fd=folder_fd)
            sock.listen(listen_backlog())
            os.rename(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
    except BaseException:
        sock.close()
        raise
    return sock


class ClientRefused(Exception):
    """A client request that is dropped cleanly, with the reason logged."""


class Client:
    """One connected client of the daemon socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        #: Set when CONNECTION_TERMINATED for this client's connection arrived.
        self.terminated = asyncio.Event()
        self.key: tuple[int, int] | None = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class ClientServer:
    """The listening socket, its links, and the clients of one daemon."""

    def __init__(self, daemon: AgentLink) -> None:
        self.daemon = daemon
        self._server: GuardedServer | None = None
        self._clients: set[Client] = set()
        self._waiting: dict[tuple[int, int], set[Client]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.buffered = 0

    # ---- socket files ----

    @property
    def socket_path(self) -> str:
        return os.path.join(self.daemon.config.socket_dir, f"qrexec.{self.daemon.config.domid}")

    def link_paths(self) -> list[str]:
        config = self.daemon.config
        names = [f"qrexec.{config.name}"]
        if config.uuid:
            names.append(f"qrexec.uuid:{config.uuid}")
        return [os.path.join(config.socket_dir, name) for name in names]

    async def start(self) -> None:
        os.makedirs(self.daemon.config.socket_dir, exist_ok=True)
        self._remove_files()
        self._server = GuardedServer(
            bind_unix(self.socket_path),
            self._serve_client,
            what=f"client socket of {self.daemon.config.name}",
            max_idle=min(MAX_IDLE_CLIENTS, self.daemon.config.max_clients),
        )
        self._server.start()
        target = os.path.basename(self.socket_path)
        for link in self.link_paths():
            os.symlink(target, link)
        log.info("listening on %s", self.socket_path)

    async def stop(self) -> None:
        """Remove the socket files and drop every client (the agent went away)."""
        self._remove_files()
        if self._server is not None:
            self._server.close()
            self._server = None
        for client in list(self._clients):
            client.close()
        for task in list(self._tasks):
            task.cancel()
        self._waiting.clear()

    def _remove_files(self) -> None:
        for path in (self.socket_path, *self.link_paths()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # ---- termination ----

    def connection_terminated(self, domain: int, port: int) -> None:
        """The agent reported the end of (domain, port): release its waiting clients."""
        for client in self._waiting.pop((domain, port), set()):
            client.terminated.set()

    def _wait_for_termination(self, client: Client, domain: int, port: int) -> None:
        client.key = (domain, port)
        self._waiting.setdefault(client.key, set()).add(client)

    # ---- per client ----

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        client = Client(reader, writer)
        task = asyncio.current_task()
        config = self.daemon.config
        if task is not None:
            self._tasks.add(task)
        try:
            async with asyncio.timeout(CLIENT_REQUEST_TIMEOUT):
                message = await self._handshake_and_read(client)
            request_complete()
            if len(self._clients) >= config.max_clients:
                raise ClientRefused(f"{len(self._clients)} clients already hold a request")
            self._clients.add(client)
            await self._handle(client, message)
            await self._hold(client)
        except (ClientRefused, ProtocolError) as exc:
            log.warning("dropping a client of %s: %s", config.name, exc)
        except TimeoutError:
            log.warning("dropping a client of %s: no request within the time limit", config.name)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.debug("a client of %s went away", config.name)
        except Exception:
            log.exception("internal error while serving a client of %s", config.name)
        finally:
            self._clients.discard(client)
            if client.key is not None:
                waiting = self._waiting.get(client.key)
                if waiting is not None:
                    waiting.discard(client)
                    if not waiting:
                        del self._waiting[client.key]
            if task is not None:
                self._tasks.discard(task)
            client.close()

    async def _read_message(self, client: Client, allowed: frozenset[MsgType]) -> Message:
        header = await client.reader.readexactly(HEADER_SIZE)
        msg_type, length = HEADER.unpack(header)
        if msg_type == MsgType.SERVICE_CONNECT and MsgType.SERVICE_CONNECT in allowed:
            return await self._read_service_connect(client, length)
        kind = check_header(msg_type, length, CLIENT_SOCKET_PROTOCOL_VERSION, allowed)
        limit = self.daemon.config.max_buffered
        if self.buffered + length > limit:
            raise ClientRefused(
                f"a {length}-byte message would exceed the {limit}-byte buffer limit"
            )
        self.buffered += length
        try:
            payload = await client.reader.readexactly(length)
        finally:
            self.buffered -= length
        return decode_payload(kind, payload)

    async def _read_service_connect(self, client: Client, length: int) -> RawFrame:
        """A client's SERVICE_CONNECT, kept raw: its length is 9..65535 and its last byte
        NUL (R4.3's rule, spec §15.3); C senders use 40, but any ident length is taken."""
        if not EXEC_PARAMS.size < length <= MAX_CMDLINE_LEN:
            raise ClientRefused(f"SERVICE_CONNECT payload is {length} bytes, not 9..65535")
        payload = await client.reader.readexactly(length)
        if payload[-1] != 0:
            raise ClientRefused("SERVICE_CONNECT request id is not NUL-terminated")
        return RawFrame(MsgType.SERVICE_CONNECT, payload)

    async def _handshake_and_read(self, client: Client) -> Message:
        client.writer.write(encode(Hello(CLIENT_SOCKET_PROTOCOL_VERSION)))
        await client.writer.drain()
        hello = await self._read_message(client, frozenset({MsgType.HELLO}))
        assert isinstance(hello, Hello)
        negotiate_client_socket(hello.version)
        return await self._read_message(client, CLIENT_MESSAGE_TYPES)

    async def _handle(self, client: Client, message: Message) -> None:
        daemon = self.daemon
        generation = daemon.generation
        if isinstance(message, ExecRequest):
            command = replace_default_user(
                decode_cmdline(message.command), daemon.config.default_user
            )
            domain, port = await self._port_for(
                client, message.msg_type, message.connect_domain, message.connect_port
            )
            forward: Message = ExecRequest(message.msg_type, domain, port, encode_cmdline(command))
        elif isinstance(message, RawFrame):
            domain, port = EXEC_PARAMS.unpack_from(message.raw)
            raw_ident = message.raw[EXEC_PARAMS.size :]
            # C-string equality up to the first NUL (spec §15.3): ``id3\0`` and a padded
            # ``id3`` name the same request. Pending idents are validated ASCII.
            ident = raw_ident.split(b"\0", 1)[0].decode("latin-1")
            if port != 0 and not is_data_port(port):
                raise ClientRefused(f"SERVICE_CONNECT: port {port} is outside the data-port range")
            if daemon.pending.claim(ident) is None:
                raise ClientRefused(f"SERVICE_CONNECT for {ident[:64]!r}, which is not pending")
            try:
                domain, port = await self._port_for(client, MsgType.SERVICE_CONNECT, domain, port)
            except ClientRefused:
                # The request was claimed: tell the agent, or its client-vm waits forever.
                await daemon.send_to_agent(ServiceRefused(raw_ident[:IDENT_SIZE]), generation)
                raise
            # Forwarded byte for byte: same length, the client's ident bytes as sent.
            forward = RawFrame(MsgType.SERVICE_CONNECT, EXEC_PARAMS.pack(domain, port) + raw_ident)
        else:
            raise RemoteProtocolError(f"{message.msg_type.name} without its parameters")
        self._wait_for_termination(client, domain, port)
        if not await daemon.send_to_agent(forward, generation):
            daemon.ports.release(domain, port)
            raise ClientRefused("the agent went away before the request could be sent")

    async def _port_for(
        self, client: Client, reply_type: MsgType, domain: int, port: int
    ) -> tuple[int, int]:
        daemon = self.daemon
        if port == 0:
            allocated = daemon.ports.allocate(domain)
            if allocated is None:
                raise ClientRefused(
                    f"no free data port for domain {domain} "
                    f"({len(daemon.ports)} in use, limit {daemon.ports.limit})"
                )
            reply = ExecParams(reply_type, daemon.config.domid, allocated)
            client.writer.write(encode(reply))
            await client.writer.drain()
            return domain, allocated
        if not is_data_port(port):
            raise ClientRefused(f"port {port} is outside the data-port range")
        return domain, port

    async def _hold(self, client: Client) -> None:
        """Keep the client until its connection ends; any byte from it is unexpected."""
        read = asyncio.ensure_future(client.reader.read(1))
        done = asyncio.ensure_future(client.terminated.wait())
        try:
            await asyncio.wait((read, done), return_when=asyncio.FIRST_COMPLETED)
        finally:
            read.cancel()
            done.cancel()
        if read.done() and not read.cancelled() and read.result():
            raise ClientRefused("unexpected data after the request")
