"""Registry of VM-initiated requests waiting for policy, one per daemon.

This is the seam between the daemon core and the VM-initiated call handling
(``qrexec.daemon.vm_calls``): a trigger from the agent takes a slot here before the policy
is asked; a SERVICE_CONNECT arriving on the daemon socket is accepted only when its ident
names a request still waiting here (spec §5, rule 4), and claiming it removes it, so the
answer for one request is sent at most once. When the agent goes away, every pending
request is dropped (spec §4(vi)).

At most :data:`~qrexec.protocol.constants.MAX_PENDING_REQUESTS` (256) wait at once; past
that, :meth:`PendingRequests.add` returns ``None`` and the caller refuses the request.

Pure bookkeeping: does no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from qrexec.protocol.constants import MAX_PENDING_REQUESTS


@dataclass(slots=True)
class PendingRequest:
    """One VM-initiated request: its ident as the agent sent it, plus the handler's data.

    ``ident`` is the validated request id (text before the NUL, e.g. ``SOCKET7``);
    ``details`` is whatever the VM-call handler wants to keep (service, target, the
    policy task...); the daemon core never looks inside.
    """

    ident: str
    details: Any = None
    created: float = field(default_factory=time.monotonic)


class PendingRequests:
    """The pending requests of one VM, keyed by ident."""

    def __init__(self, limit: int = MAX_PENDING_REQUESTS) -> None:
        self.limit = limit
        self._requests: dict[str, PendingRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, ident: object) -> bool:
        return ident in self._requests

    def add(self, ident: str, details: Any = None) -> PendingRequest | None:
        """Register a request; ``None`` when the table is full or the ident is in use."""
        if len(self._requests) >= self.limit or ident in self._requests:
            return None
        request = PendingRequest(ident, details)
        self._requests[ident] = request
        return request

    def get(self, ident: str) -> PendingRequest | None:
        return self._requests.get(ident)

    def claim(self, ident: str) -> PendingRequest | None:
        """Take a request out for answering (SERVICE_CONNECT or refusal); ``None`` if absent."""
        return self._requests.pop(ident, None)

    def clear(self) -> list[PendingRequest]:
        """Drop every request (the agent went away); returns what was dropped."""
        dropped = list(self._requests.values())
        self._requests.clear()
        return dropped
