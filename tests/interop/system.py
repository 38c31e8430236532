"""dom0 and VMs whose programs come from either implementation: ours or Qubes' C programs.

Each program of an emulated system (qrexec-daemon and qrexec-agent per VM, qrexec-client in
dom0, qrexec-client-vm in a VM) is started from our package or from the C reference build
(:func:`qrexec.sim.cpeer.build`), as the :class:`Pairing` says, all on the unix-socket vchan
in the test's own folder. Both implementations get the same command lines (the C programs'
options, which ours accept) and the same environment, so any difference a test sees comes
from the programs, not from the set-up.

Where things are, for both implementations:
- vchan sockets: ``VCHAN_SOCKET_DIR`` (+ ``VCHAN_DOMAIN``), one folder per system;
- daemon sockets: ``--socket-dir`` (``QREXEC_DAEMON_SOCKET_DIR`` for our programs too);
- agent trigger socket: ``-a PATH``; fork server off (``-S``);
- services: ``QREXEC_SERVICE_PATH`` and ``QUBES_RPC_CONFIG_PATH``, absolute host paths in
  the domain's folder (our programs then run with the real ``/`` as domain root);
- policy: the C daemon asks ``/run/qubes/policy.sock`` (hard-coded) and falls back to
  ``--policy-program``; ours is given a policy socket that does not exist, so both run our
  ``qrexec-policy-exec -- SOURCE TARGET SERVICE`` with the policy files of the test.

**Test mode.** The C agent switches users through PAM when it runs as root and only runs
calls for its own user otherwise (upstream's own socket tests run it unprivileged). When the
tests run as root (CI), every VM-side program, of both implementations, runs in a user
namespace that maps our uid to ``nobody`` (``unshare --user``): the programs see an ordinary
user, and the kernel still checks files as the owner, so the test's folders stay private.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qrexec.sim import cpeer, processes
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.testbed import clean_environment, find_program

Impl = Literal["py", "c"]

#: How long a test waits for a daemon to see its agent.
START_TIMEOUT = 30.0
#: uuid of the VM with domain id n.
UUID_PATTERN = "00000000-0000-4000-8000-{:012d}"
#: The C daemon's policy socket (not configurable): it must not exist on a test machine.
C_DAEMON_POLICY_SOCKET = Path("/run/qubes/policy.sock")
#: The unprivileged identity VM-side programs get when the tests run as root.
NAMESPACE_USER = "nobody"


@contextlib.contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A fresh folder with a short path, removed afterwards.

    The C programs refuse socket paths over 108 bytes (``qrexec.uuid:<uuid>`` is 48 alone),
    which pytest's own temporary folders exceed under xdist.
    """
    base = Path(tempfile.mkdtemp(prefix="qrx-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def vm_uuid(domid: int) -> str:
    return UUID_PATTERN.format(domid)


def vm_wrapper() -> list[str]:
    """The command prefix that runs a VM-side program unprivileged (see module docstring)."""
    if os.geteuid() != 0:
        return []
    entry = pwd.getpwnam(NAMESPACE_USER)
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("unshare (util-linux) is needed to run the C agent in test mode")
    return [unshare, "--user", f"--map-user={entry.pw_uid}", f"--map-group={entry.pw_gid}"]


def vm_user() -> str:
    """The user name the VM-side programs run as (what ``USER:`` in a command must say)."""
    return NAMESPACE_USER if os.geteuid() == 0 else getpass.getuser()


@dataclass(frozen=True)
class VmSpec:
    """Which implementation runs one VM's daemon (in dom0) and agent (in the VM)."""

    daemon: Impl
    agent: Impl


@dataclass(frozen=True)
class Pairing:
    """One combination: the clients' implementation and each VM's daemon and agent."""

    name: str
    client: Impl
    vm1: VmSpec
    vm2: VmSpec


@dataclass
class Vm:
    name: str
    domid: int
    spec: VmSpec
    root: Path
    agent: ProcessRecord | None = None
    daemon: ProcessRecord | None = None

    @property
    def services(self) -> Path:
        return self.root / "qubes-rpc"

    @property
    def rpc_config(self) -> Path:
        return self.root / "rpc-config"

    def write_service(self, name: str, text: str) -> Path:
        return write_executable(self.services / name, text)


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@dataclass
class InteropSystem:
    """dom0 plus VMs in one folder, each program from the implementation asked for."""

    base: Path
    c_bin: Path
    records: list[ProcessRecord] = field(default_factory=list)
    vms: dict[str, Vm] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vchan_dir = self.base / "vchan"
        self.socket_dir = self.base / "qubes"
        self.logs = self.base / "logs"
        self.dom0_root = self.base / "dom0"
        self.policy_d = self.dom0_root / "policy.d"
        self.system_info = self.base / "system-info.json"
        for path in (self.vchan_dir, self.socket_dir, self.logs, self.policy_d):
            path.mkdir(parents=True, exist_ok=True)
        self.write_system_info()

    # ---- environment ----

    def base_env(self, own_domain: int) -> dict[str, str]:
        env = clean_environment()
        env.update(
            QREXEC_TRANSPORT="socket",
            VCHAN_SOCKET_DIR=str(self.vchan_dir),
            VCHAN_DOMAIN=str(own_domain),
            QREXEC_DAEMON_SOCKET_DIR=str(self.socket_dir),
        )
        return env

    def dom0_env(self) -> dict[str, str]:
        """dom0's programs: daemons, qrexec-client, the policy program they run."""
        env = self.base_env(0)
        env.update(
            QREXEC_SERVICE_PATH=str(self.dom0_root / "qubes-rpc"),
            QUBES_RPC_CONFIG_PATH=str(self.dom0_root / "rpc-config"),
            QREXEC_POLICY_SOCKET=str(self.base / "no-policy-daemon.sock"),
            QREXEC_POLICY_PATH=str(self.policy_d),
            QREXEC_2011_POLICY_DIR=str(self.dom0_root / "policy-2011"),
            QREXEC_LEGACY_POLICY_DIR=str(self.dom0_root / "policy-legacy"),
            QREXEC_SYSTEM_INFO=str(self.system_info),
            QREXEC_POLICY_AUDIT_LOG=str(self.base / "audit.jsonl"),
        )
        return env

    def vm_env(self, vm: Vm) -> dict[str, str]:
        env = self.base_env(vm.domid)
        env.update(
            QREXEC_SERVICE_PATH=str(vm.services),
            QUBES_RPC_CONFIG_PATH=str(vm.rpc_config),
            QREXEC_AGENT_SOCKET=str(self.agent_socket(vm)),
        )
        return env

    def agent_socket(self, vm: Vm) -> Path:
        return self.base / f"agent.{vm.name}.sock"

    # ---- dom0 ----

    def write_system_info(self) -> None:
        domains: dict[str, dict[str, object]] = {
            "dom0": {"type": "AdminVM", "power_state": "Running", "uuid": vm_uuid(0)}
        }
        for vm in self.vms.values():
            uuid = vm_uuid(vm.domid)
            domains[vm.name] = {"type": "AppVM", "power_state": "Running", "uuid": uuid}
        self.system_info.write_text(json.dumps({"domains": domains}))

    def write_policy(self, text: str, name: str = "30-interop.policy") -> Path:
        path = self.policy_d / name
        path.write_text(text)
        return path

    def write_dom0_service(self, name: str, text: str) -> Path:
        return write_executable(self.dom0_root / "qubes-rpc" / name, text)

    def program(self, impl: Impl, name: str) -> list[str]:
        """The argv prefix that runs program ``name`` of implementation ``impl``."""
        if impl == "c":
            return [str(cpeer.program(name, self.c_bin))]
        module = {
            "qrexec-daemon": "qrexec.daemon.cli",
            "qrexec-agent": "qrexec.agent.cli",
            "qrexec-client": "qrexec.client.cli",
            "qrexec-client-vm": "qrexec.client.client_vm",
        }[name]
        return [sys.executable, "-m", module]

    # ---- VMs ----

    def start_vm(self, name: str, domid: int, spec: VmSpec) -> Vm:
        """Start the VM's agent and daemon and wait until they are connected."""
        root = self.base / "roots" / name
        vm = Vm(name, domid, spec, root)
        vm.services.mkdir(parents=True, exist_ok=True)
        vm.rpc_config.mkdir(parents=True, exist_ok=True)
        self.vms[name] = vm
        self.write_system_info()
        self.start_agent(vm)
        self.start_daemon(vm)
        self.wait_connected(vm)
        return vm

    def start_agent(self, vm: Vm) -> ProcessRecord:
        argv = [
            *vm_wrapper(),
            *self.program(vm.spec.agent, "qrexec-agent"),
            "-S",
            "-a",
            str(self.agent_socket(vm)),
        ]
        record, _ = processes.spawn(
            "agent", vm.name, argv, self.vm_env(vm), self.logs / f"agent.{vm.name}.log"
        )
        self.records.append(record)
        vm.agent = record
        return record

    def start_daemon(self, vm: Vm) -> ProcessRecord:
        if vm.spec.daemon == "c" and C_DAEMON_POLICY_SOCKET.exists():
            raise RuntimeError(
                f"{C_DAEMON_POLICY_SOCKET} exists on this machine: the C daemon would ask that "
                "policy daemon instead of the test's policy"
            )
        argv = [
            *self.program(vm.spec.daemon, "qrexec-daemon"),
            "-D",
            f"--socket-dir={self.socket_dir}",
            f"--uuid={vm_uuid(vm.domid)}",
            f"--policy-program={find_program('qrexec-policy-exec')}",
            str(vm.domid),
            vm.name,
            vm_user(),
        ]
        record, _ = processes.spawn(
            "daemon", vm.name, argv, self.dom0_env(), self.logs / f"daemon.{vm.name}.log"
        )
        self.records.append(record)
        vm.daemon = record
        return record

    def wait_connected(self, vm: Vm) -> None:
        watch = [r for r in (vm.agent, vm.daemon) if r is not None]
        processes.wait_for(
            (self.socket_dir / f"qrexec.{vm.domid}").exists,
            START_TIMEOUT,
            watch=watch,
            what=f"the daemon of {vm.name} to see its agent",
        )
        processes.wait_for(
            self.agent_socket(vm).exists,
            START_TIMEOUT,
            watch=watch,
            what=f"{vm.name}'s trigger socket",
        )

    # ---- clients ----

    def client_argv(self, impl: Impl, dest: str, cmdline: str, *options: str) -> list[str]:
        return [
            *self.program(impl, "qrexec-client"),
            f"--socket-dir={self.socket_dir}",
            *options,
            "-d",
            dest,
            cmdline,
        ]

    def client(
        self,
        impl: Impl,
        dest: str,
        cmdline: str,
        *options: str,
        input: bytes = b"",
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run qrexec-client (dom0) to completion, stdin from ``input``."""
        argv = self.client_argv(impl, dest, cmdline, *options)
        return run(argv, self.dom0_env(), input=input, timeout=timeout)

    def client_vm_argv(self, impl: Impl, vm: Vm, *args: str) -> list[str]:
        return [
            *vm_wrapper(),
            *self.program(impl, "qrexec-client-vm"),
            f"--agent-socket={self.agent_socket(vm)}",
            *args,
        ]

    def client_vm(
        self, impl: Impl, vm: Vm, *args: str, input: bytes = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Run qrexec-client-vm ARGS inside ``vm`` to completion."""
        argv = self.client_vm_argv(impl, vm, *args)
        return run(argv, self.vm_env(vm), input=input, timeout=timeout)

    def log_text(self, role: str, name: str) -> str:
        path = self.logs / f"{role}.{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        processes.stop(self.records)


def run(
    argv: Sequence[str], env: Mapping[str, str], *, input: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        list(argv), input=input, capture_output=True, env=dict(env), timeout=timeout, check=False
    )
