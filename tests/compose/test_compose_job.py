"""The compose job for real: Docker engine, images, `docker compose up`, calls, teardown.

Marked ``compose`` (run by .ci/run as root; needs apt, and network access to the Debian
mirror on a fresh machine). The job is sim/compose/ci-job.sh; this test runs it and checks
that every check it makes passed and that it cleaned up.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

REPO = Path(__file__).parents[2]
JOB = REPO / "sim" / "compose" / "ci-job.sh"

EXPECTED_CHECKS = [
    "compose up: dom0 and every VM container healthy",
    "dom0 -> vm1 command as the default user",
    "dom0 -> vm2 command exit code",
    "vm1 -> vm2 test.Add, the seed's HOWTO as written",
    "vm1 -> dom0 sim.Echo",
    "vm2 -> vm1 qubes.Filecopy is denied by policy",
    "vm1 -> vm2 qubes.Filecopy of a tree",
    "the copied tree landed in vm2's ~/QubesIncoming/vm1",
    "vm1 -> @dispvm sim.Echo (a disposable slot)",
    "three more @dispvm calls reuse the two slots",
    "every disposable is gone from dom0 after its call",
    "vm1 -> default-dvm sim.Echo autostarts the stopped container's agent",
    "vm1 sees only the vchan pairs it belongs to",
    "vm1 cannot open the dom0-vm2 pair folder",
    "vm1 cannot reach vm2's control vchan socket",
    "dom0 does have that pair folder",
    "the audit log recorded the denial",
    "down -v removed every container and volume",
]


def test_compose_job_passes_every_check(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the compose job installs packages and starts dockerd: run as root"
    env = dict(os.environ)
    proc = subprocess.run(
        ["bash", str(JOB)], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    output = proc.stdout + proc.stderr
    (tmp_path / "job.log").write_text(output)
    print(output)
    assert proc.returncode == 0, output[-4000:]
    marker = "compose-job: PASS "
    passed = [line.split(marker, 1)[1] for line in output.splitlines() if marker in line]
    for check in EXPECTED_CHECKS:
        assert any(line.startswith(check) for line in passed), f"check not run: {check}"
    assert "compose-job: FAIL" not in output
    assert "result PASS" in output
    # Nothing of the job's projects is left on the engine (when the engine still runs).
    projects = subprocess.run(
        ["docker", "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}'],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if projects.returncode == 0:
        assert not [p for p in projects.stdout.split() if p.startswith("qrexec-ci-")]
