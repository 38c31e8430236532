"""Qubes Air in containers: examples/air-two-hosts.toml as one compose project.

Each host's dom0 and VMs are containers without any network, in volumes of their own; the
relay containers alone share the internal ``air`` network, where their sshd listens (keys
generated per host, host keys pinned, the package's own proxy and forced-command entry). The
seed's ``test.Add`` goes from hostA's vm1 to hostB's vm2 with both dom0s deciding.
Marked ``compose``: run by ``.ci/run`` as root, with a Docker engine (started by the session
fixture when none runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec.sim.air.container_testbed import AirContainerTestbed
from qrexec.sim.engine import Engine

TOPOLOGY = Path(__file__).resolve().parents[2] / "examples" / "air-two-hosts.toml"
ADD_CLIENT = ["/usr/bin/our_test_add_client", "11", "22"]

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def air(
    qrexec_container_engine: tuple[Engine, str, str],
) -> Iterator[AirContainerTestbed]:
    engine, image, base = qrexec_container_engine
    testbed = AirContainerTestbed(engine, TOPOLOGY, image=image, base=base)
    try:
        testbed.start()
        yield testbed
        died = testbed.project.unexpected_exits()
        assert not died, f"containers died during the tests: {died}\n{testbed.logs()}"
    except BaseException:
        print(testbed.logs())
        raise
    finally:
        testbed.close()


def seed_call(air: AirContainerTestbed) -> tuple[int, bytes, bytes]:
    result = air.call("hostA:vm1", "hostB:vm2", "test.Add", program=ADD_CLIENT)
    return result.returncode, result.stdout, result.stderr


def test_seed_test_add_from_host_a_to_host_b(air: AirContainerTestbed) -> None:
    # The seed's client sends "11 22" to the service and copies its answer to stderr.
    assert seed_call(air) == (0, b"", b"33\n"), air.logs()
    record_a = [r for r in air.audit("hostA") if r["service"] == "test.Add"][-1]
    record_b = [r for r in air.audit("hostB") if r["service"] == "test.Add"][-1]
    # hostA's dom0 decided vm1 -> hostB-vm2 (a RemoteVM) and redirected it to its relay.
    assert (record_a["source"], record_a["requested_target"]) == ("vm1", "hostB-vm2")
    assert record_a["target"] == "relay"
    # hostB's dom0 decided the call as the original source's, carried by its relay.
    assert (record_b["requested_source"], record_b["source"]) == ("hostA-vm1", "relay")
    assert record_b["target"] == "vm2"
    assert record_a["result"] == record_b["result"] == "allow"


@pytest.mark.parametrize(
    ("host", "rule"),
    [("hostA", "test.Add * vm1 hostB-vm2 deny\n"), ("hostB", "test.Add * hostA-vm1 vm2 deny\n")],
)
def test_a_deny_on_either_side_gives_126(air: AirContainerTestbed, host: str, rule: str) -> None:
    before = len(air.audit(host))
    path = air.set_policy(host, rule, file="10-override.policy")
    try:
        code, stdout, _stderr = seed_call(air)
        assert (code, stdout) == (126, b"")
        assert [r["result"] for r in air.audit(host)[before:]] == ["deny"]
    finally:
        air.remove_policy(host, path)
    assert seed_call(air) == (0, b"", b"33\n")


PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        s.settimeout(3)
        print("open", s.recv(64).decode(errors="replace").strip())
except OSError as exc:
    print("closed", type(exc).__name__)
"""


def probe(air: AirContainerTestbed, qube: str, name: str, port: int = 22) -> str:
    return air.run(qube, ["python3", "-c", PROBE, name, str(port)]).text.strip()


