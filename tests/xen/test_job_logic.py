"""The real-Xen job's host-side decisions: marker parsing, re-run rule, check selection."""

from __future__ import annotations

import pytest

from qrexec.sim.xen import boot, job
from qrexec.sim.xen.host import JobError

pytestmark = pytest.mark.xen

SERIAL = """\
(XEN) noise
QXJ CHECK vchan-blocking PASS 2x32 MiB sha256 ok
[vm1] QXJ DOMU-STEP raw-async ok
QXJ INTEGRITY-FAIL vchan-async vchan-async: sha256 mismatch
QXJ CHECK vchan-async FAIL IntegrityFailed('sha256 mismatch')
QXJ METRIC vchan-roundtrip 1.20 ms
QXJ DONE uptime=99.0
"""


def parse(text: str) -> boot.BootResult:
    result = boot.BootResult()
    for line in text.splitlines():
        boot.parse_line(line, result)
    return result


def test_markers_are_parsed() -> None:
    result = parse(SERIAL)
    assert result.checks["vchan-blocking"][0] == "PASS"
    assert result.checks["vchan-async"][0] == "FAIL"
    assert result.integrity_failures == ["vchan-async"]
    assert result.metrics == {"vchan-roundtrip": "1.20 ms"}
    assert result.done


def test_rerun_only_when_every_failure_is_an_integrity_failure() -> None:
    checks = ["vchan-blocking", "vchan-async"]
    assert parse(SERIAL).only_integrity(checks)
    other_failure = SERIAL + "QXJ CHECK vchan-blocking FAIL timed out\n"
    assert not parse(other_failure).only_integrity(checks)
    missing = parse(SERIAL)
    assert not missing.only_integrity([*checks, "qrexec-bulk"])  # never reported: no re-run
    no_done = parse(SERIAL.replace("QXJ DONE uptime=99.0\n", ""))
    assert not no_done.only_integrity(checks)


def test_check_selection_keeps_the_run_order_and_rejects_unknown_names() -> None:
    assert job.choose_checks("vchan-peer-death,vchan-identity") == [
        "vchan-identity",
        "vchan-peer-death",
    ]
    assert job.choose_checks("default") == job.DEFAULT_CHECKS
    with pytest.raises(JobError, match="unknown checks: nope"):
        job.choose_checks("vchan-identity,nope")


def test_domu_steps_follow_the_checks() -> None:
    steps = job.domu_steps(["vchan-blocking", "conformance-asyncio", "qrexec-setup"])
    assert steps["vm1"] == ["services", "raw-blocking", "conformance-asyncio", "agent"]
    assert steps["vm2"] == ["services", "agent"]
    assert job.domu_steps(["vchan-peer-death"])["vm2"] == ["services", "hold"]
