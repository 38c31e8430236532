"""Load Xen's user-space libraries (libxenvchan, libxenstore, libxenctrl) through cffi.

ABI mode only: ``ffi.dlopen`` by soname, so nothing is compiled at install time and the
package installs on machines without Xen. Only the functions this project calls are
declared. Debian ships ``libxenvchan.so.4.17`` in ``libxenmisc4.17`` (there is no
``libxenvchan`` package), ``libxenstore.so.4`` in ``libxenstore4``.

Why the sonames are tried in order and then looked up with ``ctypes.util.find_library``:
the soname carries Xen's version, so a host with another Xen release has another name.
The environment variables ``QREXEC_LIBXENVCHAN``, ``QREXEC_LIBXENSTORE`` and
``QREXEC_LIBXENCTRL`` name a library (soname or path) to load instead, for hosts with an
unusual Xen build.

This module does no I/O besides loading the libraries, and raises
:class:`~qrexec.errors.TransportUnavailable` with the names it tried when one is absent.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any

from qrexec.errors import TransportUnavailable

VCHAN_SONAMES: tuple[str, ...] = ("libxenvchan.so.4.17",)
XENSTORE_SONAMES: tuple[str, ...] = ("libxenstore.so.4",)
XENCTRL_SONAMES: tuple[str, ...] = ("libxenctrl.so.4.17",)

#: Debian's package holding each library, named in error messages.
_DEBIAN_PACKAGE = {
    "xenvchan": "libxenmisc4.17",
    "xenstore": "libxenstore4",
    "xenctrl": "libxenmisc4.17",
}

_CDEF = """
typedef uint32_t xs_transaction_t;
struct xs_handle;
struct xentoollog_logger;
struct libxenvchan;
typedef struct xc_interface_core xc_interface;

struct libxenvchan *libxenvchan_server_init(struct xentoollog_logger *logger,
    int domain, const char *xs_path, size_t read_min, size_t write_min);
struct libxenvchan *libxenvchan_client_init(struct xentoollog_logger *logger,
    int domain, const char *xs_path);
void libxenvchan_close(struct libxenvchan *ctrl);
int libxenvchan_read(struct libxenvchan *ctrl, void *data, size_t size);
int libxenvchan_write(struct libxenvchan *ctrl, const void *data, size_t size);
int libxenvchan_wait(struct libxenvchan *ctrl);
int libxenvchan_fd_for_select(struct libxenvchan *ctrl);
int libxenvchan_is_open(struct libxenvchan *ctrl);
int libxenvchan_data_ready(struct libxenvchan *ctrl);
int libxenvchan_buffer_space(struct libxenvchan *ctrl);

/* The leading fields of struct libxenvchan (xen/include/libxenvchan.h, stable since
   Xen 4.2): the local event-channel port (to ask Xen whether the peer's end is still
   bound) and the byte holding the bit-fields is_server:1, server_persist:1, blocking:1. */
struct qrexec_vchan_head {
    void *gnt_handle;
    void *ring;
    void *event;
    uint32_t event_port;
    uint8_t flags;
};

struct xs_handle *xs_open(unsigned long flags);
void xs_close(struct xs_handle *xsh);
void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path,
    unsigned int *len);
bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path,
    const void *data, unsigned int len);
char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path,
    unsigned int *num);
bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path);
bool xs_watch(struct xs_handle *h, const char *path, const char *token);
bool xs_unwatch(struct xs_handle *h, const char *path, const char *token);
int xs_fileno(struct xs_handle *h);
char **xs_check_watch(struct xs_handle *h);

/* struct evtchn_status with its union flattened to the interdomain member. */
typedef struct {
    uint16_t dom;
    uint32_t port;
    uint32_t status;
    uint32_t vcpu;
    uint16_t remote_dom;
    uint32_t remote_port;
} xc_evtchn_status_t;
xc_interface *xc_interface_open(struct xentoollog_logger *logger,
    struct xentoollog_logger *dombuild_logger, unsigned open_flags);
int xc_interface_close(xc_interface *xch);
int xc_evtchn_status(xc_interface *xch, xc_evtchn_status_t *status);

void free(void *ptr);
"""

DOMID_SELF = 0x7FF0
#: The ``blocking`` bit-field in ``qrexec_vchan_head.flags`` (gcc's x86-64 layout).
VCHAN_FLAG_BLOCKING = 0x4
EVTCHNSTAT_INTERDOMAIN = 2


@dataclass(frozen=True)
class XenLibs:
    """The loaded libraries: ``ffi`` plus one handle per library (cffi ``Lib`` objects)."""

    ffi: Any
    vchan: Any
    xenstore: Any
    libc: Any
    xenctrl: Any | None  # optional: only used to detect a dead peer domain


def _candidates(env_var: str, sonames: tuple[str, ...], short: str) -> list[str]:
    override = os.environ.get(env_var)
    if override:
        return [override]
    names = list(sonames)
    found = ctypes.util.find_library(short)
    if found and found not in names:
        names.append(found)
    return names


def _open(ffi: Any, env_var: str, sonames: tuple[str, ...], short: str) -> Any:
    tried = _candidates(env_var, sonames, short)
    errors: list[str] = []
    for name in tried:
        try:
            return ffi.dlopen(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise TransportUnavailable(
        f"the Xen library lib{short} is not available (tried {', '.join(tried)}); "
        f"install Debian's {_DEBIAN_PACKAGE[short]} or set {env_var}, or use the socket "
        f"emulation (--transport=socket). Details: {'; '.join(errors)}"
    )


@functools.cache
def load() -> XenLibs:
    """Load the libraries once per process; raise TransportUnavailable when absent."""
    try:
        cffi: Any = importlib.import_module("cffi")
    except ImportError as exc:
        raise TransportUnavailable(
            "the vchan transport needs the cffi module (pip install 'qrexec-py[vchan]' "
            "or apt-get install python3-cffi)"
        ) from exc
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    vchan = _open(ffi, "QREXEC_LIBXENVCHAN", VCHAN_SONAMES, "xenvchan")
    xenstore = _open(ffi, "QREXEC_LIBXENSTORE", XENSTORE_SONAMES, "xenstore")
    try:
        xenctrl: Any | None = _open(ffi, "QREXEC_LIBXENCTRL", XENCTRL_SONAMES, "xenctrl")
    except TransportUnavailable:
        xenctrl = None
    libc = ffi.dlopen(None)
    return XenLibs(ffi=ffi, vchan=vchan, xenstore=xenstore, libc=libc, xenctrl=xenctrl)
