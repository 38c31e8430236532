"""Endurance job: hostile peers on every socket and channel, interleaved with real calls.

    python -m tests.endurance.run [--seed 1] [--budget 240] [--keep DIR]

One emulated system (socket backend, all in a temporary folder): the policy daemon;
vm1 and vm2 with our agents and daemons (legitimate calls vm1 -> vm2 and dom0 -> vm2 run
every round); vm3 whose "agent" is a hostile script in front of a real daemon; vm4 whose
real agent faces a hostile script playing dom0's daemon. Hostile cases, drawn by
hypothesis from fixed seeds (``deadline=None``), go round-robin to:

* ``trigger-socket`` (vm1's agent), ``policy-socket``, ``daemon-socket`` (vm2's daemon):
  garbage, half requests, requests with random fields, and silent connections kept open;
* ``daemon-control`` (vm3's daemon): random frames, triggers with random fields, allowed
  dom0 calls whose data vchan never says HELLO, control reconnects;
* ``agent-control`` (vm4's agent): random frames, EXEC_CMDLINE/JUST_EXEC with random
  domains, ports and command lines, reconnects. Where spec §15.7 says upstream's agent
  exits (status 1), ours does too; the job then starts it again, as systemd would, and
  counts it;
* ``data-channel`` (vm4's agent): a served call whose dom0 end sends garbage after HELLO.

Before (after one warm-up round) and after the run, every long-lived process's fds, RSS
and CPU time are recorded. The job fails when a process died, a legitimate call failed,
fds grew by more than :data:`FD_GROWTH` or RSS by more than :data:`RSS_GROWTH_KIB`, or
any log holds a traceback. It prints a table per target and per process.
"""

from __future__ import annotations

import argparse
import getpass
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from qrexec.agent.control import EXIT_PROTOCOL_VIOLATION
from qrexec.backends.socket import SocketBackend, SocketStream
from qrexec.errors import TransportError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import ExecRequest, Hello, ServiceConnect, encode
from qrexec.sim import processes
from tests.integration.conftest import QrexecSystem
from tests.integration.fake_agent import FakeAgent, RawControl
from tests.integration.test_agent_hostile_dom0 import FakeDom0
from tests.integration.vmcall_support import SERVICE_ECHO_ENV, VmCallSystem, vm_uuid

#: Growth allowed between the measurements before and after the hostile run.
FD_GROWTH = 16
RSS_GROWTH_KIB = 48 * 1024
#: Cases per target per round (the seed changes every round).
CASES_PER_ROUND = 25
#: Silent connections the job itself keeps open per socket (the servers cap theirs).
HELD_PER_SOCKET = 300
CONNECT_TIMEOUT = 5.0


def trigger4(request_id: bytes, service: bytes, target: bytes) -> bytes:
    payload = (
        b"\0" * 64 + target[:63].ljust(64, b"\0") + request_id[:31].ljust(32, b"\0") + service
    ) + b"\0"
    return struct.pack("<II", MsgType.TRIGGER_SERVICE4, len(payload)) + payload


