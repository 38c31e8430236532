"""The agent against a scripted (hostile) dom0 daemon (issue 12, items 2 and 5).

* An EXEC_CMDLINE / JUST_EXEC naming a domain above 32751 or a port above 65535 is
  answered with CONNECTION_TERMINATED for exactly those values, logged, and the control
  connection stays up (no traceback: the value is checked where it is decoded).
* Calls to ports nobody serves are capped per peer domain (256 may wait; more are
  refused at once) and every one of them is cancelled when the control connection is
  lost, so the agent's descriptors come back to where they were.
"""

from __future__ import annotations

import getpass
import os
import time
from pathlib import Path

import pytest

from qrexec.agent.control import MAX_PENDING_PER_DOMAIN
from qrexec.backends.socket import SocketBackend, SocketStream
from qrexec.protocol.constants import VCHAN_CONTROL_PORT, MsgType
from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import (
    ConnectionTerminated,
    Data,
    ExecRequest,
    ExitStatus,
    Hello,
    Message,
    encode,
)
from qrexec.sim import processes
from tests.integration.conftest import Domain, QrexecSystem

pytestmark = pytest.mark.timeout(180)


class FakeDom0:
    """dom0's daemon end of one agent's control vchan, driven by the test."""

    def __init__(self, vchan_dir: Path, domid: int) -> None:
        self.vchan_dir = vchan_dir
        self.backend = SocketBackend(0, vchan_dir)
        self.domid = domid
        self.stream: SocketStream | None = None

    def connect(self, timeout: float = 30) -> None:
        stream = self.backend.connect(self.domid, VCHAN_CONTROL_PORT, timeout=timeout)
        hello = read_message(stream.recv, 2)
        assert isinstance(hello, Hello), hello
        stream.send(encode(Hello(min(hello.version, 3))))
        self.stream = stream

    def send(self, message: Message) -> None:
        assert self.stream is not None
        self.stream.send(encode(message))

    def read(self) -> Message | None:
        assert self.stream is not None
        return read_message(self.stream.recv, 3)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def call(self, port: int, command: str, caller: int = 0) -> tuple[bytes, int]:
        """A whole EXEC_CMDLINE on ``port`` of domain ``caller``: (stdout, exit code)."""
        listener = SocketBackend(caller, self.vchan_dir).listen(self.domid, port)
        try:
            self.send(ExecRequest(MsgType.EXEC_CMDLINE, caller, port, command.encode()))
            data = listener.accept(30)
        finally:
            listener.close()
        try:
            hello = read_message(data.recv, 2)
            assert isinstance(hello, Hello), hello
            data.send(encode(Hello(3)))
            out = b""
            while True:
                message = read_message(data.recv, 3)
                if isinstance(message, Data) and message.msg_type is MsgType.DATA_STDOUT:
                    out += message.data
                elif isinstance(message, ExitStatus):
                    return out, message.code
                elif message is None:
                    raise AssertionError("data vchan closed without an exit code")
        finally:
            data.close()


@pytest.fixture
def agent_vm(qrexec_system: QrexecSystem) -> Domain:
    qrexec_system.start_agent("vm1", 1)
    return qrexec_system.domains["vm1"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for_fds(pid: int, at_most: int) -> int:
    count = fd_count(pid)
    deadline = time.monotonic() + 20
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = fd_count(pid)
    return count


@pytest.mark.parametrize("kind", [MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC])
@pytest.mark.parametrize(
    ("domain", "port"), [(32752, 600), (0xFFFFFFFF, 600), (0, 65536), (0, 0xFFFFFFFF)]
)
def test_out_of_range_exec_is_terminated_and_the_connection_stays(
    qrexec_system: QrexecSystem, agent_vm: Domain, kind: MsgType, domain: int, port: int
) -> None:
    dom0 = FakeDom0(qrexec_system.vchan_dir, 1)
    dom0.connect()
    dom0.send(ExecRequest(kind, domain, port, f"{getpass.getuser()}:true".encode()))
    assert dom0.read() == ConnectionTerminated(domain, port)
    # Same connection: a real call still works.
    assert dom0.call(600, f"{getpass.getuser()}:echo alive") == (b"alive\n", 0)
    assert dom0.read() == ConnectionTerminated(0, 600)
    dom0.close()
    log = qrexec_system.log_text("agent", "vm1")
    assert "Traceback" not in log
    assert "is outside" in log


def test_unserved_ports_are_capped_and_cancelled_with_the_control_channel(
    qrexec_system: QrexecSystem, agent_vm: Domain
) -> None:
    assert agent_vm.agent is not None
    pid = agent_vm.agent.pid
    dom0 = FakeDom0(qrexec_system.vchan_dir, 1)
    dom0.connect()
    # A served call first: the baseline includes whatever one call leaves allocated.
    assert dom0.call(600, f"{getpass.getuser()}:echo one") == (b"one\n", 0)
    assert dom0.read() == ConnectionTerminated(0, 600)
    baseline = fd_count(pid)
    extra = 20
    ports = range(1000, 1000 + MAX_PENDING_PER_DOMAIN + extra)
    for port in ports:
        dom0.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, port, f"{getpass.getuser()}:true".encode()))
    # The calls beyond the cap are refused at once, the first 256 keep waiting.
    refused = [dom0.read() for _ in range(extra)]
    assert refused == [ConnectionTerminated(0, p) for p in ports[-extra:]]
    # Another domain's calls are not affected by domain 0's pile.
    assert dom0.call(601, f"{getpass.getuser()}:echo two", caller=3) == (b"two\n", 0)
    assert dom0.read() == ConnectionTerminated(3, 601)
    dom0.close()
    after = wait_for_fds(pid, baseline + 2)
    assert after <= baseline + 2, (baseline, after)
    processes.wait_for(
        lambda: "cancelled" in qrexec_system.log_text("agent", "vm1"),
        20,
        what="the agent's cancellation log line",
    )
    log = qrexec_system.log_text("agent", "vm1")
    assert f"cancelled {MAX_PENDING_PER_DOMAIN} call(s)" in log
    assert log.count("already wait for their data vchan") == 1  # rate-limited
    assert "Traceback" not in log
    # The agent serves the next connection normally.
    dom0.connect()
    assert dom0.call(602, f"{getpass.getuser()}:echo three") == (b"three\n", 0)
    dom0.close()
