"""Inside a multi-host compose project: a host's view of itself, and its relay's sshd.

``qrexec-sim container ROLE --topology MULTI.toml --host HOST`` runs here. For every
container of HOST, :func:`host_view` gives the host's topology with ``qubesair.SSHProxy``
installed in its relay qubes (as process mode does) and the RemoteVM records its dom0's
system info carries. In HOST's relay containers :class:`RelaySshd` then

* copies the host's OpenSSH material from the read-only mount (:mod:`.compose_air`) into
  ``/etc/qubes/air`` with the owners OpenSSH insists on (host key root-only, client key the
  relay account's only);
* writes the proxy's configuration (each RemoteVM: the peer relay's name on the ``air``
  network, port 22, its account, the client key, the pinned ``known_hosts``) and the entry's
  (this relay's agent socket and qrexec environment; per peer, the qube names it may claim);
* and, in the host's main relay, starts ``sshd`` (the same ``sshd_config`` as process mode)
  bound only to the container's address on ``air``, and writes its pid to the file the
  healthcheck reads once it listens.

The relay programs are the package's own, unchanged: :mod:`qrexec.air.proxy` and
:mod:`qrexec.air.entry`. Does nothing outside the container it runs in.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import socket
from pathlib import Path

from qrexec.client.client_vm_args import DEFAULT_AGENT_SOCKET
from qrexec.sim import processes
from qrexec.sim.air import sshsetup
from qrexec.sim.air.air_topology import AirTopology, Host, system_info_entries
from qrexec.sim.air.compose_air import (
    AIR_DIR,
    SSH_MOUNT,
    SSHD_PORT,
    SSHD_READY,
    relay_address,
    relays,
)
from qrexec.sim.air.testbed import proxy_script, relay_topology
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.testbed import START_TIMEOUT, TestbedError, find_program
from qrexec.sim.topology import Topology

log = logging.getLogger("qrexec.sim.air.container_relay")

LOG_DIR = Path("/var/log/qubes")
#: The relay's qrexec environment variables the entry passes on to qrexec-client-vm.
_QREXEC_ENV = ("QREXEC_TRANSPORT", "VCHAN_DOMAIN", "VCHAN_SOCKET_DIR", "QREXEC_VCHAN_LAYOUT")


def host_view(air: AirTopology, host_name: str) -> tuple[Topology, dict[str, dict[str, object]]]:
    """(HOST's topology with the transport service in its relays, its RemoteVM records)."""
    host = air.host(host_name)
    topology = relay_topology(host, proxy_script(Path(AIR_DIR) / "proxy.json"))
    return topology, system_info_entries(host, air)


def _install(source: Path, target: Path, mode: int, uid: int, gid: int) -> None:
    shutil.copyfile(source, target)
    os.chown(target, uid, gid)
    os.chmod(target, mode)


def own_address() -> str:
    """This container's address on the ``air`` network (the engine maps its hostname to it)."""
    address = socket.gethostbyname(socket.gethostname())
    if address.startswith("127."):
        raise TestbedError(f"the relay container has no network address ({address})")
    return address


class RelaySshd:
    """One relay container's OpenSSH side: files, and sshd in the host's main relay."""

    def __init__(self, air: AirTopology, host: Host, topology: Topology, name: str) -> None:
        self.air = air
        self.host = host
        self.topology = topology
        self.name = name
        self.account = pwd.getpwnam(topology.domain(name).default_user)
        self.sshd: ProcessRecord | None = None

    def prepare(self) -> None:
        """Put the keys, authorized_keys, known_hosts and both programs' configs in place."""
        folder = Path(AIR_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o755)
        mount = Path(SSH_MOUNT)
        user = (self.account.pw_uid, self.account.pw_gid)
        _install(mount / "ssh_host_ed25519_key", folder / "ssh_host_ed25519_key", 0o600, 0, 0)
        _install(mount / "relay_key", folder / "relay_key", 0o600, *user)
        # sshd reads authorized_keys as the account logging in.
        _install(mount / "authorized_keys", folder / "authorized_keys", 0o644, 0, 0)
        _install(mount / "known_hosts", folder / "known_hosts", 0o644, 0, 0)
        remotes: dict[str, dict[str, object]] = {}
        for remote in self.host.remotes:
            peer = self.air.host(remote.remote_host)
            remotes[remote.name] = {
                "remote_host": remote.remote_host,
                "remote_name": remote.remote_name,
                "address": relay_address(self.air, peer.name),
                "port": SSHD_PORT,
                "user": peer.topology.domain(peer.relay).default_user,
                "key": str(folder / "relay_key"),
                "known_hosts": str(folder / "known_hosts"),
                "connect_timeout": 10,
            }
        (folder / "proxy.json").write_text(sshsetup.proxy_config(remotes))
        entry = {
            "client_vm": find_program("qrexec-client-vm"),
            "agent_socket": DEFAULT_AGENT_SOCKET,
            "env": {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                **{k: os.environ[k] for k in _QREXEC_ENV if k in os.environ},
            },
            "peers": {
                peer.name: self.host.claimable_sources(peer.name)
                for peer in self.air.hosts
                if peer.name != self.host.name
            },
        }
        (folder / "entry.json").write_text(json.dumps(entry, indent=1))
        if self.name == self.host.relay:
            endpoint = sshsetup.Endpoint(own_address(), SSHD_PORT, self.account.pw_name)
            config = sshsetup.sshd_config(
                listen=endpoint,
                host_key=folder / "ssh_host_ed25519_key",
                authorized_keys=folder / "authorized_keys",
                pid_file=Path("/run/sshd-air.pid"),
                max_startups=200,
            )
            (folder / "sshd_config").write_text(config)

    def start(self) -> None:
        """Start sshd (main relay only) and wait until it listens."""
        if self.name != self.host.relay:
            return
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_file = LOG_DIR / "sshd.log"
        argv = [sshsetup.find_openssh("sshd"), "-D", "-e", "-f", f"{AIR_DIR}/sshd_config"]
        self.sshd, _ = processes.spawn(
            "sshd", self.name, argv, {"PATH": "/usr/sbin:/usr/bin:/bin"}, log_file
        )
        processes.wait_for(
            lambda: "Server listening" in log_file.read_text(errors="replace"),
            START_TIMEOUT,
            watch=[self.sshd],
            what="the relay's sshd to listen",
        )
        Path(SSHD_READY).parent.mkdir(parents=True, exist_ok=True)
        Path(SSHD_READY).write_text(f"{self.sshd.pid}\n")
        log.info("sshd listens on the air network (pid %d)", self.sshd.pid)

    def stop(self) -> None:
        if self.sshd is not None:
            Path(SSHD_READY).unlink(missing_ok=True)
            processes.stop([self.sshd])
            self.sshd = None


def relay_sidecar(air: AirTopology, host_name: str, name: str) -> RelaySshd | None:
    """The OpenSSH side of container ``name`` of ``host_name`` if it is a relay, else None."""
    host = air.host(host_name)
    if name not in relays(host):
        return None
    topology, _ = host_view(air, host_name)
    return RelaySshd(air, host, topology, name)