@dataclass
class TargetStats:
    cases: int = 0
    #: Cases where the server hung up on us (or timed out): the expected end of most.
    hung_up: int = 0
    crashes: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class ProcessStats:
    name: str
    pid: int
    fds_before: int = 0
    fds_after: int = 0
    rss_before: int = 0
    rss_after: int = 0
    max_rss: int = 0
    cpu_before: float = 0.0
    cpu_after: float = 0.0
    alive: bool = True


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class World:
    """The emulated system and the hostile peers' state."""

    def __init__(self, base: Path) -> None:
        self.system = QrexecSystem(base)
        self.vmcalls = VmCallSystem(self.system)
        self.held: dict[str, list[socket.socket]] = {}
        self.user = getpass.getuser()
        vmcalls = self.vmcalls
        vmcalls.write_policy(
            "test.Env * vm1 vm2 allow\n"
            "fuzz.Allow0 * vm3 dom0 allow\n"
            "fuzz.Deny * @anyvm @anyvm deny\n"
        )
        vmcalls.write_dom0_service("fuzz.Allow0", "#!/bin/sh\necho hi\n")
        vmcalls.start_policy_daemon()
        vmcalls.start_vm("vm1", 1)
        vmcalls.start_vm("vm2", 2)
        vmcalls.vms["vm2"].write_service("test.Env", SERVICE_ECHO_ENV)
        # vm3: a hostile agent in front of a real daemon.
        vmcalls.vms["vm3"] = self.system.domain("vm3", 3)
        vmcalls.write_system_info({n: d.domid for n, d in vmcalls.vms.items()})
        self.vm3_daemon = self.system.start_daemon(
            "vm3",
            3,
            vmcalls.dom0_env(),
            args=["-u", vm_uuid(3), "-p", "/bin/false"],
        )
        self.fake_agent = FakeAgent(self.system.vchan_dir, 3)
        self.vm3_data = SocketBackend(3, self.system.vchan_dir)
        self.control3 = self._connect_vm3()
        self.vm3_held: list[SocketStream] = []
        # vm4: a real agent facing a hostile dom0.
        self.system.start_agent("vm4", 4)
        self.dom0 = FakeDom0(self.system.vchan_dir, 4)
        self.dom0.connect()
        #: Times vm4's agent exited on a §15.7 violation and was started again.
        self.agent_exits = 0
        self.dom0_reader_port = 2000
        self.processes = {
            "policy-daemon": vmcalls.policy_record,
            "vm1 agent": self.system.domains["vm1"].agent,
            "vm1 daemon": self.system.domains["vm1"].daemon,
            "vm2 agent": self.system.domains["vm2"].agent,
            "vm2 daemon": self.system.domains["vm2"].daemon,
            "vm3 daemon": self.vm3_daemon,
            "vm4 agent": self.system.domains["vm4"].agent,
        }

    # ---- helpers ----

    def _connect_vm3(self) -> RawControl:
        control = self.fake_agent.accept(30)
        control.hello(4)
        return control

    def reconnect_vm3(self) -> None:
        self.control3.close()
        for stream in self.vm3_held:
            stream.close()
        self.vm3_held.clear()
        self.control3 = self._connect_vm3()

    def ensure_vm4_agent(self) -> None:
        """Start vm4's agent again when the hostile dom0 made it exit, as systemd does.

        Upstream's agent exits on the daemon violations of spec §15.7, and so does ours;
        that exit (status 1) is expected here and counted. Any other status is left for the
        dead-process check to report.
        """
        dom = self.system.domains["vm4"]
        proc = dom.agent_proc
        if proc is None or proc.poll() is None or proc.returncode != EXIT_PROTOCOL_VIOLATION:
            return
        self.agent_exits += 1
        self.system.start_agent("vm4", 4)
        self.processes["vm4 agent"] = dom.agent
        self.dom0.stream = None

    def reconnect_dom0(self) -> None:
        self.dom0.close()
        self.dom0.stream = None
        deadline = time.monotonic() + 30
        while True:
            self.ensure_vm4_agent()
            try:
                self.dom0.connect(timeout=1)
                return
            except (TimeoutError, TransportError, OSError):
                if time.monotonic() > deadline:
                    raise

    def dom0_ready(self) -> None:
        """A control connection to a live vm4 agent (after an expected exit, a new one)."""
        dom = self.system.domains["vm4"]
        if self.dom0.stream is None or (dom.agent_proc and dom.agent_proc.poll() is not None):
            self.reconnect_dom0()

    def hold(self, what: str, sock: socket.socket) -> None:
        held = self.held.setdefault(what, [])
        held.append(sock)
        if len(held) > HELD_PER_SOCKET:
            held.pop(0).close()

    def release_all(self) -> None:
        for socks in self.held.values():
            for sock in socks:
                sock.close()
        self.held.clear()

    @staticmethod
    def unix(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(str(path))
        return sock

    # ---- legitimate calls ----

    def legit_calls(self) -> list[str]:
        problems = []
        result = self.vmcalls.call("vm1", "vm2", "test.Env+e", input=b"ping", timeout=60)
        if result.returncode != 3 or not result.stdout.endswith(b"ping"):
            problems.append(f"vm1 -> vm2 test.Env: {result.returncode} {result.stderr[-200:]!r}")
        result = self.system.client("vm2", f"{self.user}:echo alive", timeout=60)
        if (result.returncode, result.stdout) != (0, b"alive\n"):
            problems.append(f"dom0 -> vm2: {result.returncode} {result.stderr[-200:]!r}")
        return problems

    # ---- hostile targets: (mode, data) ----

    def trigger_socket(self, mode: int, data: bytes) -> None:
        sock = self.unix(self.vmcalls.agent_socket("vm1"))
        if mode == 0:
            self.hold("trigger", sock)
            return
        if mode == 1:
            sock.sendall(data)
        elif mode == 2:
            sock.sendall(trigger4(b"x", data.replace(b"\0", b"_") or b"fuzz.Deny", b"vm2"))
        else:
            sock.sendall(struct.pack("<II", MsgType.TRIGGER_SERVICE4, len(data)) + data[:-1])
            self.hold("trigger", sock)
            return
        sock.close()

    def policy_socket(self, mode: int, data: bytes) -> None:
        sock = self.unix(self.vmcalls.policy_socket)
        if mode == 0:
            self.hold("policy", sock)
            return
        if mode == 1:
            sock.sendall(data)
        elif mode == 2:
            value = data.replace(b"\n", b"").replace(b"\0", b"") or b"x"
            sock.sendall(
                b"source=vm1\nintended_target=" + value + b"\nservice_and_arg=fuzz.Deny+\n\n"
            )
            sock.settimeout(30)
            while sock.recv(4096):
                pass
        else:
            sock.sendall(data.replace(b"\n\n", b"\n"))
            self.hold("policy", sock)
            return
        sock.close()

    def daemon_socket(self, mode: int, data: bytes) -> None:
        sock = self.unix(self.system.daemon_socket(2))
        if mode == 0:
            self.hold("daemon", sock)
            return
        sock.settimeout(30)
        sock.recv(8)  # the daemon's HELLO
        if mode == 1:
            sock.sendall(data)
        elif mode == 2:
            sock.sendall(encode(Hello(3)) + data)
        else:
            sock.sendall(encode(Hello(3)))
            self.hold("daemon", sock)
            return
        sock.close()

    def daemon_control(self, mode: int, data: bytes) -> None:
        control = self.control3
        if mode == 0:
            control.send_raw(data)
            # Most random frames are violations: the daemon drops us; come back.
            self.reconnect_vm3()
        elif mode == 1:
            service = data.replace(b"\0", b"") or b"fuzz.Deny"
            control.send_raw(trigger4(b"SOCKET1", service[:200], data[:20] or b"vm2"))
        elif mode == 2:
            control.send_raw(trigger4(b"SOCKET2", b"fuzz.Allow0", b"dom0"))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                reply = control.read(30)
                if isinstance(reply, ServiceConnect):
                    listener = self.vm3_data.listen(0, reply.connect_port)
                    try:
                        self.vm3_held.append(listener.accept(10))
                    finally:
                        listener.close()
                    break
        else:
            self.reconnect_vm3()

    def agent_control(self, mode: int, data: bytes) -> None:
        self.dom0_ready()
        pad = data.ljust(8, b"\0")
        domain, port = struct.unpack_from("<II", pad)
        if mode == 0:
            assert self.dom0.stream is not None
            self.dom0.stream.send(data)
            self.reconnect_dom0()
        elif mode == 1:
            kind = MsgType.JUST_EXEC if data[:1] == b"j" else MsgType.EXEC_CMDLINE
            command = pad[8:].replace(b"\0", b"") or b"nobody:true"
            self.dom0.send(ExecRequest(kind, domain, port, command))
        elif mode == 2:
            # In range, nobody serves it: the agent waits (capped, cancelled on reconnect).
            self.dom0.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, 1000 + port % 5000, b"u:true"))
        else:
            self.reconnect_dom0()

    def data_channel(self, mode: int, data: bytes) -> None:
        self.dom0_ready()
        self.dom0_reader_port = 2000 + (self.dom0_reader_port - 1999) % 1000
        port = self.dom0_reader_port
        listener = self.dom0.backend.listen(4, port)
        try:
            self.dom0.send(ExecRequest(MsgType.EXEC_CMDLINE, 0, port, f"{self.user}:cat".encode()))
            stream = listener.accept(30)
        finally:
            listener.close()
        try:
            read_message(stream.recv, 2)
            if mode % 2:
                stream.send(encode(Hello(3)))
            stream.send(data)
        finally:
            stream.close()


