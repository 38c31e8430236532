"""100 VM → VM calls in flight at once among three VMs: right bytes and exit codes for each."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from qrexec.sim.harness import RunningTestbed

pytestmark = pytest.mark.timeout(600)

ECHO_SERVICE = """#!/bin/sh
cat
echo "$1 $QREXEC_REMOTE_DOMAIN"
exit $(( $1 % 7 ))
"""
VMS = ("vm1", "vm2", "vm3")
CALLS = 100


def test_hundred_concurrent_calls(qrexec_testbed: RunningTestbed) -> None:
    qrexec_testbed.set_policy("test.Echo * @anyvm @anyvm allow\n")
    for name in VMS:
        qrexec_testbed.install_service(name, "test.Echo", ECHO_SERVICE)
    # Start every client first, then feed them: all 100 calls are in flight together.
    clients: list[tuple[int, str, bytes, subprocess.Popen[bytes]]] = []
    for n in range(CALLS):
        source, target = VMS[n % 3], VMS[(n + 1) % 3]
        payload = f"call {n} from {source};".encode() * (50 + 37 * n)
        call = qrexec_testbed.start_call(source, target, f"test.Echo+{n}")
        clients.append((n, source, payload, call))

    def finish(
        item: tuple[int, str, bytes, subprocess.Popen[bytes]],
    ) -> tuple[int, str, bytes, int, bytes, bytes]:
        n, source, payload, proc = item
        out, err = proc.communicate(payload, timeout=300)
        return n, source, payload, proc.returncode, out, err

    with ThreadPoolExecutor(CALLS) as pool:
        results = list(pool.map(finish, clients))
    failures = []
    for n, source, payload, code, out, err in results:
        expected = payload + f"{n} {source}\n".encode()
        if code != n % 7 or out != expected:
            failures.append((n, code, len(out), len(expected), err[-300:]))
    assert not failures, failures
    assert len(qrexec_testbed.audit()) == CALLS
