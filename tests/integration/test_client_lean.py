"""qrexec-client starts once per call: it must never import asyncio (nor load unused code)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import Domain, QrexecSystem

pytestmark = pytest.mark.timeout(120)

HEAVY = "asyncio qrexec.policy qrexec.daemon qrexec.agent.calls"
PROBE_TEMPLATE = """
import sys
from qrexec.client.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in HEAVY_MODULES.split() if m in sys.modules)
sys.stderr.write(f"\\nEXIT={code} HEAVY={','.join(heavy)}\\n")
"""


def probe_code(modules: str) -> str:
    """The probe, reporting which of ``modules`` (space-separated) got imported."""
    return PROBE_TEMPLATE.replace("HEAVY_MODULES", repr(modules))


PROBE = probe_code(HEAVY)


def probe(
    system: QrexecSystem, *argv: str, stdin: bytes = b"", report: str = HEAVY
) -> tuple[bytes, str]:
    """Run qrexec-client in-process; the summary names which of ``report`` got imported."""
    result = subprocess.run(
        [sys.executable, "-c", probe_code(report), *argv],
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


def test_vm_call_path_imports_no_logging(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    """A call without problems shows no log record, so it need not load logging."""
    out, summary = probe(
        qrexec_system, "-d", "vm1", f"{qrexec_system.user}:cat", stdin=b"x", report="logging"
    )
    assert out == b"x"
    assert summary == "EXIT=0 HEAVY="


def test_just_exec_and_wait_paths_import_no_asyncio(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    _, summary = probe(qrexec_system, "-e", "-W", "-d", "vm1", f"{qrexec_system.user}:true")
    assert summary == "EXIT=0 HEAVY="


#: The dom0-local path execs the service: report the imports just before the exec.
EXEC_PROBE = """
import os, sys
real_execve = os.execve
def reporting_execve(path, argv, env):
    heavy = sorted(m for m in HEAVY_MODULES.split() if m in sys.modules)
    sys.stderr.write(f"\\nEXEC HEAVY={','.join(heavy)}\\n")
    sys.stderr.flush()
    real_execve(path, argv, env)
os.execve = reporting_execve
from qrexec.client.cli import main
main(sys.argv[1:])
""".replace("HEAVY_MODULES", repr(HEAVY))


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
            EXEC_PROBE,
            "-d",
            "@adminvm",
            "DEFAULT:QUBESRPC test.Local+a vm1 keyword adminvm",
        ],
        capture_output=True,
        env=qrexec_system.env(0, {"QREXEC_SERVICE_PATH": str(services)}),
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, b"local a adminvm\n")
    assert result.stderr.decode().strip().splitlines()[-1] == "EXEC HEAVY="
