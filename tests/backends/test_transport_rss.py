"""1 GiB through the socket backend to a deliberately slow reader, in two processes.

The sender must be held back by the reader (backpressure) instead of buffering: both
processes' peak RSS stays under 100 MB, and the bytes arrive intact (SHA-256). Each process
reports its own peak RSS (``VmHWM`` of /proc/self/status) just before it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PEER_SCRIPT = Path(__file__).parents[1] / "conformance" / "transport_peer.py"
GIB = 1 << 30
RSS_LIMIT_KIB = 100 * 1000  # 100 MB
PORT = 600


@pytest.fixture
def socket_dir(tmp_path: Path) -> Path:
    """This test's private socket directory (long paths are fine, see _addressable)."""
    return tmp_path


def _spawn(socket_dir: Path, domain: int, args: list[str]) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "QREXEC_TRANSPORT": "socket",
        "VCHAN_DOMAIN": str(domain),
        "VCHAN_SOCKET_DIR": str(socket_dir),
    }
    return subprocess.Popen(
        [sys.executable, str(PEER_SCRIPT), *args, "--timeout=60"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("sender_face", "reader_face"), [("blocking", "asyncio"), ("asyncio", "blocking")]
)
def test_one_gib_to_a_slow_reader_keeps_both_processes_small(
    socket_dir: Path, sender_face: str, reader_face: str
) -> None:
    reader = _spawn(
        socket_dir,
        1,
        # 2 ms pause every MiB: the reader is the bottleneck, so the sender must wait.
        [
            "sink",
            "--role=listen",
            "--remote=2",
            f"--port={PORT}",
            f"--face={reader_face}",
            f"--pause-every={1 << 20}",
            "--pause-ms=2",
        ],
    )
    sender = _spawn(
        socket_dir,
        2,
        [
            "source",
            "--role=connect",
            "--remote=1",
            f"--port={PORT}",
            f"--face={sender_face}",
            f"--bytes={GIB}",
            "--seed=11",
        ],
    )
    processes = [reader, sender]
    try:
        sent_out, _ = sender.communicate(timeout=240)
        read_out, _ = reader.communicate(timeout=60)
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, 9)
                process.wait(10)
    assert sender.returncode == 0 and reader.returncode == 0
    sent = json.loads(sent_out.splitlines()[-1])
    received = json.loads(read_out.splitlines()[-1])
    print(
        f"peak RSS: sender ({sender_face}) {sent['maxrss_kib']} KiB, "
        f"reader ({reader_face}) {received['maxrss_kib']} KiB"
    )
    assert received["bytes"] == GIB
    assert received["sha256"] == sent["sha256"]
    assert sent["maxrss_kib"] < RSS_LIMIT_KIB
    assert received["maxrss_kib"] < RSS_LIMIT_KIB
    # The blocking face must not have pulled asyncio in.
    assert (sent if sender_face == "blocking" else received)["asyncio_imported"] is False
