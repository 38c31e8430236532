"""Mixed protocol versions between qrexec-client, daemon and agent (spec §3.4)."""

from __future__ import annotations

import hashlib
import random

import pytest

from tests.integration.conftest import QrexecSystem

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("agent_cap", "dom0_cap"),
    [("2", None), (None, "2"), ("3", None), (None, "3"), ("2", "3")],
)
def test_bulk_both_ways_across_versions(
    qrexec_system: QrexecSystem, agent_cap: str | None, dom0_cap: str | None
) -> None:
    agent_env = {"QREXEC_PROTOCOL_VERSION": agent_cap} if agent_cap else None
    dom0_env = {"QREXEC_PROTOCOL_VERSION": dom0_cap} if dom0_cap else None
    qrexec_system.start_vm("vm1", 1, agent_env=agent_env, daemon_env=dom0_env)
    # Larger than any chunk, and not a multiple of either cap.
    payload = random.Random(7).randbytes(3 * 65536 + 12345)
    result = qrexec_system.client(
        "vm1",
        f"{qrexec_system.user}:cat; head -c 100000 /dev/zero >&2",
        input=payload,
        env=dom0_env,
    )
    assert result.returncode == 0, result.stderr[-500:]
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(payload).digest()
    assert result.stderr == b"\0" * 100000
