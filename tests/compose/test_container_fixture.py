"""The container-mode ``qrexec_testbed``, used as a service author would: plain pytest tests.

Each test starts a compose project of two bare VMs (tests/compose/data/two-bare-vms.toml:
no services, no policy), installs what it needs with the fixture's helpers, calls across
containers and looks at the results and dom0's audit log. Marked ``compose``: run by
``.ci/run`` as root, with a Docker engine (started by the session fixture when none runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qrexec.sim.container_harness import IMAGE_PYTHON, ContainerTestbed

TOPOLOGY = Path(__file__).parent / "data" / "two-bare-vms.toml"

pytestmark = [
    pytest.mark.compose,
    pytest.mark.qrexec_mode("containers"),
    pytest.mark.qrexec_topology(TOPOLOGY),
    pytest.mark.timeout(600),
]

# The seed's HOWTO (README.rpc, 2011), file for file.
SEED_CLIENT = "#!/bin/sh\necho $1 $2\nexec cat >&2\n"
SEED_SERVER = "#!/bin/sh\nread arg1 arg2\necho $(($arg1+$arg2))\n"


def test_seed_test_add_between_containers(qrexec_testbed: ContainerTestbed) -> None:
    tb = qrexec_testbed
    assert isinstance(tb, ContainerTestbed)
    tb.install_file("vm1", "/usr/bin/our_test_add_client", SEED_CLIENT, 0o755)
    tb.install_file("vm2", "/usr/bin/our_test_add_server", SEED_SERVER, 0o755)
    tb.install_service("vm2", "test.Add", program="/usr/bin/our_test_add_server")
    tb.set_policy("anyvm anyvm ask\n", file="test.Add", format="2011")
    tb.set_policy("!compat-2011\n", file="30-compat.policy")
    tb.set_ask_answers("test.Add * vm1 allow\n* * * deny\n")

    result = tb.call("vm1", "vm2", "test.Add", program=["/usr/bin/our_test_add_client", "11", "22"])
    # The seed's client sends "11 22" and copies the answer to its stderr.
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"33\n")
    record = tb.audit()[-1]
    assert (record["source"], record["target"], record["service"]) == ("vm1", "vm2", "test.Add")
    assert record["result"] == "ask-allowed"

    # The same call once the prompter says no: refused with qrexec-client-vm's 126.
    tb.set_ask_answers("* * * deny\n")
    refused = tb.call("vm1", "vm2", "test.Add", program=["/usr/bin/our_test_add_client", "1", "2"])
    assert refused.returncode == 126, refused
    assert b"Request refused" in refused.stderr
    assert tb.audit()[-1]["result"] != "ask-allowed"
    assert tb.running_domains() == ["dom0", "vm1", "vm2"]


def test_filecopy_between_two_containers(qrexec_testbed: ContainerTestbed) -> None:
    tb = qrexec_testbed
    tb.install_service(
        "vm2", "qubes.Filecopy", "#!/bin/sh\nexec python3 -m qrexec.sim.filecopy receive\n"
    )
    tb.set_policy("qubes.Filecopy * vm1 vm2 allow\nqubes.Filecopy * @anyvm @anyvm deny\n")
    tb.install_file("vm1", "/home/user/tree/sub/data.txt", "hello vm2\n", 0o640)
    tb.install_file("vm1", "/home/user/tree/run.sh", "#!/bin/sh\n", 0o750)
    # qrexec-client-vm runs its program by the path given, with no PATH search (§15.4).
    sender = [IMAGE_PYTHON, "-m", "qrexec.sim.filecopy", "send", "tree"]

    result = tb.call("vm1", "vm2", "qubes.Filecopy", program=sender)
    assert result.returncode == 0, result
    assert b"sent 2 file(s), 20 byte(s)" in result.stderr
    incoming = "/home/user/QubesIncoming/vm1/tree"
    assert tb.read_file("vm2", f"{incoming}/sub/data.txt") == b"hello vm2\n"
    looked = tb.run(
        "vm2", ["stat", "-c", "%a %U %s %n", f"{incoming}/sub/data.txt", f"{incoming}/run.sh"]
    )
    assert looked.text.splitlines() == [
        f"640 user 10 {incoming}/sub/data.txt",
        f"750 user 10 {incoming}/run.sh",
    ]

    # Policy denies the other direction; the sender learns it from qrexec, not the receiver.
    tb.install_service(
        "vm1", "qubes.Filecopy", "#!/bin/sh\nexec python3 -m qrexec.sim.filecopy receive\n"
    )
    tb.install_file("vm2", "/home/user/back.txt", "no\n")
    denied = tb.call("vm2", "vm1", "qubes.Filecopy", program=[*sender[:-1], "back.txt"], timeout=30)
    assert denied.returncode == 126, denied
    assert [r["result"] for r in tb.audit()] == ["allow", "deny"]
    assert tb.run("vm1", ["test", "-e", "/home/user/QubesIncoming"]).returncode == 1


def test_custom_service_exec_and_logs(qrexec_testbed: ContainerTestbed) -> None:
    tb = qrexec_testbed
    tb.install_service("vm2", "my.Upper", "#!/bin/sh\ntr a-z A-Z\necho done >&2\nexit 3\n")
    tb.set_policy("my.Upper * vm1 vm2 allow\n")
    result = tb.call("vm1", "vm2", "my.Upper", b"hello from a container")
    # The service's stdout comes back; its stderr stays in vm2; its exit code is the call's.
    assert (result.returncode, result.stdout) == (3, b"HELLO FROM A CONTAINER")
    as_user = tb.exec("vm1", "user:id -un; echo oops >&2; exit 5")
    assert (as_user.returncode, as_user.stdout, as_user.stderr) == (5, b"user\n", b"oops\n")
    as_root = tb.exec("vm2", "root:cat", input=b"stdin reaches the command")
    assert (as_root.returncode, as_root.stdout) == (0, b"stdin reaches the command")
    from_dom0 = tb.call("dom0", "vm2", "my.Upper", b"dom0 calls")
    assert (from_dom0.returncode, from_dom0.stdout) == (3, b"DOM0 CALLS")
    logs = tb.logs()
    assert "==> dom0 (container) <==" in logs and "qrexec.vm2.log" in logs


@pytest.mark.parametrize("qrexec_testbed", ["processes", "containers"], indirect=True)
def test_one_test_in_both_modes(qrexec_testbed: object, request: pytest.FixtureRequest) -> None:
    """The fixture parameter picks the mode; the test body is the same for both."""
    from qrexec.sim.harness import RunningTestbed

    tb = qrexec_testbed
    assert isinstance(tb, RunningTestbed | ContainerTestbed)
    want = ContainerTestbed if "containers" in request.node.name else RunningTestbed
    assert isinstance(tb, want)
    tb.install_service("vm2", "my.Count", "#!/bin/sh\nwc -c\n")
    tb.set_policy("my.Count * vm1 vm2 allow\n")
    result = tb.call("vm1", "vm2", "my.Count", b"12345")
    assert (result.returncode, result.stdout.strip()) == (0, b"5")
    assert tb.audit()[-1]["result"] == "allow"
