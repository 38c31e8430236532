"""What runs inside the testbed's containers: dom0's supervisor and a VM's supervisor.

Inside a container a domain has a real file system and real accounts, so every program uses
upstream's default paths (``/var/run/qubes``, ``/etc/qubes/policy.d``, ``/etc/qubes_rpc``...)
and only the transport comes from the environment (``QREXEC_TRANSPORT=socket``,
``VCHAN_DOMAIN``, ``VCHAN_SOCKET_DIR``, ``QREXEC_VCHAN_LAYOUT=isolated``, set by the compose
file) - which is why ``docker compose exec vm1 qrexec-client-vm ...`` works as in a real VM.

* **VM** (``qrexec-sim container NAME``): writes the domain's files into ``/``, makes sure its
  default user exists, and runs a *power supervisor* on ``/run/qubes-sim/power/power.sock``
  (a volume shared with dom0 only). A running domain's agent starts at once; a stopped one's
  (and a disposable slot's) when dom0 sends ``start``. ``stop`` stops the agent; a slot also
  forgets everything the disposable left in homes and /tmp.
* **dom0** (``qrexec-sim container dom0``): writes dom0's files and policy, starts the policy
  daemon, serves the qubesd stand-in on ``/run/qubesd.sock`` and starts one qrexec-daemon per
  running VM. Start/Kill/CreateDisposable go to the VM containers' power supervisors.

Power protocol (dom0 connects, one line each way): ``start [TEMPLATE]`` / ``stop`` ->
``ok`` or ``error: TEXT``. The VM side trusts nothing it cannot check: TEMPLATE must be a
disposable template of the topology.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import socketserver
import sys
import threading
import uuid as uuid_mod
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Protocol

from qrexec.sim import processes, roots
from qrexec.sim.compose import AGENT_PID_FILE as AGENT_PID_PATH
from qrexec.sim.compose import POWER_DIR, slot_names
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.qubesd import AdminApi, AdminServer
from qrexec.sim.rundir import DomainState
from qrexec.sim.testbed import TestbedError, find_program
from qrexec.sim.topology import Domain, Topology

log = logging.getLogger("qrexec.sim.container")

SYSTEM_INFO = Path("/run/qubes-sim/system-info.json")
AUDIT_LOG = Path("/var/log/qubes/policy-audit.log")
ASK_SCRIPT = Path("/etc/qubes/sim-ask-answers")
LOG_DIR = Path("/var/log/qubes")
DAEMON_SOCKET_DIR = Path("/var/run/qubes")
POWER_TIMEOUT = 60.0
START_TIMEOUT = 60.0
USER_UID = 1000
#: Written by a VM's supervisor while its agent runs (the healthcheck reads it).
AGENT_PID_FILE = Path(AGENT_PID_PATH)


def ensure_user(name: str, uid: int = USER_UID) -> None:
    """Create ``name`` (uid/gid ``uid``, home /home/NAME, /bin/bash or /bin/sh) if missing."""
    passwd = Path("/etc/passwd").read_text()
    if any(line.split(":", 1)[0] == name for line in passwd.splitlines()):
        return
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    with open("/etc/group", "a") as group:
        group.write(f"{name}:x:{uid}:\n")
    with open("/etc/passwd", "a") as pw:
        pw.write(f"{name}:x:{uid}:{uid}::/home/{name}:{shell}\n")
    home = Path("/home") / name
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, uid, uid)


def _own_home(user: str) -> None:
    """Give the user their home back after files were written into it as root."""
    import pwd

    entry = pwd.getpwnam(user)
    home = Path(entry.pw_dir)
    home.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(home):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)
    os.chown(home, entry.pw_uid, entry.pw_gid)


def _wait_forever(stop: threading.Event) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass


# ---------------------------------------------------------------------------------------
# VM side


class VmSupervisor:
    """Starts and stops one container's qrexec-agent on dom0's request."""

    def __init__(self, topology: Topology, name: str) -> None:
        self.topology = topology
        self.name = name
        self.slot = name in dict(slot_names(topology))
        self.domain = None if self.slot else topology.domain(name)
        self.agent: ProcessRecord | None = None
        self.lock = threading.Lock()
        #: Files a disposable slot got from its template (removed when it stops).
        self.template_files: list[str] = []

    def prepare(self) -> None:
        """Write the domain's files (a slot gets them from its template at start)."""
        if self.domain is not None:
            ensure_user(self.domain.default_user)
            roots.write_domain_root(Path("/"), self.domain, self.topology, python=sys.executable)
            _own_home(self.domain.default_user)

    def start(self, template: str | None) -> None:
        with self.lock:
            if self.agent is not None and processes.is_alive(self.agent):
                return
            if self.slot:
                if template is None:
                    raise TestbedError("a disposable slot needs its template")
                dom = self.topology.domain(template)
                if not dom.template_for_dispvms:
                    raise TestbedError(f"{template} is not a disposable template")
                ensure_user(dom.default_user)
                roots.write_domain_root(Path("/"), dom, self.topology, python=sys.executable)
                self.template_files = roots.domain_paths(dom)
                _own_home(dom.default_user)
            argv = [find_program("qrexec-agent"), "--transport", "socket", "--no-fork-server"]
            self.agent, _ = processes.spawn(
                "agent", self.name, argv, dict(os.environ), LOG_DIR / "qrexec-agent.log"
            )
            AGENT_PID_FILE.write_text(f"{self.agent.pid} {self.agent.start_ticks}\n")
            log.info("agent started (pid %d)", self.agent.pid)

    def stop(self) -> None:
        with self.lock:
            if self.agent is not None:
                processes.stop([self.agent])
                AGENT_PID_FILE.unlink(missing_ok=True)
                log.info("agent stopped")
                self.agent = None
            if self.slot:
                # A disposable leaves nothing behind for the next one: neither its template's
                # files (the next one may have another template) nor what it wrote at home.
                for path in self.template_files:
                    Path(path).unlink(missing_ok=True)
                self.template_files = []
                for home in Path("/home").iterdir():
                    for child in home.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child, ignore_errors=True)
                        else:
                            child.unlink(missing_ok=True)
                for child in Path("/tmp").iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)


