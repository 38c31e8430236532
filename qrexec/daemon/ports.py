"""The data-port allocator of one qrexec-daemon (spec §3.5).

Each daemon serves one VM ("its VM") and hands out the data ports 513..768 for calls that
involve that VM. Which slots may be used depends on the other end of the call, so that the
two daemons of one VM pair never pick the same port:

* the other end is dom0: any slot, lowest first;
* the other end has a higher domain id than our VM: odd slots only (even port numbers);
* the other end has a lower domain id: even slots only (odd port numbers).

A port is released only by a CONNECTION_TERMINATED naming exactly the (domain, port) pair
that reserved it. Unlike upstream, :meth:`PortAllocator.release_all` frees everything when
the agent dies, so a misbehaving VM cannot exhaust its own port range by reconnecting.

Pure bookkeeping: does no I/O.
"""

from __future__ import annotations

from qrexec.protocol.constants import MAX_DATA_PORTS, VCHAN_BASE_DATA_PORT, VCHAN_LAST_DATA_PORT


def is_data_port(port: int) -> bool:
    """Whether ``port`` lies in the data-port range 513..768."""
    return VCHAN_BASE_DATA_PORT <= port <= VCHAN_LAST_DATA_PORT


class PortAllocator:
    """Reserved data ports of one daemon, keyed by the port, valued by the other domain."""

    def __init__(self, own_domain: int, limit: int = MAX_DATA_PORTS) -> None:
        #: Domain id of the VM this daemon serves.
        self.own_domain = own_domain
        #: Most ports in use at once (the per-VM cap on concurrent data connections).
        self.limit = min(limit, MAX_DATA_PORTS)
        self._reserved: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._reserved)

    def slots_for(self, connect_domain: int) -> range:
        """The slots the parity rule allows for a call whose other end is ``connect_domain``."""
        if connect_domain == 0:
            return range(0, MAX_DATA_PORTS)
        if connect_domain > self.own_domain:
            return range(1, MAX_DATA_PORTS, 2)
        return range(0, MAX_DATA_PORTS, 2)

    def allocate(self, connect_domain: int) -> int | None:
        """Reserve the first free allowed port for ``connect_domain``; ``None`` when full."""
        if len(self._reserved) >= self.limit:
            return None
        for slot in self.slots_for(connect_domain):
            port = VCHAN_BASE_DATA_PORT + slot
            if port not in self._reserved:
                self._reserved[port] = connect_domain
                return port
        return None

    def reserve(self, connect_domain: int, port: int) -> bool:
        """Mark a port chosen elsewhere as in use (a client that brought its own port).

        Returns False when the port is already taken or out of range; nothing changes then.
        """
        if not is_data_port(port) or port in self._reserved:
            return False
        if len(self._reserved) >= self.limit:
            return False
        self._reserved[port] = connect_domain
        return True

    def is_reserved(self, connect_domain: int, port: int) -> bool:
        """Whether exactly this (domain, port) pair holds a reservation."""
        return self._reserved.get(port) == connect_domain

    def release(self, connect_domain: int, port: int) -> bool:
        """Free ``port`` if ``connect_domain`` reserved it; a mismatch is ignored (False)."""
        if self._reserved.get(port) != connect_domain:
            return False
        del self._reserved[port]
        return True

    def release_all(self) -> list[tuple[int, int]]:
        """Free every port (the agent died); returns the (domain, port) pairs freed."""
        freed = [(domain, port) for port, domain in sorted(self._reserved.items())]
        self._reserved.clear()
        return freed

    def in_use(self) -> dict[int, int]:
        """A copy of the table: port -> domain."""
        return dict(self._reserved)
