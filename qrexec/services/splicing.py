"""The service relay's bulk paths without user-space copies (Linux ``splice``).

:mod:`.relay` moves a call's bytes between the data vchan and the service. With the
socket transport on Linux, the payloads need not pass through our process at all:

* **service output** (a pipe) -> vchan: ``FIONREAD`` says how much the pipe holds, the
  8-byte header for that much (at most one chunk) goes out, then ``splice`` moves the
  payload pipe -> socket (:meth:`AsyncSocketStream.splice_from`);
* **caller's STDIN** -> service stdin (a socket, as in Qubes): each header is received and
  checked exactly as :class:`~qrexec.protocol.framing.FrameBuffer` does, then the payload
  is spliced socket -> an intermediate pipe of ours, and once the *whole* frame is there,
  pipe -> service. A frame the caller never finishes is never delivered (the copying
  path's rule too), and the pipe holds at most one frame, so memory stays bounded.

Where this cannot apply - no ``os.splice``, a transport without the splice methods
(vchan, memory), a filter, a pipe that cannot be made large enough - :mod:`.relay` keeps
its copying path; :func:`frame_pipe` and :func:`can_splice` say which.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Callable

from qrexec import trace
from qrexec.backends.base import AsyncStream
from qrexec.errors import RemoteProtocolError
from qrexec.lazy_logging import get_logger
from qrexec.protocol.constants import HEADER_SIZE, MsgType
from qrexec.protocol.framing import check_header
from qrexec.protocol.messages import HEADER
from qrexec.splice_support import splice_works

log = get_logger(__name__)

#: ``splice`` never blocks (the loop waits instead) and moves pages rather than copying.
SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 0) | getattr(os, "SPLICE_F_MOVE", 0)
#: The intermediate pipe's size: a frame spliced from a socket may take a slot per page
#: fragment, so ask for far more than one frame's bytes.
FRAME_PIPE_SIZE = 1 << 20
#: The least we accept (a user over the pipe-buffer quota gets tiny pipes): four frames.
FRAME_PIPE_FRAMES = 4
#: Linux's FIONREAD (termios.FIONREAD), without importing termios for one number.
FIONREAD = 0x541B


def can_splice(stream: AsyncStream) -> bool:
    """True when ``stream`` and this system can move payloads with ``splice``."""
    return (
        sys.platform == "linux"
        and hasattr(stream, "splice_into")
        and hasattr(stream, "splice_from")
        and splice_works()
    )


def is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def frame_pipe(chunk: int) -> tuple[int, int] | None:
    """A non-blocking pipe that holds several frames of ``chunk`` bytes, or None."""
    import fcntl

    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, FRAME_PIPE_SIZE)
    except OSError as exc:
        log.debug("intermediate pipe stays small: %s", exc)
    if fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) >= FRAME_PIPE_FRAMES * (chunk + HEADER_SIZE):
        return read_end, write_end
    os.close(read_end)
    os.close(write_end)
    return None


async def wait_fd(fd: int, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _splice_out(pipe_fd: int, target_fd: int, count: int) -> bool:
    """Move the ``count`` bytes the pipe holds into ``target_fd``; False if its reader left."""
    while count:
        try:
            moved = os.splice(pipe_fd, target_fd, count, flags=SPLICE_FLAGS)
        except BlockingIOError:
            await wait_fd(target_fd, write=True)
            continue
        except (BrokenPipeError, ConnectionResetError):
            return False
        count -= moved
    return True


async def _write_out(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to the non-blocking ``fd``; False if its reader left."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await wait_fd(fd, write=True)
        except (BrokenPipeError, ConnectionResetError):
            return False
    return True


def _pending_of_frame(pipe_fd: int, after: int) -> int:
    """Bytes of the current frame still in the pipe, ``after`` bytes of later frames
    being behind them (``FIONREAD``)."""
    import fcntl

    size = bytearray(4)
    fcntl.ioctl(pipe_fd, FIONREAD, size)
    return int.from_bytes(size, sys.byteorder) - after


def _drop(pipe_fd: int, count: int) -> None:
    """Read and forget ``count`` bytes the pipe holds (input a closed stdin will not get)."""
    while count > 0:
        count -= len(os.read(pipe_fd, min(count, 1 << 16)))


async def relay_stdin_spliced(
    stream: AsyncStream,
    version: int,
    target_fd: int,
    pipe: tuple[int, int],
    end: Callable[[], None],
    trace_key: str = "",
) -> bool:
    """The caller's STDIN into ``target_fd`` through ``pipe`` (which this closes).

    Same contract as :func:`.relay.relay_stdin`: returns False when the caller closed the
    vchan or broke the protocol (logged); ``end()`` is called at the caller's STDIN EOF or
    when the service stops taking input, after which further input is dropped.

    The pipe is the receive buffer: whatever the vchan holds is spliced in (up to the
    pipe's size, so memory stays bounded), each header is read out of it (8 bytes through
    our hands) and checked, and a payload is spliced on to the service once it is whole
    in the pipe. One splice in serves many frames when the caller is ahead.
    """
    import fcntl

    splice_into = stream.splice_into  # type: ignore[attr-defined]
    read_end, write_end = pipe
    room = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    allowed = frozenset({MsgType.DATA_STDIN})
    in_pipe = 0
    open_ = True
    traced = False

    async def fill(need: int) -> bool | bytes:
        """Splice until the pipe holds ``need`` bytes: True; False at the end of the stream.

        If the pipe runs out of slots first (a peer sending tiny pieces), its bytes and
        the rest of the ``need`` come back as bytes instead, through our memory.
        """
        nonlocal in_pipe
        while in_pipe < need:
            try:
                count = await splice_into(write_end, room - in_pipe)
            except BlockingIOError:
                carry = bytearray()
                while len(carry) < in_pipe:
                    carry += os.read(read_end, in_pipe - len(carry))
                in_pipe = 0
                while len(carry) < need:
                    data = await stream.recv(need - len(carry))
                    if not data:
                        return False
                    carry += data
                return bytes(carry)
            if not count:
                return False
            in_pipe += count
        return True

    try:
        while True:
            got = await fill(HEADER_SIZE)
            if got is False:
                if in_pipe:
                    log.warning("caller broke the data protocol: stream ended in a header")
                return False
            if got is True:
                header = os.read(read_end, HEADER_SIZE)  # a pipe holding 8 bytes gives 8
                in_pipe -= HEADER_SIZE
            else:
                header = got
            msg_type, length = HEADER.unpack(header)
            try:
                check_header(msg_type, length, version, allowed)
            except RemoteProtocolError as exc:
                log.warning("caller broke the data protocol: %s", exc)
                return False
            if trace.ON and not traced:
                traced = True
                trace.point("agent.stdin_first", vchan=trace_key)
            if not length:
                if open_:
                    end()
                    open_ = False
                continue
            got = await fill(length)
            if got is False:
                log.warning(
                    "caller broke the data protocol: stream ended in the middle of a frame "
                    "(%d bytes of it)",
                    HEADER_SIZE + in_pipe,
                )
                return False
            if got is not True:
                if open_ and not await _write_out(target_fd, got):
                    open_ = False
                    end()
                continue
            in_pipe -= length
            if open_ and not await _splice_out(read_end, target_fd, length):
                open_ = False
                end()
                # What the service did not take of this frame is dropped below.
                length = _pending_of_frame(read_end, in_pipe)
            if not open_:
                _drop(read_end, length)
    finally:
        os.close(read_end)
        os.close(write_end)


async def pump_spliced(
    stream: AsyncStream,
    kind: MsgType,
    fd: int,
    chunk: int,
    on_data: Callable[[], None],
    own: tuple[int, int] | None,
) -> None:
    """Frames of ``kind`` from ``fd`` (a pipe, or a socket when ``own`` is given) until
    its end, payloads spliced; closes ``own``.

    Each frame carries what ``fd`` holds (``FIONREAD``), at most ``chunk`` bytes; its
    readiness with nothing in it is its end. ``on_data`` is called before each frame.
    With ``own`` (a pipe of ours), each frame is assembled there (header written, payload
    spliced behind it) and goes to the vchan in one ``splice``, so the peer wakes once per
    frame and finds it whole; without it, the header goes ahead of the payload spliced
    straight from the pipe ``fd``. A frame that cannot be assembled in the pipe (out of
    slots after a service wrote in tiny pieces, or ``fd`` reset) goes through memory.
    """
    import fcntl

    splice_from = stream.splice_from  # type: ignore[attr-defined]
    size = bytearray(4)
    header = bytearray(HEADER_SIZE)
    try:
        while True:
            fcntl.ioctl(fd, FIONREAD, size)
            available = int.from_bytes(size, sys.byteorder)
            if not available:
                await wait_fd(fd, write=False)
                fcntl.ioctl(fd, FIONREAD, size)
                if not int.from_bytes(size, sys.byteorder):
                    return  # readable and empty: every writer is gone
                continue
            while available:
                count = min(available, chunk)
                HEADER.pack_into(header, 0, kind, count)
                on_data()
                available -= count
                if own is None:
                    await splice_from(header, fd, count)
                    continue
                payload = _assemble(fd, own, header, count)
                if payload is None:
                    await splice_from(b"", own[0], HEADER_SIZE + count)
                    continue
                if payload:
                    await stream.send(bytes(HEADER.pack(kind, len(payload))) + payload)
                if len(payload) < count:
                    return  # fd was reset: its end
    finally:
        if own is not None:
            os.close(own[0])
            os.close(own[1])


def _assemble(fd: int, own: tuple[int, int], header: bytearray, count: int) -> bytes | None:
    """``header`` and ``count`` bytes of ``fd`` into the pipe ``own``: None when done,
    else the payload read into memory instead (fewer bytes if ``fd`` was reset)."""
    read_end, write_end = own
    os.write(write_end, header)
    moved = 0
    try:
        while moved < count:
            step = os.splice(fd, write_end, count - moved, flags=SPLICE_FLAGS)
            if not step:
                break
            moved += step
        else:
            return None
    except (BlockingIOError, ConnectionResetError, BrokenPipeError):
        pass
    framed = bytearray()
    while len(framed) < HEADER_SIZE + moved:
        framed += os.read(read_end, HEADER_SIZE + moved - len(framed))
    payload = bytearray(framed[HEADER_SIZE:])
    try:
        while len(payload) < count:
            data = os.read(fd, count - len(payload))
            if not data:
                break
            payload += data
    except (BlockingIOError, ConnectionResetError, BrokenPipeError):
        pass
    return bytes(payload)
