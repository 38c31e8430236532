"""A testbed of plain processes on this machine: what ``qrexec-sim up``/``down`` do.

One policy daemon and one qubesd stand-in for dom0; for every running VM one
``qrexec-agent`` (in the VM's own root folder) and one ``qrexec-daemon`` (dom0's side).
Every program is pinned to the socket backend explicitly (``--transport socket`` and
``QREXEC_TRANSPORT=socket``) with the testbed's own ``VCHAN_SOCKET_DIR``, so a testbed
never touches a real Xen host's vchans, even inside a Qubes VM.

In process mode every domain's *default user* is the account that runs the agents (a
non-root agent only runs calls for its own user, as upstream's test mode does); the
topology's ``default_user`` is what containers use.

Not here: the admin API server (:mod:`qrexec.sim.qubesd`, which calls :meth:`start_domain`
and :meth:`stop_domain`), the command line (:mod:`qrexec.sim.cli`).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import uuid as uuid_mod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from qrexec.errors import QrexecError
from qrexec.sim import processes, roots
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.rundir import DomainState, RunDir, State
from qrexec.sim.topology import Domain, Topology

log = logging.getLogger(__name__)

#: Seconds to wait for a program to come up (a loaded 2-core machine starting 50 VMs).
START_TIMEOUT = 60.0
#: The vchan layout: a folder per domain pair, as the containers need (see backends).
VCHAN_LAYOUT = "isolated"
#: A multi-host testbed's additions to one host (see :meth:`Testbed.air_settings`).
AIR_FILE = "air.json"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class TestbedError(QrexecError):
    """The testbed could not be started, or a command was given in the wrong state."""


def clean_environment() -> dict[str, str]:
    """Our environment without any qrexec or vchan setting (the caller's own transport or
    paths must not leak into a testbed) and without ``NOTIFY_SOCKET`` (an agent would
    report readiness to the systemd unit that runs us)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("QREXEC", "VCHAN", "QUBES_RPC")) and key != "NOTIFY_SOCKET"
    }


