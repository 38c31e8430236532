"""VM -> VM call latency: qrexec-client-vm, the in-process client and Qubes' C programs.

Brings up, in the same run, two emulated systems over the socket backend, each in its own
temporary folder (:mod:`latency_support`): dom0 with our ``qrexec-policy-daemon`` (one
``allow`` rule) and two VMs whose ``qrexec-agent`` and ``qrexec-daemon`` are ours in one
system and Qubes' C programs in the other (the C daemons ask the same policy daemon). Then,
round-robin, N times each (medians):

* baselines: ``python -I -S -c pass`` and ``<venv>/bin/python -c 'import socket'``;
* ``qrexec-client-vm vm2 test.Echo`` from vm1 (a few bytes in, the same bytes out): ours
  (the installed script; also behind the wrapper pip writes for an entry point, whose cost
  is reported apart) and the C one against the C stack;
* the in-process client (``VmClient.call``) against our stack and against the C one.

One call is the whole path: trigger, agent, daemon, policy daemon round trip, EXEC_CMDLINE
to vm2's daemon, vm2's agent starting the service, the data vchan, the exit code.

With ``--mib N`` it also measures streams (the throughput section,
:func:`throughput_section`): N MiB VM -> VM (``qrexec-client-vm`` in vm1 is the data
vchan's server, vm2's agent its client: no daemon on the data path) and VM -> dom0
(through vm1's daemon, which runs the dom0 service), each timed from its first data byte
to end of stream where the bytes land, with the CPU of the client and every agent and
daemon per GiB (less an empty call's), against a plain unix-socket copy timed the same
way, median of ``--rounds``; then one VM -> VM stream of N MiB is checked byte for byte
(SHA-256 at both ends).

Run: ``python bench/bench_vm_calls.py [--calls 200] [--no-c] [--mib 1024 [--rounds 3]]``
(``--calls 0`` skips the latency part). Prints the install mode.
The C daemons reach the policy daemon only when run as root (a private mount namespace
gives them their fixed ``/run/qubes/policy.sock``); otherwise the C variants are skipped,
with the reason printed.
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
    policy_namespace,
    report,
    run_timed,
    script,
)

from qrexec.client.api import VmClient
from qrexec.sim import processes
from qrexec.sim.testbed import clean_environment

ECHO = "#!/bin/sh\nexec cat\n"
PAYLOAD = b"ping\n"


def two_vms(stack: Stack) -> None:
    stack.start_policy("test.Echo * vm1 vm2 allow\n", ["vm1", "vm2"])
    stack.start_vm("vm1", 1)
    stack.start_vm("vm2", 2, {"test.Echo": ECHO})


def timed_api(client: VmClient) -> float:
    start = time.perf_counter()
    result = client.call("vm2", "test.Echo", input=PAYLOAD)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or result.stdout != PAYLOAD:
        raise SystemExit(f"in-process call failed: {result}")
    return elapsed


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
    (base / "policy.d" / "30-bench.policy").write_text(
        "test.Echo * vm1 vm2 allow\ntest.Sink * vm1 vm2 allow\ntest.Sink * vm1 dom0 allow\n"
        "test.Hash * vm1 vm2 allow\n"
    )
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
        # dom0's own services (VM -> dom0 calls run them in the daemon).
        "QREXEC_DOMAIN_ROOT": str(base / "roots" / "dom0"),
    }
    write_stream_services(base, base / "roots" / "dom0")
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
        write_stream_services(base, root)
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


# ---------------------------------------------------------------------- throughput section
#: Reads stdin to EOF and writes the SHA-256 of what it read to argv[1].
HASHER = """import hashlib, os, sys
digest, buffer = hashlib.sha256(), bytearray(1 << 20)
while count := os.readv(0, [buffer]):
    digest.update(memoryview(buffer)[:count])
open(sys.argv[1], "w").write(digest.hexdigest())
"""
#: Writes argv[1] MiB of a seeded pseudo-random pattern (1 MiB block, each one numbered).
PATTERN = """import os, random, sys
block = bytearray(random.Random(7).randbytes(1 << 20))
for index in range(int(sys.argv[1])):
    block[:8] = index.to_bytes(8, "little")
    view = memoryview(block)
    while view:
        view = view[os.write(1, view):]
