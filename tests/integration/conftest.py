"""Fixtures for the agent/daemon/qrexec-client tests: emulated domains on one host.

:class:`QrexecSystem` starts ``qrexec-daemon`` and ``qrexec-agent`` processes over the
socket backend in the test's own temporary folder (vchan sockets, daemon sockets, one
root folder per domain) and tracks them by pid (``qrexec.sim.processes``), so
``pytest -n auto`` is safe and nothing is ever killed by name.
"""

from __future__ import annotations

import getpass
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qrexec.sim import processes
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.testbed import clean_environment

#: How long a test waits for a daemon to see its agent.
START_TIMEOUT = 30.0


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in KiB."""
    peak = processes.status_kib(pid, "VmHWM")
    if peak is None:
        raise AssertionError(f"no VmHWM for pid {pid}")
    return peak


def serve_once(server: socket.socket, reply: bytes) -> tuple[threading.Thread, list[bytes]]:
    """A one-connection service on the listening ``server`` (unix or TCP): it records
    everything the caller sent until EOF, then answers ``reply`` and closes."""
    received: list[bytes] = []

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                received.append(data)
                conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, received


@dataclass
class Domain:
    """One emulated VM: its id, name, root folder, and its two processes."""

    domid: int
    name: str
    root: Path
    agent: ProcessRecord | None = None
    daemon: ProcessRecord | None = None
    agent_proc: subprocess.Popen[bytes] | None = None

    def write_service(self, name: str, text: str, *, directory: str = "etc/qubes-rpc") -> Path:
        """Install an executable service file in this domain's root."""
        path = self.root / directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
        return path

    def write_file(self, relative: str, text: str, mode: int = 0o644) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path


@dataclass
class QrexecSystem:
    """dom0 plus emulated VMs in one temporary folder."""

    base: Path
    records: list[ProcessRecord] = field(default_factory=list)
    domains: dict[str, Domain] = field(default_factory=dict)
    #: Variables given to every process started (e.g. a protocol version cap).
    common_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vchan_dir = self.base / "vchan"
        self.socket_dir = self.base / "qubes"
        self.logs = self.base / "logs"
        for path in (self.vchan_dir, self.socket_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)

    @property
    def user(self) -> str:
        return getpass.getuser()

    def env(self, own_domain: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = clean_environment()
        env.update(
            QREXEC_TRANSPORT="socket",
            VCHAN_SOCKET_DIR=str(self.vchan_dir),
            VCHAN_DOMAIN=str(own_domain),
            QREXEC_DAEMON_SOCKET_DIR=str(self.socket_dir),
        )
        env.update(self.common_env)
        env.update(extra or {})
        return env

    def domain(self, name: str, domid: int) -> Domain:
        if name not in self.domains:
            root = self.base / "roots" / name
            root.mkdir(parents=True, exist_ok=True)
            self.domains[name] = Domain(domid, name, root)
        return self.domains[name]

    def start_agent(
        self,
        name: str,
        domid: int,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        wrapper: Sequence[str] = (),
    ) -> ProcessRecord:
        """Start an agent (as ``user`` when given: root only; under ``wrapper``).

        Its trigger socket is in the test's folder unless ``env`` names one: the default,
        /var/run/qubes/qrexec-agent, is the host's and shared by every test.
        """
        dom = self.domain(name, domid)
        env = {"QREXEC_AGENT_SOCKET": str(self.base / f"agent.{name}.sock"), **(env or {})}
        argv = [
            *wrapper,
            sys.executable,
            "-m",
            "qrexec.agent.cli",
            "--domain-root",
            str(dom.root),
        ]
        record, proc = processes.spawn(
            "agent", name, argv, self.env(domid, env), self.logs / f"agent.{name}.log", user=user
        )
        self.records.append(record)
        dom.agent, dom.agent_proc = record, proc
        return record

    def start_daemon(
        self,
        name: str,
        domid: int,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        default_user: str | None = None,
    ) -> ProcessRecord:
        dom = self.domain(name, domid)
        argv = [
            sys.executable,
            "-m",
            "qrexec.daemon.cli",
            "--direct",
            "--socket-dir",
            str(self.socket_dir),
            *(args or []),
            str(domid),
            name,
            default_user or self.user,
        ]
        record, _ = processes.spawn(
            "daemon", name, argv, self.env(0, env), self.logs / f"daemon.{name}.log"
        )
        self.records.append(record)
        dom.daemon = record
        return record

    def daemon_socket(self, domid: int) -> Path:
        return self.socket_dir / f"qrexec.{domid}"

    def wait_connected(self, dom: Domain) -> None:
        watch = [r for r in (dom.agent, dom.daemon) if r is not None]
        processes.wait_for(
            self.daemon_socket(dom.domid).exists,
            START_TIMEOUT,
            watch=watch,
            what=f"the daemon of {dom.name} to see its agent",
        )

    def start_vm(
        self,
        name: str,
        domid: int,
        *,
        agent_env: Mapping[str, str] | None = None,
        daemon_env: Mapping[str, str] | None = None,
    ) -> Domain:
        self.start_agent(name, domid, agent_env)
        self.start_daemon(name, domid, daemon_env)
        dom = self.domains[name]
        self.wait_connected(dom)
        return dom

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        input: bytes = b"",
        timeout: float = 60,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a client to completion, stdin from ``input``, output captured."""
        return subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            env=dict(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )

    def popen(self, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start a client with pipes on stdin, stdout and stderr."""
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
        )

    def client_argv(self, dest: str, cmdline: str, *options: str) -> list[str]:
        return [sys.executable, "-m", "qrexec.client.cli", *options, "-d", dest, cmdline]

    def client(
        self,
        dest: str,
        cmdline: str,
        *options: str,
        input: bytes = b"",
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run qrexec-client to completion (stdin from ``input``)."""
        argv = self.client_argv(dest, cmdline, *options)
        return self.run(argv, self.env(0, env), input=input, timeout=timeout)

    def popen_client(
        self, dest: str, cmdline: str, *options: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.popen(self.client_argv(dest, cmdline, *options), self.env(0, env))

    def stop(self, record: ProcessRecord) -> None:
        processes.stop([record])

    def log_text(self, role: str, name: str) -> str:
        path = self.logs / f"{role}.{name}.log"
        return path.read_text() if path.exists() else ""

    def stop_all(self) -> None:
        processes.stop(self.records)


@pytest.fixture
def qrexec_system(tmp_path: Path) -> Iterator[QrexecSystem]:
    system = QrexecSystem(tmp_path)
    try:
        yield system
    finally:
        system.stop_all()


@pytest.fixture
def vm1(qrexec_system: QrexecSystem) -> Domain:
    """A running VM ``vm1`` (domain 1) with our agent in test mode and our daemon."""
    return qrexec_system.start_vm("vm1", 1)
