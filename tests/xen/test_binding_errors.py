"""The vchan binding's error paths against Debian's real Xen libraries, without a hypervisor.

These load the real ``libxenvchan.so.4.17`` / ``libxenstore.so.4`` (Debian packages
``libxenmisc4.17`` and ``libxenstore4``) on a machine with no ``/dev/xen`` and no
xenstored, so every init call really fails inside the library; we check that each failure
becomes our clear error, not a crash. "Library missing" runs in a subprocess whose loader
is pointed at a soname that does not exist (the real dlopen fails). Marked ``xen`` because
they need those packages; the real-Xen job's README command runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qrexec.backends import xenlibs
from qrexec.errors import TransportError, TransportUnavailable

pytestmark = [pytest.mark.xen, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _host_without_xen() -> None:
    """These tests need a host where Xen is installed but not running (as CI is)."""
    assert not Path("/dev/xen").exists(), "run on a host without a hypervisor (/dev/xen exists)"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (fresh library cache) with extra environment."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=30,
        check=False,
    )


def test_real_libraries_load() -> None:
    libs = xenlibs.load()
    assert libs.vchan.libxenvchan_server_init is not None
    assert libs.xenstore.xs_open is not None


@pytest.mark.parametrize(
    ("variable", "library"),
    [("QREXEC_LIBXENVCHAN", "libxenvchan"), ("QREXEC_LIBXENSTORE", "libxenstore")],
)
def test_missing_library_gives_transport_unavailable(variable: str, library: str) -> None:
    code = (
        "from qrexec.backends.select import load_backend\n"
        "from qrexec.errors import TransportUnavailable\n"
        "try:\n"
        "    load_backend('vchan', {})\n"
        "except TransportUnavailable as exc:\n"
        "    print('UNAVAILABLE', exc)\n"
    )
    proc = run_python(code, **{variable: "libqrexec-no-such-xen.so.0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("UNAVAILABLE"), proc.stdout + proc.stderr
    assert library in proc.stdout
    assert "libqrexec-no-such-xen.so.0" in proc.stdout
    assert "socket" in proc.stdout  # tells the user the alternative


def test_missing_library_keeps_blocking_clients_free_of_asyncio() -> None:
    code = (
        "import sys\n"
        "from qrexec.backends.select import load_backend\n"
        "try:\n"
        "    load_backend('vchan', {})\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "print('asyncio' in sys.modules)\n"
    )
    proc = run_python(code, QREXEC_LIBXENVCHAN="libqrexec-no-such-xen.so.0")
    assert proc.stdout.split() == ["TransportUnavailable", "False"], proc.stderr


def test_no_xenstore_gives_transport_unavailable() -> None:
    from qrexec.backends.vchan import make_backend

    with pytest.raises(TransportUnavailable, match="xenstore"):
        make_backend({})


def test_server_init_failure_is_a_transport_error() -> None:
    from qrexec.backends.vchan import VchanBackend

    backend = VchanBackend(own_domain=3)
    with pytest.raises(TransportError, match=r"libxenvchan_server_init\(domain=0, port=512\)"):
        backend.listen(0, 512, read_min=4096, write_min=4096)


def test_client_init_failure_is_a_transport_error() -> None:
    from qrexec.backends.vchan_ring import Ring

    with pytest.raises(TransportError, match=r"libxenvchan_client_init\(domain=0, port=513\)"):
        Ring.client(xenlibs.load(), 5, 0, 513)


def test_client_waiting_for_server_without_xenstore_fails_clearly() -> None:
    from qrexec.backends.vchan import VchanBackend

    backend = VchanBackend(own_domain=5)
    with pytest.raises(TransportUnavailable, match="xenstore"):
        backend.connect(0, 513, timeout=1)


def test_loopback_is_refused_before_touching_xen() -> None:
    from qrexec.backends.vchan import VchanBackend

    backend = VchanBackend(own_domain=7)
    with pytest.raises(TransportError, match="loopback"):
        backend.listen(7, 512)
    with pytest.raises(TransportError, match="loopback"):
        backend.connect(7, 512, timeout=1)


def test_async_faces_fail_the_same_way() -> None:
    import asyncio

    from qrexec.backends.vchan import VchanBackend

    backend = VchanBackend(own_domain=3)
    with pytest.raises(TransportError, match="server_init"):
        asyncio.run(backend.listen_async(0, 512))
    with pytest.raises(TransportUnavailable, match="xenstore"):
        asyncio.run(backend.connect_async(0, 512, timeout=1))


def test_xenstore_wrapper_reports_missing_xenstored() -> None:
    from qrexec.backends.xenstore import XenStore

    with pytest.raises(TransportUnavailable, match="xs_open failed"):
        XenStore()


def test_blocking_face_does_not_import_asyncio() -> None:
    code = (
        "import sys\n"
        "from qrexec.backends.vchan import VchanBackend\n"
        "backend = VchanBackend(own_domain=3)\n"
        "try:\n"
        "    backend.listen(0, 600)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "print('asyncio' in sys.modules)\n"
    )
    proc = run_python(code)
    assert proc.stdout.split() == ["TransportError", "False"], proc.stderr
