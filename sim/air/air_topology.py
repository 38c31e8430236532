"""Multi-host topologies: several Qubes hosts, each with its own dom0, and who relays for whom.

A multi-host file has one ``[[host]]`` table per host::

    [[host]]
    name = "hostA"
    relay = "relay"                 # the qube of this host that carries cross-host traffic
    topology = "hostA.toml"         # a single-host topology file (or an inline [host.topology])

    [[host.remote]]                 # a RemoteVM: a qube of another host, as this host knows it
    name = "hostB-vm2"              # its local name here (any valid qube name)
    remote_host = "hostB"
    remote_name = "vm2"             # its name on its own host
    # relayvm = "relay"             # default: the host's relay
    # transport_rpc = "qubesair.SSHProxy"

A host's RemoteVM entries serve both ways: as call targets (dom0 redirects a call for
``hostB-vm2`` to the relay) and as the names by which callers from other hosts are known (a
request from hostB's ``vm2`` arrives as ``hostB-vm2``, and only hostB may claim it). The format
is documented in ``sim/TOPOLOGY.md``. Validation happens here; reads only the files named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrexec.air.request import AirRequestError, check_name
from qrexec.sim.topology import (
    Topology,
    TopologyError,
    derived_uuid,
    parse_topology,
    read_topology_file,
)

#: The transport service every relay runs unless a RemoteVM names another.
DEFAULT_TRANSPORT = "qubesair.SSHProxy"
_HOST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")


@dataclass(frozen=True)
class RemoteVM:
    """A qube of another host, as one host knows it."""

    name: str
    remote_host: str
    remote_name: str
    relayvm: str
    transport_rpc: str = DEFAULT_TRANSPORT

    @property
    def uuid(self) -> str:
        """A stable uuid for the local entry (derived from host and name)."""
        return derived_uuid(f"air:{self.remote_host}:{self.remote_name}:{self.name}")


@dataclass
class Host:
    """One Qubes host of a multi-host testbed."""

    name: str
    relay: str
    topology: Topology
    remotes: list[RemoteVM] = field(default_factory=list)

    def remote(self, name: str) -> RemoteVM | None:
        """The RemoteVM called ``name`` on this host."""
        return next((r for r in self.remotes if r.name == name), None)

    def local_name_of(self, host: str, qube: str) -> str | None:
        """The name this host knows ``host``'s ``qube`` by, if it knows it at all."""
        for remote in self.remotes:
            if remote.remote_host == host and remote.remote_name == qube:
                return remote.name
        return None

    def claimable_sources(self, peer: str) -> dict[str, str]:
        """Names ``peer`` may claim as a call's source → the local RemoteVM names."""
        return {r.remote_name: r.name for r in self.remotes if r.remote_host == peer}


