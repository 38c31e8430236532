"""The daemon's own VM → dom0 path at the byte level (spec §4(iii), §15.1 with ``-w 5``, §15.6).

vm1 is a scripted agent behind our daemon, and also plays qrexec-client-vm: once the
daemon answers SERVICE_CONNECT ``{0, port}``, it listens as vchan server of ``(0, port)``,
sends its HELLO first and reads what dom0 sends. The daemon must behave like R4.3's
child doing ``qrexec-client -d dom0 -c ... -w 5``: prepare (rpc-config,
``qubes.WaitForSession``, start) before connecting, STDERR EOF first, the 127/125
sequences, no QREXEC_AGENT_PID.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

from qrexec.protocol.constants import MsgType
from qrexec.protocol.messages import Data, ExitStatus, Hello, ServiceConnect
from tests.integration.dom0_peers import FakeVmCaller, eof, exit_code, frame, stdin
from tests.integration.fake_agent import RawControl
from tests.integration.test_vmcall_hostile import World, ident, trigger4
from tests.integration.vmcall_support import VmCallSystem, vmcalls

pytestmark = pytest.mark.timeout(120)
__all__ = ["vmcalls"]

HELLO4 = frame(MsgType.HELLO, struct.pack("<I", 4))
ERR_EOF = eof(MsgType.DATA_STDERR)
OUT_EOF = eof(MsgType.DATA_STDOUT)


@pytest.fixture
def world(vmcalls: VmCallSystem) -> World:
    vmcalls.write_policy("test.Dom0 * vm1 @adminvm allow\nqubes.Missing * vm1 dom0 allow\n")
    vmcalls.start_policy_daemon()
    return World(vmcalls)


def dom0_service(world: World, name: str, text: str) -> Path:
    path = world.vmcalls.dom0_root / "etc/qubes-rpc" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def dom0_config(world: World, name: str, text: bytes) -> None:
    path = world.vmcalls.dom0_root / "etc/qubes/rpc-config" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)


def call(
    world: World, control: RawControl, service: bytes, target: bytes = b"@adminvm"
) -> FakeVmCaller:
    """Trigger a call to dom0 and take the data vchan as qrexec-client-vm does."""
    control.send_raw(trigger4(service, target=target, request_id=b"SOCKET3"))
    connect = control.read(30)
    assert isinstance(connect, ServiceConnect), connect
    assert (connect.connect_domain, connect.ident) == (0, ident(b"SOCKET3"))
    vm = FakeVmCaller(world.system.vchan_dir, 1, connect.connect_port)
    vm.accept()
    return vm


def test_executable_environment_and_stderr_eof_first(world: World) -> None:
    dom0_service(
        world,
        "test.Dom0",
        '#!/bin/sh\necho "$1|$QREXEC_REMOTE_DOMAIN|$QREXEC_REQUESTED_TARGET_TYPE'
        '|${QREXEC_REQUESTED_TARGET_KEYWORD-unset}|${QREXEC_AGENT_PID-unset}"\n'
        "echo to-stderr >&2\ncat\nexit 5\n",
    )
    control = world.start_vm1()
    vm = call(world, control, b"test.Dom0+a")
    vm.send(stdin(b"in\n") + stdin(b""))
    raw = vm.read_all()
    assert raw[:20] == HELLO4 + ERR_EOF
    assert vm.messages() == [
        Hello(4),
        Data(MsgType.DATA_STDERR, b""),
        Data(MsgType.DATA_STDOUT, b"a|vm1|keyword|adminvm|unset\nin\n"),
        Data(MsgType.DATA_STDOUT, b""),
        ExitStatus(5),
    ]
    assert "to-stderr" in world.system.log_text("daemon", "vm1")


def test_missing_service_gets_the_127_sequence(world: World) -> None:
    control = world.start_vm1()
    vm = call(world, control, b"qubes.Missing", target=b"dom0")
    assert vm.read_all() == HELLO4 + ERR_EOF + OUT_EOF + exit_code(127)


def test_invalid_rpc_config_gets_the_125_sequence(world: World) -> None:
    dom0_service(world, "test.Dom0", "#!/bin/sh\necho never\n")
    dom0_config(world, "test.Dom0", b"[section]\n")
    control = world.start_vm1()
    vm = call(world, control, b"test.Dom0")
    assert vm.read_all() == HELLO4 + ERR_EOF + OUT_EOF + exit_code(125)


def test_wait_for_session_runs_before_the_service(world: World) -> None:
    """The reversed decision: dom0 runs qubes.WaitForSession for wait-for-session."""
    waiter = dom0_service(
        world,
        "qubes.WaitForSession",
        '#!/bin/sh\nsleep 0.3\necho "$QREXEC_REMOTE_DOMAIN|$#" > "$0.ran"\n',
    )
    dom0_service(world, "test.Dom0", f"#!/bin/sh\ncat {waiter}.ran\n")
    dom0_config(world, "test.Dom0", b"wait-for-session = true\n")
    control = world.start_vm1()
    vm = call(world, control, b"test.Dom0")
    vm.send(stdin(b""))
    vm.read_all()
    assert vm.messages() == [
        Hello(4),
        Data(MsgType.DATA_STDERR, b""),
        Data(MsgType.DATA_STDOUT, b"vm1|0\n"),
        Data(MsgType.DATA_STDOUT, b""),
        ExitStatus(0),
    ]


def test_service_is_started_before_the_vchan_connection(world: World) -> None:
    started = world.vmcalls.base / "started"
    dom0_service(world, "test.Dom0", f"#!/bin/sh\ntouch {started}\necho hi\n")
    control = world.start_vm1()
    control.send_raw(trigger4(b"test.Dom0", target=b"@adminvm", request_id=b"SOCKET3"))
    connect = control.read(30)
    assert isinstance(connect, ServiceConnect)
    for _ in range(200):  # no vchan server exists yet; the daemon waits up to 5 s
        if started.exists():
            break
        threading.Event().wait(0.02)
    assert started.exists()
    vm = FakeVmCaller(world.system.vchan_dir, 1, connect.connect_port)
    vm.accept()
    vm.send(stdin(b""))
    vm.read_all()
    assert vm.messages()[-2:] == [Data(MsgType.DATA_STDOUT, b""), ExitStatus(0)]
