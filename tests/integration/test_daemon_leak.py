"""A VM cannot make its daemon hold descriptors or memory (issue 12, item 1).

The attack: ask for a dom0 service that policy allows, let the daemon's data vchan
connect, never send HELLO, then drop and reconnect the control channel; repeat. Before
the fix every such call stayed in the daemon (an fd and its buffers each) forever. Now a
lost control channel cancels every call still in its handshake, and the HELLO itself has
a deadline. The deadline is set far above this test's time in the first test, so only the
cancellation can bring the daemon back to its baseline.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import pytest

from qrexec.backends.socket import SocketBackend, SocketStream
from qrexec.protocol.constants import MsgType
from qrexec.protocol.messages import ServiceConnect
from qrexec.sim import processes
from tests.integration.fake_agent import FakeAgent, RawControl
from tests.integration.vmcall_support import VmCallSystem, vm_uuid, vmcalls

pytestmark = pytest.mark.timeout(240)
__all__ = ["vmcalls"]

#: Triggers per cycle and cycles: 3 x 96 leaked fds before the fix.
CALLS_PER_CYCLE = 96
CYCLES = 3
#: Growth allowed after the cycles: a few descriptors (log reopen, a policy socket in
#: flight) and a few MiB of allocator slack.
FD_BOUND = 8
RSS_BOUND_KIB = 12 * 1024


def trigger4(request_id: bytes, service: bytes = b"fuzz.Allow0", target: bytes = b"dom0") -> bytes:
    payload = b"\0" * 64 + target.ljust(64, b"\0") + request_id.ljust(32, b"\0") + service + b"\0"
    return struct.pack("<II", MsgType.TRIGGER_SERVICE4, len(payload)) + payload


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    value = processes.status_kib(pid, "VmRSS")
    assert value is not None
    return value


class HostileVm:
    """Domain 1: a scripted agent in front of a real daemon, policy allowing fuzz.Allow0."""

    def __init__(self, vmcalls: VmCallSystem, daemon_env: dict[str, str]) -> None:
        system = vmcalls.system
        vmcalls.vms["vm1"] = system.domain("vm1", 1)
        vmcalls.write_system_info({"vm1": 1})
        env = vmcalls.dom0_env()
        env.update(daemon_env)
        self.record = system.start_daemon(
            "vm1", 1, env, args=["-u", vm_uuid(1), "-p", "/bin/false"]
        )
        self.fake = FakeAgent(system.vchan_dir, 1)
        self.data = SocketBackend(1, system.vchan_dir)
        self.held: list[SocketStream] = []

    @property
    def pid(self) -> int:
        return self.record.pid

    def connect(self) -> RawControl:
        control = self.fake.accept(30)
        control.hello(4)
        return control

    def silent_calls(self, control: RawControl, count: int) -> None:
        """``count`` allowed dom0 calls whose data vchan connects but never says HELLO."""
        for i in range(count):
            control.send_raw(trigger4(f"SOCKET{i}".encode()))
        # Listen on every port first, then accept: the daemon gives each vchan 5 s.
        listeners = []
        for _ in range(count):
            reply = control.read(60)
            assert isinstance(reply, ServiceConnect), reply
            assert reply.connect_domain == 0
            listeners.append(self.data.listen(0, reply.connect_port))
        for listener in listeners:
            try:
                self.held.append(listener.accept(30))
            finally:
                listener.close()

    def close_data(self) -> None:
        for stream in self.held:
            stream.close()
        self.held.clear()


@pytest.fixture
def hostile(vmcalls: VmCallSystem) -> Iterator[VmCallSystem]:
    vmcalls.write_policy("fuzz.Allow0 * vm1 dom0 allow\n")
    vmcalls.write_dom0_service("fuzz.Allow0", "#!/bin/sh\necho hi\n")
    vmcalls.start_policy_daemon()
    yield vmcalls


def wait_for_fds(pid: int, at_most: int) -> int:
    """The daemon's fd count once it is at most ``at_most`` (or the last one seen)."""
    count = fd_count(pid)
    deadline = time.monotonic() + 20
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = fd_count(pid)
    return count


def test_lost_control_channel_releases_silent_dom0_calls(hostile: VmCallSystem) -> None:
    vm = HostileVm(hostile, {"QREXEC_DAEMON_HANDSHAKE_TIMEOUT": "3600"})
    control = vm.connect()
    processes.wait_for(
        hostile.system.daemon_socket(1).exists, 30, watch=[vm.record], what="the daemon socket"
    )
    idle_fds = fd_count(vm.pid)
    # One warm-up cycle: the allocator's high-water mark (a freed 256 KiB receive buffer
    # is kept in the heap for reuse) is the baseline of RSS, not a leak.
    vm.silent_calls(control, CALLS_PER_CYCLE)
    control.close()
    control = vm.connect()
    base_fds = wait_for_fds(vm.pid, idle_fds + FD_BOUND)
    base_rss = rss_kib(vm.pid)
    for _ in range(CYCLES):
        vm.silent_calls(control, CALLS_PER_CYCLE)
        # The calls sit in their handshake: each holds a data vchan in the daemon.
        assert fd_count(vm.pid) >= base_fds + CALLS_PER_CYCLE
        control.close()
        control = vm.connect()
    fds = wait_for_fds(vm.pid, base_fds + FD_BOUND)
    rss = rss_kib(vm.pid)
    vm.close_data()
    assert base_fds <= idle_fds + FD_BOUND, (idle_fds, base_fds)
    assert fds <= base_fds + FD_BOUND, (base_fds, fds)
    assert rss <= base_rss + RSS_BOUND_KIB, (base_rss, rss)
    log = hostile.system.log_text("daemon", "vm1")
    assert "Traceback" not in log
    assert "cancelled" in log


def test_silent_hello_on_a_dom0_call_times_out(hostile: VmCallSystem) -> None:
    """Without any reconnect, the HELLO deadline alone frees a silent call."""
    vm = HostileVm(hostile, {"QREXEC_DAEMON_HANDSHAKE_TIMEOUT": "1"})
    control = vm.connect()
    processes.wait_for(
        hostile.system.daemon_socket(1).exists, 30, watch=[vm.record], what="the daemon socket"
    )
    base_fds = fd_count(vm.pid)
    vm.silent_calls(control, 8)
    fds = wait_for_fds(vm.pid, base_fds + 1)
    vm.close_data()
    assert fds <= base_fds + 1, (base_fds, fds)
    assert "sent no HELLO on data port" in hostile.system.log_text("daemon", "vm1")
    control.close()
