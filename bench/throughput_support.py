"""Shared pieces of the stream-throughput benches (``bench_calls``, ``bench_vm_calls``).

A stream's *data phase* is timed where the bytes end up, from the first data byte to end
of stream, so process start-up and the call's set-up are left out (they are reported
apart). Its CPU cost is the CPU time of every qrexec process on the path (client, agent,
daemon), measured around the call, minus the same processes' CPU for an empty call (the
set-up), per GiB. The physical reference is a plain unix-socket copy between two Python
processes, timed the same way. Qubes' C programs, when they build here, run the same
streams in the same run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Writes N zero bytes to stdout in 1 MiB writes.
SOURCE = """import os, sys
left = int(sys.argv[1])
view = memoryview(bytes(1 << 20))
while left > 0:
    left -= os.write(1, view[: min(left, len(view))])
"""

#: Reads stdin to EOF; writes "bytes first_byte_time eof_time" (perf_counter) to argv[1].
SINK = """import os, sys, time
buffer = bytearray(1 << 20)
total, first = 0, None
while count := os.readv(0, [buffer]):
    if first is None:
        first = time.perf_counter()
    total += count
end = time.perf_counter()
with open(sys.argv[1], "w") as out:
    out.write(f"{total} {end if first is None else first} {end}")
"""

#: The reference: a plain unix-socket copy between two processes (64 KiB sends, 256 KiB
#: receives, as bench_calls always did), timed from first byte to EOF; prints
#: "seconds cpu_seconds_of_both".
PLAIN_COPY = """import os, resource, socket, sys, time
size = int(sys.argv[1])
parent, child = socket.socketpair()
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    parent.close()
    left, first = size, None
    while left:
        data = child.recv(min(left, 1 << 18))
        if not data:
            break
        if first is None:
            first = time.perf_counter()
        left -= len(data)
    os.write(write_end, f"{first} {time.perf_counter()}".encode())
    os._exit(0 if left == 0 else 1)
child.close()
before = resource.getrusage(resource.RUSAGE_SELF)
chunk = bytes(1 << 16)
sent = 0
while sent < size:
    parent.sendall(chunk[: min(len(chunk), size - sent)])
    sent += min(len(chunk), size - sent)
parent.close()
after = resource.getrusage(resource.RUSAGE_SELF)
_, status, usage = os.wait4(pid, 0)
first, end = map(float, os.read(read_end, 100).split())
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(end - first, cpu + usage.ru_utime + usage.ru_stime)
sys.exit(os.waitstatus_to_exitcode(status))
"""

GIB = 1 << 30


def write_scripts(folder: Path) -> tuple[Path, Path]:
    """Write the source and sink scripts into ``folder``; return their paths."""
    source, sink = folder / "source.py", folder / "sink.py"
    source.write_text(SOURCE)
    sink.write_text(SINK)
    return source, sink


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_cpu(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Reap ``process``: its exit code and the CPU seconds it used."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime


def read_sink(result: Path, size: int) -> float:
    """The data phase's seconds from the sink's result file (checks the byte count)."""
    total, first, end = result.read_text().split()
    result.unlink()
    if int(total) != size:
        raise RuntimeError(f"the sink got {total} of {size} bytes")
    return float(end) - float(first)


@dataclass
class Sample:
    seconds: float
    cpu: float  # seconds of CPU of every process on the path


def plain_copy(size: int) -> Sample:
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_COPY, str(size)], capture_output=True, text=True, check=True
    )
    seconds, cpu = map(float, done.stdout.split())
    return Sample(seconds, cpu)


def timed_stream(
    run: Callable[[], tuple[float, float]], resident: Sequence[int]
) -> tuple[float, float]:
    """Run one stream; (data-phase seconds, CPU of the call's processes + ``resident`` pids).

    ``run`` starts and reaps the call and returns (seconds, CPU of the processes it
    started on the path); the long-running ``resident`` processes (agent, daemon) are
    measured around it.
    """
    before = [process_cpu(pid) for pid in resident]
    seconds, cpu = run()
    after = [process_cpu(pid) for pid in resident]
    return seconds, cpu + sum(a - b for a, b in zip(after, before, strict=True))


def median_sample(samples: list[tuple[float, float]], setup_cpu: float) -> Sample:
    """Median seconds and median CPU (less the set-up CPU of an empty call)."""
    return Sample(
        statistics.median(s for s, _ in samples),
        max(0.0, statistics.median(c for _, c in samples) - setup_cpu),
    )


def report(size: int, rows: dict[str, Sample], pairs: Sequence[tuple[str, str]]) -> None:
    """Print MB/s, throughput and CPU-per-GiB ratios to the plain copy, and our/C ratios."""
    plain = rows["plain unix-socket copy"]
    plain_rate = size / plain.seconds
    plain_cpu = plain.cpu * GIB / size
    print(f"{'stream (data phase)':34} {'MB/s':>7} {'x plain':>8} {'CPU s/GiB':>10} {'x plain':>8}")
    for label, sample in rows.items():
        rate = size / sample.seconds
        cpu = sample.cpu * GIB / size
        print(
            f"{label:34} {rate / 1e6:7.0f} {rate / plain_rate:8.2f} {cpu:10.3f}"
            f" {cpu / plain_cpu:8.2f}"
        )
    for ours, theirs in pairs:
        if ours in rows and theirs in rows:
            ratio = rows[theirs].seconds / rows[ours].seconds
            print(f"throughput ours/C, {ours}: {ratio:.2f}")
