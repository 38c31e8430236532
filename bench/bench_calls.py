"""dom0 -> VM call latency and stream throughput through our daemon and agent.

Starts one ``qrexec-daemon`` and one ``qrexec-agent`` over the socket backend in a
temporary folder, then measures, in the same run:

* **latency**: the median wall time of N (>= 200) sequential ``qrexec-client -d vm1
  'USER:true'`` calls, as a ratio to the median start of the bare interpreter
  (``python -I -S -c pass``);
* **throughput** dom0 -> VM (``cat > /dev/null`` in the VM) and VM -> dom0 (``head -c``
  in the VM), as a ratio to a plain unix-socket copy of the same size between two
  processes (whole calls, start-up included);
* **stream throughput, data phase** (the throughput section, :func:`throughput_section`):
  the same two directions timed from the first data byte to end of stream where the bytes
  land, with the CPU of the client and the agent per GiB (set-up CPU of an empty call
  subtracted), against a plain unix-socket copy timed the same way, median of
  ``--rounds``; the same streams through Qubes' C programs (``qrexec.sim.cpeer.build()``)
  in the same run, with our/C ratios.

Run: ``python bench/bench_calls.py [--calls 200] [--mib 256] [--rounds 3]``
(``--throughput-only`` skips the latency and whole-call parts). Prints the numbers; the
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
from functools import partial
from pathlib import Path

from qrexec.sim import processes

sys.path.insert(0, str(Path(__file__).parent))
import throughput_support as tp

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


# ---------------------------------------------------------------------- throughput section
#: The C system's VM (its own vchan and socket folders, so the two systems never meet).
C_VM_ID = 3
C_VM_NAME = "cvm"


def c_vm_user() -> str:
    """As root the C agent runs in a user namespace as ``nobody`` (it switches users)."""
    return "nobody" if os.geteuid() == 0 else getpass.getuser()


def start_c_vm(base: Path, bindir: Path) -> tuple[dict[str, str], list[processes.ProcessRecord]]:
    """Qubes' C qrexec-daemon and qrexec-agent for one VM over the socket vchan."""
    from qrexec.sim.cpeer import program
    from qrexec.sim.testbed import clean_environment

    cdir = base / "c"
    for sub in ("vchan", "qubes", "qubes-rpc", "rpc-config"):
        (cdir / sub).mkdir(parents=True)
    env = clean_environment()
    env.update(VCHAN_SOCKET_DIR=str(cdir / "vchan"), QREXEC_DAEMON_SOCKET_DIR=str(cdir / "qubes"))
    wrapper: list[str] = []
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        wrapper = ["unshare", "--user", f"--map-user={nobody.pw_uid}",
                   f"--map-group={nobody.pw_gid}"]  # fmt: skip
    agent_env = {
        **env,
        "VCHAN_DOMAIN": str(C_VM_ID),
        "QREXEC_SERVICE_PATH": str(cdir / "qubes-rpc"),
        "QUBES_RPC_CONFIG_PATH": str(cdir / "rpc-config"),
    }
    agent, _ = processes.spawn(
        "c-agent", C_VM_NAME,
        [*wrapper, str(program("qrexec-agent", bindir)), "-S", "-a", str(cdir / "agent.sock")],
        agent_env, cdir / "agent.log",
    )  # fmt: skip
    daemon, _ = processes.spawn(
        "c-daemon", C_VM_NAME,
        [str(program("qrexec-daemon", bindir)), "-D", f"--socket-dir={cdir / 'qubes'}",
         f"--uuid=00000000-0000-4000-8000-{C_VM_ID:012d}", "--policy-program=/bin/false",
         str(C_VM_ID), C_VM_NAME, c_vm_user()],
        {**env, "VCHAN_DOMAIN": "0"}, cdir / "daemon.log",
    )  # fmt: skip
    records = [agent, daemon]
    processes.wait_for(
        (cdir / "qubes" / f"qrexec.{C_VM_ID}").exists, 60, watch=records, what="the C agent"
    )
    return {**env, "VCHAN_DOMAIN": "0"}, records


