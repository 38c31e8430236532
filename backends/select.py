"""Which transport a program uses, decided the same way by every program.

The rule (fixed for every program): an explicit choice wins - a ``--transport`` flag, else
the ``QREXEC_TRANSPORT`` environment variable; otherwise the socket emulation when
``VCHAN_SOCKET_DIR`` is set (that is how upstream's own tests select libvchan-socket);
otherwise Xen vchan.

Backends are imported lazily by name, so a per-call client imports only the one it uses.
Does no I/O besides reading the environment passed in.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from qrexec.errors import TransportUnavailable
from qrexec.lazy_logging import get_logger, sync

TYPE_CHECKING = False  # typing is not imported at run time: the clients load this module
if TYPE_CHECKING:
    from qrexec.backends.base import Backend

log = get_logger(__name__)

TRANSPORT_ENV = "QREXEC_TRANSPORT"
SOCKET_DIR_ENV = "VCHAN_SOCKET_DIR"

#: Backend name -> module that defines ``make_backend(env) -> Backend``.
BACKEND_MODULES: dict[str, str] = {
    "socket": "qrexec.backends.socket",
    "vchan": "qrexec.backends.vchan",
}


def choose_transport(explicit: str | None, env: Mapping[str, str]) -> str:
    """Return the transport name the rule above gives, validating explicit choices."""
    name = explicit or env.get(TRANSPORT_ENV) or None
    if name is not None:
        if name not in BACKEND_MODULES:
            raise TransportUnavailable(
                f"unknown transport {name!r}; choose one of {', '.join(sorted(BACKEND_MODULES))}"
            )
        return name
    if env.get(SOCKET_DIR_ENV):
        return "socket"
    return "vchan"


def load_backend(explicit: str | None, env: Mapping[str, str]) -> Backend:
    """Choose a transport by the rule and build its backend, logging the choice."""
    name = choose_transport(explicit, env)
    try:
        # __import__ rather than importlib.import_module: no importlib import at start-up.
        __import__(BACKEND_MODULES[name])
        module = sys.modules[BACKEND_MODULES[name]]
    except ModuleNotFoundError as exc:
        if exc.name != BACKEND_MODULES[name]:
            raise
        raise TransportUnavailable(
            f"the {name!r} transport is not available in this build; use the socket "
            f"emulation with --transport=socket or {TRANSPORT_ENV}=socket "
            f"(or set {SOCKET_DIR_ENV})"
        ) from exc
    sync()  # a backend that logs through plain logging gets the program's log format
    backend: Backend = module.make_backend(env)
    log.info("transport: %s (own domain %d)", name, backend.own_domain)
    return backend
