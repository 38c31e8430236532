"""Asking dom0's policy about one VM-initiated call (spec §6.1), from qrexec-daemon.

Primary: the policy daemon socket (``--policy-socket``, env ``QREXEC_POLICY_SOCKET``,
default ``/run/qubes/policy.sock``): one §6.1 query (``source``, ``requested_source`` for
v4 triggers only, ``intended_target``, ``service_and_arg``), the answer read to EOF (at
most 4096 bytes) and parsed strictly (:func:`qrexec.policy.decision.wire.parse_response`).

A connection that is refused, reset, or finds the listen backlog full before any byte of
the answer came (a policy daemon under a flood, or restarting) is retried with bounded
backoff (:data:`RETRY_DELAYS`, under 2 s in all) before giving up on the socket.

Fallback, when the socket is missing or still refuses the connection, or its answer is
malformed, cut short or absent: run the policy program (``-p``, default
``/usr/bin/qrexec-policy-exec``) as ``PROGRAM -- SOURCE TARGET SERVICE+ARG`` (no
requested source, as upstream), parse its stdout by the same rules, and treat a non-zero
exit as a failure. ``qrexec-policy-exec`` exits 1 on an ordinary deny, so such a deny is
logged as a policy program failure, as upstream does; the call is refused either way.

Whatever goes wrong, the outcome is a deny (:data:`~qrexec.policy.decision.wire.DENY`) with the
reason logged: this module never raises for a policy problem.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass

from qrexec.daemon.vm_calls_peers import open_unix
from qrexec.errors import ProtocolError
from qrexec.policy.decision.wire import (
    DENY,
    MAX_RESPONSE_BYTES,
    PolicyQuery,
    PolicyResponse,
    parse_response,
)

log = logging.getLogger(__name__)

#: An answer that is not complete within this time counts as missing (an ``ask`` prompt
#: is answered or times out well within it, 60 s by default in the policy daemon).
POLICY_TIMEOUT = 300.0


#: Pauses between attempts on a refused or reset policy connection.
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
#: Errors that mean "try again shortly": nobody accepted, backlog full, reset, or asyncio
#: taking a full backlog's EAGAIN for a connection in progress (then ENOTCONN/EPIPE).
RETRY_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EAGAIN,
        errno.ENOTCONN,
        errno.EPIPE,
        errno.ECONNABORTED,
    }
)


class PolicyUnavailable(Exception):
    """The policy daemon could not give an answer (the fallback is tried)."""


class _Retry(Exception):
    """This attempt failed before any answer byte, in a way worth another try."""


@dataclass(frozen=True, slots=True)
class PolicySettings:
    socket_path: str
    program: str
    timeout: float = POLICY_TIMEOUT


async def _read_capped(reader: asyncio.StreamReader) -> bytes:
    """Everything up to EOF, refusing more than :data:`MAX_RESPONSE_BYTES`."""
    data = bytearray()
    while chunk := await reader.read(MAX_RESPONSE_BYTES + 1 - len(data)):
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            raise ProtocolError(f"answer longer than {MAX_RESPONSE_BYTES} bytes")
    return bytes(data)


async def _attempt(settings: PolicySettings, query: PolicyQuery) -> bytes:
    """One connection: the raw answer; _Retry when it failed before any answer byte."""
    received = False
    try:
        reader, writer = await open_unix(settings.socket_path)
        try:
            writer.write(query.encode())
            await writer.drain()
            raw = await _read_capped(reader)
            received = bool(raw)
        finally:
            writer.close()
    except OSError as exc:
        if exc.errno in RETRY_ERRNOS and not received:
            raise _Retry(str(exc)) from None
        raise
    if not raw:
        raise _Retry("connection closed without an answer")
    return raw


async def ask_policy_daemon(settings: PolicySettings, query: PolicyQuery) -> PolicyResponse:
    """One query over the policy socket; PolicyUnavailable when that does not work."""
    delays = iter(RETRY_DELAYS)
    try:
        async with asyncio.timeout(settings.timeout):
            while True:
                try:
                    raw = await _attempt(settings, query)
                    break
                except _Retry as exc:
                    delay = next(delays, None)
                    if delay is None:
                        raise PolicyUnavailable(
                            f"policy daemon at {settings.socket_path}: {exc} "
                            f"({len(RETRY_DELAYS) + 1} attempts)"
                        ) from None
                    log.debug("policy daemon: %s; retrying in %g s", exc, delay)
                    await asyncio.sleep(delay)
    except (OSError, TimeoutError) as exc:
        raise PolicyUnavailable(
            f"policy daemon at {settings.socket_path}: {exc or 'no answer in time'}"
        ) from None
    except ProtocolError as exc:
        raise PolicyUnavailable(f"policy daemon at {settings.socket_path}: {exc}") from None
    try:
        return parse_response(raw)
    except ProtocolError as exc:
        raise PolicyUnavailable(f"policy daemon gave a malformed answer: {exc}") from None


async def ask_policy_program(settings: PolicySettings, query: PolicyQuery) -> PolicyResponse:
    """The fallback: run the policy program; DENY on any failure."""
    argv = [settings.program, "--", query.source, query.intended_target, query.service_and_arg]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        log.error("cannot run the policy program %s: %s", settings.program, exc)
        return DENY
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(settings.timeout):
            raw = await _read_capped(proc.stdout)
            code = await proc.wait()
    except (TimeoutError, ProtocolError) as exc:
        log.error("policy program %s: %s", settings.program, exc or "no answer in time")
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        return DENY
    if code != 0:
        log.error("policy program %s failed (exit %d): request refused", settings.program, code)
        return DENY
    try:
        return parse_response(raw)
    except ProtocolError as exc:
        log.error("policy program %s gave a malformed answer: %s", settings.program, exc)
        return DENY


async def ask_policy(settings: PolicySettings, query: PolicyQuery) -> PolicyResponse:
    """The policy's answer to ``query``: the daemon, else the program, else DENY."""
    try:
        return await ask_policy_daemon(settings, query)
    except PolicyUnavailable as exc:
        log.warning("%s; falling back to %s", exc, settings.program)
    fallback = PolicyQuery(
        source=query.source,
        intended_target=query.intended_target,
        service_and_arg=query.service_and_arg,
    )
    return await ask_policy_program(settings, fallback)