def stream_once(
    client: list[str], env: dict[str, str], target: str, direction: str, size: int, base: Path
) -> tuple[float, float]:
    """One dom0 -> VM call moving ``size`` bytes; (data-phase seconds, client CPU)."""
    source, sink = base / "source.py", base / "sink.py"
    result = base / "sink.result"
    user, vm = target.split("@")
    python = sys.executable
    if direction == "dom0->VM":
        producer = subprocess.Popen([python, str(source), str(size)], stdout=subprocess.PIPE)
        assert producer.stdout is not None
        call = subprocess.Popen(
            [*client, "-d", vm, f"{user}:{python} {sink} {result}"],
            stdin=producer.stdout, stdout=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        producer.stdout.close()
        code, cpu = tp.wait_cpu(call)
        producer.wait()
    else:
        consumer = subprocess.Popen([python, str(sink), str(result)], stdin=subprocess.PIPE)
        assert consumer.stdin is not None
        call = subprocess.Popen(
            [*client, "-d", vm, f"{user}:{python} {source} {size}"],
            stdin=subprocess.DEVNULL, stdout=consumer.stdin, env=env,
        )  # fmt: skip
        consumer.stdin.close()
        code, cpu = tp.wait_cpu(call)
        consumer.wait()
    if code != 0:
        raise RuntimeError(f"{direction} stream through {client[0]} exited {code}")
    return tp.read_sink(result, size), cpu


def throughput_section(
    base: Path, env: dict[str, str], agent_pids: list[int], size: int, rounds: int
) -> None:
    """Data-phase stream throughput and CPU per GiB, ours and C, against a plain copy."""
    tp.write_scripts(base)
    base.chmod(0o755)
    systems: dict[str, tuple[list[str], dict[str, str], str, list[int]]] = {
        "ours": (client_argv(), env, f"{getpass.getuser()}@vm1", agent_pids)
    }
    c_records: list[processes.ProcessRecord] = []
    try:
        try:
            from qrexec.sim.cpeer import build, program

            bindir = build()
            c_env, c_records = start_c_vm(base, bindir)
            systems["C"] = (
                [str(program("qrexec-client", bindir)), f"--socket-dir={base / 'c' / 'qubes'}"],
                c_env,
                f"{c_vm_user()}@{C_VM_NAME}",
                [record.pid for record in c_records],
            )
        except Exception as exc:  # the C programs are a comparison, not a requirement
            print(f"Qubes' C programs not run: {exc}")
        directions = ("dom0->VM", "VM->dom0")
        samples: dict[str, list[tuple[float, float]]] = {"plain unix-socket copy": []}
        setup: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(rounds):
            plain = tp.plain_copy(size)
            samples["plain unix-socket copy"].append((plain.seconds, plain.cpu))
            for name, (client, call_env, target, resident) in systems.items():
                setup[name].append(
                    tp.timed_stream(
                        partial(stream_once, client, call_env, target, directions[0], 0, base),
                        resident,
                    )[1]
                )
                for direction in directions:
                    samples.setdefault(f"{name} {direction}", []).append(
                        tp.timed_stream(
                            partial(stream_once, client, call_env, target, direction, size, base),
                            resident,
                        )
                    )
        rows = {
            label: tp.median_sample(
                values, 0.0 if label.startswith("plain") else statistics.median(
                    setup[label.split()[0]])
            )
            for label, values in samples.items()
        }  # fmt: skip
        print(
            f"stream data phase, {size >> 20} MiB, median of {rounds} rounds; CPU = client + "
            "agent (+ daemon), less an empty call's"
        )
        for name in systems:
            print(f"  set-up CPU of an empty call, {name}: {statistics.median(setup[name]):.3f} s")
        tp.report(size, rows, [(f"ours {d}", f"C {d}") for d in directions])
    finally:
        processes.stop(c_records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="sequential calls (>= 200)")
    parser.add_argument("--mib", type=int, default=256, help="MiB per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput section rounds")
    parser.add_argument(
        "--throughput-only", action="store_true", help="only the data-phase stream section"
    )
    args = parser.parse_args()
    user = getpass.getuser()
    base = Path(tempfile.mkdtemp(prefix="qrx-bench-"))
    env, records = start_vm(base)
    client = client_argv()
    try:
        if args.throughput_only:
            throughput_section(base, env, [r.pid for r in records], args.mib << 20, args.rounds)
            return 0
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
        throughput_section(base, env, [r.pid for r in records], size, args.rounds)
    finally:
        processes.stop(records)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
