"""The pytest plugin as a service author uses it: fixtures, helpers, testbeds side by side."""

from __future__ import annotations

import hashlib
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


def test_in_process_and_spawned_cli_calls_agree(
    qrexec_testbed: RunningTestbed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """call/exec/start_call run in process by default, the real CLIs with spawn_cli."""
    import subprocess

    from qrexec.sim import harness

    qrexec_testbed.set_policy("my.Rev * vm1 vm2 allow\nmy.Rev * vm2 vm1 deny notify=no\n")
    qrexec_testbed.install_service("vm2", "my.Rev", "#!/bin/sh\nrev\necho e >&2\nexit 3\n")
    qrexec_testbed.install_service("vm1", "my.Rev", "#!/bin/sh\nrev\n")
    spawned: list[object] = []
    real_run = subprocess.run

    def counting_run(*args: object, **kwargs: object) -> object:
        spawned.append(args[0])
        return real_run(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", counting_run)
    for source in ("dom0", "vm1"):
        inside = qrexec_testbed.call(source, "vm2", "my.Rev", b"abc\n")
        assert not spawned
        cli = qrexec_testbed.call(source, "vm2", "my.Rev", b"abc\n", spawn_cli=True)
        assert len(spawned) == 1
        spawned.clear()
        assert inside == cli == harness.CallResult(3, b"cba\n", b"e\n")
    refused = qrexec_testbed.call("vm2", "vm1", "my.Rev")
    assert (
        refused.returncode
        == qrexec_testbed.call("vm2", "vm1", "my.Rev", spawn_cli=True).returncode
        == 126
    )
    user = qrexec_testbed.exec("vm1", "DEFAULT:echo $((6*7))")
    assert user == qrexec_testbed.exec("vm1", "DEFAULT:echo $((6*7))", spawn_cli=True)
    assert user.stdout == b"42\n"
    handle = qrexec_testbed.start_call("vm1", "vm2", "my.Rev")
    assert isinstance(handle, harness.InProcessCall)
    assert handle.communicate(b"xyz\n", timeout=60) == (b"zyx\n", b"e\n")
    assert handle.returncode == 3
    proc = qrexec_testbed.start_call("vm1", "vm2", "my.Rev", spawn_cli=True)
    assert isinstance(proc, subprocess.Popen)
    assert proc.communicate(b"xyz\n", timeout=60) == (b"zyx\n", b"e\n")


@pytest.mark.qrexec_topology(EXAMPLE)
def test_marker_selects_a_topology_file_and_the_example_works(
    qrexec_testbed: RunningTestbed,
) -> None:
    assert qrexec_testbed.running_domains() == ["dom0", "work"]
    assert (qrexec_testbed.root("vault") / "etc/qubes/rpc-config/example.Sign").exists()
    signed = qrexec_testbed.call("work", "vault", "example.Sign", b"message\n")
    digest = hashlib.sha256(b"message\n").hexdigest()
    assert (signed.returncode, signed.text) == (0, f"signed by vault: {digest}\n")
    assert "vault" in qrexec_testbed.running_domains()  # autostarted by the call
    assert qrexec_testbed.audit()[-1]["result"] == "ask-allowed"
    hello = qrexec_testbed.call("work", "@default", "example.Hello")
    assert hello.text == "hello work, this is dom0\n"
    disp = qrexec_testbed.call("work", "@dispvm", "example.Hello")
    assert disp.text == "hello work, this is a disposable\n"
    assert qrexec_testbed.call("vault", "vault", "example.Sign").returncode == 126


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


def test_seed_howto_between_vms_with_ask_answered_by_the_scripted_prompter(
    qrexec_testbed: RunningTestbed,
) -> None:
    result = qrexec_testbed.call(
        "vm1", "vm2", "test.Add", program=["/usr/bin/our_test_add_client", "11", "22"]
    )
    assert (result.returncode, result.stderr) == (0, b"33\n")
    assert result.stdout == b""
    decision = qrexec_testbed.audit()[-1]
    assert decision["result"] == "ask-allowed"
    assert str(decision["rule"]).endswith("/etc/qubes_rpc/policy/test.Add:1")
    # The prompter's answers can change while the testbed runs.
    qrexec_testbed.set_ask_answers("test.Add * * deny\n")
    refused = qrexec_testbed.call(
        "vm1", "vm2", "test.Add", program=["/usr/bin/our_test_add_client", "1", "2"]
    )
    assert refused.returncode == 126
    assert qrexec_testbed.audit()[-1]["result"] == "ask-denied"


def test_author_sets_policy_for_a_new_service_vm_to_vm_and_vm_to_dom0(
    qrexec_testbed: RunningTestbed,
) -> None:
    qrexec_testbed.install_service("vm3", "my.Rev", "#!/bin/sh\nrev\n")
    qrexec_testbed.install_service("dom0", "my.Rev", "#!/bin/sh\nrev | tr a-z A-Z\n")
    assert qrexec_testbed.call("vm1", "vm3", "my.Rev", b"abc\n").returncode == 126
    qrexec_testbed.set_policy(
        "my.Rev * vm1 vm3 allow\nmy.Rev * vm1 @adminvm allow\nmy.Rev * @anyvm @anyvm deny\n"
    )
    allowed = qrexec_testbed.call("vm1", "vm3", "my.Rev", b"abc\n")
    assert (allowed.returncode, allowed.stdout) == (0, b"cba\n")
    to_dom0 = qrexec_testbed.call("vm1", "dom0", "my.Rev", b"abc\n")
    assert (to_dom0.returncode, to_dom0.stdout) == (0, b"CBA\n")
    assert qrexec_testbed.call("vm2", "vm3", "my.Rev", b"abc\n").returncode == 126
    results = [(r["source"], r["target"], r["result"]) for r in qrexec_testbed.audit()]
    assert results[-3:] == [
        ("vm1", "vm3", "allow"),
        ("vm1", "dom0", "allow"),
        ("vm2", None, "deny"),
    ]
