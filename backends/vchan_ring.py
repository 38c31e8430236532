"""One libxenvchan endpoint (server or client): setup, raw ring calls and peer liveness.

This is the layer both faces of the vchan backend share. It knows the xenstore layout of
Qubes' vchan-xen (``/local/domain/<server>/data/vchan/<client>/<port>``, with ``ring-ref``
and ``event-channel`` below it), creates and closes libxenvchan endpoints, and answers
"is the peer still there?".

Why liveness needs more than ``libxenvchan_is_open``: when the peer *closes*, libxenvchan
clears its live flag and signals us; when the peer's *domain dies*, nothing clears the flag
and no event arrives. Like vchan-xen we then ask Xen for the status of our event channel:
once the remote domain is gone, our end is no longer ``interdomain``. Without libxenctrl
we fall back to xenstore (``/local/domain/<id>`` exists), which only dom0 can read.

It does no waiting: the blocking and asyncio faces decide how to wait on :attr:`fd`.
Not thread-safe: the faces serialise calls.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from qrexec.backends import xenlibs
from qrexec.backends.xenstore import XenStore
from qrexec.errors import TransportError

log = logging.getLogger(__name__)

#: libxenvchan_is_open values.
DISCONNECTED = 0
CONNECTED = 1
WAITING = 2


def vchan_path(server_domain: int, client_domain: int, port: int) -> str:
    """The xenstore directory a server publishes its rings under (vchan-xen layout)."""
    return f"/local/domain/{server_domain}/data/vchan/{client_domain}/{port}"


class XenstoreLiveness:
    """Answers 'does domain N still exist?' from xenstore (meaningful in dom0)."""

    def __init__(self) -> None:
        self._xs: XenStore | None = None

    def domain_exists(self, domid: int) -> bool:
        try:
            if self._xs is None:
                self._xs = XenStore()
            return self._xs.domain_exists(domid) is not False
        except TransportError:
            return True  # cannot tell: assume alive rather than break a stream

    def close(self) -> None:
        if self._xs is not None:
            self._xs.close()
            self._xs = None


class Ring:
    """A libxenvchan endpoint. Raises TransportError on setup failure."""

    def __init__(
        self,
        libs: xenlibs.XenLibs,
        ctrl: Any,
        remote_domain: int,
        port: int,
        *,
        is_server: bool,
        xs_path: str,
    ) -> None:
        self._libs = libs
        self._ffi = libs.ffi
        self._lib = libs.vchan
        self._ctrl: Any = ctrl
        self.remote_domain = remote_domain
        self.port = port
        self.is_server = is_server
        self.xs_path = xs_path
        self.fd: int = int(self._lib.libxenvchan_fd_for_select(ctrl))
        # libxenvchan 4.17 mallocs the struct and never initialises ``blocking``: set it
        # to non-blocking explicitly (as vchan-xen does), or read/write may sleep inside
        # the library while we hold our lock or run the event loop.
        head = self._ffi.cast("struct qrexec_vchan_head *", ctrl)
        head.flags = head.flags & ~xenlibs.VCHAN_FLAG_BLOCKING
        self._xenstore_node_removed = not is_server
        self._peer_dead = False
        self._xc: Any = None
        self._buf_size = 0
        self._buf: Any = None

    # -- construction --------------------------------------------------------------

    @classmethod
    def server(
        cls,
        libs: xenlibs.XenLibs,
        own_domain: int,
        remote_domain: int,
        port: int,
        read_min: int,
        write_min: int,
    ) -> Ring:
        """Publish a server endpoint for ``remote_domain`` (libxenvchan_server_init)."""
        path = vchan_path(own_domain, remote_domain, port)
        ffi = libs.ffi
        ffi.errno = 0
        ctrl = libs.vchan.libxenvchan_server_init(
            ffi.NULL, remote_domain, path.encode(), read_min, write_min
        )
        if ctrl == ffi.NULL:
            raise TransportError(
                f"libxenvchan_server_init(domain={remote_domain}, port={port}) failed: "
                f"{_strerror(ffi.errno)} (needs /dev/xen/gntalloc, evtchn and xenstore)"
            )
        log.debug("vchan server published at %s", path)
        return cls(libs, ctrl, remote_domain, port, is_server=True, xs_path=path)

    @classmethod
    def client(cls, libs: xenlibs.XenLibs, own_domain: int, remote_domain: int, port: int) -> Ring:
        """Connect to a published server (libxenvchan_client_init); the node must exist."""
        path = vchan_path(remote_domain, own_domain, port)
        ffi = libs.ffi
        ffi.errno = 0
        ctrl = libs.vchan.libxenvchan_client_init(ffi.NULL, remote_domain, path.encode())
        if ctrl == ffi.NULL:
            raise TransportError(
                f"libxenvchan_client_init(domain={remote_domain}, port={port}) failed: "
                f"{_strerror(ffi.errno)} (needs /dev/xen/gntdev, evtchn and xenstore)"
            )
        return cls(libs, ctrl, remote_domain, port, is_server=False, xs_path=path)

    # -- ring calls ----------------------------------------------------------------

    def is_open(self) -> int:
        """CONNECTED, WAITING (server before its client came) or DISCONNECTED."""
        if self._peer_dead:
            return DISCONNECTED
        return int(self._lib.libxenvchan_is_open(self._ctrl))

    def acknowledge_event(self) -> None:
        """Consume the pending event-channel notification (call only when fd is readable)."""
        if self._lib.libxenvchan_wait(self._ctrl) < 0:
            raise TransportError(f"libxenvchan_wait failed: {_strerror(self._ffi.errno)}")

    def read(self, max_bytes: int) -> bytes | None:
        """Up to ``max_bytes`` available bytes; b'' when none yet; None at end of stream."""
        if max_bytes > self._buf_size:
            self._buf_size = max(max_bytes, 4096)
            self._buf = self._ffi.new("char[]", self._buf_size)
        got = self._lib.libxenvchan_read(self._ctrl, self._buf, max_bytes)
        if got < 0 or (got == 0 and self._peer_dead):
            return None
        return self._ffi.buffer(self._buf, got)[:] if got else b""

    def read_into(self, buffer: bytearray | memoryview) -> int | None:
        """Like :meth:`read`, straight into ``buffer`` (no intermediate copy): a count, 0
        when nothing is there yet, None at end of stream."""
        target = self._ffi.from_buffer(buffer, require_writable=True)
        got = self._lib.libxenvchan_read(self._ctrl, target, len(buffer))
        if got < 0 or (got == 0 and self._peer_dead):
            return None
        return int(got)

    def write(self, data: memoryview) -> int:
        """Put as much of ``data`` as fits into the ring; -1 when the peer is gone."""
        if self._peer_dead:
            return -1
        n = int(self._lib.libxenvchan_write(self._ctrl, self._ffi.from_buffer(data), len(data)))
        return n if n >= 0 else -1

    def data_ready(self) -> int:
        return int(self._lib.libxenvchan_data_ready(self._ctrl))

    def buffer_space(self) -> int:
        return int(self._lib.libxenvchan_buffer_space(self._ctrl))

    # -- connection bookkeeping ----------------------------------------------------

    def on_connected(self) -> None:
        """Server side: the client came, so withdraw the xenstore node (as vchan-xen does).

        Removing it keeps a second client from mapping the same rings, and keeps the
        server's xenstore quota from filling with stale entries.
        """
        if self._xenstore_node_removed:
            return
        self._xenstore_node_removed = True
        try:
            with XenStore(self._libs) as xs:
                xs.remove(self.xs_path)
                parent = self.xs_path.rsplit("/", 1)[0]
                if xs.directory(parent) == []:
                    xs.remove(parent)
        except TransportError as exc:
            log.warning("could not remove %s: %s", self.xs_path, exc)

    def peer_alive(self, fallback: XenstoreLiveness | None = None) -> bool:
        """Whether the remote domain still holds its end of our event channel."""
        if self._peer_dead:
            return False
        alive = self._evtchn_interdomain()
        if alive is None and fallback is not None:
            alive = fallback.domain_exists(self.remote_domain)
        if alive is False:
            log.info("vchan peer domain %d is gone (port %d)", self.remote_domain, self.port)
            self._peer_dead = True
            return False
        return True

    def _evtchn_interdomain(self) -> bool | None:
        xenctrl = self._libs.xenctrl
        if xenctrl is None or self.is_open() == WAITING:
            return None
        ffi = self._ffi
        if self._xc is None:
            self._xc = xenctrl.xc_interface_open(ffi.NULL, ffi.NULL, 0)
            if self._xc == ffi.NULL:
                self._libs = _without_xenctrl(self._libs)
                self._xc = None
                return None
        head = ffi.cast("struct qrexec_vchan_head *", self._ctrl)
        status = ffi.new("xc_evtchn_status_t *")
        status.dom = xenlibs.DOMID_SELF
        status.port = head.event_port
        if xenctrl.xc_evtchn_status(self._xc, status) != 0:
            return None
        return bool(status.status == xenlibs.EVTCHNSTAT_INTERDOMAIN)

    def close(self) -> None:
        """Close the endpoint (the peer can still read what we wrote); idempotent."""
        if self._ctrl is None:
            return
        ctrl, self._ctrl = self._ctrl, None
        self._lib.libxenvchan_close(ctrl)
        if self._xc is not None and self._libs.xenctrl is not None:
            self._libs.xenctrl.xc_interface_close(self._xc)
            self._xc = None

    @property
    def closed(self) -> bool:
        return self._ctrl is None


def _without_xenctrl(libs: xenlibs.XenLibs) -> xenlibs.XenLibs:
    log.debug("libxenctrl cannot open the hypervisor interface; using xenstore liveness")
    return xenlibs.XenLibs(
        ffi=libs.ffi, vchan=libs.vchan, xenstore=libs.xenstore, libc=libs.libc, xenctrl=None
    )


def _strerror(err: int) -> str:
    return os.strerror(err) if err else "unknown error"