@dataclass
class AirTopology:
    """Every host of a multi-host testbed."""

    hosts: list[Host]

    def host(self, name: str) -> Host:
        """The host called ``name``; :class:`TopologyError` if there is none."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise TopologyError(f"no host named {name!r} in the multi-host topology")

    def validate(self) -> None:
        """Cross-references: unique hosts, relays that exist, remotes that point somewhere."""
        seen: set[str] = set()
        for host in self.hosts:
            if host.name in seen:
                raise TopologyError(f"host name {host.name!r} appears twice")
            seen.add(host.name)
        for host in self.hosts:
            local = {d.name for d in host.topology.domains}
            relay = host.topology.domain(host.relay) if host.relay in local else None
            if relay is None or relay.is_dom0:
                raise TopologyError(f"host[{host.name}].relay: {host.relay!r} is not a VM of it")
            names: set[str] = set()
            for remote in host.remotes:
                where = f"host[{host.name}].remote[{remote.name}]"
                if remote.name in local or remote.name in names:
                    raise TopologyError(f"{where}: the name is already taken on {host.name}")
                names.add(remote.name)
                if remote.remote_host == host.name or remote.remote_host not in seen:
                    raise TopologyError(f"{where}.remote_host: {remote.remote_host!r} is unknown")
                other = self.host(remote.remote_host).topology
                if remote.remote_name not in {d.name for d in other.vms}:
                    raise TopologyError(
                        f"{where}.remote_name: {remote.remote_host} has no VM "
                        f"{remote.remote_name!r}"
                    )
                if remote.relayvm not in local or remote.relayvm == "dom0":
                    raise TopologyError(f"{where}.relayvm: {remote.relayvm!r} is not a VM here")


def _take(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None or not isinstance(value, kind):
        raise TopologyError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _qube_name(value: str, where: str) -> str:
    try:
        return check_name(value, where)
    except AirRequestError as exc:
        raise TopologyError(str(exc)) from None


def parse_air_topology(data: Mapping[str, Any], base: Path | None = None) -> AirTopology:
    """Build an :class:`AirTopology` from parsed TOML (``base`` resolves file names)."""
    unknown = set(data) - {"host"}
    if unknown:
        raise TopologyError(f"multi-host topology: unknown keys {sorted(unknown)}")
    raw_hosts = _take(data, "host", list, "topology", [])
    if len(raw_hosts) < 2:
        raise TopologyError("a multi-host topology needs at least two [[host]] tables")
    hosts: list[Host] = []
    for index, raw in enumerate(raw_hosts):
        where = f"host[{index}]"
        if not isinstance(raw, Mapping):
            raise TopologyError(f"{where}: expected a table")
        unknown = set(raw) - {"name", "relay", "topology", "remote"}
        if unknown:
            raise TopologyError(f"{where}: unknown keys {sorted(unknown)}")
        name = _take(raw, "name", str, where)
        if not _HOST_RE.match(name):
            raise TopologyError(f"{where}.name: {name!r} is not a valid host name")
        where = f"host[{name}]"
        relay = _qube_name(_take(raw, "relay", str, where, "relay"), f"{where}.relay")
        spec = raw.get("topology")
        if isinstance(spec, str):
            path = Path(spec) if base is None else base / spec
            topology = parse_topology(read_topology_file(path), base=path.parent)
        elif isinstance(spec, Mapping):
            topology = parse_topology(spec, base=base)
        else:
            raise TopologyError(f"{where}.topology: expected a file name or a table")
        remotes = []
        for rindex, rraw in enumerate(_take(raw, "remote", list, where, [])):
            rwhere = f"{where}.remote[{rindex}]"
            if not isinstance(rraw, Mapping):
                raise TopologyError(f"{rwhere}: expected a table")
            unknown = set(rraw) - {"name", "remote_host", "remote_name", "relayvm", "transport_rpc"}
            if unknown:
                raise TopologyError(f"{rwhere}: unknown keys {sorted(unknown)}")
            remotes.append(
                RemoteVM(
                    name=_qube_name(_take(rraw, "name", str, rwhere), f"{rwhere}.name"),
                    remote_host=_take(rraw, "remote_host", str, rwhere),
                    remote_name=_qube_name(
                        _take(rraw, "remote_name", str, rwhere), f"{rwhere}.remote_name"
                    ),
                    relayvm=_take(rraw, "relayvm", str, rwhere, relay),
                    transport_rpc=_take(rraw, "transport_rpc", str, rwhere, DEFAULT_TRANSPORT),
                )
            )
        hosts.append(Host(name=name, relay=relay, topology=topology, remotes=remotes))
    air = AirTopology(hosts)
    air.validate()
    return air


def load_air_topology(path: str | Path) -> AirTopology:
    """Read and validate a multi-host topology file."""
    path = Path(path)
    return parse_air_topology(read_topology_file(path), base=path.parent)


def load_any_topology(path: str | Path) -> Topology | AirTopology:
    """A single-host or a multi-host topology file, whichever it is."""
    path = Path(path)
    data = read_topology_file(path)
    if is_multi_host(data):
        return parse_air_topology(data, base=path.parent)
    return parse_topology(data, base=path.parent)


def is_multi_host(data: Mapping[str, Any]) -> bool:
    """True for a multi-host file (it has ``[[host]]`` tables), False for a single host."""
    return "host" in data


def system_info_entries(host: Host, air: AirTopology) -> dict[str, dict[str, object]]:
    """System-info records of ``host``'s RemoteVMs (what its policy daemon sees)."""
    entries: dict[str, dict[str, object]] = {}
    for remote in host.remotes:
        entries[remote.name] = {
            "tags": [],
            "type": "RemoteVM",
            "template_for_dispvms": False,
            "default_dispvm": None,
            "icon": "remotevm-gray",
            "label": "gray",
            "guivm": "dom0",
            "power_state": "Running",
            "uuid": remote.uuid,
            "internal": False,
            "relayvm": remote.relayvm,
            "transport_rpc": remote.transport_rpc,
        }
    return entries
