"""A running three-host testbed for the cross-host tests (one per module)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from air_support import topology

from qrexec.sim.air.testbed import AirTestbed


@pytest.fixture(scope="module")
def air() -> Iterator[AirTestbed]:
    """hostA, hostB, hostC: namespaces as root, loopback ports otherwise (the mode is shown)."""
    testbed = AirTestbed(topology())
    testbed.up(progress=lambda line: print(f"air: {line}"))
    try:
        yield testbed
    finally:
        testbed.down()


def stray_processes(air: AirTestbed) -> list[str]:
    """Processes that mention the testbed's folder but are none of its long-lived ones."""
    known = {r.pid for r in air.sshd}
    for running in air.hosts.values():
        known |= {r.pid for r in running.testbed.run.read_state().processes}
    found = []
    marker = str(air.path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in known or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {text}")
    return found
