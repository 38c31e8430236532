"""dom0 -> VM call latency and stream throughput through our daemon and agent.

Starts one ``qrexec-daemon`` and one ``qrexec-agent`` over the socket backend in a
temporary folder, then measures, in the same run:

* **latency**: the median wall time of N (>= 200) sequential ``qrexec-client -d vm1
  'USER:true'`` calls, as a ratio to the median start of the bare interpreter
  (``python -I -S -c pass``);
* **throughput** dom0 -> VM (``cat > /dev/null`` in the VM) and VM -> dom0 (``head -c``
  in the VM), as a ratio to a plain unix-socket copy of the same size between two
  processes.

Run: ``python bench/bench_calls.py [--calls 200] [--mib 256]``. Prints the numbers; the
machine is shared and noisy, so only the ratios mean something.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qrexec.sim import processes

#: A plain unix-socket copy: the child receives and discards, the parent sends zeros.
PLAIN_COPY = """
import os, socket, sys
size = int(sys.argv[1])
parent, child = socket.socketpair()
pid = os.fork()
if pid == 0:
    parent.close()
    left = size
    while left:
        data = child.recv(min(left, 1 << 18))
        if not data:
            break
        left -= len(data)
    os._exit(0 if left == 0 else 1)
child.close()
chunk = bytes(1 << 16)
sent = 0
while sent < size:
    parent.sendall(chunk[: min(len(chunk), size - sent)])
    sent += min(len(chunk), size - sent)
parent.close()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def client_argv() -> list[str]:
    program = shutil.which("qrexec-client")
    return [program] if program else [sys.executable, "-m", "qrexec.client.cli"]


def timed(argv: list[str], env: dict[str, str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def start_vm(base: Path) -> tuple[dict[str, str], list[processes.ProcessRecord]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QREXEC", "VCHAN"))}
    env.update(QREXEC_TRANSPORT="socket", VCHAN_SOCKET_DIR=str(base / "vchan"))
    (base / "vchan").mkdir()
    sockets = base / "qubes"
    env["QREXEC_DAEMON_SOCKET_DIR"] = str(sockets)
    agent, _ = processes.spawn(
        "agent",
        "vm1",
        [sys.executable, "-m", "qrexec.agent.cli", "--domain-root", str(base / "root")],
        # Its trigger socket stays in the bench's folder, not the host's /var/run/qubes.
        {**env, "VCHAN_DOMAIN": "1", "QREXEC_AGENT_SOCKET": str(base / "agent.sock")},
        base / "agent.log",
    )
    daemon, _ = processes.spawn(
        "daemon",
        "vm1",
        [sys.executable, "-m", "qrexec.daemon.cli", "--direct", "-q", "1", "vm1"],
        {**env, "VCHAN_DOMAIN": "0"},
        base / "daemon.log",
    )
    records = [agent, daemon]
    processes.wait_for(
        (sockets / "qrexec.1").exists, 60, watch=records, what="the agent to connect"
    )
    return {**env, "VCHAN_DOMAIN": "0"}, records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="sequential calls (>= 200)")
    parser.add_argument("--mib", type=int, default=256, help="MiB per throughput run")
    args = parser.parse_args()
    user = getpass.getuser()
    base = Path(tempfile.mkdtemp(prefix="qrx-bench-"))
    env, records = start_vm(base)
    client = client_argv()
    try:
        bare = [timed([sys.executable, "-I", "-S", "-c", "pass"], env) for _ in range(args.calls)]
        with_site = [timed([sys.executable, "-c", "pass"], env) for _ in range(args.calls)]
        calls = [timed([*client, "-d", "vm1", f"{user}:true"], env) for _ in range(args.calls)]
        bare_ms = statistics.median(bare) * 1000
        site_ms = statistics.median(with_site) * 1000
        call_ms = statistics.median(calls) * 1000
        print(f"bare interpreter start, python -I -S (median of {args.calls}): {bare_ms:.1f} ms")
        print(f"interpreter start with site, python -c pass: {site_ms:.1f} ms")
        print(f"dom0->VM call qrexec-client 'true' (median of {args.calls}): {call_ms:.1f} ms")
        print(f"latency ratio call / bare interpreter: {call_ms / bare_ms:.2f}")
        # qrexec-client cannot run without site (it lives in site-packages), so this
        # ratio shows what the call itself adds over the unavoidable start-up.
        print(f"latency ratio call / interpreter with site: {call_ms / site_ms:.2f}")

        size = args.mib << 20
        plain = min(timed([sys.executable, "-c", PLAIN_COPY, str(size)], env) for _ in range(3))
        with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
            zeros = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
            start = time.perf_counter()
            subprocess.run(
                [*client, "-d", "vm1", f"{user}:cat > /dev/null"],
                stdin=zeros.stdout,
                env=env,
                check=True,
            )
            to_vm = time.perf_counter() - start
            zeros.wait()
            from_vm = timed(
                [*client, "-d", "vm1", f"{user}:head -c {size} /dev/zero"],
                env,
                stdin=devnull_in,
                stdout=devnull_out,
            )
        for label, seconds in (
            ("plain unix-socket copy", plain),
            ("dom0->VM", to_vm),
            ("VM->dom0", from_vm),
        ):
            print(f"{label}: {args.mib} MiB in {seconds:.2f} s = {args.mib / seconds:.0f} MiB/s")
        print(f"throughput ratio dom0->VM / plain copy: {plain / to_vm:.2f}")
        print(f"throughput ratio VM->dom0 / plain copy: {plain / from_vm:.2f}")
    finally:
        processes.stop(records)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
