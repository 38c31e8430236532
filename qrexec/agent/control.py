"""The agent's control vchan: serve dom0's daemon, dispatch its messages, report call ends.

The agent is the vchan **server** of port 512 for domain 0 with 4096-byte rings (spec
§3.5). It sends HELLO first, reads the daemon's, keeps ``min(own, daemon)``, then reads
messages (:func:`decode_daemon_message`). Each message type goes through
:attr:`Agent.handlers`; EXEC_CMDLINE and JUST_EXEC start a call task here.
SERVICE_CONNECT and SERVICE_REFUSED belong to VM-initiated calls: the VM-calls code
(``qrexec.agent.trigger``) registers handlers for them with :meth:`Agent.register_handler`
and sends triggers with :meth:`Agent.send_control`; without it they are logged and
ignored. When the daemon goes away, the agent listens again; calls in flight go on, but
their CONNECTION_TERMINATED is sent only on the connection that started them, so a
restarted daemon never frees a port that a new call may hold.

A daemon that breaks the control protocol makes the agent **exit** (status
:data:`EXIT_PROTOCOL_VIOLATION`), as upstream's agent does (spec §15.7): SERVICE_REFUSED
with a length other than 32, EXEC_CMDLINE, JUST_EXEC or SERVICE_CONNECT with 8 bytes or
fewer (or more than :data:`MAX_CONTROL_PAYLOAD`), and any other message type. Like
upstream, the last payload byte of the variable messages is taken as the terminator
(forced to NUL), not checked.

Does not run processes itself (see :mod:`.calls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from qrexec.agent.calls import AgentSettings, CallRunner
from qrexec.backends.base import AsyncStream, Backend
from qrexec.errors import InvalidField, ProtocolError, RemoteProtocolError, TransportError
from qrexec.listening import RateLimitedWarning
from qrexec.protocol.constants import (
    HEADER_SIZE,
    IDENT_SIZE,
    MAX_CMDLINE_LEN,
    VCHAN_CONTROL_PORT,
    VCHAN_CONTROL_RING_SIZE,
    MsgType,
)
from qrexec.protocol.fields import validate_connect_params
from qrexec.protocol.messages import (
    EXEC_PARAMS,
    HEADER,
    ConnectionTerminated,
    ExecRequest,
    Message,
    ServiceConnect,
    ServiceRefused,
    encode,
)
from qrexec.services.relay import handshake

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[None]]
#: What dom0's daemon may send to an agent.
DAEMON_MESSAGE_TYPES = frozenset(
    {MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC, MsgType.SERVICE_CONNECT, MsgType.SERVICE_REFUSED}
)
CONTROL_RECV_SIZE = 65536
#: dom0's daemon must answer our HELLO this soon (the agent's handshake deadline).
CONTROL_HELLO_TIMEOUT = 120.0
#: Most calls per peer domain that have not reached their data phase (connecting to the
#: caller's vchan, HELLO). dom0 hands out at most 256 ports per VM, so 256 never refuses
#: an honest call; a hostile dom0 cannot pile up more connect loops than this.
MAX_PENDING_PER_DOMAIN = 256

#: Largest payload we take from the daemon (its client messages are capped the same way).
MAX_CONTROL_PAYLOAD = MAX_CMDLINE_LEN
#: Exit status of an agent whose daemon broke the control protocol.
EXIT_PROTOCOL_VIOLATION = 1


class DaemonProtocolViolation(RemoteProtocolError):
    """dom0's daemon sent what upstream's agent exits on (spec §15.7)."""


def _c_string(raw: bytes) -> bytes:
    """A variable field whose last byte the receiver forces to NUL: up to the first NUL."""
    return raw[:-1].split(b"\0", 1)[0]


def decode_daemon_message(msg_type: int, payload: bytes) -> Message:
    """One control message from the daemon, decoded the way upstream's agent reads it.

    Raises :class:`DaemonProtocolViolation` where upstream's agent exits.
    """
    size = len(payload)
    try:
        kind = MsgType(msg_type)
    except ValueError:
        raise DaemonProtocolViolation(f"unknown message type {msg_type:#x}") from None
    if kind is MsgType.SERVICE_REFUSED:
        if size != IDENT_SIZE:
            raise DaemonProtocolViolation(f"SERVICE_REFUSED of {size} bytes, not {IDENT_SIZE}")
        return ServiceRefused(payload)
    if kind not in DAEMON_MESSAGE_TYPES:
        raise DaemonProtocolViolation(f"{kind.name} is not a daemon-to-agent message")
    if size <= EXEC_PARAMS.size:
        raise DaemonProtocolViolation(f"{kind.name} of {size} bytes (more than 8 needed)")
    domain, port = EXEC_PARAMS.unpack_from(payload)
    body = _c_string(payload[EXEC_PARAMS.size :])
    if kind is MsgType.SERVICE_CONNECT:
        return ServiceConnect(domain, port, body)
    return ExecRequest(kind, domain, port, body)


class Agent:
    """One qrexec-agent: the control connection and the calls it starts."""

    def __init__(
        self,
        backend: Backend,
        settings: AgentSettings,
        *,
        agent_socket: str | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        #: Path of the trigger socket for qrexec-client-vm (served by the VM-calls code).
        self.agent_socket = agent_socket
        self.runner = CallRunner(backend, settings)
        self.handlers: dict[MsgType, Handler] = {
            MsgType.EXEC_CMDLINE: self._start_call,
            MsgType.JUST_EXEC: self._start_call,
        }
        #: qrexec-client-vm requests waiting for dom0's answer, by request id
        #: (``SOCKET<fd>``); owned by the VM-calls code, which stores what it needs.
        self.client_requests: dict[str, Any] = {}
        #: Negotiated control-channel version (None while no daemon is connected).
        self.version: int | None = None
        #: Counts control connections; a call remembers the one that started it.
        self.generation = 0
        self.connected = asyncio.Event()
        self._stream: AsyncStream | None = None
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Calls not yet in their data phase: task -> peer domain.
        self._pending_calls: dict[asyncio.Task[None], int] = {}
        self._pending_per_domain: dict[int, int] = {}
        self._refused_warning = RateLimitedWarning(log)
        self._notified = False
        #: Callbacks run when the daemon connection ends (VM-call code refuses its waiters).
        self.on_disconnect: list[Callable[[], None]] = []

    def register_handler(self, msg_type: MsgType, handler: Handler) -> None:
        """Plug a handler for a control message type (VM-initiated calls use this)."""
        self.handlers[msg_type] = handler

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``coro`` as a tracked task (kept alive until done, errors logged)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("agent task failed", exc_info=task.exception())

    async def send_control(self, message: Message, generation: int | None = None) -> bool:
        """Send on the control vchan; False when not connected (or not to ``generation``)."""
        return await self.send_control_raw(encode(message), generation)

    async def send_control_raw(self, frame: bytes, generation: int | None = None) -> bool:
        """Like :meth:`send_control` for a frame already encoded (forwarded verbatim)."""
        if self._stream is None or (generation is not None and generation != self.generation):
            return False
        stream = self._stream
        async with self._send_lock:
            try:
                await stream.send(frame)
            except TransportError as exc:
                log.info("control vchan send failed: %s", exc)
                return False
        return True

    async def serve_forever(self) -> None:
        """Accept the daemon, serve it, and start over whenever it goes away."""
        while True:
            listener = await self.backend.listen_async(
                0,
                VCHAN_CONTROL_PORT,
                read_min=VCHAN_CONTROL_RING_SIZE,
                write_min=VCHAN_CONTROL_RING_SIZE,
            )
            try:
                stream = await listener.accept()
            finally:
                listener.close()
            try:
                await self._serve_connection(stream)
            except DaemonProtocolViolation:
                raise
            except (ProtocolError, TransportError) as exc:
                log.warning("control vchan dropped: %s", exc)
            except Exception:
                log.exception("internal error on the control vchan; waiting for dom0 again")
            finally:
                self._stream = None
                self.version = None
                self.connected.clear()
                stream.close()
                self._cancel_pending_calls()
                for callback in self.on_disconnect:
                    callback()
            log.info("dom0 daemon disconnected; waiting for it again")

    async def _serve_connection(self, stream: AsyncStream) -> None:
        try:
            async with asyncio.timeout(CONTROL_HELLO_TIMEOUT):
                version = await handshake(stream, self.settings.own_version)
        except TimeoutError:
            raise TransportError(f"no HELLO from dom0 within {CONTROL_HELLO_TIMEOUT:g} s") from None
        self.generation += 1
        self.version = version
        self._stream = stream
        self.connected.set()
        log.info("dom0 daemon connected, protocol version %d", version)
        self._notify_ready()
        buffer = bytearray()
        while data := await stream.recv(CONTROL_RECV_SIZE):
            buffer += data
            while len(buffer) >= HEADER_SIZE:
                msg_type, length = HEADER.unpack_from(buffer)
                if length > MAX_CONTROL_PAYLOAD:
                    raise DaemonProtocolViolation(
                        f"message type {msg_type:#x} of {length} bytes is over the cap"
                    )
                if len(buffer) < HEADER_SIZE + length:
                    break
                payload = bytes(buffer[HEADER_SIZE : HEADER_SIZE + length])
                del buffer[: HEADER_SIZE + length]
                message = decode_daemon_message(msg_type, payload)
                handler = self.handlers.get(message.msg_type)
                if handler is None:
                    log.warning("ignoring %s: no handler in this agent", message.msg_type.name)
                    continue
                await handler(message)
        if buffer:
            log.warning("control vchan closed inside a message (%d bytes)", len(buffer))

    async def _start_call(self, message: Message) -> None:
        if not isinstance(message, ExecRequest):
            raise ProtocolError(f"{message.msg_type.name} without a command line")
        domain, port = message.connect_domain, message.connect_port
        try:
            validate_connect_params(domain, port)
        except InvalidField as exc:
            log.warning("refusing %s: %s", message.msg_type.name, exc)
            await self.send_control(ConnectionTerminated(domain, port))
            return
        if self._pending_per_domain.get(domain, 0) >= MAX_PENDING_PER_DOMAIN:
            self._refused_warning.warning(
                "refusing calls for domain %d: %d already wait for their data vchan",
                domain,
                MAX_PENDING_PER_DOMAIN,
            )
            await self.send_control(ConnectionTerminated(domain, port))
            return
        generation = self.generation
        task = self.spawn(self._run_call(message, generation))
        self._pending_calls[task] = domain
        self._pending_per_domain[domain] = self._pending_per_domain.get(domain, 0) + 1
        task.add_done_callback(self._data_phase)

    def _data_phase(self, task: asyncio.Task[None]) -> None:
        """``task`` reached its data phase (or ended): it no longer counts as pending."""
        domain = self._pending_calls.pop(task, None)
        if domain is None:
            return
        left = self._pending_per_domain[domain] - 1
        if left:
            self._pending_per_domain[domain] = left
        else:
            del self._pending_per_domain[domain]

    def _cancel_pending_calls(self) -> None:
        """The control connection is gone: calls still connecting or in HELLO end now."""
        tasks = list(self._pending_calls)
        for task in tasks:
            task.cancel()
        if tasks:
            log.info("dom0 went away: cancelled %d call(s) before their data phase", len(tasks))

    async def _run_call(self, request: ExecRequest, generation: int) -> None:
        task = asyncio.current_task()
        assert task is not None

        def streaming() -> None:
            self._data_phase(task)

        try:
            await self.runner.run(request, on_data_phase=streaming)
        finally:
            await self.send_control(
                ConnectionTerminated(request.connect_domain, request.connect_port), generation
            )

    def _notify_ready(self) -> None:
        """Tell systemd (``NOTIFY_SOCKET``) once that the daemon has connected."""
        path = self.settings.env.get("NOTIFY_SOCKET")
        if self._notified or not path:
            return
        self._notified = True
        if path.startswith("@"):
            path = "\0" + path[1:]
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", path)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
