"""qrexec-daemon retries a refused or reset policy connection before falling back (issue 12,
item 4): a policy daemon whose backlog overflowed under a flood, or that is restarting,
costs a short wait, not a fork of the policy program."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from qrexec.daemon import policy_query
from qrexec.daemon.policy_query import PolicySettings, PolicyUnavailable, ask_policy_daemon
from qrexec.policy.decision.wire import PolicyQuery, PolicyResponse

QUERY = PolicyQuery(source="vm1", intended_target="vm2", service_and_arg="test.Echo+")
ANSWER = PolicyResponse(result="deny")


@pytest.fixture(autouse=True)
def short_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_query, "RETRY_DELAYS", (0.01, 0.01, 0.01, 0.01))


async def flaky_server(path: Path, resets: int) -> tuple[asyncio.Server, list[int]]:
    """Drops the first ``resets`` connections at once, then answers ANSWER."""
    seen = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        if seen[0] <= resets:
            writer.transport.abort()
            return
        await reader.readuntil(b"\n\n")
        writer.write(ANSWER.encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    return server, seen


def test_reset_connections_are_retried(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"

    async def run() -> tuple[PolicyResponse, int]:
        server, seen = await flaky_server(path, resets=3)
        try:
            answer = await ask_policy_daemon(PolicySettings(str(path), "/bin/false"), QUERY)
        finally:
            server.close()
        return answer, seen[0]

    assert asyncio.run(run()) == (ANSWER, 4)


def test_retries_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"

    async def run() -> int:
        server, seen = await flaky_server(path, resets=100)
        try:
            with pytest.raises(PolicyUnavailable, match="5 attempts"):
                await ask_policy_daemon(PolicySettings(str(path), "/bin/false"), QUERY)
        finally:
            server.close()
        return seen[0]

    assert asyncio.run(run()) == 5


def test_refused_connection_is_retried_then_given_up(tmp_path: Path) -> None:
    """A socket file nobody listens on (a dead daemon's) refuses every attempt."""
    path = tmp_path / "policy.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    try:
        with pytest.raises(PolicyUnavailable, match="5 attempts"):
            asyncio.run(ask_policy_daemon(PolicySettings(str(path), "/bin/false"), QUERY))
    finally:
        stale.close()


def test_missing_socket_falls_back_at_once(tmp_path: Path) -> None:
    settings = PolicySettings(str(tmp_path / "none"), "/bin/false")
    with pytest.raises(PolicyUnavailable, match="No such file"):
        asyncio.run(ask_policy_daemon(settings, QUERY))
