"""VM → VM calls that need qubesd (spec §4(ii) step 6 and 13, §14): a disposable made
for the call and killed after it, and ``autostart`` starting a stopped target.

A small qubesd stand-in speaking the §14 socket format carries the admin calls out on the
test's emulated system (it starts agent and daemon of the domain concerned).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec.sim import processes
from tests.integration.vmcall_support import VmCallSystem, vm_uuid, vmcalls

pytestmark = pytest.mark.timeout(180)
__all__ = ["vmcalls"]

WHERE_SERVICE = """#!/bin/sh
cat
echo "$0"
"""


class FakeQubesd:
    """§14 server: ``METHOD dom0 name|keyword DEST`` NUL payload, answer ``0``/``2`` NUL ..."""

    def __init__(self, vmcalls: VmCallSystem, path: Path) -> None:
        self.vmcalls = vmcalls
        self.calls: list[tuple[str, str, bytes]] = []
        self.killed: list[str] = []
        self.next_disp = 20
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(self.handle(data))

    def _name(self, dest: str) -> str:
        for name, dom in self.vmcalls.vms.items():
            if dest in (name, f"uuid:{vm_uuid(dom.domid)}"):
                return name
        return dest

    def handle(self, data: bytes) -> bytes:
        header, _, payload = data.partition(b"\0")
        method, source, kind, dest = header.decode().split(" ")
        assert (source, kind) == ("dom0", "name")
        self.calls.append((method, dest, payload))
        if method == "admin.vm.Start":
            if dest not in ("vm3", f"uuid:{vm_uuid(3)}"):
                return b"2\0QubesVMNotFoundError\0\0no such domain\0"
            self.vmcalls.start_vm("vm3", 3).write_service("test.Where", WHERE_SERVICE)
            return b"0\0"
        if method == "admin.vm.CreateDisposable":
            assert dest == f"uuid:{vm_uuid(9)}" and payload == b"uuid"
            domid = self.next_disp
            self.next_disp += 1
            name = f"disp{domid}"
            self.vmcalls.start_vm(name, domid).write_service("test.Where", WHERE_SERVICE)
            return f"0\0uuid:{vm_uuid(domid)}".encode()
        if method == "admin.vm.Kill":
            name = self._name(dest)
            dom = self.vmcalls.vms[name]
            processes.stop([r for r in (dom.agent, dom.daemon) if r is not None])
            self.killed.append(name)
            return b"0\0"
        return b"2\0ProtocolError\0\0unknown method\0"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


@pytest.fixture
def qubesd(vmcalls: VmCallSystem) -> Iterator[FakeQubesd]:
    server = FakeQubesd(vmcalls, vmcalls.base / "qubesd.sock")
    try:
        yield server
    finally:
        server.close()


def start(vmcalls: VmCallSystem, policy: str) -> None:
    vmcalls.write_policy(policy)
    vmcalls.start_policy_daemon()
    env = {"QREXEC_QUBESD_SOCKET": str(vmcalls.base / "qubesd.sock")}
    vmcalls.start_vm("vm1", 1, daemon_env=env)
    vmcalls.write_system_info(
        {"vm1": 1},
        {
            "dvmtpl": {"uuid": vm_uuid(9), "template_for_dispvms": True, "power_state": "Halted"},
            "vm3": {"uuid": vm_uuid(3), "power_state": "Halted"},
            "vm1": {"default_dispvm": "dvmtpl"},
        },
    )


def test_dispvm_call_gets_a_fresh_domain_killed_afterwards(
    vmcalls: VmCallSystem, qubesd: FakeQubesd
) -> None:
    start(vmcalls, "test.Where * vm1 @dispvm allow\n")
    result = vmcalls.call("vm1", "@dispvm", "test.Where", input=b"hello disposable\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "hello disposable"
    assert "/disp20/" in lines[1]
    deadline = time.monotonic() + 30
    while not qubesd.killed and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qubesd.killed == ["disp20"]
    assert [c[0] for c in qubesd.calls] == ["admin.vm.CreateDisposable", "admin.vm.Kill"]
    assert qubesd.calls[1][1] == f"uuid:{vm_uuid(20)}"
    (decision,) = vmcalls.audit()
    assert decision["target"] == "@dispvm:dvmtpl"


def test_autostart_starts_a_stopped_target(vmcalls: VmCallSystem, qubesd: FakeQubesd) -> None:
    start(vmcalls, "test.Where * vm1 vm3 allow\n")
    assert "vm3" not in vmcalls.vms
    result = vmcalls.call("vm1", "vm3", "test.Where", input=b"wake up\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[0] == "wake up"
    assert [c[0] for c in qubesd.calls] == ["admin.vm.Start"]
    # Running now: the next call needs no start.
    again = vmcalls.call("vm1", "vm3", "test.Where")
    assert again.returncode == 0
    assert len(qubesd.calls) == 1


def test_autostart_no_refuses_a_stopped_target(vmcalls: VmCallSystem, qubesd: FakeQubesd) -> None:
    start(vmcalls, "test.Where * vm1 vm3 allow autostart=no\n")
    result = vmcalls.call("vm1", "vm3", "test.Where")
    assert result.returncode == 126
    assert qubesd.calls == []
