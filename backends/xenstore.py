"""A small typed wrapper of libxenstore, and the domain identity questions asked of it.

What it answers: our own domain id (the ``domid`` node of our own tree), a domain's name
(``/local/domain/<id>/name``) and the reverse, the list of running domains (dom0 only: a
domU may not list ``/local/domain``), whether a domain still exists; and the node
operations the vchan backend needs (read, directory, remove, watch).

Every call is one short round trip to xenstored (a unix socket in dom0, ``/dev/xen/xenbus``
in a domU). Waiting for a node is done by the callers through :meth:`XenStore.watch_fd`,
so nothing here sleeps or loops. Not thread-safe by itself: give each thread its own
handle, or serialise calls (libxenstore handles are cheap).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from qrexec.backends import xenlibs
from qrexec.errors import TransportError, TransportUnavailable

log = logging.getLogger(__name__)

XBT_NULL = 0
#: Length limit of a domain name in xenstore-derived answers (Qubes names are < 32).
MAX_NAME_LEN = 64


class XenStore:
    """One open connection to xenstored."""

    def __init__(self, libs: xenlibs.XenLibs | None = None) -> None:
        self._libs = libs or xenlibs.load()
        self._ffi = self._libs.ffi
        self._xs = self._libs.xenstore
        ffi = self._ffi
        ffi.errno = 0
        handle = self._xs.xs_open(0)
        if handle == ffi.NULL:
            err = ffi.errno
            raise TransportUnavailable(
                "cannot open xenstore (xs_open failed: "
                f"{os.strerror(err) if err else 'unknown error'}); this is not a Xen "
                "domain with xenstore access (is xenstored running / /dev/xen/xenbus present?)"
            )
        self._handle: Any = handle
        self._watches: set[tuple[str, str]] = set()

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._handle is not None:
            self._xs.xs_close(self._handle)
            self._handle = None

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _h(self) -> Any:
        if self._handle is None:
            raise TransportError("xenstore handle used after close")
        return self._handle

    # -- nodes ---------------------------------------------------------------------

    def read(self, path: str) -> bytes | None:
        """Return the node's value, or None when it does not exist or is unreadable."""
        ffi = self._ffi
        length = ffi.new("unsigned int *")
        ffi.errno = 0
        value = self._xs.xs_read(self._h(), XBT_NULL, path.encode(), length)
        if value == ffi.NULL:
            if ffi.errno not in (errno.ENOENT, errno.EACCES, 0):
                log.debug("xs_read %s: %s", path, os.strerror(ffi.errno))
            return None
        try:
            return bytes(ffi.buffer(value, length[0]))
        finally:
            self._libs.libc.free(value)

    def write(self, path: str, value: bytes) -> None:
        """Write a node (creating parents); raise TransportError on failure."""
        ffi = self._ffi
        ffi.errno = 0
        if not self._xs.xs_write(self._h(), XBT_NULL, path.encode(), value, len(value)):
            raise TransportError(f"xs_write {path}: {os.strerror(ffi.errno)}")

    def directory(self, path: str) -> list[str] | None:
        """Return the node's children, or None when it does not exist or is unreadable."""
        ffi = self._ffi
        num = ffi.new("unsigned int *")
        entries = self._xs.xs_directory(self._h(), XBT_NULL, path.encode(), num)
        if entries == ffi.NULL:
            return None
        try:
            return [ffi.string(entries[i]).decode("ascii", "replace") for i in range(num[0])]
        finally:
            self._libs.libc.free(entries)

    def remove(self, path: str) -> bool:
        """Remove a node and its children; False (not an error) when it was absent."""
        return bool(self._xs.xs_rm(self._h(), XBT_NULL, path.encode()))

    # -- watches -------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        """Ask xenstored to signal changes under ``path`` on :meth:`watch_fd`."""
        ffi = self._ffi
        ffi.errno = 0
        if not self._xs.xs_watch(self._h(), path.encode(), token.encode()):
            raise TransportError(f"xs_watch {path}: {os.strerror(ffi.errno)}")
        self._watches.add((path, token))

    def unwatch(self, path: str, token: str) -> None:
        """Drop a watch set by :meth:`watch`; never raises."""
        if (path, token) in self._watches and self._handle is not None:
            self._xs.xs_unwatch(self._handle, path.encode(), token.encode())
            self._watches.discard((path, token))

    def watch_fd(self) -> int:
        """A file descriptor that becomes readable when a watch fires (for select)."""
        return int(self._xs.xs_fileno(self._h()))

    def drain_watch_events(self) -> list[str]:
        """Consume pending watch events without blocking; return the paths that fired."""
        ffi = self._ffi
        fired: list[str] = []
        while True:
            event = self._xs.xs_check_watch(self._h())
            if event == ffi.NULL:
                return fired
            try:
                fired.append(ffi.string(event[0]).decode("ascii", "replace"))
            finally:
                self._libs.libc.free(event)

    # -- domain identity -----------------------------------------------------------

    def own_domid(self) -> int:
        """Our own domain id, from the ``domid`` node of our own tree."""
        raw = self.read("domid")
        if raw is None:
            raise TransportUnavailable("xenstore has no 'domid' node for this domain")
        return parse_domid(raw, "domid")

    def domain_name(self, domid: int) -> str | None:
        """The name of a domain (``/local/domain/<id>/name``), None if unknown."""
        raw = self.read(f"/local/domain/{domid}/name")
        if raw is None:
            return None
        return validate_name(raw)

    def exists(self, path: str) -> bool | None:
        """True/False when xenstored says so; None when we may not know (EACCES...)."""
        ffi = self._ffi
        num = ffi.new("unsigned int *")
        ffi.errno = 0
        entries = self._xs.xs_directory(self._h(), XBT_NULL, path.encode(), num)
        if entries != ffi.NULL:
            self._libs.libc.free(entries)
            return True
        return False if ffi.errno == errno.ENOENT else None

    def domain_exists(self, domid: int) -> bool | None:
        """Whether ``/local/domain/<id>`` exists; None when this domain may not tell."""
        return self.exists(f"/local/domain/{domid}")

    def list_domains(self) -> dict[int, str]:
        """Running domains as id -> name (needs dom0's right to list ``/local/domain``)."""
        ids = self.directory("/local/domain")
        if ids is None:
            raise TransportError("cannot list /local/domain (not dom0?)")
        domains: dict[int, str] = {}
        for entry in ids:
            if not entry.isdigit():
                continue
            domid = int(entry)
            name = self.domain_name(domid)
            if name is not None:
                domains[domid] = name
        return domains

    def domid_of(self, name: str) -> int | None:
        """Reverse lookup of a running domain's name (dom0 only)."""
        for domid, dom_name in self.list_domains().items():
            if dom_name == name:
                return domid
        return None


def parse_domid(raw: bytes, what: str) -> int:
    """Validate a domain id read from xenstore (decimal, 0..32767)."""
    text = raw.decode("ascii", "replace").strip("\0").strip()
    if not text.isdigit() or int(text) > 0x7FEF:
        raise TransportError(f"invalid domain id in xenstore {what}: {text[:20]!r}")
    return int(text)


def validate_name(raw: bytes) -> str | None:
    """A domain name as qrexec accepts it, or None when xenstore holds something odd."""
    name = raw.decode("ascii", "replace").strip("\0")
    if not name or len(name) > MAX_NAME_LEN:
        return None
    if not all(c.isalnum() or c in "_.-" for c in name):
        return None
    return name
