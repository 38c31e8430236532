"""Testbed scale: 50 VMs with ``qrexec-sim up`` on this machine, each called once.

Measured in one run:

* bring-up time of a 1-VM testbed (baseline) and of an N-VM testbed (default 50), both
  through the ``qrexec-sim up`` command, and their ratio;
* one dom0 -> VM call to every VM (``qrexec-client``, output checked) and one VM -> VM call
  from every VM to the next (``qrexec-client-vm``, the seed's test.Add, policy-checked),
  the median latency of each as a ratio to starting the bare interpreter
  (``python -I -S -c pass``);
* the resident memory (RSS) of every agent and every daemon: median and max, plus the
  policy daemon's and the qubesd stand-in's.

Run: ``python bench/bench_sim.py [--vms N]``. Exit status 1 if any call failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qrexec.sim.harness import RunningTestbed
from qrexec.sim.rundir import RunDir

ADD_SERVER = "#!/bin/sh\nread a b\necho $((a+b))\n"
ADD_CLIENT = "#!/bin/sh\necho $1 $2\nexec cat >&2\n"


def topology_text(vms: int) -> str:
    """A topology file with ``vms`` VMs that all provide test.Add (2011 policy: allow)."""
    lines = [
        '[dom0]\nask = "* * * deny\\n"',
        '[[dom0.policy]]\nformat = "modern"\nfile = "30-bench.policy"\ntext = "!compat-2011\\n"',
        '[[dom0.policy]]\nformat = "2011"\nfile = "test.Add"\ntext = "anyvm anyvm allow\\n"',
    ]
    for i in range(1, vms + 1):
        lines.append(
            f'[[domain]]\nname = "vm{i}"\n'
            f'[[domain.service]]\nname = "test.Add"\nscript = """{ADD_SERVER}"""\n'
            f'[[domain.file]]\npath = "/usr/bin/our_test_add_client"\nmode = 0o755\n'
            f'text = """{ADD_CLIENT}"""'
        )
    return "\n".join(lines) + "\n"


def timed_up(vms: int, work: Path) -> tuple[float, Path]:
    """Bring a testbed up with the CLI; (seconds, run dir)."""
    topo = work / f"topology-{vms}.toml"
    topo.write_text(topology_text(vms))
    run_dir = Path(tempfile.mkdtemp(prefix="qsim-bench", dir="/tmp"))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "qrexec.sim.cli", "--run-dir", str(run_dir), "up", "-q",
         "--topology", str(topo)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started, run_dir


def interpreter_start() -> float:
    """Median time to start the bare interpreter (the baseline of a per-call client)."""
    samples = []
    for _ in range(20):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def down(run_dir: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "qrexec.sim.cli", "--run-dir", str(run_dir), "down", "-q"],
        check=True,
    )
    shutil.rmtree(run_dir, ignore_errors=True)


def fmt_mib(values: list[int]) -> str:
    if not values:
        return "n/a"
    return (
        f"median {statistics.median(values) / 1024:.1f} MiB, max {max(values) / 1024:.1f} MiB "
        f"({len(values)} processes)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=50)
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_up, base_dir = timed_up(1, work)
        down(base_dir)
        big_up, run_dir = timed_up(args.vms, work)
        try:
            bed = RunningTestbed(RunDir(run_dir).load_topology(), run_dir)
            interp = interpreter_start()
            dom0_lat = []
            for i in range(1, args.vms + 1):
                started = time.perf_counter()
                result = bed.call("dom0", f"vm{i}", "test.Add", b"20 22\n")
                dom0_lat.append(time.perf_counter() - started)
                if (result.returncode, result.stdout) != (0, b"42\n"):
                    failures += 1
                    print(f"dom0 -> vm{i}: rc {result.returncode} {result.stderr[-200:]!r}")
            vm_lat = []
            client_vm = Path(sys.executable).parent / "qrexec-client-vm"
            if client_vm.exists() or shutil.which("qrexec-client-vm"):
                for i in range(1, args.vms + 1):
                    target = f"vm{i % args.vms + 1}"
                    started = time.perf_counter()
                    result = bed.call(
                        f"vm{i}", target, "test.Add",
                        program=["/usr/bin/our_test_add_client", str(i), "1"],
                    )  # fmt: skip
                    vm_lat.append(time.perf_counter() - started)
                    if (result.returncode, result.stderr.strip()) != (0, str(i + 1).encode()):
                        failures += 1
                        print(f"vm{i} -> {target}: rc {result.returncode} {result.stderr[-200:]!r}")
            agents = bed.rss_kib("agent")
            daemons = bed.rss_kib("daemon")
            policy = bed.rss_kib("policy-daemon")
            qubesd = bed.rss_kib("qubesd")
            alive = all(s.alive for s in bed.status())
        finally:
            down(run_dir)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"bring-up, 1 VM (baseline):   {base_up:7.2f} s")
    print(f"bring-up, {args.vms} VMs:           {big_up:7.2f} s   ratio {big_up / base_up:.1f}x "
          f"({big_up / args.vms * 1000:.0f} ms per VM)")  # fmt: skip
    print(f"bare interpreter start:      {interp * 1000:7.1f} ms (baseline)")
    print(f"dom0 -> VM call, median:     {statistics.median(dom0_lat) * 1000:7.1f} ms   "
          f"ratio {statistics.median(dom0_lat) / interp:.1f}x ({len(dom0_lat)} calls)")  # fmt: skip
    if vm_lat:
        print(f"VM -> VM call, median:       {statistics.median(vm_lat) * 1000:7.1f} ms   "
              f"ratio {statistics.median(vm_lat) / interp:.1f}x ({len(vm_lat)} calls)")  # fmt: skip
    else:
        print("VM -> VM call:               n/a (qrexec-client-vm not installed)")
    print(f"RSS per agent:   {fmt_mib(agents)}")
    print(f"RSS per daemon:  {fmt_mib(daemons)}")
    print(f"RSS policy daemon: {fmt_mib(policy)}; qubesd stand-in: {fmt_mib(qubesd)}")
    print(f"all processes alive after the calls: {alive}; failed calls: {failures}")
    return 1 if failures or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
