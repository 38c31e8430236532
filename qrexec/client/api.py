"""The in-process client: qrexec calls from Python without starting a process per call.

Two clients, each with a blocking and an asyncio face:

* :class:`Dom0Client` does what ``qrexec-client -d VM`` does: talk to the VM's
  qrexec-daemon socket, run ``USER:COMMAND`` (or a service, ``DEFAULT:QUBESRPC ...``) in
  the VM and be the vchan server of the data connection (spec §4(i)).
* :class:`VmClient` does what ``qrexec-client-vm`` does: send a trigger to the local
  agent's socket, wait for the policy's answer (exec_params, or the socket closed:
  refused) and be the vchan server of the data connection (spec §4(ii)).

Every outcome that has an exit code gives a :class:`CallResult` with ``returncode``; 126
(refused), 127 (no such service) and 125 (qrexec problem) keep their Qubes meaning, and
``check=True`` raises :class:`~qrexec.errors.CallRefused`,
:class:`~qrexec.errors.CallServiceNotFound`, :class:`~qrexec.errors.CallProblem` (or
:class:`~qrexec.errors.CallFailed` for any other non-zero code), each carrying the result.
Failures that leave no exit code - no daemon, no agent, the data connection lost before
the exit code - always raise a :class:`~qrexec.errors.QrexecError`; a call past its
``timeout`` raises :class:`~qrexec.errors.CallTimeout`.

Many calls may be in flight at once from one event loop: each holds one data connection
and its own buffers, input is sent with the transport's backpressure, and output given to a
callable sink is awaited chunk by chunk, so memory stays bounded by what is captured.

The blocking face runs the asyncio face on a private event loop per thread (never inside a
running loop). The CLIs do not use this module: they stay free of asyncio.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from qrexec import trace
from qrexec.backends.base import AsyncStream, Backend
from qrexec.errors import (
    CallFailed,
    CallProblem,
    CallRefused,
    CallServiceNotFound,
    CallTimeout,
    ProtocolError,
    QrexecError,
    RemoteProtocolError,
    TransportBroken,
    UsageError,
)
from qrexec.protocol.cmdline import encode_cmdline
from qrexec.protocol.constants import (
    CLIENT_SOCKET_PROTOCOL_VERSION,
    HEADER_SIZE,
    PROTOCOL_V4,
    VCHAN_DATA_RING_SIZE,
    ExitCode,
    MsgType,
)
from qrexec.protocol.framing import FrameDecoder, check_header
from qrexec.protocol.messages import (
    EXEC_PARAMS,
    HEADER,
    Data,
    ExecParams,
    ExecRequest,
    ExitStatus,
    Hello,
    TriggerService3,
    TriggerService4,
    decode_payload,
    encode,
)
from qrexec.protocol.negotiation import (
    max_data_chunk,
    negotiate,
    negotiate_client_socket,
    own_protocol_version,
)
from qrexec.unix_address import unix_address

T = TypeVar("T")

#: ``stdout``/``stderr``: keep the output in the result (the default).
PIPE = -1
#: ``stdout``/``stderr``: throw the output away.
DEVNULL = -3

#: A place for output: PIPE, DEVNULL, a file descriptor, or a callable given each chunk
#: (a coroutine function is awaited, which gives backpressure).
Output = int | Callable[[bytes], Any]
#: Input: bytes, a file descriptor, or an (async) iterable of byte chunks.
Input = bytes | bytearray | memoryview | int | Iterable[bytes] | AsyncIterable[bytes] | None

DEFAULT_SOCKET_DIR = "/var/run/qubes"
DEFAULT_AGENT_SOCKET = "/var/run/qubes/qrexec-agent"
#: Like qrexec-client's ``-w`` default: how long the agent may take to connect (spec §3.5).
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Like qrexec-client-vm: the target's agent gives up after 120 s, we a little later.
VM_CONNECT_TIMEOUT = 125.0
REQUEST_ID = b"SOCKET"
RECV_SIZE = 256 * 1024
SERVICE_MESSAGE_TYPES = frozenset(
    {MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_EXIT_CODE}
)


@dataclass(frozen=True, slots=True)
class CallResult:
    """What a call ended with: the exit code and the captured output (None if not captured)."""

    args: str
    returncode: int
    stdout: bytes | None = None
    stderr: bytes | None = None

    def check(self) -> CallResult:
        """Return self when ``returncode`` is 0; else raise the matching CallFailed."""
        code = self.returncode
        if code == 0:
            return self
        if code == ExitCode.REQUEST_REFUSED:
            raise CallRefused(f"{self.args}: request refused", self)
        if code == ExitCode.SERVICE_NOT_FOUND:
            raise CallServiceNotFound(f"{self.args}: service not found", self)
        if code == ExitCode.PROBLEM:
            raise CallProblem(f"{self.args}: qrexec problem (exit 125)", self)
        raise CallFailed(f"{self.args}: exited with {code}", self)


_call_numbers = iter(range(1, 1 << 62))


# --- small asyncio helpers over a raw non-blocking unix socket ---------------------------


async def _connect_unix(path: str, what: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        with unix_address(path) as address:
            await loop.sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        raise QrexecError(f"cannot connect to {what} at {path}: {exc}") from None
    return sock


async def _recv_exactly(sock: socket.socket, size: int, *, eof_ok: bool) -> bytes | None:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        try:
            chunk = await loop.sock_recv(sock, size - len(data))
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            if eof_ok and not data:
                return None
            raise RemoteProtocolError(f"stream ended after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


async def _read_message(sock: socket.socket, allowed: frozenset[MsgType]) -> Any:
    header = await _recv_exactly(sock, HEADER_SIZE, eof_ok=True)
    if header is None:
        return None
    msg_type, length = HEADER.unpack(header)
    kind = check_header(msg_type, length, CLIENT_SOCKET_PROTOCOL_VERSION, allowed)
    payload = await _recv_exactly(sock, length, eof_ok=False) if length else b""
    assert payload is not None
    return decode_payload(kind, payload)


# --- the data phase, shared by both clients ------------------------------------------------


class _Sink:
    """One output: captured, discarded, written to a descriptor, or handed to a callable."""

    def __init__(self, target: Output) -> None:
        self.target = target
        self.chunks: list[bytes] | None = [] if target == PIPE else None

    async def write(self, data: bytes) -> None:
        target = self.target
        if self.chunks is not None:
            self.chunks.append(data)
        elif callable(target):
            result = target(data)
            if hasattr(result, "__await__"):
                await result
        elif target >= 0:
            view = memoryview(data)
            while view:
                view = view[os.write(target, view) :]

    def value(self) -> bytes | None:
        return b"".join(self.chunks) if self.chunks is not None else None


async def _input_chunks(source: Input, chunk: int) -> AsyncIterable[bytes]:
    if source is None:
        return
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for offset in range(0, len(view), chunk):
            yield bytes(view[offset : offset + chunk])
        return
    if isinstance(source, int):
        loop = asyncio.get_running_loop()
        while data := await loop.run_in_executor(None, os.read, source, chunk):
            yield data
        return
    if isinstance(source, AsyncIterable):
        async for data in source:
            for offset in range(0, len(data), chunk):
                yield bytes(data[offset : offset + chunk])
        return
    for data in source:
        for offset in range(0, len(data), chunk):
            yield bytes(data[offset : offset + chunk])


async def _send_input(stream: AsyncStream, version: int, source: Input, key: str) -> None:
    first = True
    try:
        async for data in _input_chunks(source, max_data_chunk(version)):
            if not data:
                continue
            if first and trace.ON:
                trace.point("client.stdin.first_byte", call=key)
            first = False
            await stream.send(encode(Data(MsgType.DATA_STDIN, data)))
    finally:
        # EOF even when the caller's input source failed: the service must not wait on.
        await stream.send(encode(Data(MsgType.DATA_STDIN, b"")))
    if trace.ON:
        trace.point("client.stdin.eof", call=key)


async def _handshake(stream: AsyncStream, own_version: int) -> int:
    await stream.send(encode(Hello(own_version)))
    decoder = FrameDecoder(own_version, allowed=(MsgType.HELLO,))
    while True:
        data = await stream.recv(HEADER_SIZE + 4)
        if not data:
            raise TransportBroken("the data vchan closed before HELLO")
        for message in decoder.feed(data):
            assert isinstance(message, Hello)
            return negotiate(own_version, message.version)


async def _data_phase(
    stream: AsyncStream,
    own_version: int,
    source: Input,
    stdout: _Sink,
    stderr: _Sink,
    key: str,
    *,
    just_exec: bool = False,
) -> int:
    version = await _handshake(stream, own_version)
    if trace.ON:
        trace.point("client.hello", call=key, version=version)
    sender = None
    if not just_exec:
        sender = asyncio.ensure_future(_send_input(stream, version, source, key))
    decoder = FrameDecoder(version, allowed=SERVICE_MESSAGE_TYPES)
    sinks = {MsgType.DATA_STDOUT: stdout, MsgType.DATA_STDERR: stderr}
    open_outputs = {MsgType.DATA_STDOUT: True, MsgType.DATA_STDERR: True}
    seen_first = False
    try:
        while True:
            data = await stream.recv(RECV_SIZE)
            if not data:
                raise TransportBroken("the data vchan closed before the exit code")
            for message in decoder.feed(data):
                if isinstance(message, ExitStatus):
                    if trace.ON:
                        trace.point("client.exit_code", call=key, code=message.code)
                    return message.code
                assert isinstance(message, Data)
                if just_exec or not open_outputs[message.msg_type]:
                    continue
                if message.is_eof:
                    open_outputs[message.msg_type] = False
                    if trace.ON:
                        trace.point("client.eof", call=key, stream=message.msg_type.name)
                    continue
                if not seen_first and trace.ON:
                    trace.point("client.output.first_byte", call=key)
                seen_first = True
                await sinks[message.msg_type].write(message.data)
    finally:
        if sender is not None:
            await _finish_sender(sender, key)


async def _finish_sender(sender: asyncio.Future[None], key: str) -> None:
    """Stop the input task; a failure of the caller's own input source is raised.

    A transport error while sending input is no failure of the call: the service may exit
    without reading all of it. (Waiting with ``asyncio.wait`` keeps a cancellation of the
    call itself propagating.)
    """
    if not sender.done():
        sender.cancel()
    await asyncio.wait({sender})
    if sender.cancelled():
        return
    problem = sender.exception()
    if isinstance(problem, QrexecError):
        if trace.ON:
            trace.point("client.stdin.stopped", call=key, why=problem)
    elif problem is not None:
        raise problem


async def _accept(
    backend: Backend, domain: int, port: int, buffer: int, wait: float
) -> AsyncStream:
    listener = await backend.listen_async(domain, port, read_min=buffer, write_min=buffer)
    try:
        async with asyncio.timeout(wait or None):
            return await listener.accept()
    except TimeoutError:
        raise QrexecError(
            f"domain {domain} did not connect the data vchan on port {port} within {wait:g} s"
        ) from None
    finally:
        listener.close()


def _with_timeout(timeout: float | None, what: str) -> Callable[[Awaitable[T]], Awaitable[T]]:
    async def run(awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError as exc:
            if isinstance(exc, CallTimeout):
                raise
            raise CallTimeout(f"{what}: no exit code within {timeout:g} s") from None

    return run


# --- the blocking face -------------------------------------------------------------------

_local = threading.local()


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on this thread's private event loop (kept between calls: cheaper)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise UsageError("the blocking face cannot run inside an event loop; await the a* method")
    runner: asyncio.Runner | None = getattr(_local, "runner", None)
    if runner is None:
        runner = _local.runner = asyncio.Runner()
        if threading.current_thread() is threading.main_thread():
            # Other threads' loops go with their thread; the main one's at exit.
            import atexit

            atexit.register(runner.close)
    return runner.run(coro)


# --- the clients ---------------------------------------------------------------------------


class _Client:
    def __init__(self, env: Mapping[str, str] | None, transport: str | None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.transport = transport
        self._backend: Backend | None = None
        self.own_version = own_protocol_version(self.env)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            from qrexec.backends.select import load_backend

            self._backend = load_backend(self.transport, self.env)
        return self._backend


class Dom0Client(_Client):
    """dom0's side: run commands and services in VMs through their qrexec-daemons.

    ``env`` (default: ``os.environ``) gives ``QREXEC_DAEMON_SOCKET_DIR``, the transport
    variables and ``QREXEC_PROTOCOL_VERSION``, as for ``qrexec-client``.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        socket_dir: str | None = None,
        transport: str | None = None,
    ) -> None:
        super().__init__(env, transport)
        self.socket_dir = (
            socket_dir or self.env.get("QREXEC_DAEMON_SOCKET_DIR") or DEFAULT_SOCKET_DIR
        )

    async def arun(
        self,
        vm: str,
        cmdline: str,
        *,
        input: Input = None,
        stdout: Output = PIPE,
        stderr: Output = PIPE,
        timeout: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        just_exec: bool = False,
        check: bool = False,
    ) -> CallResult:
        """Run ``USER:COMMAND`` (or ``USER:QUBESRPC SERVICE SOURCE``) in ``vm``."""
        if "/" in vm or not vm:
            raise UsageError(f"{vm!r} is not a domain name")
        if ":" not in cmdline:
            raise UsageError(f"{cmdline!r} is not USER:COMMAND")
        raw = encode_cmdline(cmdline)
        result = await _with_timeout(timeout, f"{vm} {cmdline}")(
            self._run(vm, cmdline, raw, input, stdout, stderr, connect_timeout, just_exec)
        )
        return result.check() if check else result

    async def _run(
        self,
        vm: str,
        cmdline: str,
        raw: bytes,
        source: Input,
        stdout: Output,
        stderr: Output,
        connect_timeout: float,
        just_exec: bool,
    ) -> CallResult:
        key = f"{os.getpid()}.{next(_call_numbers)}"
        if trace.ON:
            trace.point("client.start", call=key, dest=vm)
        sock = await _connect_unix(
            os.path.join(self.socket_dir, f"qrexec.{vm}"), f"the qrexec daemon of {vm}"
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, encode(Hello(CLIENT_SOCKET_PROTOCOL_VERSION)))
            hello = await _read_message(sock, frozenset({MsgType.HELLO}))
            if hello is None:
                raise ProtocolError(f"the daemon of {vm} closed the connection")
            negotiate_client_socket(hello.version)
            if trace.ON:
                trace.point("client.daemon_connected", call=key)
            kind = MsgType.JUST_EXEC if just_exec else MsgType.EXEC_CMDLINE
            await loop.sock_sendall(sock, encode(ExecRequest(kind, 0, 0, raw)))
            reply = await _read_message(sock, frozenset({kind}))
            if not isinstance(reply, ExecParams):
                raise ProtocolError(f"the daemon of {vm} closed the connection before replying")
            backend = self.backend
            if trace.ON:
                trace.point(
                    "client.port",
                    call=key,
                    vchan=trace.vchan_key(
                        backend.own_domain, reply.connect_domain, reply.connect_port
                    ),
                )
            stream = await _accept(
                backend,
                reply.connect_domain,
                reply.connect_port,
                VCHAN_DATA_RING_SIZE,
                connect_timeout,
            )
            if trace.ON:
                trace.point("client.vchan_connected", call=key)
            out, err = _Sink(stdout), _Sink(stderr)
            try:
                code = await _data_phase(
                    stream, self.own_version, source, out, err, key, just_exec=just_exec
                )
            finally:
                stream.close()
        finally:
            sock.close()
        if trace.ON:
            trace.point("client.teardown", call=key)
        return CallResult(f"{vm} {cmdline}", code, out.value(), err.value())

    async def acall(
        self,
        vm: str,
        service: str,
        *,
        source: str = "dom0",
        user: str = "DEFAULT",
        **kwargs: Any,
    ) -> CallResult:
        """Call ``SERVICE[+ARG]`` in ``vm`` as ``source`` (no policy: dom0 may call anything)."""
        return await self.arun(vm, f"{user}:QUBESRPC {service} {source}", **kwargs)

    def run(self, vm: str, cmdline: str, **kwargs: Any) -> CallResult:
        """Blocking :meth:`arun`."""
        return run_blocking(self.arun(vm, cmdline, **kwargs))

    def call(self, vm: str, service: str, **kwargs: Any) -> CallResult:
        """Blocking :meth:`acall`."""
        return run_blocking(self.acall(vm, service, **kwargs))


