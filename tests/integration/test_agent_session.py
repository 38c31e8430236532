"""Agent behaviour around users and sessions: wait-for-session, nogui, test mode."""

from __future__ import annotations

import os

import pytest

from tests.integration.conftest import Domain, QrexecSystem

pytestmark = pytest.mark.timeout(120)

WAIT_FOR_SESSION = """#!/bin/sh
read user
echo "waited for $user from $QREXEC_REMOTE_DOMAIN" >> "{log}"
"""


def test_wait_for_session_runs_first_and_nogui_skips_it(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    log = vm1.root / "session.log"
    vm1.write_service("qubes.WaitForSession", WAIT_FOR_SESSION.format(log=log))
    vm1.write_service("test.Gui", f'#!/bin/sh\necho "service ran" >> "{log}"\necho done\n')
    vm1.write_file("etc/qubes/rpc-config/test.Gui", "wait-for-session = true\n")
    user = qrexec_system.user
    result = qrexec_system.client("vm1", f"{user}:QUBESRPC test.Gui srcvm")
    assert (result.returncode, result.stdout) == (0, b"done\n")
    assert log.read_text() == f"waited for {user} from srcvm\nservice ran\n"
    result = qrexec_system.client("vm1", f"{user}:nogui:QUBESRPC test.Gui srcvm")
    assert result.returncode == 0
    assert log.read_text() == f"waited for {user} from srcvm\nservice ran\nservice ran\n"


def test_unprivileged_agent_runs_calls_only_for_its_own_user(qrexec_system: QrexecSystem) -> None:
    """Upstream's test mode.

    As root, the agent runs in a fresh user namespace with no id mapping, where it is
    ``nobody`` (uid 65534) and has no privileges: exactly an unprivileged agent.
    """
    wrapper: list[str] = []
    agent_user = qrexec_system.user
    if os.geteuid() == 0:
        wrapper, agent_user = ["unshare", "--user"], "nobody"
    dom = qrexec_system.domain("vm1", 1)
    qrexec_system.start_agent("vm1", 1, wrapper=wrapper)
    qrexec_system.start_daemon("vm1", 1)
    qrexec_system.wait_connected(dom)
    own = qrexec_system.client("vm1", f"{agent_user}:id -un; echo $HOME")
    assert (own.returncode, own.stdout) == (
        0,
        f"{agent_user}\n{dom.root}/home/{agent_user}\n".encode(),
    )
    refused = qrexec_system.client("vm1", "root:id -un")
    assert (refused.returncode, refused.stdout) == (125, b"")
    assert "test mode" in qrexec_system.log_text("agent", "vm1")
