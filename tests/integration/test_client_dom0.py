"""qrexec-client to dom0 itself: services run locally, no vchan (spec §8, §4(iii))."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qrexec.daemon.clients import bind_unix
from tests.integration.conftest import QrexecSystem, serve_once

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


def test_local_socket_service(qrexec_system: QrexecSystem, services: Path) -> None:
    thread, received = serve_once(bind_unix(str(services / "test.Sock")), b"answer")
    result = dom0_client(
        qrexec_system, services, "DEFAULT:QUBESRPC test.Sock+x vm1 keyword adminvm", b"q"
    )
    thread.join(10)
    assert received == [b"test.Sock+x vm1 keyword adminvm\0q"]
    assert (result.returncode, result.stdout) == (0, b"answer")
