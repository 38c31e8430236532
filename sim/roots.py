"""Domain file systems: what each emulated domain sees as its own ``/``.

In process mode every domain gets a folder (its *root*) holding its service directories,
rpc-config, home and programs; in a container the root is the container's real ``/``. The
same code writes both, from the topology. dom0's root also gets the policy directories of
the three formats, and the testbed writes the system-info file the policy daemon reads.

This module writes files only; it starts nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

from qrexec.sim.topology import POLICY_DIRS, Domain, PolicySpec, ServiceSpec, Topology

#: Service directories of a VM, searched in this order (spec §1, plus the seed's 2011 one).
SERVICE_DIRS = ("/run/qubes-rpc", "/usr/local/etc/qubes-rpc", "/etc/qubes-rpc", "/etc/qubes_rpc")
#: rpc-config directories, searched in this order (spec §1).
RPC_CONFIG_DIRS = (
    "/run/qubes/rpc-config",
    "/usr/local/etc/qubes/rpc-config",
    "/etc/qubes/rpc-config",
)
#: Modern policy directories, in the order the policy daemon reads them.
MODERN_POLICY_DIRS = ("/run/qubes/policy.d", "/etc/qubes/policy.d")

#: Module run by the builtin services' wrapper scripts.
_BUILTIN_MODULES = {"qubes.Filecopy": ("qrexec.sim.filecopy", "receive")}


def inside(root: Path, path: str) -> Path:
    """Map an absolute path of the domain's file system to the host path under ``root``."""
    return root / path.lstrip("/")


def path_list(root: Path, dirs: Iterable[str]) -> str:
    """A colon-separated search path (QREXEC_SERVICE_PATH style) under ``root``."""
    return ":".join(str(inside(root, d)) for d in dirs)


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def builtin_script(builtin: str, python: str) -> str:
    """The wrapper that runs a service shipped in this package with ``python``."""
    module, verb = _BUILTIN_MODULES[builtin]
    return f'#!/bin/sh\nexec {shlex.quote(python)} -m {module} {verb} "$@"\n'


def install_service(root: Path, service: ServiceSpec, python: str = sys.executable) -> Path:
    """Put one service (and its rpc-config) into the domain's file system; return its path."""
    target = inside(root, f"{service.directory}/{service.name}")
    if service.script is not None:
        _write(target, service.script, 0o755)
    elif service.program is not None:
        # The 2011 style: a one-line text file naming the program (not itself executable).
        _write(target, service.program + "\n", 0o644)
    else:
        assert service.builtin is not None
        _write(target, builtin_script(service.builtin, python), 0o755)
    if service.rpc_config is not None:
        _write(inside(root, f"/etc/qubes/rpc-config/{service.name}"), service.rpc_config, 0o644)
    return target


def domain_paths(domain: Domain) -> list[str]:
    """Every file :func:`write_domain_root` puts into the domain (absolute, in-domain paths)."""
    paths = [f.path for f in domain.files]
    for service in domain.services:
        paths.append(f"{service.directory}/{service.name}")
        if service.rpc_config is not None:
            paths.append(f"/etc/qubes/rpc-config/{service.name}")
    return paths


def install_policy(root: Path, policy: PolicySpec) -> Path:
    """Write one policy file into dom0's file system (replacing an older version atomically)."""
    target = inside(root, policy.path)
    _write(target, policy.text, 0o644)
    return target


def write_domain_root(
    root: Path,
    domain: Domain,
    topology: Topology,
    *,
    users: Iterable[str] = (),
    python: str = sys.executable,
) -> None:
    """Create ``root`` as ``domain``'s file system: directories, files, services, homes.

    ``users`` adds home directories besides the domain's default user (process mode maps
    the default user to the account that runs the agent).
    """
    for directory in (*SERVICE_DIRS, *RPC_CONFIG_DIRS, "/tmp", "/var/run/qubes", "/var/log"):
        inside(root, directory).mkdir(parents=True, exist_ok=True)
    for user in {domain.default_user, *users}:
        inside(root, f"/home/{user}").mkdir(parents=True, exist_ok=True)
    for file in domain.files:
        _write(inside(root, file.path), file.text, file.mode)
    for service in domain.services:
        install_service(root, service, python)
    if domain.is_dom0:
        for directory in (*MODERN_POLICY_DIRS, *POLICY_DIRS.values()):
            inside(root, directory).mkdir(parents=True, exist_ok=True)
        for policy in topology.policies:
            install_policy(root, policy)


def system_info(
    topology: Topology, running: Iterable[str], extra: Iterable[Domain] = ()
) -> dict[str, object]:
    """The policy daemon's view of the system, in qubesd's ``GetSystemInfo`` shape."""
    running_set = set(running)
    domains: dict[str, object] = {}
    for dom in [*topology.domains, *extra]:
        domains[dom.name] = {
            "tags": list(dom.tags),
            "type": dom.type,
            "template_for_dispvms": dom.template_for_dispvms,
            "default_dispvm": dom.default_dispvm,
            "icon": f"appvm-{dom.label}" if not dom.is_dom0 else "adminvm-black",
            "label": dom.label if not dom.is_dom0 else "black",
            "guivm": dom.guivm,
            "power_state": "Running" if dom.is_dom0 or dom.name in running_set else "Halted",
            "uuid": dom.uuid,
            "internal": False,
        }
        if dom.type == "DispVM" and dom.default_dispvm:
            domains[dom.name]["template"] = dom.default_dispvm  # type: ignore[index]
    return {"domains": domains}


def write_system_info(path: Path, info: dict[str, object]) -> None:
    """Replace the system-info file atomically (the policy daemon may read it any time)."""
    _write(path, json.dumps(info, indent=1, sort_keys=True) + "\n", 0o644)
