"""dom0 -> VM calls: latency of our CLI, the in-process client and Qubes' C programs, and
stream throughput through our daemon and agent, in one run.

Starts one VM (``qrexec-agent`` + ``qrexec-daemon``) of ours and one of Qubes' C programs
(:mod:`latency_support`), each on the socket backend in its own temporary folder, then
measures round-robin, N times each (medians):

* baselines: ``python -I -S -c pass`` and ``<venv>/bin/python -c 'import socket'`` (the
  second pays for site and socket, as any client must);
* ``qrexec-client -d vm1 USER:true``: our installed script (a plain script, see
  ``scripts/``), the same client behind the wrapper pip writes for an entry point (which
  imports ``re``; its cost is reported apart), and the C ``qrexec-client`` against the C
  daemon and agent;
* the in-process client (``Dom0Client.run``) against our daemon and against the C one;

then throughput dom0 -> VM and VM -> dom0 through our CLI (whole calls, start-up included)
as a ratio to a plain unix-socket copy of the same size between two processes, and the
**data-phase stream section** (:func:`throughput_section`): the same two directions timed
from the first data byte to the end of the stream where the bytes land, with the CPU of
the client and the agent per GiB (set-up CPU of an empty call subtracted), against a plain
unix-socket copy timed the same way, median of ``--rounds``; the same streams through
Qubes' C programs in the same run, with our/C ratios. Prints the install mode first: an
editable install pays for setuptools' import hook at every start.

Run: ``python bench/bench_calls.py [--calls 200] [--mib 64] [--rounds 3] [--no-c]``
(``--throughput-only`` runs only the data-phase section). The machine is shared and noisy,
so only the ratios mean something.
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

sys.path.insert(0, str(Path(__file__).parent))
import throughput_support as tp
from latency_support import (
    Stack,
    c_bin,
    install_mode,
    measure,
    pip_wrapper,
    report,
    run_timed,
    script,
)

from qrexec.client.api import Dom0Client
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
#: 100 calls in flight at once from one fresh process; prints its peak RSS in KiB.
CONCURRENT = """
import asyncio, sys
from qrexec.client.api import Dom0Client
async def main():
    client = Dom0Client()
    calls = [client.arun("vm1", f"{sys.argv[1]}:echo {n}") for n in range(int(sys.argv[2]))]
    results = await asyncio.gather(*calls)
    assert [r.stdout for r in results] == [b"%d\\n" % n for n in range(len(calls))], results
