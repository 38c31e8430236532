"""The daemon's data-port allocator (spec §3.5) and pending-request registry."""

from __future__ import annotations

from qrexec.daemon.pending import PendingRequests
from qrexec.daemon.ports import PortAllocator, is_data_port


def test_dom0_calls_take_the_lowest_free_port() -> None:
    ports = PortAllocator(own_domain=5)
    assert [ports.allocate(0) for _ in range(3)] == [513, 514, 515]
    assert ports.release(0, 514)
    assert ports.allocate(0) == 514


def test_parity_rule_for_vm_pairs() -> None:
    # The worked example of §3.5: A (5) calls B (9), B's daemon uses odd ports...
    daemon_b = PortAllocator(own_domain=9)
    assert [daemon_b.allocate(5) for _ in range(3)] == [513, 515, 517]
    # ...and when B calls A, A's daemon uses even ports.
    daemon_a = PortAllocator(own_domain=5)
    assert [daemon_a.allocate(9) for _ in range(3)] == [514, 516, 518]


def test_parity_halves_run_out_independently() -> None:
    ports = PortAllocator(own_domain=9)
    odd = [ports.allocate(5) for _ in range(128)]
    assert all(port is not None and port % 2 == 1 for port in odd)
    assert ports.allocate(5) is None
    assert ports.allocate(12) == 514


def test_release_only_for_the_reserved_pair() -> None:
    ports = PortAllocator(own_domain=5)
    port = ports.allocate(0)
    assert port == 513
    assert not ports.release(7, 513)
    assert not ports.release(0, 600)
    assert ports.is_reserved(0, 513)
    assert ports.release(0, 513)
    assert not ports.release(0, 513)


def test_release_all_frees_everything() -> None:
    ports = PortAllocator(own_domain=5)
    for _ in range(10):
        ports.allocate(0)
    assert len(ports.release_all()) == 10
    assert len(ports) == 0
    assert ports.allocate(0) == 513


def test_connection_limit() -> None:
    ports = PortAllocator(own_domain=5, limit=2)
    assert ports.allocate(0) == 513
    assert ports.allocate(0) == 514
    assert ports.allocate(0) is None
    ports.release(0, 513)
    assert ports.allocate(0) == 513


def test_data_port_range() -> None:
    assert not is_data_port(512)
    assert is_data_port(513)
    assert is_data_port(768)
    assert not is_data_port(769)


def test_pending_requests_are_claimed_once_and_capped() -> None:
    pending = PendingRequests(limit=2)
    first = pending.add("SOCKET7", details={"service": "a"})
    assert first is not None and first.details == {"service": "a"}
    assert pending.add("SOCKET7") is None  # ident in use
    assert pending.add("SOCKET8") is not None
    assert pending.add("SOCKET9") is None  # full
    claimed = pending.claim("SOCKET7")
    assert claimed is first
    assert pending.claim("SOCKET7") is None
    assert [r.ident for r in pending.clear()] == ["SOCKET8"]
    assert len(pending) == 0
