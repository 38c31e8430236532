"""What is specific to the unix-socket backend: libvchan-socket names, environment,
the isolated layout, socket-file hygiene and the asyncio-free blocking face.

Behaviour common to all backends is in tests/conformance.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from qrexec.backends.select import load_backend
from qrexec.backends.socket import SocketBackend, make_backend
from qrexec.errors import TransportBroken, TransportClosed, TransportUnavailable

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def vdir(tmp_path: Path) -> Path:
    """This test's private socket directory (long paths are fine, see _addressable)."""
    return tmp_path


def test_flat_names_match_libvchan_socket(vdir: Path) -> None:
    vm = SocketBackend(5, vdir)
    assert vm.server_path(0, 512) == vdir / "vchan.5.0.512.sock"
    assert vm.client_path(0, 513) == vdir / "vchan.0.5.513.sock"


def test_isolated_names_use_one_directory_per_pair(vdir: Path) -> None:
    vm = SocketBackend(7, vdir, "isolated")
    assert vm.server_path(3, 514) == vdir / "pair.3.7" / "vchan.7.3.514.sock"
    assert vm.client_path(3, 514) == vdir / "pair.3.7" / "vchan.3.7.514.sock"
    assert SocketBackend(3, vdir, "isolated").server_path(7, 514).parent == vdir / "pair.3.7"


def test_make_backend_reads_the_environment(vdir: Path) -> None:
    backend = make_backend(
        {"VCHAN_DOMAIN": "12", "VCHAN_SOCKET_DIR": str(vdir), "QREXEC_VCHAN_LAYOUT": "isolated"}
    )
    assert (backend.own_domain, backend.socket_dir, backend.layout) == (12, vdir, "isolated")
    default = make_backend({})
    assert (default.own_domain, str(default.socket_dir), default.layout) == (
        0,
        "/var/run/vchan",
        "flat",
    )
    chosen = load_backend(None, {"VCHAN_SOCKET_DIR": str(vdir), "VCHAN_DOMAIN": "3"})
    assert isinstance(chosen, SocketBackend) and chosen.own_domain == 3


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VCHAN_DOMAIN": "dom0"}, "VCHAN_DOMAIN"),
        ({"VCHAN_DOMAIN": "-1"}, "VCHAN_DOMAIN"),
        ({"VCHAN_DOMAIN": "65535"}, "VCHAN_DOMAIN"),
        ({"QREXEC_VCHAN_LAYOUT": "nested"}, "QREXEC_VCHAN_LAYOUT"),
    ],
)
def test_bad_environment_is_refused_by_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(TransportUnavailable, match=named):
        make_backend(env)


def test_bad_ports_and_domains_are_refused(vdir: Path) -> None:
    backend = SocketBackend(1, vdir)
    for remote, port in [(-1, 513), (1 << 16, 513), (2, -5), (2, 1 << 20)]:
        with pytest.raises(ValueError):
            backend.listen(remote, port)


@pytest.mark.parametrize("layout", ["flat", "isolated"])
def test_socket_directories_longer_than_sun_path_work(vdir: Path, layout: str) -> None:
    deep = vdir / ("d" * 100) / ("e" * 100)
    a = SocketBackend(1, deep, layout)  # type: ignore[arg-type]
    b = SocketBackend(2, deep, layout)  # type: ignore[arg-type]
    connecting = threading.Thread(target=lambda: got.append(b.connect(1, 513, timeout=30)))
    got: list[object] = []
    connecting.start()  # before the directory even exists
    listener = a.listen(2, 513)
    assert listener.path.exists() and len(bytes(listener.path)) > 200
    server = listener.accept(timeout=30)
    connecting.join(30)
    server.send(b"deep")
    assert got[0].recv(4) == b"deep"  # type: ignore[attr-defined]
    assert not listener.path.exists()


def test_raw_bytes_without_framing_for_a_c_peer(vdir: Path) -> None:
    """A libvchan-socket peer just connects to the file and exchanges the bytes as sent."""
    listener = SocketBackend(0, vdir).listen(9, 512)
    c_peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    directory = os.open(vdir, os.O_PATH)
    c_peer.connect(f"/proc/self/fd/{directory}/vchan.0.9.512.sock")  # short address form
    os.close(directory)
    stream = listener.accept(timeout=10)
    stream.send(b"\x00\x01\x02")
    assert c_peer.recv(10) == b"\x00\x01\x02"
    c_peer.sendall(b"raw")
    assert stream.recv(10) == b"raw"
    c_peer.close()
    assert stream.recv(10) == b""


def test_server_removes_its_file_after_accepting_and_on_close(vdir: Path) -> None:
    a, b = SocketBackend(1, vdir), SocketBackend(2, vdir)
    listener = a.listen(2, 513)
    assert listener.path.exists()
    client = b.connect(1, 513, timeout=10)
    listener.accept(timeout=10)
    assert not listener.path.exists()
    client.close()
    idle = a.listen(2, 514)
    idle.close()
    assert not idle.path.exists()


def test_listener_never_unlinks_a_newer_server(vdir: Path) -> None:
    a = SocketBackend(1, vdir)
    old = a.listen(2, 513)
    new = a.listen(2, 513)  # rebinds the name, as libvchan-socket's unlink+bind does
    old.close()
    assert new.path.exists()
    client = SocketBackend(2, vdir).connect(1, 513, timeout=10)
    new.accept(timeout=10).send(b"new")
    assert client.recv(3) == b"new"


