"""VM → VM call latency through qrexec-client-vm, as a ratio to starting a bare interpreter.

Brings up an emulated dom0 (our ``qrexec-policy-daemon`` with one ``allow`` rule) and two
VMs (``qrexec-agent`` + ``qrexec-daemon`` each) over the socket backend in a temporary
folder, then times N sequential ``qrexec-client-vm vm2 test.Echo`` calls from vm1 (the
installed console script, as a user runs it; a few bytes in, the same bytes out) and, in
the same run and interleaved with them, N starts of ``python -I -S -c pass``. Medians are
compared, so machine noise affects both alike. One call is the whole path: client start,
trigger, agent, daemon, policy daemon round trip, EXEC_CMDLINE to vm2's daemon, vm2's
agent starting the service, the data vchan, exit code.

Run: ``python bench/bench_vm_calls.py [--calls 200]``. Every process started is tracked
by pid and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qrexec.sim import processes
from qrexec.sim.testbed import clean_environment

ECHO = "#!/bin/sh\nexec cat\n"


def environment(base: Path, domid: int, extra: dict[str, str]) -> dict[str, str]:
    env = clean_environment()
    env.update(
        QREXEC_TRANSPORT="socket",
        VCHAN_SOCKET_DIR=str(base / "vchan"),
        VCHAN_DOMAIN=str(domid),
        QREXEC_DAEMON_SOCKET_DIR=str(base / "qubes"),
    )
    env.update(extra)
    return env


def wait_for(path: Path, what: str, records: list[processes.ProcessRecord]) -> None:
    processes.wait_for(path.exists, 30.0, watch=records, what=what)


def bring_up(base: Path, records: list[processes.ProcessRecord]) -> dict[str, str]:
    """Start dom0's policy daemon and vm1, vm2; return vm1's environment for clients."""
    for sub in ("vchan", "qubes", "logs", "policy.d"):
        (base / sub).mkdir()
    (base / "policy.d" / "30-bench.policy").write_text("test.Echo * vm1 vm2 allow\n")
    domains = {"dom0": {"type": "AdminVM", "power_state": "Running"}}
    for domid in (1, 2):
        domains[f"vm{domid}"] = {
            "uuid": f"00000000-0000-4000-8000-{domid:012d}",
            "power_state": "Running",
        }
    (base / "system-info.json").write_text(json.dumps({"domains": domains}))
    dom0 = {
        "QREXEC_POLICY_SOCKET": str(base / "policy.sock"),
        "QREXEC_POLICY_PATH": str(base / "policy.d"),
        "QREXEC_SYSTEM_INFO": str(base / "system-info.json"),
    }
    policy, _ = processes.spawn(
        "policy",
        "dom0",
        [sys.executable, "-m", "qrexec.policy.decision.daemon", "--eval-socket-path", "",
         "--gui-socket-path", "", "-q", "--socket-path", str(base / "policy.sock")],
        environment(base, 0, dom0),
        base / "logs" / "policy.log",
    )  # fmt: skip
    records.append(policy)
    wait_for(base / "policy.sock", "the policy daemon", records)
    user = os.environ.get("USER") or __import__("getpass").getuser()
    for domid in (1, 2):
        name = f"vm{domid}"
        root = base / "roots" / name
        (root / "etc/qubes-rpc").mkdir(parents=True)
        service = root / "etc/qubes-rpc/test.Echo"
        service.write_text(ECHO)
        service.chmod(0o755)
        agent_env = {"QREXEC_AGENT_SOCKET": str(base / f"agent.{name}.sock")}
        agent, _ = processes.spawn(
            "agent",
            name,
            [sys.executable, "-m", "qrexec.agent.cli", "--domain-root", str(root)],
            environment(base, domid, agent_env),
            base / "logs" / f"agent.{name}.log",
        )
        records.append(agent)
        daemon, _ = processes.spawn(
            "daemon",
            name,
            [sys.executable, "-m", "qrexec.daemon.cli", "--direct", "-q",
             "-u", f"00000000-0000-4000-8000-{domid:012d}", str(domid), name, user],
            environment(base, 0, dom0),
            base / "logs" / f"daemon.{name}.log",
        )  # fmt: skip
        records.append(daemon)
        wait_for(base / "qubes" / f"qrexec.{domid}", f"{name}'s agent and daemon", records)
        wait_for(base / f"agent.{name}.sock", f"{name}'s trigger socket", records)
    return environment(
        base, 1, {"QREXEC_AGENT_SOCKET": str(base / "agent.vm1.sock"),
                  "QREXEC_DOMAIN_ROOT": str(base / "roots" / "vm1")}
    )  # fmt: skip


def timed(argv: list[str], env: dict[str, str] | None, data: bytes) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, input=data, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or (data and done.stdout != data):
        raise SystemExit(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="sequential calls (>= 200)")
    args = parser.parse_args()
    client = shutil.which("qrexec-client-vm")
    if client is None:
        raise SystemExit("qrexec-client-vm is not installed (pip install -e .)")
    records: list[processes.ProcessRecord] = []
    base = Path(tempfile.mkdtemp(prefix="qrx-bench-vmcalls-"))
    try:
        env = bring_up(base, records)
        call = [client, "vm2", "test.Echo"]
        bare = [sys.executable, "-I", "-S", "-c", "pass"]
        payload = b"ping\n"
        for _ in range(5):  # warm caches and the policy daemon
            timed(call, env, payload)
        calls: list[float] = []
        starts: list[float] = []
        for _ in range(args.calls):
            calls.append(timed(call, env, payload))
            starts.append(timed(bare, None, b""))
        call_ms = statistics.median(calls) * 1000
        bare_ms = statistics.median(starts) * 1000
        print(f"VM->VM calls (qrexec-client-vm, sequential): {args.calls}")
        print(f"  median call latency        {call_ms:8.2f} ms")
        print(f"  median python -I -S start  {bare_ms:8.2f} ms")
        print(f"  ratio call / bare start    {call_ms / bare_ms:8.2f}x")
        q = statistics.quantiles(calls, n=10)
        print(f"  call p10 / p90             {q[0] * 1000:8.2f} / {q[-1] * 1000:.2f} ms")
    finally:
        processes.stop(records)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
