"""Bulk data and concurrency: 1 GiB each way with bounded memory; 50 calls at once."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from tests.integration.conftest import Domain, QrexecSystem, peak_rss_kib

GIB = 1 << 30
BLOCK = 1 << 20
#: Writes BLOCK pseudo-random bytes, GIB // BLOCK times, to stdout.
GENERATOR = (
    "import random, sys\n"
    f"block = random.Random(11).randbytes({BLOCK})\n"
    f"for _ in range({GIB // BLOCK}):\n"
    "    sys.stdout.buffer.write(block)\n"
)


def expected_digest() -> str:
    import random

    block = random.Random(11).randbytes(BLOCK)
    digest = hashlib.sha256()
    for _ in range(GIB // BLOCK):
        digest.update(block)
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_gib_each_way_is_identical_with_bounded_memory(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    # The service echoes what it receives (dom0 -> VM) to its stdout (VM -> dom0) and
    # hashes it into a file, so both directions carry 1 GiB at the same time.
    in_hash = vm1.root / "in.sha256"
    generator = subprocess.Popen([sys.executable, "-c", GENERATOR], stdout=subprocess.PIPE)
    assert generator.stdout is not None
    client = subprocess.Popen(
        qrexec_system.client_argv(
            "vm1", f"{qrexec_system.user}:{{ tee /dev/fd/3 | sha256sum > {in_hash}; }} 3>&1"
        ),
        stdin=generator.stdout,
        stdout=subprocess.PIPE,
        env=qrexec_system.env(0),
    )
    generator.stdout.close()
    assert client.stdout is not None
    received = hashlib.sha256()
    size = 0
    while chunk := client.stdout.read(1 << 20):
        received.update(chunk)
        size += len(chunk)
    assert client.wait(60) == 0
    assert generator.wait(60) == 0
    expected = expected_digest()
    assert size == GIB
    assert received.hexdigest() == expected  # VM -> dom0, hashed here
    assert in_hash.read_text().split()[0] == expected  # dom0 -> VM, hashed in the VM
    assert vm1.agent is not None and vm1.daemon is not None
    assert peak_rss_kib(vm1.agent.pid) < 100 * 1024
    assert peak_rss_kib(vm1.daemon.pid) < 100 * 1024


@pytest.mark.timeout(300)
def test_fifty_concurrent_calls_all_complete(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    clients = [
        qrexec_system.popen_client(
            "vm1", f"{qrexec_system.user}:read x; echo out-$x; echo err-$x >&2; exit $(($x % 50))"
        )
        for _ in range(50)
    ]
    results = [proc.communicate(f"{i}\n".encode(), timeout=240) for i, proc in enumerate(clients)]
    for i, (proc, (out, err)) in enumerate(zip(clients, results, strict=True)):
        assert (proc.returncode, out, err) == (i % 50, f"out-{i}\n".encode(), f"err-{i}\n".encode())