def test_client_retries_past_a_stale_socket_file(vdir: Path) -> None:
    a, b = SocketBackend(1, vdir), SocketBackend(2, vdir)
    stale_path = a.server_path(2, 513)
    directory = os.open(stale_path.parent, os.O_PATH)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A dead server's leftover (connecting to it gives ECONNREFUSED).
    stale.bind(f"/proc/self/fd/{directory}/{stale_path.name}")
    stale.close()
    os.close(directory)
    assert stale_path.exists()
    connecting = threading.Thread(target=lambda: results.append(b.connect(1, 513, timeout=30)))
    results: list[object] = []
    connecting.start()
    listener = a.listen(2, 513)
    listener.accept(timeout=30)
    connecting.join(30)
    assert len(results) == 1


def test_isolated_layout_keeps_other_pairs_out(vdir: Path) -> None:
    """Domain 3, given only its own pair directories, cannot reach or squat vchan 1<->2."""
    host = vdir / "host"
    one, two = SocketBackend(1, host, "isolated"), SocketBackend(2, host, "isolated")
    listener = one.listen(2, 513)
    assert listener.path.parent == host / "pair.1.2"
    # Domain 3's view, as a container would mount it: only pair.1.3 and pair.2.3.
    view3 = vdir / "view3"
    view3.mkdir()
    for name in ("pair.1.3", "pair.2.3"):
        (host / name).mkdir()
        (view3 / name).symlink_to(host / name)
    three = SocketBackend(3, view3, "isolated")
    with pytest.raises(TimeoutError):
        three.connect(1, 513, timeout=0.3)
    squatter = three.listen(2, 513)  # as server for 2: lands in pair.2.3, not in pair.1.2
    assert squatter.path.resolve().parent == host / "pair.2.3"
    assert sorted(p.name for p in (host / "pair.1.2").iterdir()) == ["vchan.1.2.513.sock"]
    # The real pair still works.
    client = two.connect(1, 513, timeout=10)
    listener.accept(timeout=10).send(b"ok")
    assert client.recv(2) == b"ok"
    # Even claiming another id, domain 3 only sees pair directories it was given.
    liar = SocketBackend(1, view3, "isolated")
    with pytest.raises(TimeoutError):
        liar.connect(2, 514, timeout=0.3)
    assert not (view3 / "pair.1.2").exists()


def test_flat_layout_is_documented_as_no_security_boundary() -> None:
    import qrexec.backends.socket as module

    assert module.__doc__ is not None
    assert "not a security boundary" in " ".join(module.__doc__.split())


def test_blocking_face_never_imports_asyncio(vdir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, threading
        from qrexec.backends.select import load_backend
        env = {{"VCHAN_SOCKET_DIR": {str(vdir)!r}, "VCHAN_DOMAIN": "1"}}
        a = load_backend(None, env)
        b = load_backend(None, {{**env, "VCHAN_DOMAIN": "2"}})
        listener = a.listen(2, 513)
        got = []
        t = threading.Thread(target=lambda: got.append(b.connect(1, 513, timeout=10)))
        t.start()
        server = listener.accept(timeout=10)
        t.join()
        client = got[0]
        client.send(b"ping")
        assert server.recv(4) == b"ping"
        server.close()
        assert client.recv(4) == b""
        client.close()
        print("asyncio" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "False"


def test_close_from_another_thread_wakes_blocking_recv_without_leaking_fds(vdir: Path) -> None:
    a, b = SocketBackend(1, vdir), SocketBackend(2, vdir)
    before = len(os.listdir("/proc/self/fd"))
    for port in range(513, 533):
        listener = a.listen(2, port)
        client = b.connect(1, port, timeout=10)
        server = listener.accept(timeout=10)
        errors: list[BaseException] = []

        def read(stream: object = server, errors: list[BaseException] = errors) -> None:
            try:
                stream.recv(10)  # type: ignore[attr-defined]
            except TransportClosed as exc:
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        server.close()
        reader.join(10)
        client.close()
        assert not reader.is_alive()
        assert len(errors) == 1
    assert len(os.listdir("/proc/self/fd")) <= before


def test_splice_from_a_pipe_sends_the_header_then_exactly_count_bytes(vdir: Path) -> None:
    server = SocketBackend(1, vdir).listen(2, 600)
    client = threading.Thread(target=lambda: results.append(SocketBackend(2, vdir).connect(1, 600)))
    results: list[object] = []
    client.start()
    ours = server.accept(timeout=10)
    client.join(10)
    theirs = results[0]
    read_end, write_end = os.pipe()
    try:
        payload = os.urandom(70000)
        os.write(write_end, payload[:60000])
        ours.splice_from(b"HEADER:!", read_end, 50000)  # leaves 10000 in the pipe
        received = b""
        while len(received) < 8 + 50000:
            received += theirs.recv(65536)  # type: ignore[attr-defined]
        assert received == b"HEADER:!" + payload[:50000]
        # A pipe that runs dry inside a frame breaks the stream instead of blocking.
        os.close(write_end)
        write_end = -1
        with pytest.raises(TransportBroken, match="ran dry"):
            ours.splice_from(b"HEADER:!", read_end, 20000)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        ours.close()
        theirs.close()  # type: ignore[attr-defined]
