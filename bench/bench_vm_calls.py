"""VM -> VM call latency: qrexec-client-vm, the in-process client and Qubes' C programs.

Brings up, in the same run, two emulated systems over the socket backend, each in its own
temporary folder (:mod:`latency_support`): dom0 with our ``qrexec-policy-daemon`` (one
``allow`` rule) and two VMs whose ``qrexec-agent`` and ``qrexec-daemon`` are ours in one
system and Qubes' C programs in the other (the C daemons ask the same policy daemon). Then,
round-robin, N times each (medians):

* baselines: ``python -I -S -c pass`` and ``<venv>/bin/python -c 'import socket'``;
* ``qrexec-client-vm vm2 test.Echo`` from vm1 (a few bytes in, the same bytes out): ours
  (the console script) and the C one against the C stack;
* the in-process client (``VmClient.call``) against our stack and against the C one.

One call is the whole path: trigger, agent, daemon, policy daemon round trip, EXEC_CMDLINE
to vm2's daemon, vm2's agent starting the service, the data vchan, the exit code.

Run: ``python bench/bench_vm_calls.py [--calls 200] [--no-c]``. Prints the install mode.
The C daemons reach the policy daemon only when run as root (a private mount namespace
gives them their fixed ``/run/qubes/policy.sock``); otherwise the C variants are skipped,
with the reason printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from latency_support import (
    Stack,
    c_bin,
    install_mode,
    measure,
    policy_namespace,
    report,
    run_timed,
    script,
)

from qrexec.client.api import VmClient

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per variant")
    parser.add_argument("--no-c", action="store_true", help="skip Qubes' C programs")
    args = parser.parse_args()
    print(f"install mode: {install_mode()}; python {sys.executable}")
    base = Path(tempfile.mkdtemp(prefix="qrx-bv-", dir="/tmp"))
    stacks: list[Stack] = []
    try:
        ours = Stack(base / "py", "py")
        stacks.append(ours)
        two_vms(ours)
        env = ours.vm_env("vm1", 1)
        client = script("qrexec-client-vm")
        api = VmClient(env)
        variants = {
            "python -I -S -c pass": lambda: run_timed([sys.executable, "-I", "-S", "-c", "pass"],
                                                      None),
            "python -c 'import socket'": lambda: run_timed(
                [sys.executable, "-c", "import socket"], None
            ),
            "our qrexec-client-vm": lambda: run_timed([client, "vm2", "test.Echo"], env,
                                                      PAYLOAD, PAYLOAD),
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
    finally:
        for stack in stacks:
            stack.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