class _PowerHandler(socketserver.StreamRequestHandler):
    server: _PowerServer

    def handle(self) -> None:
        line = self.rfile.readline(256).decode("ascii", "replace").strip()
        words = line.split()
        try:
            if words[:1] == ["start"] and len(words) <= 2:
                self.server.supervisor.start(words[1] if len(words) == 2 else None)
            elif words == ["stop"]:
                self.server.supervisor.stop()
            else:
                raise TestbedError(f"unknown power command {line!r}")
            answer = "ok"
        except Exception as exc:
            log.warning("power command %r failed: %s", line, exc)
            answer = f"error: {exc}"
        self.wfile.write(answer.encode() + b"\n")


class _PowerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, supervisor: VmSupervisor) -> None:
        self.supervisor = supervisor
        super().__init__(path, _PowerHandler)


def open_pair_dirs() -> None:
    """Let every account of this domain use its vchan pair folders (volumes start root-only).

    Inside one container every account is the same domain, as in a real VM where any user
    may run qrexec-client-vm; the sticky bit keeps one user from unlinking another's socket.
    """
    base = Path(os.environ.get("VCHAN_SOCKET_DIR", "/run/vchan"))
    for pair in base.glob("pair.*"):
        os.chmod(pair, 0o1777)


def power_socket(vm: str | None = None) -> Path:
    """The power socket: inside the VM (``vm`` None) or dom0's view of VM ``vm``."""
    return Path(POWER_DIR) / (vm or "") / "power.sock"


