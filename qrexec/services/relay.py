"""The service side of one data vchan: handshake, then relaying a process or a socket.

Data phase (spec §4(v)), from the side that runs the service:

* STDOUT and STDERR chunks go out at most ``max_data_chunk(version)`` bytes each, then a
  zero-length message of each type as EOF. Socket services have no stderr: STDERR EOF goes
  out first thing.
* STDIN chunks from the caller are written to the service; the caller's STDIN EOF shuts
  down the service's stdin (the write side of its stdin socket).
* Once stdout and stderr are at EOF and the process has exited, EXIT_CODE (a signal is
  128 + signo) is sent and the vchan closed.
* If the caller goes away first, everything towards the service is closed (it sees EOF or
  EPIPE) and the call ends without an exit code; the process is reaped in the background.

Single-socket mode (SIGUSR1 to ``$QREXEC_AGENT_PID``): a process's stdin is one end of a
socketpair, and whatever the process writes *into its stdin* is always read and sent as
STDOUT, so the switch needs no per-call state in the agent (the agent only has to survive
the signal). Output on that socket counts toward STDOUT EOF until the process exits;
after the exit, what is already buffered there is still sent, but a background child
that inherited fd 0 cannot hold the call open.

Nothing here knows about commands, users or lookup: see :mod:`.calls`. asyncio only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable

from qrexec import trace
from qrexec.backends.base import AsyncStream
from qrexec.errors import RemoteProtocolError, TransportError
from qrexec.pipe_buffers import enlarge_pipe, enlarge_send_buffer
from qrexec.protocol.constants import HEADER_SIZE, SIGNAL_EXIT_BASE, MsgType
from qrexec.protocol.framing import DataFramer, FrameBuffer, hello_length, hello_version
from qrexec.protocol.messages import (
    Data,
    ExitStatus,
    Hello,
    encode,
)
from qrexec.protocol.negotiation import max_data_chunk, negotiate
from qrexec.services.splicing import (
    can_splice,
    frame_pipe,
    is_pipe,
    pump_spliced,
    relay_stdin_spliced,
    wait_fd,
)

log = logging.getLogger(__name__)

#: Buffers per ``writev`` (POSIX guarantees 16 at least; Linux takes 1024).
WRITEV_MAX = 512


def exit_status(returncode: int) -> int:
    """A Popen return code as the wire's exit code (signal n -> 128 + n)."""
    if returncode < 0:
        return SIGNAL_EXIT_BASE - returncode
    return returncode


async def recv_exactly(stream: AsyncStream, size: int) -> bytes | None:
    """Exactly ``size`` bytes, or None when the stream ends first."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


async def read_hello(stream: AsyncStream) -> int:
    """Read exactly one HELLO (never past it) and return the peer's version."""
    header = await recv_exactly(stream, HEADER_SIZE)
    if header is None:
        raise RemoteProtocolError("peer closed the vchan before HELLO")
    payload = await recv_exactly(stream, hello_length(header))
    if payload is None:
        raise RemoteProtocolError("peer closed the vchan inside HELLO")
    return hello_version(payload)


async def handshake(stream: AsyncStream, own_version: int) -> int:
    """Send our HELLO first, without waiting, then read the peer's; the agreed version."""
    await stream.send(encode(Hello(own_version)))
    return negotiate(own_version, await read_hello(stream))


