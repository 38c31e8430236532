"""Fake peers that feed the same bytes to Qubes' C program and to ours (differential tests).

- :func:`daemon_under_test`: a scripted agent (the vchan server of dom0's port 512, as real
  agents are) in front of a ``qrexec-daemon`` of either implementation, whose policy program
  is a shim that logs its arguments and answers ``result=deny`` (optionally only once a
  gate opens, so a request stays pending while the test talks to the daemon's socket);
- :func:`agent_under_test`: a scripted daemon (the control vchan's client) in front of a
  ``qrexec-agent`` of either implementation, run unprivileged as in the pairing tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from qrexec.backends.socket import SocketBackend, SocketListener
from qrexec.sim import processes
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.testbed import clean_environment
from tests.interop import rawpeer
from tests.interop.rawpeer import RawConn
from tests.interop.system import (
    C_DAEMON_POLICY_SOCKET,
    START_TIMEOUT,
    Impl,
    InteropSystem,
    short_temp_dir,
    vm_uuid,
    vm_wrapper,
)

C = TypeVar("C")
R = TypeVar("R")

#: The VM under test: domain id and name.
VM_ID = 1
VM_NAME = "vm1"
CONTROL_PORT = 512

POLICY_SHIM = """#!/bin/sh
printf '%s\\n' "$*" >> {log}
while [ -e {gate} ]; do sleep 0.02; done
echo result=deny
"""


def both(run: Callable[[Impl, C, Path], R], case: C, c_bin: Path) -> tuple[R, R]:
    """``run`` for Qubes' program and for ours, at the same time (each in its own folder):
    the cases wait for quiet periods, so running them side by side halves the time."""
    with ThreadPoolExecutor(2) as pool:
        theirs = pool.submit(run, "c", case, c_bin)
        ours = pool.submit(run, "py", case, c_bin)
        return theirs.result(), ours.result()


def base_env(vchan_dir: Path, own_domain: int) -> dict[str, str]:
    env = clean_environment()
    env.update(
        QREXEC_TRANSPORT="socket", VCHAN_SOCKET_DIR=str(vchan_dir), VCHAN_DOMAIN=str(own_domain)
    )
    return env


def exited(record: ProcessRecord, within: float) -> bool:
    """True when the process is gone within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)
        if not processes.is_alive(record):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@dataclass
class DaemonRun:
    """A daemon of one implementation with a scripted agent connected to it."""

    impl: Impl
    base: Path
    record: ProcessRecord
    listener: SocketListener
    agent: RawConn
    hello: bytes
    policy_log: Path
    gate: Path

    @property
    def socket_path(self) -> Path:
        return self.base / "qubes" / f"qrexec.{VM_ID}"

    def policy_calls(self) -> list[str]:
        return self.policy_log.read_text().splitlines() if self.policy_log.exists() else []

    def wait_policy_calls(self, count: int, timeout: float = 10) -> list[str]:
        processes.wait_for(
            lambda: len(self.policy_calls()) >= count, timeout, what="the policy program"
        )
        return self.policy_calls()

    def open_gate(self) -> None:
        self.gate.unlink(missing_ok=True)

    def client(self) -> RawConn:
        """A connection to the daemon's client socket, HELLOs done (client protocol 3)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        conn = RawConn.of_socket(sock)
        assert conn.expect(rawpeer.HELLO) == rawpeer.u32(3)
        conn.send(rawpeer.msg(rawpeer.HELLO, rawpeer.u32(3)))
        return conn

    def reconnects(self, timeout: float = 15) -> bool:
        """True when the daemon connects to the agent's control port again."""
        listener = SocketBackend(VM_ID, self.base / "vchan").listen(0, CONTROL_PORT)
        try:
            stream = listener.accept(timeout)
        except (TimeoutError, OSError):
            return False
        finally:
            listener.close()
        stream.close()
        return True


