"""Policy daemon round trip: what one §6.1 query costs through the socket.

Starts ``qrexec-policy-daemon`` (in-process, its own thread and event loop) on a small policy
in a temporary directory and measures, from a blocking client that opens one connection per
query as qrexec-daemon does:

* the median time of N sequential allow queries (decision, audit line, reload check), and
* the median time of N round trips to a trivial unix-socket server in the same process
  setup that answers ``result=deny`` without parsing anything (the baseline),

and prints both and their ratio, plus the throughput of 8 concurrent clients. All numbers
come from this run on this machine; nothing is asserted.

Run: ``python bench/bench_policy_daemon.py [--queries N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from qrexec.policy.decision.daemon import build_parser, serve

QUERY = b"source=work\nrequested_source=\nintended_target=personal\nservice_and_arg=test.Add+\n\n"
POLICY = "\n".join(
    [f"svc.N{i} * @anyvm @anyvm deny" for i in range(200)] + ["test.Add * work personal allow"]
)
SYSTEM_INFO = {
    "domains": {
        "work": {"uuid": "11111111-1111-1111-1111-111111111111", "power_state": "Running"},
        "personal": {"uuid": "22222222-2222-2222-2222-222222222222", "power_state": "Running"},
    }
}


def round_trip(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def median_us(path: str, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        round_trip(path, QUERY)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


Server = Callable[[asyncio.Event, threading.Event], Awaitable[None]]
StopBox = list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]


def run_in_thread(
    coro_factory: Server, started: threading.Event, stop_box: StopBox
) -> threading.Thread:
    def run() -> None:
        async def main() -> None:
            stop = asyncio.Event()
            stop_box.append((asyncio.get_running_loop(), stop))
            await coro_factory(stop, started)

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(30)
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=2000)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qpd-bench") as tmp:
        root = Path(tmp)
        (root / "policy.d").mkdir()
        (root / "policy.d" / "30-user.policy").write_text(POLICY + "\n")
        (root / "info.json").write_text(json.dumps(SYSTEM_INFO))
        sock, baseline_sock = str(root / "p.sock"), str(root / "b.sock")
        argv = [
            "--socket-path", sock, "--eval-socket-path", "", "--gui-socket-path", "",
            "--policy-path", str(root / "policy.d"),
            "--legacy-policy-dir", str(root / "l"), "--policy-2011-dir", str(root / "o"),
            "--system-info", str(root / "info.json"),
            "--audit-log", str(root / "audit.jsonl"), "--ask-prompter", "deny", "-q",
        ]  # fmt: skip
        args = build_parser().parse_args(argv)

        async def daemon(stop: asyncio.Event, started: threading.Event) -> None:
            ready = asyncio.Event()
            task = asyncio.create_task(serve(args, {}, ready=ready, stop=stop))
            await ready.wait()
            started.set()
            await task

        async def baseline(stop: asyncio.Event, started: threading.Event) -> None:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await r.readuntil(b"\n\n")
                w.write(b"result=deny\n")
                w.close()

            server = await asyncio.start_unix_server(handle, baseline_sock)
            started.set()
            await stop.wait()
            server.close()

        boxes: StopBox = []
        threads = [
            run_in_thread(daemon, threading.Event(), boxes),
            run_in_thread(baseline, threading.Event(), boxes),
        ]
        assert round_trip(sock, QUERY).startswith(b"result=allow")
        median_us(sock, 100)  # warm up both
        median_us(baseline_sock, 100)
        policy_us = median_us(sock, opts.queries)
        base_us = median_us(baseline_sock, opts.queries)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: round_trip(sock, QUERY), range(opts.queries)))
        elapsed = time.perf_counter() - t0
        assert all(r.startswith(b"result=allow") for r in replies)
        audit_lines = len((root / "audit.jsonl").read_text().splitlines())
        for loop, stop in boxes:
            loop.call_soon_threadsafe(stop.set)
        for thread in threads:
            thread.join(30)
    print(f"policy daemon query, median of {opts.queries}: {policy_us:8.1f} us")
    print(f"baseline unix-socket round trip:        {base_us:8.1f} us")
    print(f"ratio policy/baseline:                  {policy_us / base_us:8.2f}")
    print(f"8 concurrent clients: {opts.queries / elapsed:8.0f} queries/s")
    print(f"audit lines written: {audit_lines} (expected {2 * opts.queries + 101})")


if __name__ == "__main__":
    main()