class Sidecar(Protocol):
    """Something a VM container runs next to its agent (a relay qube's sshd, sim/air)."""

    def prepare(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


def run_vm(topology: Topology, name: str, sidecar: Sidecar | None = None) -> int:
    """Main of a VM container."""
    supervisor = VmSupervisor(topology, name)
    supervisor.prepare()
    open_pair_dirs()
    if sidecar is not None:
        sidecar.prepare()
        sidecar.start()
    path = power_socket()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = _PowerServer(str(path), supervisor)
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if supervisor.domain is not None and supervisor.domain.running:
        supervisor.start(None)
    log.info("%s ready (%s)", name, "running" if supervisor.agent else "stopped")
    _wait_forever(threading.Event())
    server.shutdown()
    supervisor.stop()
    if sidecar is not None:
        sidecar.stop()
    path.unlink(missing_ok=True)
    return 0


# ---------------------------------------------------------------------------------------
# dom0 side


def power(vm: str, command: str) -> None:
    """Send a power command to a VM container and check its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(POWER_TIMEOUT)
        sock.connect(str(power_socket(vm)))
        sock.sendall(command.encode() + b"\n")
        answer = sock.makefile("rb").readline(512).decode("ascii", "replace").strip()
    if answer != "ok":
        raise TestbedError(f"{vm} refused {command!r}: {answer or 'no answer'}")


@dataclasses.dataclass
class _Daemon:
    state: DomainState
    record: ProcessRecord | None = None
    slot: str | None = None


class Dom0Supervisor:
    """dom0's programs in a container; the qubesd stand-in's domain control."""

    def __init__(
        self, topology: Topology, remote_vms: Mapping[str, Mapping[str, object]] | None = None
    ) -> None:
        self.topology = topology
        #: System-info records of other hosts' qubes (RemoteVMs, sim/air), as they are.
        self.remote_vms = dict(remote_vms or {})
        self.lock = threading.RLock()
        self.domains: dict[str, _Daemon] = {
            d.name: _Daemon(DomainState(d.name, d.id, d.uuid, running=d.is_dom0))
            for d in topology.domains
        }
        self.free_slots = dict(slot_names(topology))
        self.extra: dict[str, Domain] = {}
        self.policy: ProcessRecord | None = None
        self.counter = 0

    # DomainControl for the admin API --------------------------------------------------
    def domain_states(self) -> dict[str, DomainState]:
        with self.lock:
            return {name: d.state for name, d in self.domains.items()}

    def start_domain(self, name: str) -> None:
        with self.lock:
            daemon = self.domains[name]
            if daemon.slot is None:
                power(name, "start")
            self._start_daemon(daemon)
        self._wait_daemon(daemon)

    def create_disposable(self, template: str) -> DomainState:
        dom = self.topology.domain(template)
        if not dom.template_for_dispvms:
            raise TestbedError(f"{template} is not a disposable template")
        with self.lock:
            if not self.free_slots:
                raise TestbedError("no free disposable slot (raise compose_disposable_slots)")
            slot, slot_id = self.free_slots.popitem()
            self.counter += 1
            name = f"disp{slot_id}x{self.counter}"
            state = DomainState(name, slot_id, str(uuid_mod.uuid4()), False, True, template)
            daemon = _Daemon(state, slot=slot)
            self.domains[name] = daemon
            self.extra[name] = dataclasses.replace(
                dom, name=name, id=slot_id, uuid=state.uuid, type="DispVM",
                template_for_dispvms=False, default_dispvm=template,
            )  # fmt: skip
            try:
                power(slot, f"start {template}")
                self._start_daemon(daemon)
            except Exception:
                del self.domains[name]
                del self.extra[name]
                self.free_slots[slot] = slot_id
                raise
        self._wait_daemon(daemon)
        return state

    def stop_domain(self, name: str) -> None:
        with self.lock:
            daemon = self.domains[name]
            if daemon.record is not None:
                processes.stop([daemon.record])
                daemon.record = None
            for link in (
                f"qrexec.{daemon.state.id}",
                f"qrexec.{name}",
                f"qrexec.uuid:{daemon.state.uuid}",
            ):
                (DAEMON_SOCKET_DIR / link).unlink(missing_ok=True)
            power(daemon.slot or name, "stop")
            daemon.state.running = False
            if daemon.slot is not None:
                del self.domains[name]
                del self.extra[name]
                self.free_slots[daemon.slot] = daemon.state.id
            self._write_system_info()

    # Internals -----------------------------------------------------------------------
    def _start_daemon(self, daemon: _Daemon) -> None:
        state = daemon.state
        argv = [
            find_program("qrexec-daemon"), "--direct", "--transport", "socket",
            "-u", state.uuid, str(state.id), state.name,
            self.topology.domain(state.template).default_user if state.template
            else self.topology.domain(state.name).default_user,
        ]  # fmt: skip
        env = dict(os.environ, QREXEC_STARTUP_TIMEOUT=str(int(START_TIMEOUT)))
        daemon.record, _ = processes.spawn(
            "daemon", state.name, argv, env, LOG_DIR / f"qrexec.{state.name}.log"
        )
        state.running = True
        self._write_system_info()

    def _wait_daemon(self, daemon: _Daemon) -> None:
        assert daemon.record is not None
        processes.wait_for(
            lambda: (DAEMON_SOCKET_DIR / f"qrexec.{daemon.state.name}").exists(),
            START_TIMEOUT,
            watch=[daemon.record],
            what=f"{daemon.state.name}'s agent to say HELLO",
        )

    def _write_system_info(self) -> None:
        running = [n for n, d in self.domains.items() if d.state.running]
        info = roots.system_info(self.topology, running, self.extra.values())
        if self.remote_vms:
            domains = info["domains"]
            assert isinstance(domains, dict)
            domains.update(self.remote_vms)
        roots.write_system_info(SYSTEM_INFO, info)

    def run(self) -> int:
        ensure_user(self.topology.dom0.default_user)
        open_pair_dirs()
        roots.write_domain_root(Path("/"), self.topology.dom0, self.topology)
        ASK_SCRIPT.parent.mkdir(parents=True, exist_ok=True)
        ASK_SCRIPT.write_text(self.topology.ask)
        for directory in (LOG_DIR, DAEMON_SOCKET_DIR, Path("/run/qubes")):
            directory.mkdir(parents=True, exist_ok=True)
        self._write_system_info()
        policy_argv = [
            find_program("qrexec-policy-daemon"),
            "--system-info", str(SYSTEM_INFO),
            "--audit-log", str(AUDIT_LOG),
            "--ask-prompter", f"scripted:{ASK_SCRIPT}",
        ]  # fmt: skip
        self.policy, _ = processes.spawn(
            "policy-daemon", "dom0", policy_argv, dict(os.environ), LOG_DIR / "policy-daemon.log"
        )
        Path("/run/qubesd.sock").unlink(missing_ok=True)
        server = AdminServer("/run/qubesd.sock", AdminApi(self))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for dom in self.topology.vms:
            if dom.running:
                self._start_daemon(self.domains[dom.name])
        log.info("dom0 ready: daemons started, waiting for agents")
        _wait_forever(threading.Event())
        server.shutdown()
        with self.lock:
            records = [d.record for d in self.domains.values() if d.record is not None]
            processes.stop([*records, self.policy])
        return 0
