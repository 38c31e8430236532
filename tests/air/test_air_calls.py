"""Cross-host calls through two dom0s and OpenSSH: the seed HOWTO, refusals on each side,
bulk data, concurrency, and what the caller sees when the transport fails."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import stray_processes

from qrexec.sim import processes
from qrexec.sim.air.testbed import AirTestbed, wait_until

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(300)]

#: The rule each host's policy decides the seed's call by.
RULES = {
    "hostA": "test.Add * vm1 hostB-vm2 {action}\n",
    "hostB": "test.Add * hostA-vm1 vm2 {action}\n",
}
ADD_CLIENT = ["/usr/bin/our_test_add_client", "11", "22"]


def seed_call(air: AirTestbed) -> subprocess.CompletedProcess[bytes] | object:
    return air.call("hostA:vm1", "hostB:vm2", "test.Add", local_program=ADD_CLIENT)


def assert_clean(air: AirTestbed) -> None:
    """No relayed call left a process behind, and the next call works."""
    assert wait_until(lambda: not stray_processes(air), 10), stray_processes(air)
    result = air.call("hostA:vm1", "hostB:vm2", "test.Add", local_program=ADD_CLIENT)
    assert (result.returncode, result.stderr) == (0, b"33\n")


def test_seed_howto_across_hosts_with_both_audits_naming_the_source(air: AirTestbed) -> None:
    print(f"network mode: {air.mode}")
    result = air.call("hostA:vm1", "hostB:vm2", "test.Add", local_program=ADD_CLIENT)
    # The seed's client prints "11 22" to the service and copies its answer to stderr.
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"33\n")
    audit_a = [r for r in air.hosts["hostA"].audit() if r.get("service") == "test.Add"]
    audit_b = [r for r in air.hosts["hostB"].audit() if r.get("service") == "test.Add"]
    assert audit_a[-1]["source"] == "vm1"
    assert audit_a[-1]["requested_target"] == "hostB-vm2"
    # hostB's dom0 decided the call as hostA-vm1's (the relay only carried it).
    assert audit_b[-1]["requested_source"] == "hostA-vm1"
    assert audit_b[-1]["source"] == "relay"
    assert audit_b[-1]["target"] == "vm2"
    assert audit_a[-1]["result"] == audit_b[-1]["result"] == "allow"


@contextmanager
def policy(air: AirTestbed, host: str, text: str) -> Iterator[None]:
    """Put ``text`` before the topology's rules on ``host`` for the duration."""
    path = air.hosts[host].set_policy(text, file="10-override.policy")
    try:
        yield
    finally:
        path.unlink()
        # The policy daemon reloads by stat fingerprint: make the removal visible at once.
        os.utime(path.parent)


@pytest.mark.parametrize("host", ["hostA", "hostB"])
def test_deny_on_either_side_gives_126(air: AirTestbed, host: str) -> None:
    rule = (
        "test.Add * vm1 hostB-vm2 deny\n" if host == "hostA" else "test.Add * hostA-vm1 vm2 deny\n"
    )
    with policy(air, host, rule):
        result = seed_call(air)
        assert result.returncode == 126
    assert_clean(air)


@pytest.mark.parametrize("host", ["hostA", "hostB"])
def test_ask_on_either_side_is_answered_by_the_prompter(air: AirTestbed, host: str) -> None:
    rule = "test.Add * vm1 hostB-vm2 ask\n" if host == "hostA" else "test.Add * hostA-vm1 vm2 ask\n"
    with policy(air, host, rule):
        result = seed_call(air)
        assert (result.returncode, result.stderr) == (0, b"33\n")
    audit = [r for r in air.hosts[host].audit() if r.get("service") == "test.Add"]
    assert audit[-1]["result"] == "ask-allowed"


def test_64_mib_each_way_hash_exact(air: AirTestbed) -> None:
    data = os.urandom(1 << 20) * 64
    started = time.monotonic()
    result = air.call("hostA:vm1", "hostB:vm2", "test.Cat", input=data, timeout=240)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    print(f"64 MiB each way across hosts in {elapsed:.2f} s")


def test_20_concurrent_cross_host_calls(air: AirTestbed) -> None:
    def one(index: int) -> tuple[int, bytes]:
        payload = f"{index} {index * 3}\n".encode()
        result = air.call("hostA:vm1", "hostB:vm2", "test.Cat", input=payload * 100)
        return result.returncode, result.stdout == payload * 100

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert results == [(0, True)] * 20
    assert_clean(air)


