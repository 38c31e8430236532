"""qrexec-client to dom0 itself: services run locally, no vchan (spec §8, §4(iii))."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qrexec.daemon.clients import bind_unix
from tests.integration.conftest import QrexecSystem

pytestmark = pytest.mark.timeout(60)


def dom0_client(
    system: QrexecSystem, services: Path, cmdline: str, stdin: bytes = b"", dest: str = "dom0"
) -> subprocess.CompletedProcess[bytes]:
    return system.run(
        [sys.executable, "-m", "qrexec.client.cli", "-d", dest, cmdline],
        system.env(0, {"QREXEC_SERVICE_PATH": str(services)}),
        input=stdin,
        timeout=30,
    )


@pytest.fixture
def services(tmp_path: Path) -> Path:
    folder = tmp_path / "dom0-rpc"
    folder.mkdir()
    return folder


def test_local_service_environment_stdio_and_exit_code(
    qrexec_system: QrexecSystem, services: Path
) -> None:
    service = services / "test.Dom0"
    service.write_text(
        '#!/bin/sh\ncat\necho "$1|$QREXEC_REMOTE_DOMAIN|$QREXEC_REQUESTED_TARGET_TYPE'
        '|${QREXEC_REQUESTED_TARGET-unset}|${QREXEC_REQUESTED_TARGET_KEYWORD-unset}"\nexit 4\n'
    )
    service.chmod(0o755)
    by_name = dom0_client(
        qrexec_system, services, "DEFAULT:QUBESRPC test.Dom0+a vm1 name dom0", b"in\n"
    )
    assert (by_name.returncode, by_name.stdout) == (4, b"in\na|vm1|name|dom0|unset\n")
    by_keyword = dom0_client(
        qrexec_system, services, "DEFAULT:QUBESRPC test.Dom0 vm1 keyword adminvm", dest="@adminvm"
    )
    assert by_keyword.stdout == b"|vm1|keyword|unset|adminvm\n"


def test_local_service_errors(qrexec_system: QrexecSystem, services: Path) -> None:
    missing = dom0_client(qrexec_system, services, "DEFAULT:QUBESRPC no.Such vm1")
    assert missing.returncode == 127
    assert missing.stderr.startswith(b"qrexec-client: service 'no.Such' not found")
    not_default = dom0_client(qrexec_system, services, "root:QUBESRPC no.Such vm1")
    assert not_default.returncode == 125
    shell = dom0_client(qrexec_system, services, "DEFAULT:echo not a service")
    assert (shell.returncode, shell.stdout) == (125, b"")
    # Nothing was exec'd: the code stands under -E, as in R4.3.
    for option_cmdline, code in (("DEFAULT:QUBESRPC no.Such vm1", 127), ("root:x", 125)):
        result = qrexec_system.run(
            [sys.executable, "-m", "qrexec.client.cli", "-E", "-d", "dom0", option_cmdline],
            qrexec_system.env(0, {"QREXEC_SERVICE_PATH": str(services)}),
            timeout=30,
        )
        assert result.returncode == code, option_cmdline


def test_service_is_execd_in_place(qrexec_system: QrexecSystem, services: Path) -> None:
    """Spec §15.7: the service replaces qrexec-client (same pid); no QREXEC_AGENT_PID."""
    service = services / "test.Pid"
    service.write_text('#!/bin/sh\necho "$$|${QREXEC_AGENT_PID-unset}"\nexit 6\n')
    service.chmod(0o755)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qrexec.client.cli",
            "-E",
            "-d",
            "dom0",
            "DEFAULT:QUBESRPC test.Pid vm1",
        ],
        stdout=subprocess.PIPE,
        env=qrexec_system.env(0, {"QREXEC_SERVICE_PATH": str(services)}),
    )
    out, _ = proc.communicate(timeout=30)
    # Exec'd: its own status, even with -E.
    assert (proc.returncode, out) == (6, f"{proc.pid}|unset\n".encode())


def test_local_socket_and_tcp_services_cannot_be_execd(
    qrexec_system: QrexecSystem, services: Path
) -> None:
    server = bind_unix(str(services / "test.Sock"))
    (services / "test.Tcp").symlink_to("/dev/tcp/127.0.0.1/1")
    for name in ("test.Sock+x", "test.Tcp"):
        result = dom0_client(qrexec_system, services, f"DEFAULT:QUBESRPC {name} vm1", b"q")
        assert (result.returncode, result.stdout) == (125, b""), name
    server.close()
