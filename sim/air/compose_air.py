"""A multi-host topology as one compose file: every host's containers, joined only by relays.

Each host is rendered as in the single-host compose file (:func:`qrexec.sim.compose.build_compose`:
dom0 and one container per VM, no network at all, vchans and power sockets in named
volumes), with every service and volume name prefixed by the host's (``hostA-dom0``,
``hostA-vchan-0-2``): no volume is shared between hosts, so no domain of one host can reach
a vchan, a daemon or a power socket of another. The one network of the file, ``air``
(``internal``: nothing outside the engine's containers), has only the relay qubes as members;
a relay's sshd listens only on its address there (:mod:`.container_relay`). A cross-host call
therefore has one way out of a host: qrexec to the relay, OpenSSH to the peer's relay.

The relay containers, and only they, mount their host's OpenSSH material (read-only, from a
folder next to the compose file, written by :func:`write_ssh_material` with
:mod:`.sshsetup`): the sshd host key, the relay's client key, ``authorized_keys`` (each peer
key with ``restrict`` and a forced command bound to that peer) and ``known_hosts`` (every peer
relay's host key, pinned). :func:`build_air_compose` does no I/O; :func:`write_ssh_material`
runs ``ssh-keygen`` and writes that folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qrexec.sim.air import sshsetup
from qrexec.sim.air.air_topology import AirTopology, Host
from qrexec.sim.compose import build_compose, to_yaml

#: The network shared by the relay containers (and nothing else).
AIR_NETWORK = "air"
#: Where a relay container finds its host's OpenSSH material (read-only).
SSH_MOUNT = "/etc/qrexec-sim/air"
#: Where the relay keeps its working copy of it (owned and moded for sshd and ssh).
AIR_DIR = "/etc/qubes/air"
#: The interpreter inside the image (the forced command names it).
IMAGE_PYTHON = "/usr/bin/python3"
#: Written by a relay container once its sshd listens: ``PID`` (the healthcheck reads it).
SSHD_READY = "/run/qubes-sim/sshd.ready"
SSHD_PORT = 22


def service_name(host: str, domain: str) -> str:
    """The compose service (and container DNS name) of ``host``'s ``domain``."""
    return f"{host}-{domain}"


def relay_address(air: AirTopology, host: str) -> str:
    """The name by which relays reach ``host``'s relay on the ``air`` network."""
    return service_name(host, air.host(host).relay)


def relays(host: Host) -> set[str]:
    """Every qube of ``host`` that carries cross-host traffic."""
    return {host.relay, *(r.relayvm for r in host.remotes)}


def _prefixed_mounts(host: str, mounts: list[str], volumes: Mapping[str, object]) -> list[str]:
    """Rename named-volume mounts (``VOLUME:PATH``) to the host's volumes; binds stay."""
    renamed = []
    for mount in mounts:
        volume, _, rest = mount.partition(":")
        renamed.append(f"{host}-{volume}:{rest}" if volume in volumes else mount)
    return renamed


def build_air_compose(
    air: AirTopology,
    *,
    topology_dir: str,
    topology_name: str,
    ssh_dir: str,
    build_context: str = ".",
) -> dict[str, object]:
    """The compose document for every host of ``air``.

    ``topology_dir``/``topology_name``: the multi-host file's folder (relative to the compose
    file) and name, mounted read-only into every container; ``ssh_dir``: the folder of
    :func:`write_ssh_material` (relative to the compose file), one subfolder per host.
    """
    services: dict[str, object] = {}
    volumes: dict[str, object] = {}
    for host in air.hosts:
        single = build_compose(
            host.topology,
            topology_dir=topology_dir,
            topology_name=topology_name,
            build_context=build_context,
        )
        host_volumes = single["volumes"]
        assert isinstance(host_volumes, dict)
        for volume, spec in host_volumes.items():
            volumes[f"{host.name}-{volume}"] = spec
        host_services = single["services"]
        assert isinstance(host_services, dict)
        for name, raw in host_services.items():
            spec = dict(raw)
            spec["command"] = [*spec["command"], "--host", host.name]
            spec["volumes"] = _prefixed_mounts(host.name, list(spec["volumes"]), host_volumes)
            if name in relays(host):
                del spec["network_mode"]
                spec["networks"] = [AIR_NETWORK]
                spec["volumes"] = [*spec["volumes"], f"{ssh_dir}/{host.name}:{SSH_MOUNT}:ro"]
            if name == host.relay:
                health = dict(spec["healthcheck"])
                test = list(health["test"])
                # $$: compose's escape for a literal $.
                test[-1] = f"{test[-1]} && read pid < {SSHD_READY} && kill -0 $$pid"
                health["test"] = test
                spec["healthcheck"] = health
            services[service_name(host.name, name)] = spec
    return {
        "services": services,
        "volumes": volumes,
        "networks": {AIR_NETWORK: {"internal": True}},
    }


HEADER = """\
# Generated by `qrexec-sim compose` from the multi-host topology {source}. Do not edit.
# Every host's dom0 and VMs as in the single-host file (no network; vchans in the host's own
# volumes), services named HOST-DOMAIN; the only network, "{network}", joins the relay
# containers, whose sshd is the only way between hosts (see sim/CONTAINERS.md).
# OpenSSH keys: {ssh_dir}/ (generated with this file; relay containers mount their host's).
#   docker compose up -d --wait
#   docker compose exec -u user hostA-vm1 qrexec-client-vm hostB-vm2 test.Add \\
#       /usr/bin/our_test_add_client 11 22
#   docker compose down -v
"""


def render_air_compose(air: AirTopology, *, source: str, ssh_dir: str, **kw: str) -> str:
    """The compose file's text (header comment + YAML)."""
    header = HEADER.format(source=source, network=AIR_NETWORK, ssh_dir=ssh_dir)
    return header + to_yaml(build_air_compose(air, ssh_dir=ssh_dir, **kw))


def write_ssh_material(air: AirTopology, folder: Path) -> None:
    """Generate every host's keys into ``folder/HOST/``, with authorized_keys and known_hosts.

    Fresh keys every time (a new compose file means new keys). Files are readable by their
    owner only; the relay container copies them into place with the owners sshd and ssh want.
    """
    keys: dict[str, tuple[str, str]] = {}
    for host in air.hosts:
        where = folder / host.name
        where.mkdir(parents=True, exist_ok=True)
        where.chmod(0o700)
        keys[host.name] = (
            sshsetup.generate_key(where / "ssh_host_ed25519_key", f"{host.name} sshd"),
            sshsetup.generate_key(where / "relay_key", f"{host.name} relay"),
        )
    entry_config = Path(AIR_DIR) / "entry.json"
    for host in air.hosts:
        where = folder / host.name
        authorized = [
            sshsetup.authorized_key_line(peer.name, keys[peer.name][1], entry_config, IMAGE_PYTHON)
            for peer in air.hosts
            if peer.name != host.name
        ]
        sshsetup.write_private(where / "authorized_keys", "\n".join(authorized) + "\n")
        known: list[str] = []
        for remote in host.remotes:
            line = sshsetup.known_hosts_line(remote.remote_host, keys[remote.remote_host][0])
            if line not in known:
                known.append(line)
        sshsetup.write_private(where / "known_hosts", "\n".join(known) + "\n")
