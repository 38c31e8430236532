"""The compose form of a multi-host topology: what is shared between hosts (only the relays'
network) and what the relays get. The rendering is pure; the key folder needs ssh-keygen."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from air_support import topology

from qrexec.sim.air.air_topology import load_air_topology
from qrexec.sim.air.compose_air import AIR_NETWORK, SSH_MOUNT, build_air_compose
from qrexec.sim.cli import main as sim_main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "air-two-hosts.toml"


def _document() -> dict[str, dict[str, dict[str, object]]]:
    return build_air_compose(  # type: ignore[return-value]
        topology(), topology_dir="./t", topology_name="air.toml", ssh_dir="./keys"
    )


def test_every_host_has_its_own_prefixed_services_and_volumes() -> None:
    document = _document()
    services = document["services"]
    assert set(services) == {
        f"{host}-{domain}"
        for host in ("hostA", "hostB", "hostC")
        for domain in ("dom0", "relay", "vm1", "vm2")
    }
    owners: dict[str, set[str]] = {}
    for name, service in services.items():
        host = name.split("-", 1)[0]
        assert service["command"][-2:] == ["--host", host]  # type: ignore[index]
        for mount in service["volumes"]:  # type: ignore[attr-defined]
            source = mount.split(":", 1)[0]
            if source in document["volumes"]:
                assert source.startswith(f"{host}-"), (name, mount)
                owners.setdefault(source, set()).add(host)
    # Same domain ids on every host, yet no volume (vchan pair, power socket) is shared.
    assert "hostA-vchan-0-1" in owners and "hostB-vchan-0-1" in owners
    assert all(len(hosts) == 1 for hosts in owners.values())


def test_only_relays_are_on_a_network_and_only_they_see_keys() -> None:
    document = _document()
    assert document["networks"] == {AIR_NETWORK: {"internal": True}}
    for name, service in document["services"].items():
        keys = [m for m in service["volumes"] if SSH_MOUNT in m]  # type: ignore[attr-defined]
        if name.endswith("-relay"):
            assert "network_mode" not in service
            assert service["networks"] == [AIR_NETWORK]
            host = name.split("-", 1)[0]
            assert keys == [f"./keys/{host}:{SSH_MOUNT}:ro"]
            # Healthy only once its sshd listens.
            assert "sshd.ready" in service["healthcheck"]["test"][-1]  # type: ignore[index]
        else:
            assert service["network_mode"] == "none" and "networks" not in service
            assert keys == []


@pytest.mark.ssh
def test_qrexec_sim_compose_writes_the_file_and_pinned_keys(tmp_path: Path) -> None:
    out = tmp_path / "compose.air.yaml"
    args = ["compose", "--topology", str(EXAMPLE), "-o", str(out), "--context", str(REPO)]
    assert sim_main(args) == 0
    document = yaml.safe_load(out.read_text())
    assert set(document["services"]) == {
        "hostA-dom0", "hostA-relay", "hostA-vm1", "hostB-dom0", "hostB-relay", "hostB-vm2",
    }  # fmt: skip
    keys = tmp_path / "compose.air-ssh"
    relay = document["services"]["hostA-relay"]
    assert f"./compose.air-ssh/hostA:{SSH_MOUNT}:ro" in relay["volumes"]
    air = load_air_topology(EXAMPLE)
    for host in air.hosts:
        folder = keys / host.name
        assert (folder.stat().st_mode & 0o777) == 0o700
        for private in ("ssh_host_ed25519_key", "relay_key"):
            assert ((folder / private).stat().st_mode & 0o777) == 0o600
        peer = next(h.name for h in air.hosts if h.name != host.name)
        # The peer's client key, bound to the peer's name, no shell; the peer's host key pinned.
        peer_key = (keys / peer / "relay_key.pub").read_text().split()[1]
        (line,) = (folder / "authorized_keys").read_text().splitlines()
        assert line.startswith(
            f'restrict,command="/usr/bin/python3 -m qrexec.air.entry --peer {peer} '
            '--config /etc/qubes/air/entry.json" ssh-ed25519 '
        )
        assert peer_key in line
        host_key = (keys / peer / "ssh_host_ed25519_key.pub").read_text().split()[1]
        assert (folder / "known_hosts").read_text() == (
            f"qubes-air-{peer} ssh-ed25519 {host_key}\n"
        )


def test_a_multi_host_compose_file_needs_an_output_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert sim_main(["compose", "--topology", str(EXAMPLE)]) == 1
    assert "give -o FILE" in capsys.readouterr().err
