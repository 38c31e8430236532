"""qrexec-client starts once per call: it must never import asyncio (nor load unused code)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import Domain, QrexecSystem

pytestmark = pytest.mark.timeout(120)

PROBE = """
import sys
from qrexec.client.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("asyncio", "qrexec.policy", "qrexec.daemon", "qrexec.agent.calls")
               if m in sys.modules)
sys.stderr.write(f"\\nEXIT={code} HEAVY={','.join(heavy)}\\n")
"""


def probe(system: QrexecSystem, *argv: str, stdin: bytes = b"") -> tuple[bytes, str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        input=stdin,
        capture_output=True,
        env=system.env(0),
        timeout=60,
        check=False,
    )
    return result.stdout, result.stderr.decode().strip().splitlines()[-1]


def test_vm_call_path_imports_no_asyncio(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    out, summary = probe(qrexec_system, "-d", "vm1", f"{qrexec_system.user}:cat", stdin=b"x")
    assert out == b"x"
    assert summary == "EXIT=0 HEAVY="


def test_just_exec_and_wait_paths_import_no_asyncio(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    _, summary = probe(qrexec_system, "-e", "-W", "-d", "vm1", f"{qrexec_system.user}:true")
    assert summary == "EXIT=0 HEAVY="


def test_dom0_local_service_path_imports_no_asyncio(qrexec_system: QrexecSystem) -> None:
    services = qrexec_system.base / "dom0-rpc"
    services.mkdir()
    service = services / "test.Local"
    service.write_text('#!/bin/sh\necho "local $1 $QREXEC_REQUESTED_TARGET_KEYWORD"\n')
    service.chmod(0o755)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            "-d",
            "@adminvm",
            "DEFAULT:QUBESRPC test.Local+a vm1 keyword adminvm",
        ],
        capture_output=True,
        env=qrexec_system.env(0, {"QREXEC_SERVICE_PATH": str(services)}),
        timeout=60,
        check=False,
    )
    assert result.stdout == b"local a adminvm\n"
    assert result.stderr.decode().strip().splitlines()[-1] == "EXIT=0 HEAVY="
