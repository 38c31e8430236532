"""The pure parts of cross-host calls: argument splitting, request lines, the entry's checks,
the topology, and the OpenSSH material (no ssh is run here)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from air_support import TOPOLOGY, topology

from qrexec.air import entry, proxy
from qrexec.air.request import (
    AirRequestError,
    parse_request_line,
    split_transport_argument,
)
from qrexec.sim.air import sshsetup
from qrexec.sim.air.air_topology import parse_air_topology, system_info_entries
from qrexec.sim.topology import TopologyError


@pytest.mark.parametrize(
    ("text", "target", "service", "argument"),
    [
        ("hostB-vm2+test.Add+", "hostB-vm2", "test.Add", ""),
        ("hostB-vm2+test.Add", "hostB-vm2", "test.Add", ""),
        ("hostB-vm2+qubes.Filecopy+a+b", "hostB-vm2", "qubes.Filecopy", "a+b"),
        ("v+s++", "v", "s", "+"),
    ],
)
def test_transport_argument_splits_at_the_first_two_plus_only(
    text: str, target: str, service: str, argument: str
) -> None:
    parsed = split_transport_argument(text)
    assert (parsed.remote_target, parsed.service, parsed.argument) == (target, service, argument)
    assert parsed.service_call == f"{service}+{argument}"


@pytest.mark.parametrize(
    "text", ["", "hostB-vm2", "hostB-vm2+", "+test.Add", "a b+test.Add", "vm+te st", "vm+a/b", ".."]
)
def test_bad_transport_arguments_are_refused(text: str) -> None:
    with pytest.raises(AirRequestError):
        split_transport_argument(text)


def test_request_line_round_trip_and_refusals() -> None:
    request = parse_request_line("vm1 vm2 test.Add+x")
    assert (request.source, request.target, request.service_call) == ("vm1", "vm2", "test.Add+x")
    assert request.line() == "vm1 vm2 test.Add+x"
    for bad in [
        "",
        "vm1 vm2",
        "vm1 vm2 test.Add extra",
        "vm1  vm2 test.Add",
        "vm1 vm2 test.Add;id",
        "$(id) vm2 test.Add",
        "vm1 ../x test.Add",
        "vm1 vm2 +test.Add",
        "vm1 vm2 " + "a" * 600,
    ]:
        with pytest.raises(AirRequestError):
            parse_request_line(bad)


ENTRY_CONFIG = {
    "client_vm": "/usr/bin/qrexec-client-vm",
    "agent_socket": "/run/relay/agent.sock",
    "env": {},
    "peers": {"hostA": {"vm1": "hostA-vm1"}, "hostC": {"vm1": "hostC-vm1"}},
}


def test_entry_maps_the_peers_qube_to_its_local_name() -> None:
    argv = entry.prepare(ENTRY_CONFIG, "hostA", "vm1 vm2 test.Add+")
    assert argv == [
        "/usr/bin/qrexec-client-vm",
        "-a",
        "/run/relay/agent.sock",
        "--source-qube=hostA-vm1",
        "vm2",
        "test.Add+",
    ]
    # The same qube name from another peer is that peer's qube, never hostA's.
    assert entry.prepare(ENTRY_CONFIG, "hostC", "vm1 vm2 test.Add")[3] == "--source-qube=hostC-vm1"


@pytest.mark.parametrize(
    ("peer", "command", "message"),
    [
        ("hostC", "hostA-vm1 vm2 test.Add", "hostC may not call on behalf of 'hostA-vm1'"),
        ("hostA", "vm9 vm2 test.Add", "hostA may not call on behalf of 'vm9'"),
        ("hostZ", "vm1 vm2 test.Add", "hostZ is not a peer"),
        ("hostA", "vm1 vm2 test.Add;id", "invalid service"),
        ("hostA", "", "is not 'SOURCE TARGET"),
    ],
)
def test_entry_refuses_with_126_and_one_line(
    peer: str, command: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert entry.prepare(ENTRY_CONFIG, peer, command) == 126
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_entry_usage_and_unreadable_config(tmp_path: Path) -> None:
    assert entry.main(["--peer", "hostA"]) == 125
    assert entry.main(["--peer", "hostA", "--config", str(tmp_path / "missing.json")]) == 125


def test_proxy_refuses_unknown_targets_and_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps({"ssh": "/bin/false", "remotes": {}}))
    assert proxy.main(["--config", str(config), "hostB-vm2+test.Add+"]) == 125
    assert "no remote qube 'hostB-vm2'" in capsys.readouterr().err
    assert proxy.main(["--config", str(config), "nonsense"]) == 125
    assert "bad transport argument" in capsys.readouterr().err
    assert proxy.main(["--config", str(tmp_path / "none.json"), "x+y"]) == 125


def test_proxy_runs_ssh_with_pinned_keys_and_an_argument_list() -> None:
    remote = {
        "remote_host": "hostB",
        "remote_name": "vm2",
        "address": "169.254.7.2",
        "port": 22,
        "user": "root",
        "key": "/k",
        "known_hosts": "/kh",
    }
    request = parse_request_line("vm1 vm2 test.Add+")
    argv = proxy.ssh_argv("/usr/bin/ssh", remote, request, "/log")
    assert argv[0] == "/usr/bin/ssh"
    for option in (
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "UserKnownHostsFile=/kh",
        "GlobalKnownHostsFile=/dev/null",
        "HostKeyAlias=qubes-air-hostB",
        "IdentityFile=/k",
        "IdentitiesOnly=yes",
    ):
        assert option in argv
    assert argv[argv.index("-F") + 1] == "/dev/null"
    assert argv[-3:] == ["--", "169.254.7.2", "vm1 vm2 test.Add+"]


def test_authorized_keys_bind_the_peer_and_restrict_everything(tmp_path: Path) -> None:
    line = sshsetup.authorized_key_line("hostA", "ssh-ed25519 AAAAkey hostA relay", tmp_path / "e")
    assert line.startswith('restrict,command="')
    assert "--peer hostA" in line
    assert line.endswith(" ssh-ed25519 AAAAkey hostA relay")
    assert sshsetup.known_hosts_line("hostB", "ssh-ed25519 AAAAhost c") == (
        "qubes-air-hostB ssh-ed25519 AAAAhost"
    )


def test_sshd_config_allows_forced_commands_and_keys_only(tmp_path: Path) -> None:
    text = sshsetup.sshd_config(
        listen=sshsetup.Endpoint("127.0.0.1", 2222, "user"),
        host_key=tmp_path / "hk",
        authorized_keys=tmp_path / "ak",
        pid_file=tmp_path / "pid",
        max_startups=50,
    )
    assert "ListenAddress 127.0.0.1:2222" in text
    assert "PasswordAuthentication no" in text
    assert "PermitRootLogin forced-commands-only" in text
    assert "AuthenticationMethods publickey" in text
    assert "AllowTcpForwarding no" in text


def test_multi_host_topology_and_its_remote_vms() -> None:
    air = topology()
    assert [h.name for h in air.hosts] == ["hostA", "hostB", "hostC"]
    host_b = air.host("hostB")
    assert host_b.claimable_sources("hostA") == {"vm1": "hostA-vm1"}
    assert host_b.claimable_sources("hostC") == {"vm1": "hostC-vm1"}
    assert air.host("hostA").local_name_of("hostB", "vm2") == "hostB-vm2"
    info = system_info_entries(air.host("hostA"), air)
    assert info["hostB-vm2"]["type"] == "RemoteVM"
    assert info["hostB-vm2"]["relayvm"] == "relay"
    assert info["hostB-vm2"]["transport_rpc"] == "qubesair.SSHProxy"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["host"][0]["remote"][0].update(remote_host="hostZ"), "unknown"),
        (lambda d: d["host"][0]["remote"][0].update(remote_name="vm9"), "has no VM 'vm9'"),
        (lambda d: d["host"][0]["remote"][0].update(name="vm1"), "already taken"),
        (lambda d: d["host"][0].update(relay="vm9"), "is not a VM of it"),
        (lambda d: d["host"][1].update(name="hostA"), "appears twice"),
        (lambda d: d["host"][0].update(colour="blue"), "unknown keys"),
        (lambda d: d["host"][0]["remote"][0].update(name="bad name"), "invalid"),
        (lambda d: d.update(host=d["host"][:1]), "at least two"),
    ],
)
def test_multi_host_topology_errors_name_the_key(edit: object, message: str) -> None:
    data = tomllib.loads(TOPOLOGY)
    edit(data)  # type: ignore[operator]
    with pytest.raises(TopologyError, match=message):
        parse_air_topology(data)