asyncio.run(main())
def peak_kib():
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
print(peak_kib())
"""
#: What the issue allows the client for 100 concurrent calls.
CONCURRENT_RSS_LIMIT_MIB = 60


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


def throughput(ours: Stack, client: str, mib: int) -> None:
    env = ours.dom0_env()
    size = mib << 20
    plain = min(run_timed([sys.executable, "-c", PLAIN_COPY, str(size)], env) for _ in range(3))
    user = ours.user
    with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
        zeros = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        start = time.perf_counter()
        subprocess.run([client, "-d", "vm1", f"{user}:cat > /dev/null"], stdin=zeros.stdout,
                       env=env, check=True)  # fmt: skip
        to_vm = time.perf_counter() - start
        zeros.wait()
        start = time.perf_counter()
        subprocess.run([client, "-d", "vm1", f"{user}:head -c {size} /dev/zero"],
                       stdin=devnull_in, stdout=devnull_out, env=env, check=True)  # fmt: skip
        from_vm = time.perf_counter() - start
    for label, seconds in (("plain unix-socket copy", plain), ("dom0->VM", to_vm),
                           ("VM->dom0", from_vm)):  # fmt: skip
        print(f"  {label}: {mib} MiB in {seconds:.2f} s = {mib / seconds:.0f} MiB/s")
    print(f"  throughput ratio dom0->VM / plain copy: {plain / to_vm:.2f}")
    print(f"  throughput ratio VM->dom0 / plain copy: {plain / from_vm:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per variant")
    parser.add_argument("--mib", type=int, default=64, help="MiB per throughput run (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="data-phase section rounds")
    parser.add_argument(
        "--throughput-only", action="store_true", help="only the data-phase stream section"
    )
    parser.add_argument("--no-c", action="store_true", help="skip Qubes' C programs")
    args = parser.parse_args()
    print(f"install mode: {install_mode()}; python {sys.executable}")
    if args.throughput_only:
        return stream_section(args.mib or 256, args.rounds)
    base = Path(tempfile.mkdtemp(prefix="qrx-bc-", dir="/tmp"))
    stacks: list[Stack] = []
    try:
        ours = Stack(base / "py", "py")
        stacks.append(ours)
        ours.start_vm("vm1", 1)
        env = ours.dom0_env()
        client = script("qrexec-client")
        user = ours.user
        dom0 = Dom0Client(env)
        wrapped = pip_wrapper(base, "qrexec-client-pip", "qrexec.client.cli")
        variants = {
            "python -I -S -c pass": lambda: run_timed([sys.executable, "-I", "-S", "-c", "pass"],
                                                      None),
            "python -c 'import socket'": lambda: run_timed(
                [sys.executable, "-c", "import socket"], None
            ),
            "our CLI (installed script)": lambda: run_timed([client, "-d", "vm1", f"{user}:true"],
                                                            env),
            "our CLI behind pip's wrapper": lambda: run_timed(
                [wrapped, "-d", "vm1", f"{user}:true"], env
            ),
            "our in-process client": lambda: timed_api(dom0, user),
        }  # fmt: skip
        if not args.no_c:
            theirs = Stack(base / "c", "c", c_bin())
            stacks.append(theirs)
            theirs.start_vm("vm1", 1)
            c_env = theirs.dom0_env()
            c_client = str(theirs.bindir / "qrexec-client") if theirs.bindir else ""
            c_sockets = f"--socket-dir={theirs.base / 'qubes'}"
            c_user = theirs.user
            c_dom0 = Dom0Client(c_env)
            variants["C CLI, C daemon+agent"] = lambda: run_timed(
                [c_client, c_sockets, "-d", "vm1", f"{c_user}:true"], c_env
            )
            variants["in-process client, C daemon+agent"] = lambda: timed_api(c_dom0, c_user)
        print(f"dom0->VM 'USER:true', median of {args.calls} (round-robin):")
        medians = measure(variants, args.calls)
        report(
            medians,
            [
                ("our CLI / python -c 'import socket' (goal <= 1.5)",
                 "our CLI (installed script)", "python -c 'import socket'"),
                ("our CLI / python -I -S -c pass", "our CLI (installed script)",
                 "python -I -S -c pass"),
                ("our CLI behind pip's wrapper / import socket", "our CLI behind pip's wrapper",
                 "python -c 'import socket'"),
                ("our CLI / C CLI", "our CLI (installed script)", "C CLI, C daemon+agent"),
                ("in-process / python -I -S -c pass (goal <= 0.5)", "our in-process client",
                 "python -I -S -c pass"),
                ("in-process / C CLI", "our in-process client", "C CLI, C daemon+agent"),
                ("in-process on C stack / C CLI", "in-process client, C daemon+agent",
                 "C CLI, C daemon+agent"),
            ],
        )  # fmt: skip
        wrapper = medians["our CLI behind pip's wrapper"] - medians["our CLI (installed script)"]
        print(
            "  pip's entry-point wrapper (imports re; sys.exit: full interpreter teardown) "
            f"would cost about {wrapper:.2f} ms"
        )
        concurrent(env, user, 100)
        if args.mib:
            print(f"throughput through our CLI ({args.mib} MiB, whole calls):")
            throughput(ours, client, args.mib)
    finally:
        for stack in stacks:
            stack.stop()
        shutil.rmtree(base, ignore_errors=True)
    if args.mib:
        return stream_section(args.mib, args.rounds)
    return 0


def stream_section(mib: int, rounds: int) -> int:
    """The data-phase stream section on a VM of its own (see the module docstring)."""
    base = Path(tempfile.mkdtemp(prefix="qrx-bench-"))
    env, records = start_vm(base)
    try:
        throughput_section(base, env, [r.pid for r in records], mib << 20, rounds)
    finally:
        processes.stop(records)
        shutil.rmtree(base, ignore_errors=True)
    return 0


def concurrent(env: dict[str, str], user: str, count: int) -> None:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT, user, str(count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    rss_mib = int(done.stdout.split()[-1]) / 1024
    print(
        f"{count} concurrent in-process calls from one fresh process: {elapsed:.2f} s, "
        f"peak RSS {rss_mib:.1f} MiB (limit {CONCURRENT_RSS_LIMIT_MIB}; "
        f"ratio {rss_mib / CONCURRENT_RSS_LIMIT_MIB:.2f})"
    )


def timed_api(client: Dom0Client, user: str) -> float:
    start = time.perf_counter()
    result = client.run("vm1", f"{user}:true")
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"in-process call failed: {result}")
    return elapsed


if __name__ == "__main__":
    sys.exit(main())
