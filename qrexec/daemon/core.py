"""One qrexec-daemon: the control vchan to its VM's agent, and the state around it.

Lifecycle (spec §4(vi), §8): connect as vchan **client** of ``(domid, 512)``, read the
agent's HELLO and answer ``min(own, agent)``, open the client socket (:mod:`.clients`),
then read the agent's messages until it goes away. Then: close the client socket and
every client on it, free every data port (unlike upstream, so a VM cannot exhaust its
own range by dying), drop pending requests, wait for the agent again, serve again.

**Everything the agent sends is untrusted**, with one rule:

* a *protocol violation* - bad framing or length, a length over the cap, an unknown or
  out-of-place type (a trigger the negotiated version does not allow, anything a daemon
  never receives), an out-of-range port, a variable field without its terminator - drops
  this agent's connection with a logged reason (:class:`RemoteProtocolError`);
* *well-framed but invalid content* (characters, request ids, a trigger's service name
  without its NUL or with a NUL inside, §15.2) is sanitised or refused with
  SERVICE_REFUSED echoing the 32 request-id bytes, and the connection stays
  (:class:`InvalidField`). v3/v4 triggers reach their handler undecoded
  (:class:`~qrexec.protocol.messages.RawFrame`) for that reason.

Where R4.3's daemon *exits* on a violation, ours drops that agent and waits for it again
(``docs/decisions.md``).

Neither stops the daemon or any other daemon. Message types are dispatched through
:attr:`Daemon.handlers`; VM-initiated calls (``qrexec.daemon.vm_calls``) replace the
default trigger handler, which refuses every request, with :meth:`Daemon.register_handler`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from qrexec.backends.base import AsyncStream, Backend
from qrexec.daemon.clients import ClientServer
from qrexec.daemon.config import DaemonConfig
from qrexec.daemon.pending import PendingRequests
from qrexec.daemon.ports import PortAllocator, is_data_port
from qrexec.errors import InvalidField, RemoteProtocolError, TransportError
from qrexec.protocol.constants import (
    VCHAN_CONTROL_PORT,
    MsgType,
)
from qrexec.protocol.fields import validate_trigger_frame
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import (
    ConnectionTerminated,
    Hello,
    Message,
    RawFrame,
    ServiceRefused,
    TriggerService,
    encode,
)
from qrexec.protocol.negotiation import agent_message_types, negotiate
from qrexec.services.relay import read_hello

log = logging.getLogger(__name__)

AgentHandler = Callable[[Message], Awaitable[None]]
CONTROL_RECV_SIZE = 65536
#: The agent's HELLO must come this soon after the vchan connects.
HELLO_TIMEOUT = 30.0


class AgentGone(Exception):
    """The agent connection ended (internal signal of :meth:`Daemon.serve_agent`)."""


class Daemon:
    """State and control channel of one daemon; clients live in :class:`.clients.ClientServer`."""

    def __init__(self, backend: Backend, config: DaemonConfig) -> None:
        self.backend = backend
        self.config = config
        self.ports = PortAllocator(config.domid, config.max_connections)
        self.pending = PendingRequests()
        self.clients = ClientServer(self)
        self.handlers: dict[MsgType, AgentHandler] = {
            MsgType.CONNECTION_TERMINATED: self._on_connection_terminated,
            MsgType.TRIGGER_SERVICE: self.refuse_trigger,
            MsgType.TRIGGER_SERVICE3: self.refuse_trigger,
            MsgType.TRIGGER_SERVICE4: self.refuse_trigger,
        }
        #: Negotiated control version; None while the agent is away.
        self.version: int | None = None
        #: Counts agent connections (a task started for one must not act on the next).
        self.generation = 0
        self.connected = asyncio.Event()
        #: Callbacks run when the agent goes away (VM-call code drops its waiters here).
        self.on_agent_lost: list[Callable[[], None]] = []
        self._stream: AsyncStream | None = None
        self._send_lock = asyncio.Lock()
        self._drop_reason: str | None = None

    # ---- seams for VM-initiated calls ----

    def register_handler(self, msg_type: MsgType, handler: AgentHandler) -> None:
        """Replace the handler of an agent message type (the triggers, for VM calls)."""
        self.handlers[msg_type] = handler

    async def send_to_agent(self, message: Message, generation: int | None = None) -> bool:
        """Send one message on the control vchan; False when the agent is not there."""
        stream = self._stream
        if stream is None or (generation is not None and generation != self.generation):
            return False
        async with self._send_lock:
            try:
                await stream.send(encode(message))
            except TransportError as exc:
                self.drop_agent(f"cannot send to the agent: {exc}")
                return False
        return True

    def drop_agent(self, reason: str) -> None:
        """Close the agent connection now, logging ``reason`` (the violation rule)."""
        if self._stream is None:
            return
        if self._drop_reason is None:
            self._drop_reason = reason
            log.error("dropping the agent of %s: %s", self.config.name, reason)
        self._stream.close()

    async def refuse_trigger(self, message: Message) -> None:
        """Default trigger handler: sanitise/validate, then refuse (no VM-call support).

        A request with an invalid ident is refused as §3.6 demands; a valid one is refused
        because this daemon has no policy hook installed.
        """
        assert isinstance(message, RawFrame | TriggerService)
        try:
            request = validate_trigger_frame(message)
        except InvalidField as exc:
            log.warning("refusing a request from %s: %s", self.config.name, exc)
            await self.send_to_agent(ServiceRefused(exc.ident or b""))
            return
        log.warning(
            "refusing %s -> %s (%s): VM-initiated calls are not enabled in this daemon",
            self.config.name,
            request.target,
            request.service,
        )
        await self.send_to_agent(ServiceRefused(request.raw_ident))

    # ---- lifecycle ----

    async def connect_agent(self, timeout: float | None) -> AsyncStream:
        """Connect the control vchan and do HELLO; the stream, ready for messages."""
        stream = await self.backend.connect_async(
            self.config.domid, VCHAN_CONTROL_PORT, timeout=timeout
        )
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                peer = await read_hello(stream)
            version = negotiate(self.config.own_version, peer)
            await stream.send(encode(Hello(version)))
        except BaseException:
            stream.close()
            raise
        self.version = version
        self.generation += 1
        self._stream = stream
        self._drop_reason = None
        log.info("agent of %s connected, protocol version %d", self.config.name, version)
        return stream

    async def run(self, on_first_connect: Callable[[], None] | None = None) -> None:
        """Serve the agent forever (across restarts). TimeoutError if it never comes."""
        first = True
        while True:
            timeout = self.config.startup_timeout if first else None
            try:
                stream = await self.connect_agent(timeout)
            except (RemoteProtocolError, TransportError, TimeoutError) as exc:
                if first and isinstance(exc, TimeoutError):
                    raise
                log.warning("agent of %s: connection failed: %s", self.config.name, exc)
                await asyncio.sleep(1)
                continue
            await self.clients.start()
            self.connected.set()
            if first and on_first_connect is not None:
                on_first_connect()
            first = False
            await self.serve_agent(stream)
            await self.agent_lost()

    async def serve_agent(self, stream: AsyncStream) -> None:
        """Read and dispatch the agent's messages until it goes away or breaks the rules."""
        assert self.version is not None
        decoder = FrameDecoder(
            self.version,
            allowed=agent_message_types(self.version),
            # Their name tails are judged by §15.2's refusal rules, not by the decoder.
            raw_types=(MsgType.TRIGGER_SERVICE3, MsgType.TRIGGER_SERVICE4),
        )
        try:
            while data := await stream.recv(CONTROL_RECV_SIZE):
                for message in decoder.feed(data):
                    await self.handlers[message.msg_type](message)
                    if self._drop_reason is not None:
                        return
            decoder.close()
            log.warning("agent of %s disconnected", self.config.name)
        except RemoteProtocolError as exc:
            self.drop_agent(f"protocol violation: {exc}")
        except TransportError as exc:
            log.warning("agent of %s: control vchan failed: %s", self.config.name, exc)
        except Exception:
            # A bug in a handler must not take the daemon down: drop this connection
            # (everything tied to it is released) and wait for the agent again.
            log.exception(
                "agent of %s: internal error while handling its message", self.config.name
            )
            self.drop_agent("internal error (see the traceback above)")

    async def agent_lost(self) -> None:
        """Forget everything tied to the agent connection that just ended."""
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        self.version = None
        self.connected.clear()
        await self.clients.stop()
        freed = self.ports.release_all()
        dropped = self.pending.clear()
        for callback in self.on_agent_lost:
            callback()
        log.info(
            "agent of %s gone: freed %d port(s), dropped %d pending request(s); waiting for it",
            self.config.name,
            len(freed),
            len(dropped),
        )

    async def _on_connection_terminated(self, message: Message) -> None:
        assert isinstance(message, ConnectionTerminated)
        domain, port = message.connect_domain, message.connect_port
        if not is_data_port(port):
            raise RemoteProtocolError(f"CONNECTION_TERMINATED for out-of-range port {port}")
        if not self.ports.release(domain, port):
            log.debug("CONNECTION_TERMINATED(%d, %d) matches no reservation", domain, port)
        self.clients.connection_terminated(domain, port)
