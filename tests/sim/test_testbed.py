"""The process testbed: up, status, exec, the qubesd stand-in, failures, down."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from qrexec.sim import processes
from qrexec.sim.cli import main as sim_main
from qrexec.sim.harness import RunningTestbed
from qrexec.sim.qubesd import AdminError, call_admin, parse_request
from qrexec.sim.rundir import RunDir
from qrexec.sim.testbed import Testbed
from qrexec.sim.topology import parse_topology

pytestmark = pytest.mark.timeout(120)

SMALL = {
    "dom0": {"ask": "* * * deny\n"},
    "domain": [
        {
            "name": "work",
            "service": [{"name": "t.Hi", "script": "#!/bin/sh\necho hi $QREXEC_REMOTE_DOMAIN\n"}],
        },
        {"name": "cold", "running": False},
        {"name": "dvm", "template_for_dispvms": True, "running": False,
         "service": [{"name": "t.Hi", "script": "#!/bin/sh\necho disposable hi\n"}]},
    ],
}  # fmt: skip


def _wait_dead(record: processes.ProcessRecord) -> None:
    deadline = time.monotonic() + 10
    while processes.is_alive(record) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_up_runs_one_agent_and_daemon_per_running_vm(qrexec_testbed: RunningTestbed) -> None:
    roles = sorted((s.record.role, s.record.domain) for s in qrexec_testbed.status())
    assert roles == sorted(
        [("policy-daemon", "dom0"), ("qubesd", "dom0")]
        + [(role, vm) for vm in ("vm1", "vm2", "vm3") for role in ("agent", "daemon")]
    )
    assert all(s.alive for s in qrexec_testbed.status())
    assert qrexec_testbed.running_domains() == ["dom0", "vm1", "vm2", "vm3"]
    # Every program is pinned to the socket backend, with the testbed's own directory.
    agent = qrexec_testbed.process("agent", "vm1")
    assert agent.argv[1:3] == ["--transport", "socket"]
    env = dict(
        line.split("=", 1)
        for line in Path(f"/proc/{agent.pid}/environ").read_text().split("\0")
        if "=" in line
    )
    assert env["QREXEC_TRANSPORT"] == "socket"
    assert env["VCHAN_SOCKET_DIR"] == str(qrexec_testbed.run_dir / "vchan")
    assert env["QREXEC_VCHAN_LAYOUT"] == "isolated"


def test_exec_runs_in_the_vm_with_its_own_home(qrexec_testbed: RunningTestbed) -> None:
    result = qrexec_testbed.exec("vm2", 'DEFAULT:echo "$HOME"; id -un; cat; exit 3', b"in\n")
    assert result.returncode == 3
    home, user, echoed = result.text.splitlines()
    assert Path(home) == qrexec_testbed.home("vm2")
    assert user == getpass.getuser()
    assert echoed == "in"


def test_dom0_calls_a_topology_service_and_an_installed_one(
    qrexec_testbed: RunningTestbed,
) -> None:
    assert qrexec_testbed.call("dom0", "vm1", "sim.Echo", b"x").text == "vm1 echoes dom0: x"
    qrexec_testbed.install_service("vm3", "my.Service", "#!/bin/sh\necho arg=$1\n")
    result = qrexec_testbed.call("dom0", "vm3", "my.Service+abc")
    assert (result.returncode, result.text) == (0, "arg=abc\n")
    assert qrexec_testbed.call("dom0", "vm3", "no.Such").returncode == 127


@pytest.mark.parametrize(
    ("role", "domain"),
    [("agent", "vm2"), ("daemon", "vm1"), ("policy-daemon", "dom0"), ("qubesd", "dom0")],
)
def test_status_reports_a_killed_process_and_down_still_cleans_up(
    tmp_path: Path, role: str, domain: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = Path(f"/tmp/qsim-k{os.getpid()}-{role[:3]}")
    testbed = RunningTestbed(
        parse_topology({"domain": [{"name": "vm1"}, {"name": "vm2"}]}), run_dir
    )
    try:
        testbed.start()
        assert sim_main(["--run-dir", str(run_dir), "status"]) == 0
        victim = testbed.process(role, domain)
        os.kill(victim.pid, signal.SIGKILL)
        _wait_dead(victim)
        capsys.readouterr()
        assert sim_main(["--run-dir", str(run_dir), "status"]) == 1
        out = capsys.readouterr().out
        dead = [line for line in out.splitlines() if "DEAD" in line]
        assert len(dead) == 1 and dead[0].split()[:2] == [role, domain]
        records = [s.record for s in testbed.status()]
        assert sim_main(["--run-dir", str(run_dir), "down"]) == 0
        assert not any(processes.is_alive(r) for r in records)
        run = RunDir(run_dir)
        leftovers = [p for p in run_dir.rglob("*") if p.is_socket()]
        assert leftovers == []
        assert not run.daemon_socket_dir.exists() and not run.vchan_dir.exists()
        assert testbed.status() == []
    finally:
        testbed.close()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.qrexec_topology(parse_topology(SMALL))
def test_admin_start_brings_a_stopped_domain_up(qrexec_testbed: RunningTestbed) -> None:
    sock = str(qrexec_testbed.testbed.run.qubesd_socket)
    assert qrexec_testbed.running_domains() == ["dom0", "work"]
    assert call_admin(sock, "admin.vm.Start", "cold") == (True, b"")
    assert qrexec_testbed.running_domains() == ["cold", "dom0", "work"]
    assert qrexec_testbed.exec("cold", "DEFAULT:echo up").text == "up\n"
    ok, answer = call_admin(sock, "admin.vm.Start", "cold")
    assert not ok and answer.startswith(b"QubesVMNotHaltedError\0")
    assert call_admin(sock, "admin.vm.Kill", "cold") == (True, b"")
    assert qrexec_testbed.running_domains() == ["dom0", "work"]
    ok, answer = call_admin(sock, "admin.vm.Kill", "cold")
    assert not ok and answer.startswith(b"QubesVMNotStartedError\0")


@pytest.mark.qrexec_topology(parse_topology(SMALL))
def test_admin_create_disposable_makes_a_fresh_domain_that_kill_removes(
    qrexec_testbed: RunningTestbed,
) -> None:
    sock = str(qrexec_testbed.testbed.run.qubesd_socket)
    ok, first = call_admin(sock, "admin.vm.CreateDisposable", "dvm", b"uuid")
    assert ok and first.startswith(b"uuid:")
    ok, second = call_admin(sock, "admin.vm.CreateDisposable", "dvm")
    assert ok
    domains = qrexec_testbed.testbed.domain_states()
    disp1 = next(d for d in domains.values() if d.uuid == first.decode()[5:])
    disp2 = domains[second.decode()]
    assert disp1.name != disp2.name and disp1.id != disp2.id
    assert disp1.disposable and disp1.template == "dvm" and disp1.running
    result = qrexec_testbed.call("dom0", disp1.name, "t.Hi")
    assert result.text == "disposable hi\n"
    assert call_admin(sock, "admin.vm.Kill", first.decode()) == (True, b"")
    assert disp1.name not in qrexec_testbed.testbed.domain_states()
    assert not qrexec_testbed.root(disp1.name).exists()
    assert not any(s.record.domain == disp1.name for s in qrexec_testbed.status())
    ok, answer = call_admin(sock, "admin.vm.CreateDisposable", "work")
    assert not ok and b"not a disposable template" in answer


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"admin.vm.Start dom0 name vm1", "NUL-terminated"),
        (b"admin.vm.Start dom0 vm1\0", "4 header fields"),
        (b"admin.vm.Remove dom0 name vm1\0", "not served"),
        (b"admin.vm.Start dom0 label vm1\0", "destination type"),
        (b"admin.vm.Start dom0 name vm1;rm\0", "destination"),
        (b"admin.vm.Start dom0 name \xff\0", "ASCII"),
    ],
)
def test_admin_requests_are_validated(raw: bytes, message: str) -> None:
    with pytest.raises(AdminError, match=message):
        parse_request(raw)


def test_keyword_destination_is_parsed() -> None:
    request = parse_request(b"admin.vm.CreateDisposable+x dom0 keyword dispvm\0uuid")
    assert (request.method, request.argument, request.dest, request.payload) == (
        "admin.vm.CreateDisposable",
        "x",
        "@dispvm",
        b"uuid",
    )


def test_run_dir_too_long_is_refused_with_the_limit() -> None:
    with pytest.raises(ValueError, match="at most 48 characters"):
        RunDir("/tmp/" + "x" * 60)


@pytest.mark.qrexec_topology(parse_topology(SMALL))
def test_qrexec_client_k_kills_the_destination_after_the_call(
    qrexec_testbed: RunningTestbed,
) -> None:
    sock = str(qrexec_testbed.testbed.run.qubesd_socket)
    ok, name = call_admin(sock, "admin.vm.CreateDisposable", "dvm")
    assert ok
    argv, env = qrexec_testbed.testbed.exec_argv(name.decode(), "DEFAULT:echo last words")
    argv.insert(1, "-k")
    done = qrexec_testbed.testbed.run_client(argv, env)
    assert (done.returncode, done.stdout) == (0, b"last words\n"), done.stderr
    assert name.decode() not in qrexec_testbed.testbed.domain_states()
    # -k on a domain that is not running reports qubesd's refusal but keeps the call's code.
    argv, env = qrexec_testbed.testbed.exec_argv("work", "DEFAULT:exit 3")
    argv.insert(1, "-k")
    assert qrexec_testbed.testbed.run_client(argv, env).returncode == 3
    assert "work" not in qrexec_testbed.running_domains()
    argv, env = qrexec_testbed.testbed.exec_argv("cold", "DEFAULT:true")
    argv.insert(1, "-k")
    done = qrexec_testbed.testbed.run_client(argv, env)
    assert done.returncode == 125
    assert b"QubesVMNotStartedError" in done.stderr


@pytest.mark.qrexec_topology(parse_topology(SMALL))
def test_a_domain_that_cannot_start_is_not_left_half_running(
    qrexec_testbed: RunningTestbed,
) -> None:
    # An agent that cannot start: a file squats its vchan pair folder.
    cold_id = qrexec_testbed.testbed.domain_states()["cold"].id
    (qrexec_testbed.run_dir / "vchan" / f"pair.0.{cold_id}").write_text("in the way")
    sock = str(qrexec_testbed.testbed.run.qubesd_socket)
    ok, answer = call_admin(sock, "admin.vm.Start", "cold")
    assert not ok and answer.startswith(b"QubesException\0")
    assert b"exited while waiting for cold's agent to say HELLO" in answer
    assert "cold" not in qrexec_testbed.running_domains()
    assert not any(s.record.domain == "cold" for s in qrexec_testbed.status())
    assert all(s.alive for s in qrexec_testbed.status())


def test_programs_get_the_pinned_transport_and_none_of_our_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QREXEC_TRANSPORT", "vchan")
    monkeypatch.setenv("VCHAN_SOCKET_DIR", "/elsewhere")
    monkeypatch.setenv("QUBES_RPC_CONFIG_PATH", "/elsewhere")
    monkeypatch.setenv("QREXEC_SERVICE_PATH", "/elsewhere")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    testbed = Testbed("/tmp/qsim-env-test", parse_topology(SMALL))  # nothing is created
    env = testbed.vm_env("work", 7)
    assert env["QREXEC_TRANSPORT"] == "socket"
    assert env["VCHAN_SOCKET_DIR"] == str(testbed.run.vchan_dir)
    assert env["VCHAN_DOMAIN"] == "7"
    for leaked in ("QUBES_RPC_CONFIG_PATH", "QREXEC_SERVICE_PATH", "NOTIFY_SOCKET"):
        assert leaked not in env
    assert env["PATH"] == os.environ["PATH"]
