"""The cross-domain runner, checked over the socket backend with two real processes.

On Xen, the same script runs in dom0 and in a domU over vchan (see cross_domain.py); here
it proves that both halves of every scenario fit together and pass on a known-good backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cross_domain import SCENARIOS

RUNNER = Path(__file__).with_name("cross_domain.py")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("face", "layout"), [("blocking", "flat"), ("asyncio", "isolated")])
def test_both_halves_pass_over_the_socket_backend(tmp_path: Path, face: str, layout: str) -> None:
    processes = []
    for side, own, peer in (("a", 0, 5), ("b", 5, 0)):
        env = {
            **os.environ,
            "VCHAN_SOCKET_DIR": str(tmp_path),
            "VCHAN_DOMAIN": str(own),
            "QREXEC_VCHAN_LAYOUT": layout,
        }
        command = [
            sys.executable,
            str(RUNNER),
            f"--side={side}",
            f"--peer-domain={peer}",
            f"--face={face}",
            "--transport=socket",
            "--bulk-mib=8",
        ]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=240)
            outputs.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, 9)
                process.wait(10)
    for side, out, process in zip("ab", outputs, processes, strict=True):
        passes = [line for line in out.splitlines() if f"CONFORMANCE {side} PASS" in line]
        assert len(passes) == len(SCENARIOS), out
        assert f"CONFORMANCE {side} DONE passed={len(SCENARIOS)} failed=0" in out
        assert process.returncode == 0
