"""Generating a compose file from a topology: a dom0 container and one container per VM.

Isolation comes from what each container mounts (no network at all: ``network_mode: none``):

* one named volume per pair of domains, ``vchan-<lo>-<hi>``, mounted at
  ``/run/vchan/pair.<lo>.<hi>`` - the socket backend's *isolated* layout. dom0 mounts its pair
  with every VM; a VM mounts its pair with dom0 and with every other VM (the data vchans of
  VM->VM calls run directly between the two VMs, as on Xen). No VM sees the pair of two other
  domains, so it can neither reach nor impersonate them except through qrexec;
* one volume per VM, ``power-<vm>``, shared by dom0 and that VM only: the VM's supervisor
  listens there for dom0's "start"/"stop" (the qubesd stand-in's Start and Kill).

Disposables and autostart: containers cannot be created on demand without handing dom0 the
docker socket (root on the host), so the file pre-creates *disposable slots* (stopped VM
containers with every pair volume) and every VM container runs a supervisor that starts its
agent only when dom0 says so. See sim/CONTAINERS.md for the security trade-off.

The output is YAML written by a small emitter (block style, every string double-quoted), so
the same topology always gives byte-identical text - ``compose.yaml`` at the repository root
is checked against it. Does no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from itertools import combinations

from qrexec.sim.topology import Topology

#: The image every container runs; one image for dom0 and the VMs.
IMAGE = "${QREXEC_SIM_IMAGE:-qrexec-sim:local}"
#: Public base image for users with a normal Docker setup; CI passes a locally built one.
DEFAULT_BASE = "python:3.11-slim-bookworm"
BASE_ARG = "${QREXEC_SIM_BASE:-" + DEFAULT_BASE + "}"
#: Where the socket backend's directory is inside every container.
VCHAN_DIR = "/run/vchan"
#: Where power sockets live: a VM's own folder, and dom0's folder per VM.
POWER_DIR = "/run/qubes-sim/power"
#: Topology file inside the containers when it is not the packaged default.
TOPOLOGY_MOUNT = "/etc/qrexec-sim/topology"
#: Written by a VM container's supervisor while its agent runs (pid and start time).
AGENT_PID_FILE = "/run/qubes-sim/agent.pid"

Yaml = Mapping[str, object] | Sequence[object] | str | int | bool | None


def slot_names(topology: Topology) -> list[tuple[str, int]]:
    """(service name, domain id) of each pre-created disposable slot."""
    if not topology.dispvm_templates():
        return []
    first = max(d.id for d in topology.domains) + 1
    return [
        (f"dispslot{i}", first + i - 1) for i in range(1, topology.compose_disposable_slots + 1)
    ]


def pair_volume(a: int, b: int) -> tuple[str, str]:
    """(volume name, mount point) of the vchan pair folder of domains ``a`` and ``b``."""
    low, high = sorted((a, b))
    return f"vchan-{low}-{high}", f"{VCHAN_DIR}/pair.{low}.{high}"


def _dom0_health(topology: Topology) -> str:
    """dom0 is healthy once the policy daemon listens and every running VM's daemon has its
    agent's HELLO (its socket exists). A shell test: Python every second in every container
    would cost a 2-core machine more than the testbed itself."""
    tests = ["test -S /run/qubes/policy.sock"]
    tests += [f"test -S /var/run/qubes/qrexec.{d.name}" for d in topology.vms if d.running]
    return " && ".join(tests)


def _vm_health(running: bool) -> str:
    """A VM is healthy once its power supervisor listens and, if it runs, its agent lives."""
    test = f"test -S {POWER_DIR}/power.sock"
    if running:
        test += f" && read pid ticks < {AGENT_PID_FILE} && kill -0 $$pid"  # $$: compose escape
    return test


def _env(domain_id: int) -> dict[str, str]:
    return {
        "QREXEC_TRANSPORT": "socket",
        "VCHAN_DOMAIN": str(domain_id),
        "VCHAN_SOCKET_DIR": VCHAN_DIR,
        "QREXEC_VCHAN_LAYOUT": "isolated",
    }


def build_compose(
    topology: Topology,
    *,
    topology_dir: str | None = None,
    topology_name: str | None = None,
    build_context: str = ".",
) -> dict[str, object]:
    """The compose document for ``topology``.

    ``topology_dir``/``topology_name``: the topology file's folder (relative to the compose
    file) and name, mounted read-only into every container; None means the packaged
    default. ``build_context``: the repository, relative to the compose file.
    """
    topo_args: list[str] = []
    topo_volumes: list[str] = []
    if topology_dir is not None and topology_name is not None:
        topo_args = ["--topology", f"{TOPOLOGY_MOUNT}/{topology_name}"]
        topo_volumes = [f"{topology_dir}:{TOPOLOGY_MOUNT}:ro"]

    vms = [(d.name, d.id) for d in topology.vms] + slot_names(topology)
    volumes: dict[str, object] = {}
    services: dict[str, object] = {}

    def service(
        name: str, domain_id: int, mounts: list[str], role: str, health: str
    ) -> dict[str, object]:
        return {
            "build": {
                "context": build_context,
                "dockerfile": "sim/docker/Dockerfile",
                "args": {"BASE": BASE_ARG},
            },
            "image": IMAGE,
            "hostname": name,
            "init": True,
            "network_mode": "none",
            "dns_opt": ["timeout:1", "attempts:1"],
            "security_opt": ["no-new-privileges:true"],
            "stop_grace_period": "3s",
            "environment": _env(domain_id),
            "command": ["qrexec-sim", "container", role, *topo_args],
            "volumes": [*mounts, *topo_volumes],
            "healthcheck": {
                "test": ["CMD-SHELL", health],
                "interval": "1s",
                "timeout": "10s",
                "retries": 120,
            },
        }

    dom0_mounts = []
    for name, domain_id in vms:
        volume, mount = pair_volume(0, domain_id)
        volumes[volume] = {}
        dom0_mounts.append(f"{volume}:{mount}")
        volumes[f"power-{name}"] = {}
        dom0_mounts.append(f"power-{name}:{POWER_DIR}/{name}")
    services["dom0"] = service("dom0", 0, dom0_mounts, "dom0", _dom0_health(topology))

    vm_mounts: dict[str, list[str]] = {
        name: [f"{pair_volume(0, i)[0]}:{pair_volume(0, i)[1]}", f"power-{name}:{POWER_DIR}"]
        for name, i in vms
    }
    for (name_a, id_a), (name_b, id_b) in combinations(vms, 2):
        volume, mount = pair_volume(id_a, id_b)
        volumes[volume] = {}
        vm_mounts[name_a].append(f"{volume}:{mount}")
        vm_mounts[name_b].append(f"{volume}:{mount}")
    running = {d.name for d in topology.vms if d.running}
    for name, domain_id in vms:
        health = _vm_health(name in running)
        services[name] = service(name, domain_id, vm_mounts[name], name, health)

    return {"services": services, "volumes": volumes}


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def to_yaml(value: object, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars (strings double-quoted, JSON-style)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        if not value:
            return pad + "{}\n"
        for key, item in value.items():
            if (isinstance(item, Mapping) and item) or (isinstance(item, list) and item):
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 1)}")
            elif isinstance(item, Mapping):
                lines.append(f"{pad}{key}: {{}}\n")
            elif isinstance(item, list):
                lines.append(f"{pad}{key}: []\n")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}\n")
        return "".join(lines)
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping | list) and item:
                nested = to_yaml(item, indent + 1)
                lines.append(f"{pad}- {nested.lstrip()}")
            else:
                lines.append(f"{pad}- {_scalar(item)}\n")
        return "".join(lines)
    return pad + _scalar(value) + "\n"


HEADER = """\
# Generated by `qrexec-sim compose` from {source}. Do not edit: regenerate it.
# dom0 and one container per VM, no network; each container mounts only the vchan pair
# folders it belongs to (see sim/CONTAINERS.md). Usage:
#   docker compose up -d --wait
#   docker compose exec vm1 qrexec-client-vm vm2 test.Add /usr/bin/our_test_add_client 11 22
#   docker compose down -v
"""


def render_compose(topology: Topology, *, source: str = "the default topology", **kw: str) -> str:
    """The compose file's text (header comment + YAML)."""
    return HEADER.format(source=source) + to_yaml(build_compose(topology, **kw))
