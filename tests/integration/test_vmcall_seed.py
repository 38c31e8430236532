"""The 2011 seed's HOWTO (test.Add) between emulated VMs, with our policy daemon deciding.

Written as a service author would, on the pytest plugin's ``qrexec_testbed``: the default
topology holds the seed's files exactly as the seed writes them, inside each domain's root
(``/usr/bin/our_test_add_client`` and ``/usr/bin/our_test_add_server`` in every VM, the
one-line ``/etc/qubes_rpc/test.Add`` in vm2, the 2011 policy file
``/etc/qubes_rpc/policy/test.Add`` in dom0), and the command line is the seed's own.
"""

from __future__ import annotations

import pytest

from qrexec.sim.harness import RunningTestbed

pytestmark = pytest.mark.timeout(180)

SEED_CLIENT = ["/usr/bin/our_test_add_client", "11", "22"]


@pytest.mark.parametrize(
    ("policy_line", "audit_result"),
    [("anyvm anyvm ask", "ask-allowed"), ("anyvm anyvm allow", "allow")],
)
def test_seed_howto(qrexec_testbed: RunningTestbed, policy_line: str, audit_result: str) -> None:
    qrexec_testbed.set_policy(policy_line + "\n", file="test.Add", format="2011")
    qrexec_testbed.set_ask_answers("test.Add + vm1 allow\n")
    result = qrexec_testbed.call("vm1", "vm2", "test.Add", program=SEED_CLIENT)
    assert result.returncode == 0, result.stderr
    # The seed's client sends the service's answer to its stderr, which is ours.
    assert result.stderr.decode().split() == ["33"]
    assert result.stdout == b""
    decisions = qrexec_testbed.audit()
    assert len(decisions) == 1, decisions
    decision = decisions[0]
    assert decision["result"] == audit_result
    assert (decision["source"], decision["target"], decision["service"]) == (
        "vm1",
        "vm2",
        "test.Add",
    )


def test_seed_ask_answered_no(qrexec_testbed: RunningTestbed) -> None:
    qrexec_testbed.set_policy("anyvm anyvm ask\n", file="test.Add", format="2011")
    qrexec_testbed.set_ask_answers("test.Add + vm1 deny\n")
    marker = qrexec_testbed.root("vm2") / "ran"
    qrexec_testbed.install_file(
        "vm2", "/usr/bin/our_test_add_server", f"#!/bin/sh\ntouch {marker}\n", 0o755
    )
    result = qrexec_testbed.call("vm1", "vm2", "test.Add", program=SEED_CLIENT)
    assert result.returncode == 126
    assert b"Request refused" in result.stderr
    assert not marker.exists()
    assert [d["result"] for d in qrexec_testbed.audit()] == ["ask-denied"]