def find_program(name: str) -> str:
    """A console script of this project: next to the running interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise TestbedError(f"{name} is not installed (run: python3 -m pip install -e .)")
    return found


@dataclasses.dataclass
class ProcessStatus:
    """One line of ``qrexec-sim status``."""

    record: ProcessRecord
    alive: bool


class Testbed:
    """One testbed, identified by its run directory."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        run_dir: str | Path,
        topology: Topology | None = None,
        *,
        air: Mapping[str, object] | None = None,
    ) -> None:
        self.run = RunDir(run_dir)
        self._topology = topology
        self._children: list[subprocess.Popen[bytes]] = []
        self._air = dict(air) if air is not None else None

    def air_settings(self) -> dict[str, object]:
        """What a multi-host testbed (:mod:`qrexec.sim.air`) adds to this host: RemoteVM
        records for the system info (``remote_vms``) and a command prefix that puts the
        agents into the host's network namespace (``wrap``). Kept in the run directory, so
        every process that opens this testbed later (the qubesd stand-in) sees the same."""
        if self._air is None:
            path = self.run.path / AIR_FILE
            self._air = json.loads(path.read_text()) if path.exists() else {}
        return self._air

    @property
    def topology(self) -> Topology:
        """The topology this testbed runs (read from the run directory once started)."""
        if self._topology is None:
            self._topology = self.run.load_topology()
        return self._topology

    # Environments ---------------------------------------------------------------------
    def base_env(self, own_domain: int) -> dict[str, str]:
        """Environment every program of the testbed gets: the pinned socket transport."""
        env = clean_environment()
        env.update(
            QREXEC_TRANSPORT="socket",
            VCHAN_DOMAIN=str(own_domain),
            VCHAN_SOCKET_DIR=str(self.run.vchan_dir),
            QREXEC_VCHAN_LAYOUT=VCHAN_LAYOUT,
        )
        if self.trace_file.exists():
            env.update(QREXEC_TRACE="1", QREXEC_TRACE_FILE=str(self.trace_file))
        return env

    def dom0_env(self) -> dict[str, str]:
        """dom0's programs: daemons, qrexec-client, dom0-local services."""
        root = self.run.root("dom0")
        env = self.base_env(0)
        env.update(
            QREXEC_DAEMON_SOCKET_DIR=str(self.run.daemon_socket_dir),
            QREXEC_POLICY_SOCKET=str(self.run.policy_socket),
            QREXEC_QUBESD_SOCKET=str(self.run.qubesd_socket),
            QREXEC_DOMAIN_ROOT=str(root),
            QREXEC_STARTUP_TIMEOUT=str(int(START_TIMEOUT)),
            QREXEC_POLICY_PATH=roots.path_list(root, roots.MODERN_POLICY_DIRS),
            QREXEC_LEGACY_POLICY_DIR=str(roots.inside(root, "/etc/qubes-rpc/policy")),
            QREXEC_2011_POLICY_DIR=str(roots.inside(root, "/etc/qubes_rpc/policy")),
            QREXEC_SYSTEM_INFO=str(self.run.system_info_file),
            QREXEC_POLICY_AUDIT_LOG=str(self.run.audit_log),
        )
        return env

    def vm_env(self, name: str, domain_id: int) -> dict[str, str]:
        """A VM's programs: its agent and its qrexec-client-vm calls.

        The agent resolves its default service and rpc-config paths inside
        ``QREXEC_DOMAIN_ROOT``, so the domain sees the upstream paths.
        """
        root = self.run.root(name)
        env = self.base_env(domain_id)
        env.update(
            QREXEC_AGENT_SOCKET=str(self.run.agent_socket(name)),
            QREXEC_DOMAIN_ROOT=str(root),
        )
        return env

    # Starting ---------------------------------------------------------------------------
    def _record(self, state: State, record: ProcessRecord, proc: subprocess.Popen[bytes]) -> None:
        state.processes.append(record)
        self._children.append(proc)

    @property
    def trace_file(self) -> Path:
        """Where the programs write their trace lines when the testbed was started traced."""
        return self.run.path / "trace.log"

    def up(self, progress: Progress = _quiet, *, trace: bool = False) -> None:
        """Write every domain's files, start dom0's programs and the running VMs, and wait
        until every daemon has its agent's HELLO. On failure everything started is stopped.

        ``trace``: every program (and every client the testbed runs) traces its stages
        into :attr:`trace_file` (``QREXEC_TRACE=1``); its existence is the switch.
        """
        topology = self.topology
        if any(processes.is_alive(p) for p in self.run.read_state().processes):
            raise TestbedError(f"a testbed is already running in {self.run.path}; down it first")
        self._reset_dir()
        if self._air:
            (self.run.path / AIR_FILE).write_text(json.dumps(self._air, indent=1))
        if trace:
            self.trace_file.touch()
        user = getpass.getuser()
        self.run.save_topology(topology)
        progress(f"writing domain roots under {self.run.path / 'd'}")
        for dom in topology.domains:
            roots.write_domain_root(self.run.root(dom.name), dom, topology, users=[user])
        with self.run.locked_state() as state:
            state.agent_user = user
            for dom in topology.domains:
                state.domains[dom.name] = DomainState(
                    name=dom.name, id=dom.id, uuid=dom.uuid, running=dom.is_dom0 or dom.running
                )
            state.next_dispvm_id = max(d.id for d in topology.domains) + 1
            self._write_system_info(state)
        try:
            self._start_dom0(progress)
            names = [d.name for d in topology.vms if d.running]
            self.start_domains(names, progress)
        except BaseException:
            progress("start failed; stopping what was started")
            self.down()
            raise
        progress(f"testbed up: dom0 + {len(names)} running VM(s) in {self.run.path}")

    def _reset_dir(self) -> None:
        """Remove what an earlier testbed left in the run directory (it is not running)."""
        if self.run.path.exists():
            for child in self.run.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.run.vchan_dir.mkdir()
        self.run.daemon_socket_dir.mkdir()
        self.run.log_dir.mkdir()

    def _start_dom0(self, progress: Progress) -> None:
        env = self.dom0_env()
        dom0_root = self.run.root("dom0")
        policy_argv = [
            find_program("qrexec-policy-daemon"),
            "--socket-path",
            str(self.run.policy_socket),
            "--system-info",
            str(self.run.system_info_file),
            "--audit-log",
            str(self.run.audit_log),
            "--eval-socket-path",
            str(roots.inside(dom0_root, "/etc/qubes-rpc/policy.EvalSimple")),
            "--gui-socket-path",
            str(roots.inside(dom0_root, "/etc/qubes-rpc/policy.EvalGUI")),
            "--ask-prompter",
            f"scripted:{self.run.ask_script}",
        ]
        for directory in roots.MODERN_POLICY_DIRS:
            policy_argv += ["--policy-path", str(roots.inside(dom0_root, directory))]
        qubesd_argv = [sys.executable, "-m", "qrexec.sim.qubesd", "--run-dir", str(self.run.path)]
        self.run.ask_script.write_text(self.topology.ask)
        progress("starting the policy daemon and the qubesd stand-in")
        with self.run.locked_state() as state:
            policy, policy_proc = processes.spawn(
                "policy-daemon", "dom0", policy_argv, env, self.run.log_file("policy", "dom0")
            )
            self._record(state, policy, policy_proc)
            qubesd, qubesd_proc = processes.spawn(
                "qubesd", "dom0", qubesd_argv, env, self.run.log_file("qubesd", "dom0")
            )
            self._record(state, qubesd, qubesd_proc)
        processes.wait_for(
            lambda: self.run.policy_socket.exists() and self.run.qubesd_socket.exists(),
            START_TIMEOUT,
            watch=[policy, qubesd],
            what="the policy daemon and qubesd stand-in sockets",
        )

    def start_domains(self, names: Sequence[str], progress: Progress = _quiet) -> None:
        """Start agent and daemon of each named domain, all at once, and wait for HELLOs."""
        state = self.run.read_state()
        watch: list[ProcessRecord] = []
        for name in names:
            progress(f"starting {name}: qrexec-agent and qrexec-daemon")
            watch += self._spawn_domain(state.domains[name], state.agent_user)
        pending = list(names)
        while pending:
            name = pending[0]
            processes.wait_for(
                self.run.daemon_socket(name).exists,
                START_TIMEOUT,
                watch=watch,
                what=f"{name}'s agent to say HELLO to its daemon",
            )
            progress(f"{name}: agent said HELLO ({len(names) - len(pending) + 1}/{len(names)})")
            pending.pop(0)

    def _spawn_domain(self, dom: DomainState, agent_user: str) -> list[ProcessRecord]:
        root = self.run.root(dom.name)
        wrap = self.air_settings().get("wrap")
        agent_argv = [
            *([str(word) for word in wrap] if isinstance(wrap, list) else []),
            find_program("qrexec-agent"),
            "--transport",
            "socket",
            "--no-fork-server",
            "--agent-socket",
            str(self.run.agent_socket(dom.name)),
            "--domain-root",
            str(root),
        ]
        daemon_argv = [
            find_program("qrexec-daemon"),
            "--direct",
            "--transport",
            "socket",
            "--socket-dir",
            str(self.run.daemon_socket_dir),
            "--policy-socket",
            str(self.run.policy_socket),
            "--qubesd-socket",
            str(self.run.qubesd_socket),
            "-u",
            dom.uuid,
            str(dom.id),
            dom.name,
            agent_user,
        ]
        with self.run.locked_state() as state:
            agent, agent_proc = processes.spawn(
                "agent",
                dom.name,
                agent_argv,
                self.vm_env(dom.name, dom.id),
                self.run.log_file("agent", dom.name),
            )
            self._record(state, agent, agent_proc)
            daemon, daemon_proc = processes.spawn(
                "daemon",
                dom.name,
                daemon_argv,
                self.dom0_env(),
                self.run.log_file("daemon", dom.name),
            )
            self._record(state, daemon, daemon_proc)
            state.domains[dom.name].running = True
            self._write_system_info(state)
        return [agent, daemon]

    def start_domain(self, name: str) -> None:
        """Start one stopped domain (autostart, disposables) and wait for its HELLO.

        A domain that does not come up is stopped again (a disposable is removed), so a
        failed start leaves nothing half-running behind.
        """
        try:
            self.start_domains([name])
        except BaseException:
            log.warning("%s did not start; stopping what was started", name)
            self.stop_domain(name)
            raise

    def create_disposable(self, template: str) -> DomainState:
        """Make a fresh disposable from ``template``'s files and start it."""
        template_dom = self.topology.domain(template)
        if not template_dom.template_for_dispvms:
            raise TestbedError(f"{template} is not a disposable template")
        with self.run.locked_state() as state:
            disp_id = state.next_dispvm_id
            state.next_dispvm_id += 1
            name = f"disp{disp_id}"
            disp = DomainState(
                name=name,
                id=disp_id,
                uuid=str(uuid_mod.uuid4()),
                running=False,
                disposable=True,
                template=template,
            )
            state.domains[name] = disp
            domain = self._disposable_domain(disp, template_dom)
            roots.write_domain_root(
                self.run.root(name), domain, self.topology, users=[state.agent_user]
            )
            self._write_system_info(state)
        self.start_domain(name)
        return disp

    @staticmethod
    def _disposable_domain(disp: DomainState, template: Domain) -> Domain:
        return dataclasses.replace(
            template,
            name=disp.name,
            id=disp.id,
            uuid=disp.uuid,
            type="DispVM",
            template_for_dispvms=False,
            default_dispvm=template.default_dispvm or template.name,
        )

    # Stopping ---------------------------------------------------------------------------
    def stop_domain(self, name: str) -> None:
        """Stop a domain's agent and daemon; a disposable is removed altogether."""
        with self.run.locked_state() as state:
            if name not in state.domains or name == "dom0":
                raise TestbedError(f"no VM named {name!r} in this testbed")
            mine = [p for p in state.processes if p.domain == name]
            processes.stop(mine)
            state.processes = [p for p in state.processes if p.domain != name]
            dom = state.domains[name]
            dom.running = False
            self._remove_domain_sockets(dom)
            if dom.disposable:
                del state.domains[name]
                shutil.rmtree(self.run.root(name), ignore_errors=True)
            self._write_system_info(state)
        self._reap_children()

    def down(self) -> list[ProcessRecord]:
        """Stop every process this testbed started and remove its sockets; return them."""
        with self.run.locked_state() as state:
            records = list(state.processes)
            processes.stop(records)
            state.processes = []
            for dom in state.domains.values():
                dom.running = dom.name == "dom0"
            for dom in [d for d in state.domains.values() if d.disposable]:
                del state.domains[dom.name]
                shutil.rmtree(self.run.root(dom.name), ignore_errors=True)
        self._reap_children()
        for path in (self.run.vchan_dir, self.run.daemon_socket_dir):
            shutil.rmtree(path, ignore_errors=True)
        for sock in self.run.path.glob("d/*/var/run/qubes/*"):
            if sock.is_socket():
                sock.unlink()
        for path in (self.run.policy_socket, self.run.qubesd_socket):
            path.unlink(missing_ok=True)
        for sock in self.run.root("dom0").glob("etc/qubes-rpc/policy.Eval*"):
            sock.unlink()
        return records

    def _remove_domain_sockets(self, dom: DomainState) -> None:
        for link in (f"qrexec.{dom.id}", f"qrexec.{dom.name}", f"qrexec.uuid:{dom.uuid}"):
            (self.run.daemon_socket_dir / link).unlink(missing_ok=True)
        self.run.agent_socket(dom.name).unlink(missing_ok=True)

    def _reap_children(self) -> None:
        for proc in self._children:
            proc.poll()
        self._children = [p for p in self._children if p.returncode is None]

    def _write_system_info(self, state: State) -> None:
        extra = [
            self._disposable_domain(d, self.topology.domain(d.template or ""))
            for d in state.domains.values()
            if d.disposable
        ]
        running = [d.name for d in state.domains.values() if d.running]
        info = roots.system_info(self.topology, running, extra)
        remote_vms = self.air_settings().get("remote_vms")
        if isinstance(remote_vms, dict):
            domains = info["domains"]
            assert isinstance(domains, dict)
            domains.update(remote_vms)
        roots.write_system_info(self.run.system_info_file, info)

    # Looking ----------------------------------------------------------------------------
    def status(self) -> list[ProcessStatus]:
        """Every recorded process and whether it still runs."""
        self._reap_children()
        return [ProcessStatus(r, processes.is_alive(r)) for r in self.run.read_state().processes]

    def domain_states(self) -> dict[str, DomainState]:
        """The domains as the running testbed knows them (disposables included)."""
        return self.run.read_state().domains

    # Calling ----------------------------------------------------------------------------
    def exec_argv(self, vm: str, cmdline: str) -> tuple[list[str], dict[str, str]]:
        """``qrexec-client`` invocation (and env) that runs ``USER:cmd`` in ``vm`` from dom0."""
        argv = [
            find_program("qrexec-client"),
            "--socket-dir",
            str(self.run.daemon_socket_dir),
            "-d",
            vm,
            cmdline,
        ]
        return argv, self.dom0_env()

    def call_argv(
        self, source: str, target: str, service: str, local_program: Sequence[str] = ()
    ) -> tuple[list[str], dict[str, str], str | None]:
        """The client invocation for a service call from ``source``: (argv, env, cwd).

        From dom0 it is ``qrexec-client -d TARGET DEFAULT:QUBESRPC SERVICE dom0`` (no
        policy, as in Qubes); from a VM it is ``qrexec-client-vm`` through that VM's agent,
        with a local program's absolute path resolved inside the VM's file system.
        """
        state = self.run.read_state()
        if source == "dom0":
            argv = [
                find_program("qrexec-client"),
                "--socket-dir",
                str(self.run.daemon_socket_dir),
                "-d",
                target,
            ]
            if local_program:
                argv += ["-l", shlex.join(self._in_domain(source, local_program))]
            argv.append(f"DEFAULT:QUBESRPC {service} dom0")
            return argv, self.dom0_env(), str(roots.inside(self.run.root("dom0"), "/"))
        if source not in state.domains:
            raise TestbedError(f"no domain named {source!r} in this testbed")
        dom = state.domains[source]
        argv = [find_program("qrexec-client-vm"), target, service]
        argv += self._in_domain(source, local_program)
        env = self.vm_env(source, dom.id)
        home = self.run.root(source) / "home" / state.agent_user
        env["HOME"] = str(home)
        return argv, env, str(home)

    def _in_domain(self, domain: str, program: Sequence[str]) -> list[str]:
        """Resolve an absolute program path inside the domain's root when it exists there."""
        if not program:
            return []
        first = program[0]
        if first.startswith("/"):
            candidate = roots.inside(self.run.root(domain), first)
            if candidate.exists():
                first = str(candidate)
        return [first, *program[1:]]

    def run_client(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        cwd: str | None = None,
        input: bytes | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a client with captured output (what the pytest plugin's helpers do)."""
        return subprocess.run(
            list(argv),
            env=dict(env),
            cwd=cwd,
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            check=False,
        )
