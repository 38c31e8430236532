"""The cross-domain conformance suite (tests/conformance/cross_domain.py) inside Xen.

Each run has two halves: side ``a`` (always the vchan *server*) and side ``b`` (the
client), one in dom0 and one in vm1, meeting only through the vchan backend. The four runs
cover both faces and both roles:

* ``conformance-blocking`` / ``-asyncio``: dom0 is side a (server), vm1 side b;
* ``conformance-domu-server-blocking`` / ``-asyncio``: vm1 is side a, dom0 side b (the
  agent's layout). Without the peer-death scenario: a domU's kernel refuses the hypercall
  that tells whether a peer's event channel is still bound, so a domU cannot notice a
  killed *process* on the other side (dom0 detects a dead VM; see deploy/README.md).

The domU publishes its half's result under its own xenstore ``data/qrexec-job/<run>``;
dom0 reads it and decides. Runs inside the guests.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrexec.sim.xen import guest_common as gc

RUNNER = Path("/opt/qrexec-py/tests/conformance/cross_domain.py")
#: The suite's own bulk scenario (the raw checks already move 32 MiB each way).
BULK_MIB = 8
RESULT_NODE = "data/qrexec-job"


@dataclass(frozen=True)
class Run:
    face: str
    domu_side: str  # "b": dom0 serves; "a": the domU serves
    base_port: int


RUNS = {
    "conformance-blocking": Run("blocking", "b", 1100),
    "conformance-asyncio": Run("asyncio", "b", 1200),
    "conformance-domu-server-blocking": Run("blocking", "a", 1300),
    "conformance-domu-server-asyncio": Run("asyncio", "a", 1400),
}


def scenario_filter(run: Run) -> list[str]:
    """``--only`` arguments: every scenario but peer-death when the domU serves."""
    if run.domu_side == "b":
        return []
    sys.path.insert(0, str(RUNNER.parent))
    try:
        # the suite's own list, so scenarios added later are picked up
        cross_domain: Any = importlib.import_module("cross_domain")
    finally:
        sys.path.remove(str(RUNNER.parent))
    names = [name for name, _a, _b in cross_domain.SCENARIOS if name != "peer-death"]
    return [f"--only={name}" for name in names]


def run_half(name: str, side: str, peer_domain: int, timeout: float) -> tuple[int, str, str]:
    """Run one half; return (exit status, 'passed=N failed=M', failed scenario lines)."""
    run = RUNS[name]
    rc, lines = gc.run_streaming(
        [
            sys.executable,
            str(RUNNER),
            f"--side={side}",
            f"--peer-domain={peer_domain}",
            f"--face={run.face}",
            "--transport=vchan",
            f"--base-port={run.base_port}",
            f"--bulk-mib={BULK_MIB}",
            *scenario_filter(run),
        ],
        dict(os.environ, PYTHONPATH="/opt/qrexec-py", QREXEC_TRANSPORT="vchan"),
        "",
        timeout,
    )
    done = [line for line in lines if f"CONFORMANCE {side} DONE" in line]
    summary = done[-1].split("DONE", 1)[1].strip() if done else f"no summary, rc={rc}"
    failed = " | ".join(line for line in lines if f"CONFORMANCE {side} FAIL" in line)
    return rc, summary, failed
