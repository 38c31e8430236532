"""qrexec-daemon's side of spec §6.1: ask the policy daemon, fall back to the policy program.

:func:`query_policy` sends a :class:`~qrexec.policy.decision.wire.PolicyQuery` to the policy socket
and parses the answer (at most 4096 bytes, read to EOF) with the strict rules of
:func:`~qrexec.policy.decision.wire.parse_response`. When the socket is missing or refuses, or its
answer is malformed, it runs the fallback as the C daemon does::

    POLICY_PROGRAM -- SOURCE TARGET SERVICE+ARG

(without ``requested_source``), parses its stdout with the same rules, and counts a
non-zero exit as a failure. Every failure is a deny; the returned :class:`PolicyAnswer`
says which path answered and why, for the caller's log. Timeouts are the caller's: an
``ask`` may legitimately keep the answer waiting for as long as the user takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Final

from qrexec.errors import RemoteProtocolError
from qrexec.policy.decision.socket_service import read_to_eof
from qrexec.policy.decision.wire import (
    DENY,
    MAX_RESPONSE_BYTES,
    PolicyQuery,
    PolicyResponse,
    parse_response,
)

log = logging.getLogger(__name__)

DEFAULT_POLICY_PROGRAM: Final = "/usr/bin/qrexec-policy-exec"


@dataclass(frozen=True, slots=True)
class PolicyAnswer:
    response: PolicyResponse
    via: str  # "socket", "program" or "none"
    problem: str | None = None  # why the answer is a deny by failure, if it is


async def _ask_socket(socket_path: str, query: PolicyQuery) -> PolicyResponse:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        writer.write(query.encode())
        await writer.drain()
        data = await read_to_eof(reader, MAX_RESPONSE_BYTES, "policy response")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return parse_response(data)


async def _ask_program(program: str, query: PolicyQuery) -> tuple[PolicyResponse, str | None]:
    argv = [program, "--", query.source, query.intended_target, query.service_and_arg]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        data = await read_to_eof(proc.stdout, MAX_RESPONSE_BYTES, "policy program output")
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        # qrexec-policy-exec exits 1 on an ordinary deny too; like the C daemon we cannot
        # tell the two apart, so it is logged as a problem and refused either way.
        return DENY, f"{program} exited with {code}"
    return parse_response(data), None


async def query_policy(
    query: PolicyQuery,
    *,
    socket_path: str,
    policy_program: str | None = DEFAULT_POLICY_PROGRAM,
) -> PolicyAnswer:
    """The policy's answer to ``query`` (never raises for policy-side failures)."""
    try:
        return PolicyAnswer(await _ask_socket(socket_path, query), "socket")
    except (OSError, RemoteProtocolError) as exc:
        problem = f"policy socket {socket_path}: {exc}"
    if not policy_program:
        log.warning("%s; no fallback program: denied", problem)
        return PolicyAnswer(DENY, "none", problem)
    log.warning("%s; falling back to %s", problem, policy_program)
    try:
        response, failed = await _ask_program(policy_program, query)
    except (OSError, RemoteProtocolError) as exc:
        return PolicyAnswer(DENY, "program", f"{policy_program}: {exc}")
    return PolicyAnswer(response, "program", failed)
