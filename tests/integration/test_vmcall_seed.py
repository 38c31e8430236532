"""The 2011 seed's HOWTO (test.Add) between emulated VMs, with our policy daemon deciding.

Files are written exactly as the seed writes them, inside each domain's root: the client
and server programs in ``/usr/bin``, the one-line ``/etc/qubes_rpc/test.Add`` in vm2, the
2011 policy file ``/etc/qubes_rpc/policy/test.Add`` in dom0 (no policy.d there, the seed's
setup). ``qrexec-client-vm`` resolves the absolute LOCAL_PROGRAM inside vm1's root
(``QREXEC_DOMAIN_ROOT``), so the command line is the seed's own.
"""

from __future__ import annotations

import pytest

from tests.integration.vmcall_support import VmCallSystem, vmcalls

pytestmark = pytest.mark.timeout(180)
__all__ = ["vmcalls"]

SEED_CLIENT = """#!/bin/sh
echo $1 $2
exec cat >&2
# more correct: exec cat >&$SAVED_FD_1, but do not scare the reader
"""
SEED_SERVER = """#!/bin/sh
read arg1 arg2
echo $(($arg1+$arg2))
"""


def seed_setup(vmcalls: VmCallSystem, policy_line: str) -> None:
    vm1 = vmcalls.start_vm("vm1", 1)
    vm2 = vmcalls.start_vm("vm2", 2)
    for vm in (vm1, vm2):
        vm.write_file("usr/bin/our_test_add_client", SEED_CLIENT, 0o755)
        vm.write_file("usr/bin/our_test_add_server", SEED_SERVER, 0o755)
    vm2.write_file("etc/qubes_rpc/test.Add", "/usr/bin/our_test_add_server\n")
    vmcalls.write_policy_2011("test.Add", policy_line + "\n")
    vmcalls.start_policy_daemon()


@pytest.mark.parametrize(
    ("policy_line", "audit_result"),
    [("anyvm anyvm ask", "ask-allowed"), ("anyvm anyvm allow", "allow")],
)
def test_seed_howto(vmcalls: VmCallSystem, policy_line: str, audit_result: str) -> None:
    vmcalls.ask_script.write_text("test.Add + vm1 allow\n")
    seed_setup(vmcalls, policy_line)
    result = vmcalls.call("vm1", "vm2", "test.Add", "/usr/bin/our_test_add_client", "11", "22")
    assert result.returncode == 0, result.stderr
    # The seed's client sends the service's answer to its stderr, which is ours.
    assert result.stderr.decode().split() == ["33"]
    assert result.stdout == b""
    decisions = vmcalls.audit()
    assert len(decisions) == 1, decisions
    decision = decisions[0]
    assert decision["result"] == audit_result
    assert (decision["source"], decision["target"], decision["service"]) == (
        "vm1",
        "vm2",
        "test.Add",
    )


def test_seed_ask_answered_no(vmcalls: VmCallSystem) -> None:
    vmcalls.ask_script.write_text("test.Add + vm1 deny\n")
    seed_setup(vmcalls, "anyvm anyvm ask")
    marker = vmcalls.vms["vm2"].root / "ran"
    vmcalls.vms["vm2"].write_file(
        "usr/bin/our_test_add_server", f"#!/bin/sh\ntouch {marker}\n", 0o755
    )
    result = vmcalls.call("vm1", "vm2", "test.Add", "/usr/bin/our_test_add_client", "11", "22")
    assert result.returncode == 126
    assert b"Request refused" in result.stderr
    assert not marker.exists()
    assert [d["result"] for d in vmcalls.audit()] == ["ask-denied"]
