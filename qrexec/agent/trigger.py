"""The agent's trigger socket: VM-initiated calls from ``qrexec-client-vm`` (spec §4(ii)).

Each client of the trigger socket (``-a``/``QREXEC_AGENT_SOCKET``, a host path as given;
default ``/var/run/qubes/qrexec-agent``) sends one trigger and no HELLO. As upstream's
agent (spec §15.7), only MSG_TRIGGER_SERVICE4 with ``160 < len <= 65160`` is taken;
anything else closes the client, which reports "Request refused". Nothing else in the
payload is checked here (dom0's daemon validates and refuses): the request id field starts
with ``SOCKET<fd>`` + NUL - our own descriptor number for that client, unique while we
hold it - and its later bytes stay as sent. The payload goes to dom0 byte for byte when
the control channel negotiated v4; for v3 it becomes TRIGGER_SERVICE3 (the source field
dropped, every other byte kept), for v2 the fixed 128-byte MSG_TRIGGER_SERVICE, which
needs fields that fit (service name up to 63 bytes, target up to 31); a request v2
cannot carry closes the client.

dom0 answers on the control channel with the ident:

* SERVICE_CONNECT ``{domain, port}``: the ident must start ``SOCKET<n>`` (``SOCKET012``
  and ``SOCKET12x`` name descriptor 12, as upstream reads them); the first 8
  payload bytes go to the client holding descriptor n, which becomes the vchan server of
  ``(domain, port)``. We then wait for the client to close its socket and send
  CONNECTION_TERMINATED ``(domain, port)``, on the control connection the request went
  out on (a restarted daemon must not free a port a new call holds). Any other ident, or
  one naming no waiting client (a second SERVICE_CONNECT included), is ignored (no
  CONNECTION_TERMINATED), as upstream ignores a bad ident or EBADF.
* SERVICE_REFUSED: the client socket is closed.

A client that goes away before the answer keeps its descriptor (and so its ident) until
the answer arrives, so an ident is never reused while dom0 may still answer it; a late
SERVICE_CONNECT for it is terminated at once. When the control connection drops, every
waiting client is refused. A malformed trigger, or none within
:data:`TRIGGER_READ_TIMEOUT`, closes that client only; more than :data:`MAX_WAITING`
waiting clients are refused at once. At most :data:`MAX_IDLE_CLIENTS` clients may be
connected without having sent their trigger; beyond that the oldest is dropped, and running
out of descriptors pauses accepting (:mod:`qrexec.listening`); bad clients are logged once
a minute, not once each.

asyncio only; the control channel itself is :mod:`.control`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qrexec.errors import InvalidField, ProtocolError, QrexecError
from qrexec.listening import (
    GuardedServer,
    RateLimitedWarning,
    listen_backlog,
    request_complete,
)
from qrexec.protocol.constants import (
    HEADER_SIZE,
    IDENT_SIZE,
    MAX_SERVICE_NAME_LEN,
    PROTOCOL_V3,
    PROTOCOL_V4,
    V3_TARGET_DOMAIN_SIZE,
    V4_SOURCE_DOMAIN_SIZE,
    MsgType,
)
from qrexec.protocol.fields import convert_trigger, fixed_field_value
from qrexec.protocol.messages import (
    EXEC_PARAMS,
    HEADER,
    ConnectionTerminated,
    Message,
    ServiceConnect,
    ServiceRefused,
    TriggerService4,
    encode,
)
from qrexec.unix_address import unix_address

if TYPE_CHECKING:
    from qrexec.agent.control import Agent

log = logging.getLogger(__name__)

#: Layout of the TRIGGER_SERVICE4 payload: source[64], target[64], request_id[32], name.
TARGET_OFFSET = V4_SOURCE_DOMAIN_SIZE
IDENT_OFFSET = TARGET_OFFSET + V3_TARGET_DOMAIN_SIZE
NAME_OFFSET = IDENT_OFFSET + IDENT_SIZE
#: What the trigger socket accepts (spec §15.7): 160 < len <= 160 + 65000.
MAX_TRIGGER_PAYLOAD = NAME_OFFSET + MAX_SERVICE_NAME_LEN
#: A client must send its whole trigger this soon after connecting.
TRIGGER_READ_TIMEOUT = 10.0
#: Most clients waiting for dom0's answer at once (dom0 keeps at most 256 pending).
MAX_WAITING = 512
#: Most connected clients that have not sent their whole trigger yet; the oldest is
#: dropped beyond it (any user of the VM may connect, see :mod:`qrexec.listening`).
MAX_IDLE_CLIENTS = 256
#: Environment overrides of the two limits above (tests; odd deployments).
ENV_READ_TIMEOUT = "QREXEC_AGENT_TRIGGER_TIMEOUT"
ENV_MAX_IDLE = "QREXEC_AGENT_MAX_IDLE_CLIENTS"
IDENT_PREFIX = "SOCKET"
#: Where upstream's agent listens (spec §1).
DEFAULT_AGENT_SOCKET = "/var/run/qubes/qrexec-agent"
#: What a connected client may still send us: nothing meaningful; it is read and dropped.
DRAIN_SIZE = 4096


@dataclasses.dataclass(eq=False)
class Waiter:
    """One client waiting for dom0's answer."""

    ident: str
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    generation: int
    #: ``(domain, port)`` on SERVICE_CONNECT, None on refusal.
    answer: asyncio.Future[tuple[int, int] | None]

    def resolve(self, value: tuple[int, int] | None) -> None:
        if not self.answer.done():
            self.answer.set_result(value)


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (a stale socket file there is replaced).

    Paths longer than a sockaddr_un holds (deep test folders) work too.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_address(path) as address:
            sock.bind(address)
        # Any user of the VM may call qrexec-client-vm (upstream creates it 0666).
        os.chmod(path, 0o666)
        sock.listen(listen_backlog())
    except BaseException:
        sock.close()
        raise
    return sock


