"""An agent that dies mid-call: the client fails fast, the daemon serves the new agent,
and the dead call's data port is free again (spec §4(vi), §3.5)."""

from __future__ import annotations

import signal

import pytest

from tests.integration.conftest import QrexecSystem

pytestmark = pytest.mark.timeout(120)


def test_killed_agent_fails_the_call_and_restart_frees_its_port(
    qrexec_system: QrexecSystem,
) -> None:
    # One data port per VM: a port the dead call kept would refuse every later call.
    vm = qrexec_system.start_vm("vm1", 1, daemon_env={"QREXEC_DAEMON_MAX_CONNECTIONS": "1"})
    client = qrexec_system.popen_client("vm1", f"{qrexec_system.user}:echo started; cat")
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.readline() == b"started\n"
    assert vm.agent_proc is not None
    vm.agent_proc.send_signal(signal.SIGKILL)
    vm.agent_proc.wait(10)
    # The client must notice within 10 s (a generous bound, not a
    # performance assertion).
    code = client.wait(timeout=10)
    assert code != 0
    client.stdin.close()
    client.stdout.close()
    assert client.stderr is not None
    client.stderr.close()

    qrexec_system.start_agent("vm1", 1)
    qrexec_system.wait_connected(vm)
    for attempt in range(3):
        result = qrexec_system.client("vm1", f"{qrexec_system.user}:echo call {attempt}")
        assert (result.returncode, result.stdout) == (0, f"call {attempt}\n".encode())
    assert vm.daemon is not None
    assert "freed 1 port(s)" in qrexec_system.log_text("daemon", "vm1")


def test_daemon_removes_its_sockets_while_the_agent_is_away(qrexec_system: QrexecSystem) -> None:
    vm = qrexec_system.start_vm("vm1", 1)
    socket_path = qrexec_system.daemon_socket(1)
    link = qrexec_system.socket_dir / "qrexec.vm1"
    assert socket_path.exists() and link.is_symlink()
    assert vm.agent is not None
    qrexec_system.stop(vm.agent)
    from qrexec.sim.processes import wait_for

    wait_for(lambda: not socket_path.exists(), 30, what="the daemon socket to go away")
    assert not link.is_symlink()
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:true")
    assert result.returncode == 125
    qrexec_system.start_agent("vm1", 1)
    qrexec_system.wait_connected(vm)
    assert link.is_symlink()
    assert qrexec_system.client("vm1", f"{qrexec_system.user}:true").returncode == 0
