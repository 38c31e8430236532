"""A plain call of each per-call client loads nothing beyond what it must.

Each client runs a real call in a fresh interpreter started without ``site`` (``-S``), with
only the folder holding the ``qrexec`` package on ``sys.path``: an editable install's import
hook loads ``pathlib``, ``re`` and more at start-up and a regular install does not, so
without ``site`` both installs give the same answer. The modules loaded at the end are
compared with what ``os`` and ``import socket, struct, select`` load in the same kind of
interpreter, our own ``qrexec`` modules, and the allow-list in
:mod:`tests.integration.lean_allowlist` (one reason per entry); the modules in
:data:`FORBIDDEN` fail the test even if allowed. pip's console-script wrapper (which
imports ``re``) is not part of this: the probe calls ``main`` itself; the benches measure
the wrapper apart.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

import qrexec
from tests.integration.conftest import Domain, QrexecSystem
from tests.integration.lean_allowlist import ALLOWED, BASELINE
from tests.integration.vmcall_support import VmCallSystem, vmcalls

pytestmark = pytest.mark.timeout(120)
__all__ = ["vmcalls"]

#: Never on a plain call.
FORBIDDEN = (
    "re",
    "argparse",
    "dataclasses",
    "typing",
    "pathlib",
    "urllib",
    "ipaddress",
    "logging",
    "importlib.util",
    "asyncio",
    "subprocess",
)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(qrexec.__file__)))

PROBE = """
import sys
sys.path.insert(0, sys.argv.pop(1))
from MODULE import main
code = main(sys.argv[1:])
loaded = sorted(sys.modules)
sys.stdout.flush()
sys.stderr.write("\\nLEAN " + repr((code, loaded)) + "\\n")
"""


def loaded_by(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-S", "-c", f"{code}\nimport sys\nprint(repr(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(ast.literal_eval(done.stdout.splitlines()[-1]))


def run_probe(
    module: str, argv: list[str], env: dict[str, str], stdin: bytes
) -> tuple[int, bytes, set[str]]:
    done = subprocess.run(
        [sys.executable, "-S", "-c", PROBE.replace("MODULE", module), PACKAGE_PARENT, *argv],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    line = done.stderr.decode().strip().splitlines()[-1]
    assert line.startswith("LEAN "), done.stderr.decode()
    code, loaded = ast.literal_eval(line[5:])
    return code, done.stdout, set(loaded)


def unexpected(loaded: set[str]) -> list[str]:
    """Modules beyond the baseline, our own and the allow-list; and any forbidden one."""
    baseline = loaded_by(BASELINE)
    extra = loaded - baseline
    bad = sorted(m for m in extra if m.split(".")[0] != "qrexec" and m not in ALLOWED)
    bad += sorted(
        f"{m} (forbidden)"
        for m in FORBIDDEN
        if m in loaded or any(x.startswith(m + ".") for x in loaded)
    )
    return bad


def test_allow_list_entries_have_reasons() -> None:
    assert all(reason.strip() for reason in ALLOWED.values())


def test_qrexec_client_plain_call_is_lean(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    code, out, loaded = run_probe(
        "qrexec.client.cli",
        ["-d", "vm1", f"{qrexec_system.user}:cat"],
        qrexec_system.env(0),
        b"x",
    )
    assert (code, out) == (0, b"x")
    bad = unexpected(loaded)
    assert not bad, f"qrexec-client loads {bad}"


def test_qrexec_client_vm_plain_call_is_lean(vmcalls: VmCallSystem) -> None:
    vmcalls.write_policy("test.Echo * vm1 vm2 allow\n")
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm1", 1)
    vmcalls.start_vm("vm2", 2).write_service("test.Echo", "#!/bin/sh\nexec cat\n")
    code, out, loaded = run_probe(
        "qrexec.client.client_vm", ["vm2", "test.Echo"], vmcalls.vm_env("vm1"), b"ping"
    )
    assert (code, out) == (0, b"ping")
    bad = unexpected(loaded)
    assert not bad, f"qrexec-client-vm loads {bad}"


def test_the_check_catches_a_forbidden_import() -> None:
    """The comparison itself: a module outside every list, and a forbidden one, are named."""
    loaded = loaded_by(BASELINE) | {"qrexec.client.cli", "argparse", "csv"}
    assert unexpected(loaded) == ["argparse", "csv", "argparse (forbidden)"]