class TriggerRejected(QrexecError):
    """A trigger-socket client sent something other than an acceptable TRIGGER_SERVICE4."""


def check_trigger_header(header: bytes) -> int:
    """The payload length of an acceptable trigger header; TriggerRejected otherwise."""
    msg_type, length = HEADER.unpack(header)
    if msg_type != MsgType.TRIGGER_SERVICE4:
        raise TriggerRejected(f"message type {msg_type:#x} is not TRIGGER_SERVICE4")
    if not NAME_OFFSET < length <= MAX_TRIGGER_PAYLOAD:
        raise TriggerRejected(
            f"TRIGGER_SERVICE4 of {length} bytes (needs {NAME_OFFSET + 1}..{MAX_TRIGGER_PAYLOAD})"
        )
    return int(length)


def with_ident(payload: bytes, ident: str) -> bytes:
    """The TRIGGER_SERVICE4 payload with ``ident`` + NUL at the start of its request id
    field; the field's later bytes, and every other byte, stay as sent."""
    raw = ident.encode("ascii") + b"\0"
    return payload[:IDENT_OFFSET] + raw + payload[IDENT_OFFSET + len(raw) :]


def forward_frame(payload: bytes, version: int) -> bytes:
    """The frame to send dom0 for a TRIGGER_SERVICE4 ``payload`` (ident already set).

    v4: as is. v3: TRIGGER_SERVICE3, the same bytes without the source field. v2: the
    fixed MSG_TRIGGER_SERVICE (:class:`InvalidField` when the fields do not fit).
    """
    if version >= PROTOCOL_V4:
        return HEADER.pack(MsgType.TRIGGER_SERVICE4, len(payload)) + payload
    if version == PROTOCOL_V3:
        rest = payload[TARGET_OFFSET:]
        return HEADER.pack(MsgType.TRIGGER_SERVICE3, len(rest)) + rest
    fields = TriggerService4(
        source_domain=fixed_field_value(payload[:TARGET_OFFSET]),
        target_domain=fixed_field_value(payload[TARGET_OFFSET:IDENT_OFFSET]),
        request_id=fixed_field_value(payload[IDENT_OFFSET:NAME_OFFSET]),
        service_name=payload[NAME_OFFSET:].split(b"\0", 1)[0],
    )
    return encode(convert_trigger(fields, version))


#: ``SOCKET`` then a C-style decimal number; what follows the digits is ignored, as
#: upstream's agent reads it.
_SOCKET_IDENT = re.compile(rb"SOCKET[ \t\n\v\f\r]*([+-]?[0-9]{1,10})")


def parse_socket_ident(raw: bytes) -> int | None:
    """The descriptor number of a ``SOCKET<n>`` ident (up to its first NUL), else None."""
    match = _SOCKET_IDENT.match(raw.split(b"\0", 1)[0])
    if match is None:
        return None
    number = int(match.group(1))
    return number if number >= 0 else None


