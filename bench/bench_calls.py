"""dom0 -> VM call latency: our CLI, the in-process client and Qubes' C programs, one run.

Starts one VM (``qrexec-agent`` + ``qrexec-daemon``) of ours and one of Qubes' C programs
(:mod:`latency_support`), each on the socket backend in its own temporary folder, then
measures round-robin, N times each (medians):

* baselines: ``python -I -S -c pass`` and ``<venv>/bin/python -c 'import socket'`` (the
  second pays for site and socket, as any client must);
* ``qrexec-client -d vm1 USER:true``: our console script (pip's wrapper imports ``re``),
  our client started without the wrapper (``python -c 'from qrexec.client.cli import
  main'``), and the C ``qrexec-client`` against the C daemon and agent;
* the in-process client (``Dom0Client.run``) against our daemon and against the C one;

then throughput dom0 -> VM and VM -> dom0 through our CLI as a ratio to a plain unix-socket
copy of the same size between two processes. Prints the install mode first: an editable
install pays for setuptools' import hook at every start.

Run: ``python bench/bench_calls.py [--calls 200] [--mib 64] [--no-c]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from latency_support import Stack, c_bin, install_mode, measure, report, run_timed, script

from qrexec.client.api import Dom0Client

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
NO_WRAPPER = "import sys\nfrom qrexec.client.cli import main\nsys.exit(main(sys.argv[1:]))"
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
    parser.add_argument("--no-c", action="store_true", help="skip Qubes' C programs")
    args = parser.parse_args()
    print(f"install mode: {install_mode()}; python {sys.executable}")
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
        variants = {
            "python -I -S -c pass": lambda: run_timed([sys.executable, "-I", "-S", "-c", "pass"],
                                                      None),
            "python -c 'import socket'": lambda: run_timed(
                [sys.executable, "-c", "import socket"], None
            ),
            "our CLI (console script)": lambda: run_timed([client, "-d", "vm1", f"{user}:true"],
                                                          env),
            "our CLI (no pip wrapper)": lambda: run_timed(
                # -P: not the checkout in the current folder, the installed package.
                [sys.executable, "-P", "-c", NO_WRAPPER, "-d", "vm1", f"{user}:true"], env
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
                ("our CLI / python -c 'import socket' (goal <= 1.5)", "our CLI (console script)",
                 "python -c 'import socket'"),
                ("our CLI / python -I -S -c pass", "our CLI (console script)",
                 "python -I -S -c pass"),
                ("our CLI without pip wrapper / import socket", "our CLI (no pip wrapper)",
                 "python -c 'import socket'"),
                ("our CLI / C CLI", "our CLI (console script)", "C CLI, C daemon+agent"),
                ("in-process / python -I -S -c pass (goal <= 0.5)", "our in-process client",
                 "python -I -S -c pass"),
                ("in-process / C CLI", "our in-process client", "C CLI, C daemon+agent"),
                ("in-process on C stack / C CLI", "in-process client, C daemon+agent",
                 "C CLI, C daemon+agent"),
            ],
        )  # fmt: skip
        wrapper = medians["our CLI (console script)"] - medians["our CLI (no pip wrapper)"]
        print(f"  pip console-script wrapper (imports re) costs about {wrapper:.2f} ms")
        concurrent(env, user, 100)
        if args.mib:
            print(f"throughput through our CLI ({args.mib} MiB):")
            throughput(ours, client, args.mib)
    finally:
        for stack in stacks:
            stack.stop()
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