"""


def pattern_digest(mib: int) -> str:
    import hashlib
    import random

    block = bytearray(random.Random(7).randbytes(1 << 20))
    digest = hashlib.sha256()
    for index in range(mib):
        block[:8] = index.to_bytes(8, "little")
        digest.update(block)
    return digest.hexdigest()


def write_stream_services(base: Path, root: Path) -> None:
    """test.Sink (the timing sink) and test.Hash in a domain root's service folder."""
    tp.write_scripts(base)
    (base / "hasher.py").write_text(HASHER)
    (base / "pattern.py").write_text(PATTERN)
    folder = root / "etc/qubes-rpc"
    folder.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    for name, body in (
        ("test.Sink", f"exec {python} {base / 'sink.py'} {base / 'sink.result'}"),
        ("test.Hash", f"exec {python} {base / 'hasher.py'} {base / 'hash.result'}"),
    ):
        service = folder / name
        service.write_text(f"#!/bin/sh\n{body}\n")
        service.chmod(0o755)


def stream_vm_call(
    client: str, env: dict[str, str], target: str, service: str, producer_argv: list[str]
) -> tuple[int, float]:
    """Pipe ``producer_argv`` into ``qrexec-client-vm target service``; (exit, client CPU)."""
    producer = subprocess.Popen(producer_argv, stdout=subprocess.PIPE)
    assert producer.stdout is not None
    call = subprocess.Popen(
        [client, target, service], stdin=producer.stdout, stdout=subprocess.DEVNULL, env=env
    )
    producer.stdout.close()
    code, cpu = tp.wait_cpu(call)
    producer.wait()
    return code, cpu


def throughput_section(
    client: str, env: dict[str, str], base: Path, records: list[processes.ProcessRecord],
    mib: int, rounds: int,
) -> None:  # fmt: skip
    """VM -> VM and VM -> dom0 streams, data phase, against a plain copy; then a hash check."""
    size = mib << 20
    resident = [record.pid for record in records if record.role in ("agent", "daemon")]
    source = [sys.executable, str(base / "source.py")]

    def stream(target: str, nbytes: int) -> tuple[float, float]:
        code, cpu = stream_vm_call(client, env, target, "test.Sink", [*source, str(nbytes)])
        if code != 0:
            raise SystemExit(f"stream to {target} exited {code}")
        return tp.read_sink(base / "sink.result", nbytes), cpu

    samples: dict[str, list[tuple[float, float]]] = {"plain unix-socket copy": []}
    setup: dict[str, list[float]] = {}
    for _ in range(rounds):
        plain = tp.plain_copy(size)
        samples["plain unix-socket copy"].append((plain.seconds, plain.cpu))
        for label, target in (("VM->VM", "vm2"), ("VM->dom0", "dom0")):
            setup.setdefault(label, []).append(
                tp.timed_stream(partial(stream, target, 0), resident)[1]
            )
            samples.setdefault(label, []).append(
                tp.timed_stream(partial(stream, target, size), resident)
            )
    rows = {
        label: tp.median_sample(values, statistics.median(setup[label]) if label in setup else 0.0)
        for label, values in samples.items()
    }
    print(
        f"stream data phase, {mib} MiB, median of {rounds} rounds; CPU = qrexec-client-vm + "
        "every agent and daemon, less an empty call's"
    )
    for label, values in setup.items():
        print(f"  set-up CPU of an empty call, {label}: {statistics.median(values):.3f} s")
    tp.report(size, rows, [])
    code, _ = stream_vm_call(
        client, env, "vm2", "test.Hash", [sys.executable, str(base / "pattern.py"), str(mib)]
    )
    got = (base / "hash.result").read_text()
    ok = code == 0 and got == pattern_digest(mib)
    print(f"VM->VM {mib} MiB SHA-256 check: {'identical' if ok else f'DIFFERENT ({code})'}")
    if not ok:
        raise SystemExit("the VM->VM stream was not byte-exact")


