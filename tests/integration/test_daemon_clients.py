"""The daemon's client socket (spec §5) seen from raw clients and a scripted agent."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import (
    ConnectionTerminated,
    ExecParams,
    ExecRequest,
    Hello,
    Message,
    ServiceConnect,
    encode,
)
from tests.integration.conftest import QrexecSystem
from tests.integration.fake_agent import FakeAgent, RawControl

pytestmark = pytest.mark.timeout(120)


class RawClient:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))

    def read(self) -> Message | None:
        return read_message(self.sock.recv, 3)

    def send(self, message: Message) -> None:
        self.sock.sendall(encode(message))

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted(qrexec_system: QrexecSystem) -> Iterator[tuple[RawControl, Path]]:
    """A daemon for domain 5 ("vm5", default user "alice") served by a scripted agent."""
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    qrexec_system.start_daemon("vm5", 5, default_user="alice")
    control = agent.accept()
    assert control.hello(4) == 4
    path = qrexec_system.daemon_socket(5)
    from qrexec.sim.processes import wait_for

    wait_for(path.exists, 30, what="the daemon socket")
    yield control, path
    control.close()


def test_exec_gets_a_port_and_reaches_the_agent_with_default_user(
    scripted: tuple[RawControl, Path],
) -> None:
    control, path = scripted
    client = RawClient(path)
    assert client.read() == Hello(3)
    client.send(Hello(3))
    client.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"DEFAULT:QUBESRPC a.b+c src"))
    assert client.read() == ExecParams(MsgType.EXEC_CMDLINE, 5, 513)
    forwarded = control.read(10)
    assert forwarded == ExecRequest(MsgType.EXEC_CMDLINE, 0, 513, b"alice:QUBESRPC a.b+c src")
    # The client is held until the agent reports the end of (0, 513)...
    second = RawClient(path)
    second.read()
    second.send(Hello(4))
    second.send(ExecRequest(MsgType.JUST_EXEC, 0, 0, b"bob:true"))
    assert second.read() == ExecParams(MsgType.JUST_EXEC, 5, 514)
    assert control.read(10) == ExecRequest(MsgType.JUST_EXEC, 0, 514, b"bob:true")
    # ...a mismatched pair releases nothing...
    control.send(ConnectionTerminated(7, 513))
    control.send(ConnectionTerminated(0, 514))
    assert second.closed()
    client.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        client.sock.recv(1)
    client.sock.settimeout(20)
    control.send(ConnectionTerminated(0, 513))
    assert client.closed()
    # ...and the freed port is handed out again.
    third = RawClient(path)
    third.read()
    third.send(Hello(3))
    third.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:x"))
    assert third.read() == ExecParams(MsgType.EXEC_CMDLINE, 5, 513)


def test_client_with_its_own_port_gets_no_reply(scripted: tuple[RawControl, Path]) -> None:
    control, path = scripted
    client = RawClient(path)
    client.read()
    client.send(Hello(3))
    client.send(ExecRequest(MsgType.EXEC_CMDLINE, 9, 600, b"u:QUBESRPC x+ vm9"))
    assert control.read(10) == ExecRequest(MsgType.EXEC_CMDLINE, 9, 600, b"u:QUBESRPC x+ vm9")
    control.send(ConnectionTerminated(9, 600))
    assert client.closed()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(encode(Hello(2)), id="hello-below-3"),
        pytest.param(encode(Hello(3)) + b"\x00\x09\x00\x00\x00\x00\x00\x00", id="unknown-type"),
        pytest.param(
            encode(Hello(3)) + encode(ConnectionTerminated(0, 513)), id="out-of-place-type"
        ),
        pytest.param(
            encode(Hello(3)) + encode(ExecRequest(MsgType.EXEC_CMDLINE, 0, 5, b"u:true")),
            id="port-out-of-range",
        ),
        pytest.param(
            encode(Hello(3)) + encode(ServiceConnect(0, 0, b"SOCKET5")), id="connect-not-pending"
        ),
        pytest.param(
            encode(Hello(3)) + encode(ServiceConnect(0, 0, b"SOCK\x01")), id="connect-bad-ident"
        ),
        pytest.param(encode(Hello(3)) + b"\x00\x02\x00\x00\x00\x00\x01\x00", id="cmdline-over-cap"),
        pytest.param(
            encode(Hello(3)) + encode(ExecParams(MsgType.EXEC_CMDLINE, 0, 0)), id="no-cmdline"
        ),
    ],
)
def test_bad_clients_are_dropped_and_nothing_reaches_the_agent(
    scripted: tuple[RawControl, Path], bad: bytes
) -> None:
    control, path = scripted
    client = RawClient(path)
    client.read()
    client.sock.sendall(bad)
    assert client.closed()
    with pytest.raises(TimeoutError):
        control.read(0.5)
    good = RawClient(path)
    good.read()
    good.send(Hello(3))
    good.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:ok"))
    assert good.read() == ExecParams(MsgType.EXEC_CMDLINE, 5, 513)
    assert control.read(10) == ExecRequest(MsgType.EXEC_CMDLINE, 0, 513, b"u:ok")


def test_unexpected_bytes_after_the_request_drop_the_client(
    scripted: tuple[RawControl, Path],
) -> None:
    _control, path = scripted
    client = RawClient(path)
    client.read()
    client.send(Hello(3))
    client.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:x"))
    assert client.read() == ExecParams(MsgType.EXEC_CMDLINE, 5, 513)
    client.sock.sendall(b"junk")
    assert client.closed()


def test_client_count_limit(qrexec_system: QrexecSystem) -> None:
    """``max_clients`` bounds clients holding a request; a slot freed is reused."""
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    qrexec_system.start_daemon("vm5", 5, env={"QREXEC_DAEMON_MAX_CLIENTS": "2"})
    control = agent.accept()
    control.hello()
    from qrexec.sim.processes import wait_for

    path = qrexec_system.daemon_socket(5)
    wait_for(path.exists, 30, what="the daemon socket")

    def holding_client() -> RawClient:
        client = RawClient(path)
        assert client.read() == Hello(3)
        client.send(Hello(3))
        client.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:x"))
        reply = client.read()
        assert isinstance(reply, ExecParams)
        return client

    held = [holding_client(), holding_client()]
    refused = RawClient(path)
    assert refused.read() == Hello(3)
    refused.send(Hello(3))
    refused.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:x"))
    assert refused.closed()
    held[0].close()
    for _ in range(100):
        try:
            retry = holding_client()
        except (AssertionError, ConnectionError, OSError):
            continue
        retry.close()
        break
    else:
        pytest.fail("a slot freed by a leaving client was never reused")


def test_idle_clients_oldest_dropped(qrexec_system: QrexecSystem) -> None:
    """Clients that never send their request are capped: the oldest makes room."""
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    qrexec_system.start_daemon("vm5", 5, env={"QREXEC_DAEMON_MAX_CLIENTS": "2"})
    control = agent.accept()
    control.hello()
    from qrexec.sim.processes import wait_for

    path = qrexec_system.daemon_socket(5)
    wait_for(path.exists, 30, what="the daemon socket")
    idle = [RawClient(path), RawClient(path)]
    for client in idle:
        assert client.read() == Hello(3)
    newcomer = RawClient(path)
    assert newcomer.read() == Hello(3)
    assert idle[0].closed()
    newcomer.send(Hello(3))
    newcomer.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:x"))
    assert isinstance(newcomer.read(), ExecParams)


def test_buffered_bytes_limit(qrexec_system: QrexecSystem) -> None:
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    qrexec_system.start_daemon("vm5", 5, env={"QREXEC_DAEMON_MAX_BUFFERED": "1000"})
    control = agent.accept()
    control.hello()
    from qrexec.sim.processes import wait_for

    path = qrexec_system.daemon_socket(5)
    wait_for(path.exists, 30, what="the daemon socket")
    big = RawClient(path)
    big.read()
    big.send(Hello(3))
    big.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:" + b"x" * 2000))
    assert big.closed()
    small = RawClient(path)
    small.read()
    small.send(Hello(3))
    small.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:" + b"x" * 100))
    assert small.read() == ExecParams(MsgType.EXEC_CMDLINE, 5, 513)


def test_no_free_port_is_a_clean_refusal(qrexec_system: QrexecSystem) -> None:
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    qrexec_system.start_daemon("vm5", 5, env={"QREXEC_DAEMON_MAX_CONNECTIONS": "1"})
    control = agent.accept()
    control.hello()
    from qrexec.sim.processes import wait_for

    path = qrexec_system.daemon_socket(5)
    wait_for(path.exists, 30, what="the daemon socket")
    first = RawClient(path)
    first.read()
    first.send(Hello(3))
    first.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:a"))
    assert first.read() == ExecParams(MsgType.EXEC_CMDLINE, 5, 513)
    second = RawClient(path)
    second.read()
    second.send(Hello(3))
    second.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 0, b"u:b"))
    assert second.closed()
    assert "no free data port" in qrexec_system.log_text("daemon", "vm5")


def daemon_argv(system: QrexecSystem, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qrexec.daemon.cli",
        "--socket-dir",
        str(system.socket_dir),
        *extra,
        "7",
        "vm7",
    ]


def test_daemonized_parent_exits_3_when_the_agent_never_comes(
    qrexec_system: QrexecSystem,
) -> None:
    env = qrexec_system.env(
        0, {"QREXEC_STARTUP_TIMEOUT": "1", "QREXEC_LOG_DIR": str(qrexec_system.logs)}
    )
    result = subprocess.run(daemon_argv(qrexec_system), env=env, timeout=60, check=False)
    assert result.returncode == 3


def test_daemonized_parent_exits_0_once_connected(qrexec_system: QrexecSystem) -> None:
    qrexec_system.start_agent("vm7", 7)
    env = qrexec_system.env(0, {"QREXEC_LOG_DIR": str(qrexec_system.logs)})
    argv = daemon_argv(qrexec_system, "-q")
    result = subprocess.run(argv, env=env, timeout=60, check=False)
    # The background child is ours: the only process running exactly this argv (the
    # socket folder in it is this test's own temporary folder). Stop it by pid, also when
    # a check below fails.
    child = find_process_by_argv(argv)
    try:
        assert result.returncode == 0
        assert qrexec_system.daemon_socket(7).exists()
        call = qrexec_system.client("vm7", f"{qrexec_system.user}:echo daemonized")
        assert call.stdout == b"daemonized\n"
        assert (qrexec_system.logs / "qrexec.vm7.log").exists()
    finally:
        os.kill(child, signal.SIGTERM)


def find_process_by_argv(argv: list[str]) -> int:
    wanted = "\0".join(argv).encode() + b"\0"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == wanted:
                return int(pid)
        except OSError:
            continue
    raise AssertionError("the daemonized qrexec-daemon is not running")


def test_startup_nowait_parent_returns_at_once(qrexec_system: QrexecSystem) -> None:
    env = qrexec_system.env(
        0, {"QREXEC_STARTUP_NOWAIT": "1", "QREXEC_LOG_DIR": str(qrexec_system.logs)}
    )
    argv = daemon_argv(qrexec_system)
    result = subprocess.run(argv, env=env, timeout=60, check=False)
    child = find_process_by_argv(argv)
    try:
        assert result.returncode == 0
        assert not qrexec_system.daemon_socket(7).exists()
        # The background daemon is still waiting for its agent, and serves it once it comes.
        qrexec_system.start_agent("vm7", 7)
        qrexec_system.wait_connected(qrexec_system.domains["vm7"])
        call = qrexec_system.client("vm7", f"{qrexec_system.user}:echo late agent")
        assert call.stdout == b"late agent\n"
    finally:
        os.kill(child, signal.SIGTERM)
