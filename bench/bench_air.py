"""Cross-host calls (Qubes Air over OpenSSH) against the same calls within one host.

Measured in one run, on one multi-host testbed (namespaces as root, loopback ports without):

* latency: median of N calls vm1 -> vm2 within hostA (the baseline) and hostA:vm1 ->
  hostB:vm1 across hosts (two dom0 policies, two relays, one ssh connection per call), and
  their ratio;
* throughput: a 64 MiB stream through ``cat`` each way, within one host and across hosts,
  MiB/s and the ratio;
* scale: H hosts x V VMs come up (default 4 x 10), and every VM calls vm1 on every other host
  (H*V*(H-1) calls, 8 at a time); all must succeed.

Run: ``python bench/bench_air.py [--hosts H] [--vms V] [--calls N] [--mib M]``. Exit status 1
if any call failed. Needs OpenSSH (Debian: openssh-server, openssh-client).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import statistics
import sys
import time

from qrexec.sim.air.air_topology import AirTopology, Host, RemoteVM, parse_air_topology
from qrexec.sim.air.testbed import AirTestbed

ECHO = "#!/bin/sh\nexec cat\n"


def host_table(name: str, vms: int) -> dict[str, object]:
    domains: list[dict[str, object]] = [{"name": "relay"}]
    for i in range(1, vms + 1):
        domains.append({"name": f"vm{i}", "service": [{"name": "test.Echo", "script": ECHO}]})
    policy = "test.Echo * @anyvm @anyvm allow\n"
    return {
        "name": name,
        "relay": "relay",
        "topology": {
            "dom0": {"policy": [{"file": "30-bench.policy", "text": policy}]},
            "domain": domains,
        },
    }


def topology(hosts: int, vms: int) -> AirTopology:
    """``hosts`` hosts of ``vms`` VMs; every host knows every VM of every other host."""
    names = [f"host{chr(ord('A') + i)}" for i in range(hosts)]
    data = {"host": [host_table(name, vms) for name in names]}
    air = parse_air_topology(data)
    for host in air.hosts:
        host.remotes = [
            RemoteVM(f"{other}-vm{i}", other, f"vm{i}", host.relay)
            for other in names
            if other != host.name
            for i in range(1, vms + 1)
        ]
    air.validate()
    return air


def median_call(air: AirTestbed, source: str, target: str, calls: int) -> float:
    samples = []
    for index in range(calls):
        payload = f"{index}\n".encode()
        started = time.perf_counter()
        result = air.call(source, target, "test.Echo", input=payload)
        samples.append(time.perf_counter() - started)
        if (result.returncode, result.stdout) != (0, payload):
            raise SystemExit(f"{source} -> {target} failed: {result!r}")
    return statistics.median(samples)


def stream(air: AirTestbed, source: str, target: str, mib: int) -> float:
    """MiB/s of ``mib`` MiB sent through cat and back (the whole call timed)."""
    data = os.urandom(1 << 20) * mib
    started = time.perf_counter()
    result = air.call(source, target, "test.Echo", input=data, timeout=600)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or hashlib.sha256(result.stdout).digest() != (
        hashlib.sha256(data).digest()
    ):
        raise SystemExit(f"stream {source} -> {target} failed: rc {result.returncode}")
    return mib / elapsed


def everyone_calls(air: AirTestbed, hosts: list[Host], vms: int) -> tuple[int, int, float]:
    jobs = [
        (f"{h.name}:vm{i}", f"{other.name}:vm1")
        for h in hosts
        for i in range(1, vms + 1)
        for other in hosts
        if other.name != h.name
    ]

    def one(job: tuple[str, str]) -> bool:
        payload = f"{job[0]}->{job[1]}\n".encode()
        result = air.call(job[0], job[1], "test.Echo", input=payload, timeout=300)
        return (result.returncode, result.stdout) == (0, payload)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, jobs))
    return len(jobs), results.count(False), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    if args.hosts < 2 or args.vms < 2:
        parser.error("at least 2 hosts and 2 VMs")
    air_topology = topology(args.hosts, args.vms)
    started = time.perf_counter()
    air = AirTestbed(air_topology)
    air.up()
    up_seconds = time.perf_counter() - started
    try:
        local = median_call(air, "hostA:vm1", "hostA:vm2", args.calls)
        remote = median_call(air, "hostA:vm1", "hostB:vm1", args.calls)
        local_rate = stream(air, "hostA:vm1", "hostA:vm2", args.mib)
        remote_rate = stream(air, "hostA:vm1", "hostB:vm1", args.mib)
        total, failed, spent = everyone_calls(air, air_topology.hosts, args.vms)
    finally:
        air.down()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; network: {air.mode}")
    print(f"bring-up, {args.hosts} hosts x {args.vms} VMs (+1 relay each): {up_seconds:.2f} s")
    print(f"call within one host, median:  {local * 1000:8.1f} ms (baseline, {args.calls} calls)")
    print(f"call across hosts, median:     {remote * 1000:8.1f} ms   ratio {remote / local:.2f}x")
    print(f"{args.mib} MiB each way within one host: {local_rate:8.1f} MiB/s (baseline)")
    print(f"{args.mib} MiB each way across hosts:    {remote_rate:8.1f} MiB/s   "
          f"ratio {remote_rate / local_rate:.2f}x")  # fmt: skip
    print(f"every VM calls vm1 on every other host: {total} calls, {failed} failed, "
          f"{spent:.1f} s ({total / spent:.1f} calls/s, 8 at a time)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