def build_trigger(target: str, service: str, source_qube: str, version: int) -> bytes:
    """TRIGGER_SERVICE4 (or 3 when our version is capped below 4), as qrexec-client-vm."""
    raw_target = target.replace("$", "@").encode("utf-8", "surrogateescape")
    raw_service = service.encode("utf-8", "surrogateescape")
    if version >= PROTOCOL_V4:
        return encode(
            TriggerService4(
                source_domain=source_qube.encode("utf-8", "surrogateescape"),
                target_domain=raw_target,
                request_id=REQUEST_ID,
                service_name=raw_service,
            )
        )
    if source_qube:
        raise UsageError("source_qube needs protocol version 4")
    return encode(
        TriggerService3(target_domain=raw_target, request_id=REQUEST_ID, service_name=raw_service)
    )


class VmClient(_Client):
    """A VM's side: call services in other domains through the local agent.

    ``env`` (default ``os.environ``) gives ``QREXEC_AGENT_SOCKET``, the transport variables
    and ``QREXEC_PROTOCOL_VERSION``, as for ``qrexec-client-vm``.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        agent_socket: str | None = None,
        transport: str | None = None,
    ) -> None:
        super().__init__(env, transport)
        self.agent_socket = (
            agent_socket or self.env.get("QREXEC_AGENT_SOCKET") or DEFAULT_AGENT_SOCKET
        )

    async def acall(
        self,
        target: str,
        service: str,
        *,
        input: Input = None,
        stdout: Output = PIPE,
        stderr: Output = PIPE,
        source_qube: str = "",
        timeout: float | None = None,
        buffer_size: int = VCHAN_DATA_RING_SIZE,
        check: bool = False,
    ) -> CallResult:
        """Call ``SERVICE[+ARG]`` in ``target`` (policy decides); ``source_qube`` relays."""
        if not service or service.startswith("+"):
            raise UsageError(f"service {service!r} is empty or has no name before '+'")
        trigger = build_trigger(target, service, source_qube, self.own_version)
        what = f"{target} {service}"
        result = await _with_timeout(timeout, what)(
            self._call(what, trigger, input, stdout, stderr, buffer_size)
        )
        return result.check() if check else result

    async def _call(
        self,
        what: str,
        trigger: bytes,
        source: Input,
        stdout: Output,
        stderr: Output,
        buffer_size: int,
    ) -> CallResult:
        key = f"{os.getpid()}.{next(_call_numbers)}"
        if trace.ON:
            trace.point("client.start", call=key, dest=what)
        sock = await _connect_unix(self.agent_socket, "the qrexec agent")
        loop = asyncio.get_running_loop()
        try:
            try:
                await loop.sock_sendall(sock, trigger)
                if trace.ON:
                    trace.point("client.trigger_sent", call=key)
                raw = await _recv_exactly(sock, EXEC_PARAMS.size, eof_ok=True)
            except (ConnectionResetError, BrokenPipeError):
                raw = None
            if raw is None:
                if trace.ON:
                    trace.point("client.refused", call=key)
                return CallResult(what, ExitCode.REQUEST_REFUSED, b"", b"Request refused\n")
            domain, port = EXEC_PARAMS.unpack(raw)
            backend = self.backend
            if trace.ON:
                trace.point(
                    "client.port", call=key, vchan=trace.vchan_key(backend.own_domain, domain, port)
                )
            stream = await _accept(backend, domain, port, buffer_size, VM_CONNECT_TIMEOUT)
            if trace.ON:
                trace.point("client.vchan_connected", call=key)
            out, err = _Sink(stdout), _Sink(stderr)
            try:
                code = await _data_phase(stream, self.own_version, source, out, err, key)
            finally:
                stream.close()
        finally:
            # Closing the trigger socket tells the agent the call is over.
            sock.close()
        if trace.ON:
            trace.point("client.teardown", call=key)
        return CallResult(what, code, out.value(), err.value())

    def call(self, target: str, service: str, **kwargs: Any) -> CallResult:
        """Blocking :meth:`acall`."""
        return run_blocking(self.acall(target, service, **kwargs))