def test_hosts_are_joined_only_through_the_relays_sshd(air: AirContainerTestbed) -> None:
    # Only the relay reaches the peer relay's sshd (and gets OpenSSH's banner).
    assert probe(air, "hostA:relay", "hostB-relay").startswith("open SSH-2.0-OpenSSH")
    assert probe(air, "hostB:relay", "hostA-relay").startswith("open SSH-2.0-OpenSSH")
    # A VM or a dom0 of hostA has no network at all: neither the peer relay nor its own.
    for qube in ("hostA:vm1", "hostA:dom0"):
        assert air.run(qube, ["ls", "/sys/class/net"]).text.split() == ["lo"]
        assert probe(air, qube, "hostB-relay").startswith("closed"), qube
        assert probe(air, qube, "hostA-relay").startswith("closed"), qube
    # Not even the relay reaches the other host's dom0 or VMs: they are on no network.
    assert probe(air, "hostA:relay", "hostB-vm2").startswith("closed")
    assert probe(air, "hostA:relay", "hostB-dom0").startswith("closed")
    # The relay's sshd listens on its address on the air network only (not on 0.0.0.0).
    listening = [
        line.split()[1]
        for line in air.run("hostB:relay", ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).text.split(
            "\n"
        )
        if line.split()[3:4] == ["0A"]
    ]
    assert [a for a in listening if a.endswith(":0016")] != []
    assert all(not a.startswith("00000000") for a in listening), listening
    # No volume (vchan pair, power socket) is mounted by containers of both hosts.
    volumes: dict[str, set[str]] = {}
    for service, container in air.project.containers().items():
        host = service.split("-", 1)[0]
        for mount in container.attrs["Mounts"]:
            if mount["Type"] == "volume":
                volumes.setdefault(mount["Name"], set()).add(host)
    assert volumes and all(len(hosts) == 1 for hosts in volumes.values()), volumes


def test_a_peer_cannot_claim_a_qube_that_is_not_its_own(air: AirContainerTestbed) -> None:
    # With hostA's own key, ask hostB's sshd to run a call as hostA's relay, which hostB does
    # not know as a hostA qube: the forced command refuses it before any qrexec call.
    ssh = [
        "ssh", "-F", "/dev/null", "-T", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/etc/qubes/air/known_hosts",
        "-o", "HostKeyAlias=qubes-air-hostB", "-i", "/etc/qubes/air/relay_key",
        "-l", "user", "hostB-relay",
    ]  # fmt: skip
    before = len(air.audit("hostB"))
    refused = air.run("hostA:relay", [*ssh, "relay vm2 test.Add"], user="user")
    assert refused.returncode == 126, refused
    assert b"hostA may not call on behalf of 'relay'" in refused.stderr
    assert len(air.audit("hostB")) == before
    # The same key and command line naming hostA's vm1 is what the proxy sends: allowed.
    allowed = air.run("hostA:relay", [*ssh, "vm1 vm2 test.Add"], input=b"3 4\n", user="user")
    assert (allowed.returncode, allowed.stdout) == (0, b"7\n"), allowed
    assert air.audit("hostB")[-1]["requested_source"] == "hostA-vm1"


def test_peer_sshd_down_gives_125_with_one_line_then_calls_work_again(
    air: AirContainerTestbed,
) -> None:
    # Until it is gone or a zombie (its parent, the container's supervisor, reaps it later).
    stop = (
        "read pid < /run/qubes-sim/sshd.ready && kill $pid && while test -e /proc/$pid "
        '&& test "$(cut -d" " -f3 /proc/$pid/stat)" != Z; do sleep 0.05; done'
    )
    assert air.run("hostB:relay", ["sh", "-c", stop]).returncode == 0
    code, stdout, stderr = seed_call(air)
    assert (code, stdout) == (125, b"")
    (line,) = stderr.decode().splitlines()
    assert line.startswith("qubesair.SSHProxy: hostB-vm2 (hostB): ")
    assert "Connection refused" in line
    # sshd again (it detaches; the healthcheck reads the new pid), and the next call works.
    restart = (
        "rm -f /run/sshd-air.pid && /usr/sbin/sshd -f /etc/qubes/air/sshd_config "
        "&& while ! test -s /run/sshd-air.pid; do :; done "
        "&& cp /run/sshd-air.pid /run/qubes-sim/sshd.ready"
    )
    assert air.run("hostB:relay", ["sh", "-c", restart]).returncode == 0
    assert seed_call(air) == (0, b"", b"33\n")


@pytest.mark.qrexec_mode("containers")
@pytest.mark.qrexec_topology(TOPOLOGY)
def test_the_pytest_plugin_runs_a_multi_host_file_in_containers(
    qrexec_testbed: AirContainerTestbed,
) -> None:
    tb = qrexec_testbed
    assert isinstance(tb, AirContainerTestbed)
    tb.set_policy("hostB", "test.Add * hostA-vm1 vm2 deny\n", file="10-override.policy")
    assert seed_call(tb)[0] == 126
    assert tb.audit("hostA")[-1]["result"] == "allow"
    assert tb.audit("hostB")[-1]["result"] == "deny"
