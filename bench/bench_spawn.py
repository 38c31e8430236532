"""Starting a child: subprocess.Popen vs os.posix_spawn vs asyncio's subprocess machinery.

The agent starts every call's process; this measures the start itself (until the call
returns, the child having exec'd ``/bin/sh -c true``), N times each, round-robin, and prints
medians and the ratio of each to Popen (what the agent uses).

Run: ``python bench/bench_spawn.py [--runs 300]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time

ARGV = ["/bin/sh", "-c", "true"]
ENV = {"PATH": "/usr/bin:/bin"}


def popen() -> float:
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    proc = subprocess.Popen(
        ARGV, stdin=read_end, stdout=write_end, stderr=write_end, env=ENV, start_new_session=True
    )
    elapsed = time.perf_counter() - start
    os.close(read_end)
    os.close(write_end)
    proc.wait()
    return elapsed


def posix_spawn() -> float:
    read_end, write_end = os.pipe()
    actions = [
        (os.POSIX_SPAWN_DUP2, read_end, 0),
        (os.POSIX_SPAWN_DUP2, write_end, 1),
        (os.POSIX_SPAWN_DUP2, write_end, 2),
    ]
    start = time.perf_counter()
    pid = os.posix_spawn(ARGV[0], ARGV, ENV, file_actions=actions, setsid=True)
    elapsed = time.perf_counter() - start
    os.close(read_end)
    os.close(write_end)
    os.waitpid(pid, 0)
    return elapsed


async def asyncio_subprocess() -> float:
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*ARGV, env=ENV, start_new_session=True)
    elapsed = time.perf_counter() - start
    await proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    times: dict[str, list[float]] = {"Popen": [], "posix_spawn": [], "asyncio subprocess": []}
    for _ in range(args.runs):
        times["Popen"].append(popen())
        times["posix_spawn"].append(posix_spawn())
        times["asyncio subprocess"].append(loop.run_until_complete(asyncio_subprocess()))
    loop.close()
    base = statistics.median(times["Popen"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:20} start median {median * 1000:7.3f} ms   ratio to Popen {median / base:.2f}"
        )


if __name__ == "__main__":
    main()