def test_a_third_host_cannot_claim_host_a_qubes_through_b(air: AirTestbed) -> None:
    # hostC's own vm1 arrives on hostB as hostC-vm1, whom hostB's policy does not allow.
    result = air.call("hostC:vm1", "hostB:vm2", "test.Add", local_program=ADD_CLIENT)
    assert result.returncode == 126
    audit_b = [r for r in air.hosts["hostB"].audit() if r.get("service") == "test.Add"]
    assert audit_b[-1]["requested_source"] == "hostC-vm1"
    # With its own key, hostC asks hostB's sshd directly to run as hostA's vm1: refused by
    # the entry (126) before any qrexec call, whatever name it tries.
    ssh_dir = air.ssh_dir("hostC")
    endpoint = air._endpoint("hostB")
    for claimed in ("hostA-vm1", "vm1@hostA"):
        argv = [
            "ssh", "-F", "/dev/null", "-T", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={air.ssh_dir('hostA') / 'known_hosts'}",
            "-o", "HostKeyAlias=qubes-air-hostB", "-o", "IdentitiesOnly=yes",
            "-o", f"IdentityFile={ssh_dir / 'relay_key'}", "-o", "LogLevel=ERROR",
            "-p", str(endpoint.port), "-l", endpoint.user, "--", endpoint.address,
            f"{claimed} vm2 test.Add+",
        ]  # fmt: skip
        wrap = air.network.hosts["hostC"].wrap if air.network else []
        done = subprocess.run([*wrap, *argv], capture_output=True, timeout=60, check=False)
        assert done.returncode == 126, done.stderr
        assert b"may not call on behalf of" in done.stderr or b"invalid source" in done.stderr
    assert_clean(air)


def _transport_failure(air: AirTestbed, cause: bytes) -> None:
    result = seed_call(air)
    assert result.returncode == 125, result
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("qubesair.SSHProxy: hostB-vm2 (hostB): ")
    assert cause.decode() in lines[0], lines[0]


def _restart_sshd(air: AirTestbed, host: str) -> None:
    air._start_sshd(air.air.host(host))
    log = air.ssh_dir(host) / "sshd.log"
    assert wait_until(lambda: log.read_text().count("Server listening") >= 2, 30)


def test_peer_host_down_gives_125_naming_the_cause(air: AirTestbed) -> None:
    mine = [r for r in air.sshd if r.domain == "hostB"]
    processes.stop(mine)
    air.sshd = [r for r in air.sshd if r.domain != "hostB"]
    try:
        _transport_failure(air, b"Connection refused")
    finally:
        (air.ssh_dir("hostB") / "sshd.log").write_text("")
        air._start_sshd(air.air.host("hostB"))
        assert wait_until(
            lambda: "Server listening" in (air.ssh_dir("hostB") / "sshd.log").read_text(), 30
        )
    assert_clean(air)


def test_sshd_refusing_the_key_gives_125(air: AirTestbed) -> None:
    keys = air.ssh_dir("hostB") / "authorized_keys"
    saved = keys.read_text()
    keys.write_text("")
    try:
        _transport_failure(air, b"Permission denied")
    finally:
        keys.write_text(saved)
    assert_clean(air)


def test_wrong_host_key_gives_125(air: AirTestbed) -> None:
    known = air.ssh_dir("hostA") / "known_hosts"
    saved = known.read_text()
    # Pin hostC's key under hostB's alias: a host that is not who it should be.
    other = (air.ssh_dir("hostC") / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known.write_text(f"qubes-air-hostB {' '.join(other)}\n")
    try:
        _transport_failure(air, b"Host key verification failed")
    finally:
        known.write_text(saved)
    assert_clean(air)


def test_stopped_relay_qube_is_autostarted(air: AirTestbed) -> None:
    running = air.hosts["hostA"]
    running.testbed.stop_domain("relay")
    assert not running.testbed.domain_states()["relay"].running
    result = seed_call(air)
    assert (result.returncode, result.stderr) == (0, b"33\n")
    assert running.testbed.domain_states()["relay"].running
    assert_clean(air)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [*_descendants(child), child]
    return found


def test_remote_call_killed_mid_stream_gives_125(air: AirTestbed) -> None:
    sshd = next(r for r in air.sshd if r.domain == "hostB")
    before = set(_children(sshd.pid))
    running = air.hosts["hostA"]
    argv, env, cwd = running.testbed.call_argv("vm1", "hostB-vm2", "test.Cat")
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"first\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"first\n"
        sessions = [pid for pid in _children(sshd.pid) if pid not in before]
        assert sessions, "no sshd session for the running call"
        # The whole session: without root, sshd's per-connection child forks the process
        # that holds the connection, so killing the child alone would not cut it.
        doomed = [d for pid in sessions for d in _descendants(pid)] + sessions
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 125, (proc.returncode, err)
    lines = err.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qubesair.SSHProxy: hostB-vm2"), lines
    assert_clean(air)