def timed(argv: list[str], env: dict[str, str] | None, data: bytes) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, input=data, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or (data and done.stdout != data):
        raise SystemExit(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per variant")
    parser.add_argument("--no-c", action="store_true", help="skip Qubes' C programs")
    parser.add_argument("--mib", type=int, default=0, help="also stream N MiB each way")
    parser.add_argument("--rounds", type=int, default=3, help="throughput section rounds")
    args = parser.parse_args()
    print(f"install mode: {install_mode()}; python {sys.executable}")
    if args.mib:
        stream_section(args.mib, args.rounds)
    if not args.calls:
        return 0
    base = Path(tempfile.mkdtemp(prefix="qrx-bv-", dir="/tmp"))
    stacks: list[Stack] = []
    try:
        ours = Stack(base / "py", "py")
        stacks.append(ours)
        two_vms(ours)
        env = ours.vm_env("vm1", 1)
        client = script("qrexec-client-vm")
        api = VmClient(env)
        wrapped = pip_wrapper(base, "qrexec-client-vm-pip", "qrexec.client.client_vm")
        variants = {
            "python -I -S -c pass": lambda: run_timed([sys.executable, "-I", "-S", "-c", "pass"],
                                                      None),
            "python -c 'import socket'": lambda: run_timed(
                [sys.executable, "-c", "import socket"], None
            ),
            "our qrexec-client-vm": lambda: run_timed([client, "vm2", "test.Echo"], env,
                                                      PAYLOAD, PAYLOAD),
            "our qrexec-client-vm behind pip's wrapper": lambda: run_timed(
                [wrapped, "vm2", "test.Echo"], env, PAYLOAD, PAYLOAD),
            "our in-process client": lambda: timed_api(api),
        }  # fmt: skip
        if args.no_c:
            pass
        elif policy_namespace(base / "policy.sock") is None:
            print("C variants skipped: the C daemon's fixed policy socket path needs root")
        else:
            theirs = Stack(base / "c", "c", c_bin())
            stacks.append(theirs)
            two_vms(theirs)
            c_env = theirs.vm_env("vm1", 1)
            assert theirs.bindir is not None
            agent_option = f"--agent-socket={theirs.agent_socket('vm1')}"
            c_client = [str(theirs.bindir / "qrexec-client-vm"), agent_option, "vm2", "test.Echo"]
            c_api = VmClient(c_env)
            variants["C qrexec-client-vm, C stack"] = lambda: run_timed(
                c_client, c_env, PAYLOAD, PAYLOAD
            )
            variants["in-process client, C stack"] = lambda: timed_api(c_api)
        print(f"VM->VM test.Echo with policy, median of {args.calls} (round-robin):")
        medians = measure(variants, args.calls)
        report(
            medians,
            [
                ("our CLI / python -c 'import socket' (goal <= 2)", "our qrexec-client-vm",
                 "python -c 'import socket'"),
                ("our CLI / python -I -S -c pass", "our qrexec-client-vm",
                 "python -I -S -c pass"),
                ("our CLI / C CLI", "our qrexec-client-vm", "C qrexec-client-vm, C stack"),
                ("in-process / python -I -S -c pass (goal <= 1)", "our in-process client",
                 "python -I -S -c pass"),
                ("in-process / C CLI", "our in-process client", "C qrexec-client-vm, C stack"),
                ("in-process on C stack / C CLI", "in-process client, C stack",
                 "C qrexec-client-vm, C stack"),
            ],
        )  # fmt: skip
        wrapper = (
            medians["our qrexec-client-vm behind pip's wrapper"] - medians["our qrexec-client-vm"]
        )
        print(
            "  pip's entry-point wrapper (imports re; sys.exit: full interpreter teardown) "
            f"would cost about {wrapper:.2f} ms"
        )
    finally:
        for stack in stacks:
            stack.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def stream_section(mib: int, rounds: int) -> None:
    """The data-phase stream section on a system of its own (see the module docstring)."""
    client = shutil.which("qrexec-client-vm") or script("qrexec-client-vm")
    records: list[processes.ProcessRecord] = []
    base = Path(tempfile.mkdtemp(prefix="qrx-bench-vmcalls-"))
    try:
        env = bring_up(base, records)
        throughput_section(client, env, base, records, mib, rounds)
    finally:
        processes.stop(records)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