def read_now(fd: int, size: int) -> bytes | None:
    """One non-blocking read: data, ``b""`` at EOF, None when nothing is there yet."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return b""


async def read_fd(fd: int, size: int) -> bytes:
    """Read up to ``size`` bytes from a non-blocking fd; ``b""`` at EOF."""
    while True:
        data = read_now(fd, size)
        if data is not None:
            return data
        await wait_fd(fd)


def readv_now(fd: int, buffers: list[memoryview]) -> int | None:
    """One non-blocking ``readv``: the count, 0 at EOF, None when nothing is there yet."""
    try:
        return os.readv(fd, buffers)
    except BlockingIOError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return 0


async def writev_fd(fd: int, views: list[memoryview]) -> bool:
    """Write all of ``views``, in order, to a non-blocking fd (several per system call);
    False when the reader is gone."""
    while views:
        try:
            written = os.writev(fd, views[:WRITEV_MAX])
        except BlockingIOError:
            await wait_fd(fd, write=True)
            continue
        except (BrokenPipeError, ConnectionResetError):
            return False
        while views and written >= len(views[0]):
            written -= len(views[0])
            views = views[1:]
        if written:
            views = [views[0][written:], *views[1:]]
    return True


async def write_fd(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to a non-blocking fd; False when the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await wait_fd(fd, write=True)
            continue
        except (BrokenPipeError, ConnectionResetError):
            return False
        view = view[written:]
    return True


async def wait_process(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc`` without blocking the loop (pidfd when the kernel has it)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, proc.wait)
    try:
        while proc.poll() is None:
            await wait_fd(pidfd)
    finally:
        os.close(pidfd)
    assert proc.returncode is not None
    return proc.returncode


class DataChannel:
    """Our end of one data vchan after the handshake: framed sends and receives.

    The bulk paths copy nothing in user space: input from the service is read straight
    into frames (:class:`~qrexec.protocol.framing.DataFramer`) and sent as they are, and
    the caller's STDIN is received into one buffer
    (:class:`~qrexec.protocol.framing.FrameBuffer`) and written to the service from there.
    """

    def __init__(self, stream: AsyncStream, version: int) -> None:
        self.stream = stream
        self.version = version
        self.max_chunk = max_data_chunk(version)
        #: The call's ``vchan=`` key in trace lines (set by the agent when tracing).
        self.trace_key = ""
        self._traced: set[MsgType] = set()

    def trace_first(self, kind: MsgType) -> None:
        """Trace the first data of ``kind`` this call sends (a no-op unless tracing)."""
        if trace.ON and kind not in self._traced:
            self._traced.add(kind)
            trace.point("agent.first_byte", vchan=self.trace_key, stream=kind.name)

    async def send_data(self, kind: MsgType, data: bytes) -> None:
        self.trace_first(kind)
        for offset in range(0, len(data), self.max_chunk):
            await self.stream.send(encode(Data(kind, data[offset : offset + self.max_chunk])))

    async def send_eof(self, kind: MsgType) -> None:
        if trace.ON:
            trace.point("agent.eof", vchan=self.trace_key, stream=kind.name)
        await self.stream.send(encode(Data(kind, b"")))

    async def send_exit(self, code: int) -> None:
        await self.stream.send(encode(ExitStatus(code)))

    async def finish_early(
        self, code: int, *, stdout_eof: bool = True, stdout_first: bool = False
    ) -> None:
        """The whole reply of a call that produced no data: EOFs, then the exit code.

        dom0 sends STDERR EOF first; a VM agent sends STDOUT EOF first
        (``stdout_first``, spec §15.6).
        """
        if stdout_first:
            await self.send_eof(MsgType.DATA_STDOUT)
        await self.send_eof(MsgType.DATA_STDERR)
        if stdout_eof and not stdout_first:
            await self.send_eof(MsgType.DATA_STDOUT)
        await self.send_exit(code)


async def relay_stdin(
    channel: DataChannel,
    deliver: Callable[[list[memoryview]], Awaitable[bool]],
    end: Callable[[], None],
    target_fd: int | None = None,
) -> bool:
    """Caller's STDIN into the service until the caller goes away.

    Payloads go to ``deliver`` as views into the receive buffer, consecutive ones
    together - or, when ``target_fd`` (what ``deliver`` writes to) is given and the
    transport can splice, straight from the vchan to it (:mod:`.splicing`). Returns only
    when the caller has closed the vchan (or broke the protocol), which is a normal end
    once the exit code has been sent and an abort before.
    """
    if target_fd is not None and can_splice(channel.stream):
        pipe = frame_pipe(channel.max_chunk)
        if pipe is not None:
            return await relay_stdin_spliced(
                channel.stream, channel.version, target_fd, pipe, end, channel.trace_key
            )
    frames = FrameBuffer(channel.version, allowed=(MsgType.DATA_STDIN,))
    stream = channel.stream
    open_ = True
    traced = False
    pending: list[memoryview] = []
    while True:
        count = await stream.recv_into(frames.free_space())
        if not count:
            return False
        if trace.ON and not traced:
            traced = True
            trace.point("agent.stdin_first", vchan=channel.trace_key)
        frames.filled(count)
        view = frames.view  # a new buffer once the stream turned out bulk
        try:
            while (frame := frames.next_frame()) is not None:
                if not open_:
                    continue  # the service closed its stdin; upstream drops the rest too
                _, start, stop = frame
                if start != stop:
                    pending.append(view[start:stop])
                    continue
                if pending and not await deliver(pending):
                    pending = []
                    end()
                    open_ = False
                    continue
                pending = []
                end()
                open_ = False
        except RemoteProtocolError as exc:
            log.warning("caller broke the data protocol: %s", exc)
            return False
        if pending:
            if not await deliver(pending):
                end()
                open_ = False
            pending = []


async def _pump(channel: DataChannel, kind: MsgType, fd: int) -> None:
    if can_splice(channel.stream) and is_pipe(fd):
        await pump_spliced(
            channel.stream,
            kind,
            fd,
            channel.max_chunk,
            lambda: channel.trace_first(kind),
            frame_pipe(channel.max_chunk),
        )
        return
    framer = DataFramer(kind, channel.max_chunk)
    while True:
        count = readv_now(fd, framer.payloads)
        if count is None:
            await wait_fd(fd)
            continue
        if not count:
            return
        channel.trace_first(kind)
        await channel.stream.send(framer.frames(count))


async def _pump_until(
    channel: DataChannel, kind: MsgType, fd: int, stop: asyncio.Future[None]
) -> None:
    """Like :func:`_pump`, but once ``stop`` is done only what is already readable goes."""
    framer = DataFramer(kind, channel.max_chunk)
    while True:
        count = readv_now(fd, framer.payloads)
        if count == 0:
            return
        if count is not None:
            channel.trace_first(kind)
            await channel.stream.send(framer.frames(count))
            continue
        if stop.done():
            return
        readable = asyncio.ensure_future(wait_fd(fd))
        try:
            await asyncio.wait((readable, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            readable.cancel()


def _shutdown_write(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def _race(work: Awaitable[None], caller_gone: asyncio.Task[bool]) -> bool:
    """Run ``work`` unless the caller goes away first; True when ``work`` completed."""
    task = asyncio.ensure_future(work)
    await asyncio.wait((task, caller_gone), return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TransportError, OSError):
        await task
    return False


async def relay_process(
    channel: DataChannel,
    proc: subprocess.Popen[bytes],
    stdin_sock: socket.socket,
    stdout_fd: int,
    stderr_fd: int,
) -> int | None:
    """Relay a running process over the channel; its exit code, None if the caller left.

    Takes ownership of ``stdin_sock`` (our end of the process's stdin socketpair) and of
    the two pipe read ends; all are closed on return.
    """
    for fd in (stdin_sock.fileno(), stdout_fd, stderr_fd):
        os.set_blocking(fd, False)
    enlarge_send_buffer(stdin_sock)
    enlarge_pipe(stdout_fd)
    exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sock_fd = stdin_sock.fileno()

    async def watch_exit() -> int:
        code = await wait_process(proc)
        exited.set_result(None)
        return code

    async def produce() -> int:
        waiter = asyncio.ensure_future(watch_exit())
        await asyncio.gather(
            _pump(channel, MsgType.DATA_STDOUT, stdout_fd),
            _pump_until(channel, MsgType.DATA_STDOUT, sock_fd, exited),
        )
        await channel.send_eof(MsgType.DATA_STDOUT)
        return await waiter

    async def produce_stderr() -> None:
        await _pump(channel, MsgType.DATA_STDERR, stderr_fd)
        await channel.send_eof(MsgType.DATA_STDERR)

    caller_gone = asyncio.ensure_future(
        relay_stdin(
            channel,
            lambda views: writev_fd(sock_fd, views),
            lambda: _shutdown_write(stdin_sock),
            target_fd=sock_fd,
        )
    )
    code_box: list[int] = []

    async def run() -> None:
        results = await asyncio.gather(produce(), produce_stderr())
        code_box.append(results[0])

    try:
        finished = await _race(run(), caller_gone)
        if finished:
            await channel.send_exit(exit_status(code_box[0]))
            return exit_status(code_box[0])
        log.info("caller closed the data vchan early (service pid %d)", proc.pid)
        return None
    finally:
        caller_gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller_gone
        stdin_sock.close()
        os.close(stdout_fd)
        os.close(stderr_fd)
        if proc.returncode is None:
            reap_in_background(proc)


_background: set[asyncio.Task[int]] = set()


def reap_in_background(proc: subprocess.Popen[bytes]) -> None:
    """Collect a process we no longer relay, so it never lingers as a zombie."""
    task = asyncio.ensure_future(wait_process(proc))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def relay_socket(
    channel: DataChannel,
    sock: socket.socket,
    *,
    exit_on_client_eof: bool,
    exit_on_service_eof: bool,
    stderr_eof_sent: bool = False,
) -> int | None:
    """Relay a connected service socket (unix or TCP): 0 at the end, None if the caller left.

    By default the call ends when the caller's stdin has ended *and* the service has
    closed its side; the rpc-config options end it at the first of the two. STDERR EOF
    goes out first unless the caller already sent it (``stderr_eof_sent``: dom0 sends it
    before anything else, spec §15.1).
    """
    sock.setblocking(False)
    fd = sock.fileno()
    client_eof: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_client_eof() -> None:
        _shutdown_write(sock)
        if not client_eof.done():
            client_eof.set_result(None)

    async def produce() -> None:
        if not stderr_eof_sent:
            await channel.send_eof(MsgType.DATA_STDERR)
        pump = asyncio.ensure_future(_pump(channel, MsgType.DATA_STDOUT, fd))
        if exit_on_client_eof:
            await asyncio.wait((pump, client_eof), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                await channel.send_eof(MsgType.DATA_STDOUT)
                return
        else:
            await pump
        # The service's EOF goes out at once; the exit code waits for the caller's
        # STDIN EOF too, unless exit-on-service-eof (spec §15.6, as upstream's agent).
        await channel.send_eof(MsgType.DATA_STDOUT)
        if not exit_on_service_eof:
            await client_eof

    caller_gone = asyncio.ensure_future(
        relay_stdin(channel, lambda views: writev_fd(fd, views), on_client_eof, target_fd=fd)
    )
    try:
        if await _race(produce(), caller_gone):
            await channel.send_exit(0)
            return 0
        log.info("caller closed the data vchan early (socket service)")
        return None
    finally:
        caller_gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller_gone
        sock.close()


def ignore_sigusr1(loop: asyncio.AbstractEventLoop) -> None:
    """Make SIGUSR1 harmless: single-socket mode needs no action (module docstring)."""
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: log.debug("SIGUSR1: a service switched to single-socket mode")
    )
