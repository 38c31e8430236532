"""The pytest plugin as a service author uses it: fixtures, helpers, testbeds side by side."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from qrexec.sim.harness import RunningTestbed
from qrexec.sim.topology import Topology, parse_topology

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).parents[2] / "examples" / "split-gpg.toml"


def test_author_installs_a_service_and_calls_it(qrexec_testbed: RunningTestbed) -> None:
    qrexec_testbed.install_service(
        "vm2",
        "my.Upper",
        '#!/bin/sh\ntr a-z A-Z\necho "from $QREXEC_REMOTE_DOMAIN" >&2\nexit 4\n',
    )
    result = qrexec_testbed.call("dom0", "vm2", "my.Upper", b"hello")
    assert result.returncode == 4
    assert result.stdout == b"HELLO"
    assert result.stderr == b"from dom0\n"


def test_author_puts_a_program_in_the_vm_and_uses_a_2011_service_file(
    qrexec_testbed: RunningTestbed,
) -> None:
    qrexec_testbed.install_file(
        "vm1", "/usr/bin/double", "#!/bin/sh\nread x\necho $((x*2))\n", 0o755
    )
    qrexec_testbed.install_service("vm1", "my.Double", program="/usr/bin/double")
    assert (
        qrexec_testbed.root("vm1") / "etc/qubes_rpc/my.Double"
    ).read_text() == "/usr/bin/double\n"
    assert qrexec_testbed.call("dom0", "vm1", "my.Double", b"21\n").text == "42\n"


@pytest.mark.qrexec_topology(EXAMPLE)
def test_marker_selects_a_topology_file(qrexec_testbed: RunningTestbed) -> None:
    assert qrexec_testbed.running_domains() == ["dom0", "work"]
    assert (qrexec_testbed.root("vault") / "etc/qubes/rpc-config/example.Sign").exists()


class TestOverriddenTopologyFixture:
    @pytest.fixture
    def qrexec_topology(self) -> Topology:
        return parse_topology(
            {
                "domain": [
                    {
                        "name": "solo",
                        "service": [{"name": "s.X", "script": "#!/bin/sh\necho solo\n"}],
                    }
                ]
            }
        )

    def test_fixture_override(self, qrexec_testbed: RunningTestbed) -> None:
        assert qrexec_testbed.running_domains() == ["dom0", "solo"]
        assert qrexec_testbed.call("dom0", "solo", "s.X").text == "solo\n"


def test_two_testbeds_at_once_do_not_interfere(
    qrexec_testbed_factory: Callable[..., RunningTestbed],
) -> None:
    first = qrexec_testbed_factory()
    second = qrexec_testbed_factory()
    assert first.run_dir != second.run_dir
    ids_first = {d.id for d in first.topology.vms}
    ids_second = {d.id for d in second.topology.vms}
    assert not ids_first & ids_second
    first.install_service("vm1", "which.Bed", "#!/bin/sh\necho first\n")
    second.install_service("vm1", "which.Bed", "#!/bin/sh\necho second\n")
    assert first.call("dom0", "vm1", "which.Bed").text == "first\n"
    assert second.call("dom0", "vm1", "which.Bed").text == "second\n"
    # Breaking one testbed leaves the other alone.
    os.kill(first.process("agent", "vm1").pid, signal.SIGKILL)
    assert second.call("dom0", "vm1", "which.Bed").text == "second\n"
    assert all(s.alive for s in second.status())
    assert first.call("dom0", "vm1", "which.Bed").returncode != 0


def test_set_policy_and_ask_answers_write_dom0_files(qrexec_testbed: RunningTestbed) -> None:
    path = qrexec_testbed.set_policy("my.S * @anyvm @anyvm allow\n")
    assert path == qrexec_testbed.root("dom0") / "etc/qubes/policy.d/20-test.policy"
    legacy = qrexec_testbed.set_policy("anyvm anyvm deny\n", file="my.S", format="2011")
    assert legacy == qrexec_testbed.root("dom0") / "etc/qubes_rpc/policy/my.S"
    qrexec_testbed.set_ask_answers("my.S * * deny\n")
    assert (qrexec_testbed.run_dir / "ask-answers").read_text() == "my.S * * deny\n"