Target = Callable[[World, int, bytes], None]
TARGETS: dict[str, Target] = {
    "trigger-socket": World.trigger_socket,
    "policy-socket": World.policy_socket,
    "daemon-socket": World.daemon_socket,
    "daemon-control": World.daemon_control,
    "agent-control": World.agent_control,
    "data-channel": World.data_channel,
}
#: What a hostile peer may meet without that being a finding (the server hung up).
EXPECTED_ERRORS = (OSError, TimeoutError, ConnectionError, EOFError, TransportError)


def run_round(world: World, name: str, target: Target, seed: int, stats: TargetStats) -> None:
    @settings(
        max_examples=CASES_PER_ROUND,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @hypothesis_seed(seed)
    @given(mode=st.integers(0, 3), data=st.binary(max_size=600))
    def case(mode: int, data: bytes) -> None:
        stats.cases += 1
        try:
            target(world, mode, data)
        except EXPECTED_ERRORS:
            stats.hung_up += 1

    try:
        case()
    except Exception as exc:
        stats.errors.append(f"{type(exc).__name__}: {exc}"[:300])


def measure(world: World, stats: dict[str, ProcessStats], when: str) -> None:
    for name, record in world.processes.items():
        assert record is not None
        entry = stats.setdefault(name, ProcessStats(name, record.pid))
        if not processes.is_alive(record):
            entry.alive = False
            continue
        fds, rss, cpu = fd_count(record.pid), processes.rss_kib(record.pid) or 0, 0.0
        cpu = cpu_seconds(record.pid)
        if when == "before":
            entry.fds_before, entry.rss_before, entry.cpu_before = fds, rss, cpu
        else:
            entry.fds_after, entry.rss_after, entry.cpu_after = fds, rss, cpu
            entry.max_rss = processes.status_kib(record.pid, "VmHWM") or 0


def settle(world: World, before: dict[str, ProcessStats], limit: float = 20.0) -> None:
    """Let the servers notice the closed connections and cancelled calls."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(
            fd_count(r.pid) <= before[n].fds_before + FD_GROWTH
            for n, r in world.processes.items()
            if r is not None and processes.is_alive(r)
        ):
            return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of hostile cases")
    parser.add_argument("--keep", help="keep the system's folder (logs) here")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    base = Path(tempfile.mkdtemp(prefix="qrexec-endurance-"))
    started = time.monotonic()
    world = World(base)
    targets = {name: TargetStats() for name in TARGETS}
    procs: dict[str, ProcessStats] = {}
    problems: list[str] = []
    try:
        # Warm-up: one small round each, so that allocator high-water marks are baseline.
        for round_seed, (name, target) in enumerate(TARGETS.items()):
            run_round(world, name, target, args.seed * 1000 + round_seed, TargetStats())
        world.release_all()
        world.reconnect_vm3()
        world.reconnect_dom0()
        problems += world.legit_calls()
        time.sleep(1)
        measure(world, procs, "before")
        hostile_start = time.monotonic()
        round_no = 0
        while time.monotonic() - hostile_start < args.budget:
            round_no += 1
            for index, (name, target) in enumerate(TARGETS.items()):
                run_round(
                    world, name, target, args.seed * 100000 + round_no * 10 + index, targets[name]
                )
                world.ensure_vm4_agent()
                dead = [n for n, r in world.processes.items() if r and not processes.is_alive(r)]
                if dead:
                    targets[name].crashes += 1
                    problems.append(f"{', '.join(dead)} died during {name} cases")
                    raise SystemExit(1)
            problems += world.legit_calls()
        world.release_all()
        world.reconnect_vm3()
        world.reconnect_dom0()
        problems += world.legit_calls()
        settle(world, procs)
        measure(world, procs, "after")
    except SystemExit:
        pass
    finally:
        world.system.stop_all()
    for name, t in targets.items():
        problems += [f"{name}: driver error {e}" for e in t.errors]
    leaks = {}
    for p in procs.values():
        if not p.alive:
            problems.append(f"{p.name} died")
            continue
        grew = []
        if p.fds_after > p.fds_before + FD_GROWTH:
            grew.append(f"fds {p.fds_before} -> {p.fds_after}")
        if p.rss_after > p.rss_before + RSS_GROWTH_KIB:
            grew.append(f"RSS {p.rss_before} -> {p.rss_after} KiB")
        leaks[p.name] = len(grew)
        problems += [f"{p.name}: {g} (bound +{FD_GROWTH} fds, +{RSS_GROWTH_KIB} KiB)" for g in grew]
    tracebacks = []
    for log in sorted(world.system.logs.iterdir()):
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            tracebacks.append(log.name)
    problems += [f"traceback in {name}" for name in tracebacks]
    print(f"{'target':<16} {'cases':>7} {'hung up':>7} {'crashes':>7}")
    for name, t in targets.items():
        print(f"{name:<16} {t.cases:>7} {t.hung_up:>7} {t.crashes:>7}")
    print()
    print(
        f"{'process':<14} {'leaks':>5} {'fds before':>10} {'fds after':>9} "
        f"{'RSS before':>10} {'RSS after':>9} {'max RSS':>8} {'CPU s':>6}"
    )
    for p in procs.values():
        print(
            f"{p.name:<14} {leaks.get(p.name, 1):>5} {p.fds_before:>10} {p.fds_after:>9} "
            f"{p.rss_before // 1024:>8}Mi {p.rss_after // 1024:>7}Mi {p.max_rss // 1024:>6}Mi "
            f"{p.cpu_after - p.cpu_before:>6.1f}"
        )
    print(
        f"\nvm4's agent exited on a §15.7 violation and was started again "
        f"{world.agent_exits} time(s) (expected: upstream's agent exits there too)"
    )
    print(f"endurance: {time.monotonic() - started:.0f} s, seed {args.seed}")
    if args.keep:
        shutil.copytree(base / "logs", args.keep, dirs_exist_ok=True)
    shutil.rmtree(base, ignore_errors=True)
    if problems:
        print("endurance FAILED:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print("endurance passed: no crash, no growth beyond the bounds, no traceback")
    return 0


if __name__ == "__main__":
    sys.exit(main())