@contextlib.contextmanager
def daemon_under_test(
    impl: Impl, c_bin: Path, *, version: int = 4, gated: bool = False
) -> Iterator[DaemonRun]:
    """Start ``impl``'s daemon for vm1 and connect a scripted agent that says HELLO(version)."""
    with short_temp_dir() as base:
        system = InteropSystem(base, c_bin)
        policy_log = base / "policy-calls"
        gate = base / "gate"
        if gated:
            gate.write_text("")
        shim = base / "policy-shim"
        shim.write_text(POLICY_SHIM.format(log=policy_log, gate=gate))
        shim.chmod(0o755)
        if impl == "c" and C_DAEMON_POLICY_SOCKET.exists():
            raise RuntimeError(f"{C_DAEMON_POLICY_SOCKET} exists: the C daemon would use it")
        listener = SocketBackend(VM_ID, system.vchan_dir).listen(0, CONTROL_PORT)
        argv = [
            *system.program(impl, "qrexec-daemon"),
            "-D",
            f"--socket-dir={system.socket_dir}",
            f"--uuid={vm_uuid(VM_ID)}",
            f"--policy-program={shim}",
            str(VM_ID),
            VM_NAME,
            "user",
        ]
        env = system.dom0_env()
        record, _ = processes.spawn("daemon", VM_NAME, argv, env, system.logs / "daemon.log")
        try:
            stream = listener.accept(START_TIMEOUT)
            agent = RawConn(stream.recv, stream.send)
            agent.send(rawpeer.msg(rawpeer.HELLO, rawpeer.u32(version)))
            hello = agent.expect(rawpeer.HELLO)
            processes.wait_for(
                (system.socket_dir / f"qrexec.{VM_ID}").exists,
                START_TIMEOUT,
                watch=[record],
                what="the daemon's socket",
            )
            yield DaemonRun(impl, base, record, listener, agent, hello, policy_log, gate)
        finally:
            gate.unlink(missing_ok=True)
            processes.stop([record])
            listener.close()


@dataclass
class AgentRun:
    """An agent of one implementation with a scripted daemon connected to it."""

    impl: Impl
    base: Path
    record: ProcessRecord
    control: RawConn
    hello: bytes
    services: Path
    rpc_config: Path
    trigger_socket: Path
    backend: SocketBackend

    def data_server(self, port: int) -> SocketListener:
        """dom0's end of a data vchan (qrexec-client is its server for dom0 → VM calls)."""
        return self.backend.listen(VM_ID, port)

    def accept_data(self, listener: SocketListener, timeout: float = 20) -> RawConn:
        stream = listener.accept(timeout)
        return RawConn(stream.recv, stream.send)


@contextlib.contextmanager
def agent_under_test(impl: Impl, c_bin: Path, *, version: int = 4) -> Iterator[AgentRun]:
    """Start ``impl``'s agent for vm1 and connect to it as its daemon (HELLO ``version``)."""
    with short_temp_dir() as base:
        system = InteropSystem(base, c_bin)
        services = base / "qubes-rpc"
        rpc_config = base / "rpc-config"
        services.mkdir()
        rpc_config.mkdir()
        trigger = base / "agent.sock"
        env = base_env(system.vchan_dir, VM_ID)
        env.update(
            QREXEC_SERVICE_PATH=str(services),
            QUBES_RPC_CONFIG_PATH=str(rpc_config),
            QREXEC_AGENT_SOCKET=str(trigger),
        )
        argv = [*vm_wrapper(), *system.program(impl, "qrexec-agent"), "-S", "-a", str(trigger)]
        record, _ = processes.spawn("agent", VM_NAME, argv, env, system.logs / "agent.log")
        try:
            backend = SocketBackend(0, system.vchan_dir)
            stream = backend.connect(VM_ID, CONTROL_PORT, timeout=START_TIMEOUT)
            control = RawConn(stream.recv, stream.send)
            hello = control.expect(rawpeer.HELLO)
            control.send(rawpeer.msg(rawpeer.HELLO, rawpeer.u32(version)))
            processes.wait_for(trigger.exists, START_TIMEOUT, watch=[record], what="trigger")
            yield AgentRun(
                impl, base, record, control, hello, services, rpc_config, trigger, backend
            )
        finally:
            processes.stop([record])
