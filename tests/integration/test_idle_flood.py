"""1,100 silent connections on the trigger socket and on the policy socket, with the
agent's and the policy daemon's RLIMIT_NOFILE at 1024, do not stop a legitimate call
(issue 12, "Done when"). The idle-read timeouts are set far above this test's own
timeout, so only the idle cap (oldest silent connection dropped first) can let the call
through; the logs say so in at most 5 lines each."""

from __future__ import annotations

import resource
import socket
import sys
from collections.abc import Iterator

import pytest

from tests.integration.vmcall_support import SERVICE_ECHO_ENV, VmCallSystem, vmcalls

pytestmark = pytest.mark.timeout(240)
__all__ = ["vmcalls"]

IDLE_CONNECTIONS = 1100
#: Runs the rest of the command line with RLIMIT_NOFILE 1024 (soft and hard).
NOFILE_1024 = [
    sys.executable,
    "-c",
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]
#: Far above the test's timeout: a silent connection is never timed out during the test.
NEVER = "36000"


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """This test process holds 2 x 1,100 client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * IDLE_CONNECTIONS + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {wanted}: cannot run the flood")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood(path: str) -> list[socket.socket]:
    held = []
    for _ in range(IDLE_CONNECTIONS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(path)
        held.append(sock)
    return held


def about_the_flood(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if " WARNING" in line or " ERROR" in line or "Traceback" in line or "resource" in line
    ]


def test_legitimate_call_through_idle_floods(vmcalls: VmCallSystem, enough_fds: None) -> None:
    vmcalls.write_policy("test.Env * vm1 vm2 allow\n")
    vmcalls.start_policy_daemon(wrapper=NOFILE_1024, env={"QREXEC_POLICY_QUERY_TIMEOUT": NEVER})
    vmcalls.start_vm(
        "vm1",
        1,
        agent_env={"QREXEC_AGENT_TRIGGER_TIMEOUT": NEVER},
        agent_wrapper=NOFILE_1024,
    )
    vmcalls.start_vm("vm2", 2)
    vmcalls.vms["vm2"].write_service("test.Env", SERVICE_ECHO_ENV)
    held = flood(str(vmcalls.agent_socket("vm1"))) + flood(str(vmcalls.policy_socket))
    try:
        result = vmcalls.call("vm1", "vm2", "test.Env+x", timeout=120)
        # The echo service exits 3 on purpose.
        assert result.returncode == 3, result.stderr
        assert result.stdout.decode().splitlines()[:2] == ["arg=x", "remote=vm1"]
    finally:
        for sock in held:
            sock.close()
    # Once the flood has gone, calls go on, and its leaving is not logged per client.
    again = vmcalls.call("vm1", "vm2", "test.Env+y", timeout=120)
    assert again.returncode == 3, again.stderr
    agent_lines = about_the_flood(vmcalls.system.log_text("agent", "vm1"))
    policy_lines = about_the_flood(vmcalls.system.log_text("policy", "dom0"))
    assert len(agent_lines) <= 5, agent_lines
    assert len(policy_lines) <= 5, policy_lines
    assert any("dropping the oldest" in line for line in agent_lines), agent_lines
    assert any("dropping the oldest" in line for line in policy_lines), policy_lines
