"""The dom0 end of a VM → dom0 call (spec §4(iii), §15.1), run by the daemon of the calling VM.

Upstream forks a child of qrexec-daemon that does what ``qrexec-client -d dom0 -c ... -w 5``
does; here it is a task of the daemon running the same code
(:func:`qrexec.services.dom0.serve_dom0_call`), once SERVICE_CONNECT ``{0, port}``
has gone to the VM's agent: the command ``QUBESRPC SERVICE+ARG SOURCE TYPE TARGET`` (TYPE
``name`` or ``keyword``, TARGET the requested target without ``@``) is prepared on dom0's
own service path (``QREXEC_SERVICE_PATH`` inside ``QREXEC_DOMAIN_ROOT``) - rpc-config,
``qubes.WaitForSession`` when it asks for it, the service started - and only then does the
daemon connect as vchan client of ``(VM, port)`` within :data:`DOM0_CONNECT_TIMEOUT`.
The service's stderr goes to the daemon's log, STDERR EOF goes out first; a service that
cannot be prepared answers STDERR EOF, STDOUT EOF and 127 or 125. Like upstream's child,
the daemon does not pass the service's code on anywhere (it is logged). The VM's HELLO
has a deadline (:data:`DOM0_HELLO_TIMEOUT`, a handshake step); the data phase has none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from qrexec.backends.base import Backend
from qrexec.services.dom0 import serve_dom0_call

log = logging.getLogger(__name__)

#: The daemon's child waits this long for the VM's data vchan server (spec §3.5).
DOM0_CONNECT_TIMEOUT = 5.0
#: ... and this long for the VM's HELLO on it (a handshake step, docs/decisions.md).
DOM0_HELLO_TIMEOUT = 5.0


async def run_dom0_service(
    backend: Backend,
    vm_domid: int,
    port: int,
    command: str,
    env: Mapping[str, str],
    own_version: int,
    source_name: str,
    *,
    hello_timeout: float = DOM0_HELLO_TIMEOUT,
    on_data_phase: Callable[[], None] | None = None,
) -> int | None:
    """Serve one VM → dom0 call on ``(vm_domid, port)``; its exit code, or None.

    Connecting and the VM's HELLO have deadlines; once both HELLOs are through (the data
    phase, announced by ``on_data_phase``) nothing is timed any more.
    """
    result = await serve_dom0_call(
        backend,
        vm_domid,
        port,
        command,
        env,
        own_version,
        source_name=source_name,
        connect_timeout=DOM0_CONNECT_TIMEOUT,
        hello_timeout=hello_timeout,
        on_data_phase=on_data_phase,
    )
    return result.code
