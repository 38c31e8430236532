"""The multi-host testbed through its user-facing tools: ``qrexec-sim`` and the pytest plugin."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from qrexec.sim.air.testbed import AirTestbed

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(300)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "air-two-hosts.toml"


def sim(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qrexec.sim", "--run-dir", str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_qrexec_sim_up_call_status_down() -> None:
    # Short, in /tmp: unix socket paths below it must fit in sun_path.
    run_dir = Path(tempfile.mkdtemp(prefix="qsa", dir="/tmp"))
    up = sim(run_dir, "up", "--topology", str(EXAMPLE), "-q")
    try:
        assert up.returncode == 0, up.stderr
        call = sim(
            run_dir, "call", "hostA:vm1", "hostB:vm2", "test.Add",
            "/usr/bin/our_test_add_client", "11", "22",
        )  # fmt: skip
        assert (call.returncode, call.stderr) == (0, "33\n")
        status = sim(run_dir, "status")
        assert status.returncode == 0, status.stdout
        assert "hostB    sshd" in status.stdout
        denied = sim(run_dir, "call", "hostB:vm2", "hostA:vm1", "test.Add")
        assert denied.returncode == 126  # hostB's policy has no rule for it
    finally:
        down = sim(run_dir, "down")
    assert down.returncode == 0, down.stderr
    assert sim(run_dir, "status").returncode != 0
    shutil.rmtree(run_dir)


@pytest.mark.qrexec_topology(str(EXAMPLE))
def test_pytest_plugin_runs_a_multi_host_topology(qrexec_testbed: AirTestbed) -> None:
    assert isinstance(qrexec_testbed, AirTestbed)
    result = qrexec_testbed.call(
        "hostA:vm1",
        "hostB:vm2",
        "test.Add",
        local_program=["/usr/bin/our_test_add_client", "1", "2"],
    )
    assert (result.returncode, result.stderr) == (0, b"3\n")
    records = [r for r in qrexec_testbed.audit("hostB") if r.get("service") == "test.Add"]
    assert records[-1]["requested_source"] == "hostA-vm1"
