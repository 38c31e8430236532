"""A multi-host testbed: one process-mode testbed per host, relays joined by OpenSSH.

``up`` makes the network (:mod:`.network`), generates every key, pins every host key, writes
each relay's proxy and entry configuration (:mod:`.sshsetup`), starts each host's testbed with
its RemoteVMs in the system info and ``qubesair.SSHProxy`` installed in its relay qube, and
starts one ``sshd`` per host. ``down`` stops every process it recorded (by pid) and removes
the namespaces. State lives in the run directory, so ``qrexec-sim down`` works from another
process. Process mode is no isolation boundary between hosts: see ``sim/TOPOLOGY.md``.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qrexec.errors import QrexecError
from qrexec.sim import processes
from qrexec.sim.air import network as net
from qrexec.sim.air import sshsetup
from qrexec.sim.air.air_topology import AirTopology, Host, RemoteVM, system_info_entries
from qrexec.sim.harness import CallResult, RunningTestbed
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.rundir import RunDir
from qrexec.sim.testbed import START_TIMEOUT, Testbed, find_program
from qrexec.sim.topology import ServiceSpec, Topology

Progress = Callable[[str], None]
STATE_FILE = "air-state.json"


class AirTestbedError(QrexecError):
    """The multi-host testbed could not start, or was used in the wrong state."""


def _quiet(_: str) -> None:
    pass


def proxy_script(config: Path) -> str:
    """The ``qubesair.SSHProxy`` service file installed into a relay qube."""
    command = shlex.join([sys.executable, "-m", "qrexec.air.proxy", "--config", str(config)])
    return f'#!/bin/sh\nexec {command} "$@"\n'


def relay_topology(host: Host, script: str) -> Topology:
    """``host``'s topology with ``qubesair.SSHProxy`` (``script``) in every relay qube."""
    topology = dataclasses.replace(host.topology, domains=list(host.topology.domains))
    relays = {host.relay, *(r.relayvm for r in host.remotes)}
    for index, dom in enumerate(topology.domains):
        if dom.name in relays:
            service = ServiceSpec(name="qubesair.SSHProxy", script=script)
            topology.domains[index] = dataclasses.replace(dom, services=[*dom.services, service])
    return topology


def local_name(air: AirTopology, source_host: str, target: str) -> str:
    """How ``source_host`` names ``target`` (``HOST:VM``, or a name of its own)."""
    host_name, colon, vm = target.partition(":")
    if not colon:
        return target
    if host_name == source_host:
        return vm
    name = air.host(source_host).local_name_of(host_name, vm)
    if name is None:
        raise AirTestbedError(f"{source_host} knows no RemoteVM for {target}")
    return name