class TriggerSocket:
    """The trigger socket of one agent and the clients waiting on it."""

    def __init__(self, agent: Agent, path: str) -> None:
        self.agent = agent
        self.path = path
        #: The agent's registry of clients waiting for dom0, by ident (Waiter values).
        self.waiting: dict[str, Waiter] = agent.client_requests
        self._server: GuardedServer | None = None
        env = agent.settings.env
        self.read_timeout = _env_positive(env, ENV_READ_TIMEOUT, TRIGGER_READ_TIMEOUT)
        self.max_idle = int(_env_positive(env, ENV_MAX_IDLE, MAX_IDLE_CLIENTS))
        #: Any user of the VM can open clients that say nothing: one line per minute.
        self._bad_client = RateLimitedWarning(log)

    async def start(self) -> None:
        parent = os.path.dirname(self.path)
        # The default folder is the system's (/var/run/qubes, made at boot); only an
        # explicitly configured socket (an emulated domain's root) gets its folder made.
        if parent and self.path != DEFAULT_AGENT_SOCKET:
            os.makedirs(parent, exist_ok=True)
        self._server = GuardedServer(
            bind_unix(self.path),
            self._serve,
            what=f"trigger socket {self.path}",
            max_idle=self.max_idle,
        )
        self._server.start()
        # As upstream: any user of the VM may run qrexec-client-vm.
        os.chmod(self.path, 0o666)
        self.agent.register_handler(MsgType.SERVICE_CONNECT, self._on_service_connect)
        self.agent.register_handler(MsgType.SERVICE_REFUSED, self._on_service_refused)
        self.agent.on_disconnect.append(self._refuse_all)
        log.info("trigger socket for qrexec-client-vm at %s", self.path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # ---- answers from dom0 ----

    @staticmethod
    def _ident_of(raw: bytes) -> str:
        return fixed_field_value(raw, IDENT_SIZE).decode("ascii", "replace")

    async def _on_service_connect(self, message: Message) -> None:
        assert isinstance(message, ServiceConnect)
        number = parse_socket_ident(message.ident)
        waiter = None if number is None else self.waiting.pop(f"{IDENT_PREFIX}{number}", None)
        if waiter is None:
            log.warning(
                "SERVICE_CONNECT for %r, which names no waiting client; ignored",
                self._ident_of(message.ident),
            )
            return
        waiter.resolve((message.connect_domain, message.connect_port))

    async def _on_service_refused(self, message: Message) -> None:
        assert isinstance(message, ServiceRefused)
        waiter = self.waiting.pop(self._ident_of(message.ident), None)
        if waiter is None:
            log.warning("SERVICE_REFUSED for unknown request %r", self._ident_of(message.ident))
            return
        waiter.resolve(None)

    def _refuse_all(self) -> None:
        """The control connection ended: nobody will answer the waiting clients."""
        waiters = list(self.waiting.values())
        self.waiting.clear()
        for waiter in waiters:
            waiter.resolve(None)
        if waiters:
            log.info("dom0 went away: refused %d waiting request(s)", len(waiters))

    # ---- one client ----

    async def _read_trigger(self, reader: asyncio.StreamReader) -> bytes:
        """The payload of the client's TRIGGER_SERVICE4 (TriggerRejected otherwise)."""
        length = check_trigger_header(await reader.readexactly(HEADER_SIZE))
        return await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        ident = f"{IDENT_PREFIX}{sock.fileno()}"
        try:
            if len(self.waiting) >= MAX_WAITING:
                log.warning("refusing a call: %d requests already wait for dom0", MAX_WAITING)
                return
            try:
                async with asyncio.timeout(self.read_timeout):
                    payload = await self._read_trigger(reader)
            except (
                TriggerRejected,
                ProtocolError,
                asyncio.IncompleteReadError,
                TimeoutError,
                OSError,
            ) as exc:
                self._bad_client.warning(
                    "dropping a trigger-socket client: %s", exc or "no trigger in time"
                )
                return
            request_complete()
            await self._forward_and_wait(ident, with_ident(payload, ident), reader, writer)
        finally:
            writer.close()

    async def _forward_and_wait(
        self,
        ident: str,
        payload: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        agent = self.agent
        version, generation = agent.version, agent.generation
        if version is None:
            log.warning("refusing a call: dom0's daemon is not connected")
            return
        try:
            frame = forward_frame(payload, version)
        except InvalidField as exc:
            log.warning("refusing a call that protocol version %d cannot carry: %s", version, exc)
            return
        waiter = Waiter(
            ident, writer, reader, generation, asyncio.get_running_loop().create_future()
        )
        self.waiting[ident] = waiter
        if not await agent.send_control_raw(frame, generation):
            self.waiting.pop(ident, None)
            log.warning("refusing a call: the control channel is gone")
            return
        log.debug("forwarded %s (protocol version %d)", ident, version)
        try:
            answer = await waiter.answer
        finally:
            if self.waiting.get(ident) is waiter:
                del self.waiting[ident]
        if answer is None:
            log.info("request %s refused", ident)
            return
        domain, port = answer
        try:
            writer.write(EXEC_PARAMS.pack(domain, port))
            await writer.drain()
            # The client holds the socket for the whole call; its end is the call's end.
            while await reader.read(DRAIN_SIZE):
                pass
        except OSError as exc:
            log.info("client of %s went away: %s", ident, exc)
        finally:
            await agent.send_control(ConnectionTerminated(domain, port), generation)
            log.debug("call %s (domain %d port %d) terminated", ident, domain, port)


def _env_positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value > 0:
        return value
    log.warning("ignoring %s=%r: not a positive number", name, raw)
    return default


async def install(agent: Agent) -> None:
    """Serve the trigger socket of ``agent`` (called by :mod:`.cli` when present).

    A socket that cannot be created (no such folder and no right to make it) is logged
    and the agent runs on without VM-initiated calls.
    """
    path = agent.agent_socket
    if not path:
        log.info("no trigger socket configured: VM-initiated calls are disabled")
        return
    service = TriggerSocket(agent, path)
    try:
        await service.start()
    except OSError as exc:
        log.warning(
            "cannot serve the trigger socket %s: %s; VM-initiated calls disabled", path, exc
        )
