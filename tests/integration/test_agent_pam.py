"""A root agent's calls through a PAM service (spec §7); needs root (marker ``root``).

Each test writes a throwaway service file ``/etc/pam.d/qrexec-test-<random>`` (removed
afterwards) and points the agent at it with ``QREXEC_PAM_SERVICE``. ``pam_exec`` appends
``PAM_TYPE PAM_USER PAM_SERVICE`` to a marker file at session open and close, which shows
the session belonged to the right user and ended with the call.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import QrexecSystem
from tests.integration.test_agent_users import account, open_system

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
__all__ = ["account", "open_system"]  # fixtures shared with the plain-switch tests

PAM_DIR = Path("/etc/pam.d")
ALLOW = "auth sufficient pam_permit.so\naccount sufficient pam_permit.so\n"

WriteService = Callable[[str], str]


@pytest.fixture
def pam_service() -> Iterator[WriteService]:
    """Writes throwaway PAM service files; returns their names; removes them at the end."""
    written: list[Path] = []

    def write(text: str) -> str:
        name = "qrexec-test-" + secrets.token_hex(6)
        path = PAM_DIR / name
        path.write_text(text)
        written.append(path)
        return name

    try:
        yield write
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@pytest.fixture
def marker(open_system: QrexecSystem) -> tuple[Path, str]:
    """A marker file and the PAM session line that appends to it."""
    log = open_system.base / "pam-marker"
    script = open_system.base / "pam-marker.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER $PAM_SERVICE" >> {log}\n')
    script.chmod(0o755)
    return log, f"session required pam_exec.so quiet {script}\n"


def start_vm_with_pam(system: QrexecSystem, service: str) -> None:
    system.start_vm("vm1", 1, agent_env={"QREXEC_PAM_SERVICE": service})


def test_calls_run_in_a_pam_session_of_the_user(
    open_system: QrexecSystem,
    account: str,
    pam_service: WriteService,
    marker: tuple[Path, str],
) -> None:
    marker_log, session_line = marker
    env_conf = open_system.base / "pam_env.conf"
    env_conf.write_text("QRX_PAM_MARK DEFAULT=from-pam\nHOME OVERRIDE=/nonexistent-pam-home\n")
    service = pam_service(
        ALLOW
        + f"session required pam_env.so readenv=0 user_readenv=0 conffile={env_conf}\n"
        + session_line
    )
    start_vm_with_pam(open_system, service)
    vm = open_system.domains["vm1"]
    result = open_system.client(
        "vm1",
        f"{account}:id -un; id -Gn; echo $HOME; pwd; echo $QRX_PAM_MARK $USER; cat; exit 7",
        input=b"stdin line\n",
    )
    assert result.returncode == 7, result.stderr
    name, groups, home, cwd, variables, stdin = result.stdout.decode().splitlines()
    assert name == account
    assert f"{account}g" in groups.split()
    # HOME stays under the emulated domain's root although pam_env overrides it.
    assert home == cwd == str(vm.root / "home" / account)
    assert variables == f"from-pam {account}"
    assert stdin == "stdin line"
    assert marker_log.read_text() == (
        f"open_session {account} {service}\nclose_session {account} {service}\n"
    )

    # The helper (Python) ignores SIGPIPE; the call's process must not inherit that.
    piped = open_system.client("vm1", f"{account}:yes | head -n 1")
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, b"y\n", b"")

    vm.write_service("test.PamEnv", '#!/bin/sh\necho "$QRX_PAM_MARK $QREXEC_REMOTE_DOMAIN $1"\n')
    rpc = open_system.client("vm1", f"{account}:QUBESRPC test.PamEnv+arg src")
    assert (rpc.returncode, rpc.stdout) == (0, b"from-pam src arg\n")
    assert marker_log.read_text().count(f"close_session {account} {service}\n") == 3


def test_a_refusing_pam_service_fails_the_call_with_125(
    open_system: QrexecSystem,
    account: str,
    pam_service: WriteService,
    marker: tuple[Path, str],
) -> None:
    marker_log, session_line = marker
    service = pam_service("auth requisite pam_deny.so\n" + session_line)
    start_vm_with_pam(open_system, service)
    touched = open_system.base / "ran"
    for options in ((), ("-e",)):
        result = open_system.client("vm1", f"{account}:touch {touched}", *options)
        assert result.returncode == 125, result.stderr
    assert not touched.exists()
    assert not marker_log.exists()
    agent_log = open_system.log_text("agent", "vm1")
    assert "pam_authenticate: Authentication failure" in agent_log
    assert service in agent_log
    # A root call goes through PAM too; the agent keeps serving and reads the file anew.
    assert open_system.client("vm1", "root:true").returncode == 125
    (PAM_DIR / service).write_text(ALLOW)
    allowed = open_system.client("vm1", f"{account}:id -un")
    assert (allowed.returncode, allowed.stdout) == (0, f"{account}\n".encode())


def test_a_refused_session_fails_with_125_and_names_the_step(
    open_system: QrexecSystem, account: str, pam_service: WriteService
) -> None:
    service = pam_service(ALLOW + "session requisite pam_deny.so\n")
    start_vm_with_pam(open_system, service)
    result = open_system.client("vm1", f"{account}:echo ran")
    assert (result.returncode, result.stdout) == (125, b"")
    assert "pam_open_session" in open_system.log_text("agent", "vm1")


def test_an_unrunnable_shell_fails_with_125_and_still_closes_the_session(
    open_system: QrexecSystem, pam_service: WriteService, marker: tuple[Path, str]
) -> None:
    marker_log, session_line = marker
    name = "qrx" + secrets.token_hex(4)
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/nonexistent/shell", name], check=True
    )
    try:
        service = pam_service(ALLOW + session_line)
        start_vm_with_pam(open_system, service)
        result = open_system.client("vm1", f"{name}:echo ran")
        assert (result.returncode, result.stdout) == (125, b"")
        assert "/nonexistent/shell" in open_system.log_text("agent", "vm1")
        assert marker_log.read_text() == (
            f"open_session {name} {service}\nclose_session {name} {service}\n"
        )
    finally:
        subprocess.run(["userdel", name], check=False)


def test_without_the_service_file_the_plain_switch_still_works(
    open_system: QrexecSystem, account: str
) -> None:
    missing = "qrexec-test-missing-" + secrets.token_hex(6)
    assert not (PAM_DIR / missing).exists()
    start_vm_with_pam(open_system, missing)
    result = open_system.client("vm1", f"{account}:id -un; echo $HOME")
    vm_home = open_system.domains["vm1"].root / "home" / account
    assert result.stdout == f"{account}\n{vm_home}\n".encode(), result.stderr
    assert os.stat(vm_home).st_uid != 0


def test_a_debian_style_service_applies_session_limits_to_the_call_only(
    open_system: QrexecSystem, account: str, pam_service: WriteService
) -> None:
    """pam_rootok, pam_limits and the system's non-interactive session stack, as a VM's
    /etc/pam.d/qrexec would have them; the limit reaches the call, not the agent."""
    limits = open_system.base / "limits.conf"
    limits.write_text(f"{account} hard nofile 123\n")
    service = pam_service(
        "auth sufficient pam_rootok.so\n"
        f"session required pam_limits.so conf={limits}\n"
        "@include common-session-noninteractive\n"
    )
    start_vm_with_pam(open_system, service)
    result = open_system.client("vm1", f"{account}:id -un; ulimit -Hn")
    assert (result.returncode, result.stdout) == (0, f"{account}\n123\n".encode()), result.stderr
    root_call = open_system.client("vm1", "root:ulimit -Hn")
    assert root_call.returncode == 0
    assert root_call.stdout != b"123\n"