class AirTestbed:
    """Several hosts, each a :class:`RunningTestbed`, and the sshd of each relay."""

    def __init__(
        self, air: AirTopology, run_dir: Path | None = None, *, mode: str | None = None
    ) -> None:
        self._own_dir = run_dir is None
        self.path = run_dir or Path(tempfile.mkdtemp(prefix="qair", dir="/tmp"))
        self.air = air
        self.mode = mode or net.default_mode()
        self.user = getpass.getuser()
        self.network: net.AirNetwork | None = None
        self.hosts: dict[str, RunningTestbed] = {}
        self.sshd: list[ProcessRecord] = []

    # Paths ------------------------------------------------------------------------------
    def host_dir(self, host: str) -> Path:
        return self.path / "h" / host

    def ssh_dir(self, host: str) -> Path:
        return self.path / "ssh" / host

    # Up and down --------------------------------------------------------------------------
    def up(self, progress: Progress = _quiet) -> AirTestbed:
        names = [h.name for h in self.air.hosts]
        progress(f"multi-host testbed: {', '.join(names)} ({self.mode} mode)")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.network = net.make_network(str(self.path), names, self.mode)
            self._save_state()
            keys = self._generate_keys(progress)
            for host in self.air.hosts:
                self._write_host_config(host, keys)
            for host in self.air.hosts:
                progress(f"{host.name}: starting its dom0 and VMs")
                self._start_host(host)
            for host in self.air.hosts:
                self._start_sshd(host)
            self._save_state()
            for host in self.air.hosts:
                self._wait_sshd(host)
        except BaseException:
            progress("start failed; stopping what was started")
            self.down()
            raise
        progress("multi-host testbed up")
        return self

    def _generate_keys(self, progress: Progress) -> dict[str, tuple[str, str]]:
        """(host key, relay client key) public lines of every host."""
        keys: dict[str, tuple[str, str]] = {}
        for host in self.air.hosts:
            folder = self.ssh_dir(host.name)
            progress(f"{host.name}: generating its sshd host key and its relay's key")
            keys[host.name] = (
                sshsetup.generate_key(folder / "ssh_host_ed25519_key", f"{host.name} sshd"),
                sshsetup.generate_key(folder / "relay_key", f"{host.name} relay"),
            )
        return keys

    def _endpoint(self, host: str) -> sshsetup.Endpoint:
        assert self.network is not None
        place = self.network.hosts[host]
        return sshsetup.Endpoint(place.address, place.port, self.user)

    def _write_host_config(self, host: Host, keys: dict[str, tuple[str, str]]) -> None:
        folder = self.ssh_dir(host.name)
        entry_config = folder / "entry.json"
        lines = [
            sshsetup.authorized_key_line(peer.name, keys[peer.name][1], entry_config)
            for peer in self.air.hosts
            if peer.name != host.name
        ]
        sshsetup.write_private(folder / "authorized_keys", "\n".join(lines) + "\n")
        sshsetup.write_private(
            folder / "sshd_config",
            sshsetup.sshd_config(
                listen=self._endpoint(host.name),
                host_key=folder / "ssh_host_ed25519_key",
                authorized_keys=folder / "authorized_keys",
                pid_file=folder / "sshd.pid",
                max_startups=200,
            ),
        )
        remotes: dict[str, dict[str, object]] = {}
        known: list[str] = []
        for remote in host.remotes:
            peer = self._endpoint(remote.remote_host)
            remotes[remote.name] = {
                "remote_host": remote.remote_host,
                "remote_name": remote.remote_name,
                "address": peer.address,
                "port": peer.port,
                "user": peer.user,
                "key": str(folder / "relay_key"),
                "known_hosts": str(folder / "known_hosts"),
                "connect_timeout": 10,
            }
            line = sshsetup.known_hosts_line(remote.remote_host, keys[remote.remote_host][0])
            if line not in known:
                known.append(line)
        sshsetup.write_private(folder / "known_hosts", "\n".join(known) + "\n")
        sshsetup.write_private(folder / "proxy.json", sshsetup.proxy_config(remotes))

    def _host_topology(self, host: Host) -> Topology:
        """The host's topology with the transport service in every relay qube."""
        return relay_topology(host, proxy_script(self.ssh_dir(host.name) / "proxy.json"))

    def _start_host(self, host: Host) -> None:
        assert self.network is not None
        running = RunningTestbed(self._host_topology(host), self.host_dir(host.name))
        running.testbed = Testbed(
            self.host_dir(host.name),
            running.topology,
            air={
                "remote_vms": system_info_entries(host, self.air),
                "wrap": self.network.hosts[host.name].wrap,
            },
        )
        self.hosts[host.name] = running
        running.start()
        relay_env = running.testbed.vm_env(host.relay, host.topology.domain(host.relay).id)
        entry = {
            "client_vm": find_program("qrexec-client-vm"),
            "agent_socket": str(running.testbed.run.agent_socket(host.relay)),
            "env": relay_env,
            "peers": {
                peer.name: host.claimable_sources(peer.name)
                for peer in self.air.hosts
                if peer.name != host.name
            },
        }
        sshsetup.write_private(self.ssh_dir(host.name) / "entry.json", json.dumps(entry, indent=1))

    def _start_sshd(self, host: Host) -> None:
        assert self.network is not None
        folder = self.ssh_dir(host.name)
        if self.mode == net.NETNS:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep folder
        argv = [
            *self.network.hosts[host.name].wrap,
            sshsetup.find_openssh("sshd"),
            "-D",
            "-e",
            "-f",
            str(folder / "sshd_config"),
        ]
        record, _proc = processes.spawn(
            "sshd", host.name, argv, {"PATH": "/usr/sbin:/usr/bin:/bin"}, folder / "sshd.log"
        )
        self.sshd.append(record)

    def _wait_sshd(self, host: Host) -> None:
        log = self.ssh_dir(host.name) / "sshd.log"
        processes.wait_for(
            lambda: "Server listening" in log.read_text(errors="replace"),
            START_TIMEOUT,
            watch=[r for r in self.sshd if r.domain == host.name],
            what=f"{host.name}'s sshd to listen",
        )

    def down(self) -> None:
        """Stop every sshd and every host, remove the namespaces (and our own folder)."""
        try:
            processes.stop(self.sshd)
            self.sshd = []
            if (self.path / STATE_FILE).exists():
                self._save_state()
            for running in self.hosts.values():
                running.testbed.down()
        finally:
            if self.network is not None:
                net.remove_network(self.network)
            if self._own_dir:
                shutil.rmtree(self.path, ignore_errors=True)

    # The RunningTestbed face the pytest plugin uses.
    @property
    def run_dir(self) -> Path:
        return self.path

    def close(self) -> None:
        """Stop everything (as :meth:`down`)."""
        self.down()

    def logs(self) -> str:
        """Every host's logs and every sshd's log, for a failed test's report."""
        parts = []
        for name, running in self.hosts.items():
            text = running.logs()
            if text:
                parts.append(f"==== host {name} ====\n{text}")
        for host in self.air.hosts:
            log = self.ssh_dir(host.name) / "sshd.log"
            if log.exists():
                parts.append(f"==== sshd of {host.name} ====\n{log.read_text(errors='replace')}")
        return "\n".join(parts)

    def audit(self, host: str) -> list[dict[str, object]]:
        """``host``'s dom0 audit log records."""
        return self.hosts[host].audit()

    def __enter__(self) -> AirTestbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _save_state(self) -> None:
        state: dict[str, Any] = {
            "mode": self.mode,
            "network": dataclasses.asdict(self.network) if self.network else None,
            "sshd": [dataclasses.asdict(r) for r in self.sshd],
            "hosts": [
                {
                    "name": h.name,
                    "relay": h.relay,
                    "remotes": [dataclasses.asdict(r) for r in h.remotes],
                }
                for h in self.air.hosts
            ],
        }
        (self.path / STATE_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def open(cls, run_dir: Path) -> AirTestbed:
        """The multi-host testbed running in ``run_dir`` (for ``qrexec-sim call``/``down``)."""
        try:
            state = json.loads((run_dir / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise AirTestbedError(f"no multi-host testbed in {run_dir}: {exc}") from exc
        hosts = []
        for raw in state["hosts"]:
            host_dir = run_dir / "h" / raw["name"]
            topology = RunDir(host_dir).load_topology()
            remotes = [RemoteVM(**r) for r in raw["remotes"]]
            hosts.append(Host(raw["name"], raw["relay"], topology, remotes))
        testbed = cls(AirTopology(hosts), run_dir, mode=state["mode"])
        if state.get("network"):
            raw_net = state["network"]
            testbed.network = net.AirNetwork(
                raw_net["mode"],
                {k: net.HostNetwork(**v) for k, v in raw_net["hosts"].items()},
                raw_net.get("switch"),
            )
        testbed.sshd = [ProcessRecord(**r) for r in state["sshd"]]
        for host in hosts:
            running = RunningTestbed(host.topology, testbed.host_dir(host.name))
            running.testbed = Testbed(testbed.host_dir(host.name))
            testbed.hosts[host.name] = running
        return testbed

    def status(self) -> list[str]:
        """One line per process of every host, and each sshd."""
        lines = []
        for record in self.sshd:
            word = "running" if processes.is_alive(record) else "DEAD"
            lines.append(f"{record.domain:8} sshd           pid {record.pid:<8} {word}")
        for name, running in self.hosts.items():
            for entry in running.testbed.status():
                word = "running" if entry.alive else "DEAD"
                record = entry.record
                lines.append(
                    f"{name:8} {record.role:14} {record.domain:10} pid {record.pid:<8} {word}"
                )
        return lines

    # Calls ------------------------------------------------------------------------------
    def local_name(self, source_host: str, target: str) -> str:
        """How ``source_host`` names ``target`` (``HOST:VM``, or a name of its own)."""
        return local_name(self.air, source_host, target)

    def call_argv(
        self, source: str, target: str, service: str, local_program: Sequence[str] = ()
    ) -> tuple[list[str], dict[str, str], str | None]:
        """The client invocation for a call from ``HOST:VM`` (see :meth:`local_name`)."""
        source_host, colon, source_vm = source.partition(":")
        if not colon or source_host not in self.hosts:
            raise AirTestbedError(f"source {source!r} is not HOST:VM of this testbed")
        local = self.local_name(source_host, target)
        return self.hosts[source_host].testbed.call_argv(source_vm, local, service, local_program)

    def call(
        self,
        source: str,
        target: str,
        service: str,
        *,
        input: bytes = b"",
        timeout: float = 60.0,
        local_program: Sequence[str] = (),
    ) -> CallResult:
        """Call ``service`` from ``HOST:VM`` to ``HOST:VM`` through both hosts' policies."""
        argv, env, cwd = self.call_argv(source, target, service, local_program)
        running = self.hosts[source.partition(":")[0]]
        done = running.testbed.run_client(argv, env, cwd=cwd, input=input, timeout=timeout)
        return CallResult(done.returncode, done.stdout, done.stderr)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
