"""qrexec.unix_address: bind and connect at socket paths past the sockaddr_un limit."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from qrexec.unix_address import MAX_UNIX_PATH, unix_address


def deep_folder(tmp_path: Path) -> Path:
    folder = tmp_path / ("d" * 60) / ("e" * 60)
    folder.mkdir(parents=True)
    return folder


def test_short_path_is_itself(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with unix_address(path) as address:
        assert address == str(path)


def test_long_path_binds_and_connects(tmp_path: Path) -> None:
    path = deep_folder(tmp_path) / "server.sock"
    assert len(str(path)) > MAX_UNIX_PATH
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        with unix_address(path) as address:
            assert address.startswith("/proc/self/fd/")
            server.bind(address)
        server.listen(1)
        assert path.is_socket()
        with unix_address(str(path)) as address:
            client.connect(address)
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"


def test_missing_folder_is_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120) / "s.sock"
    with pytest.raises(FileNotFoundError), unix_address(path):
        pass


def test_name_too_long_even_through_the_folder(tmp_path: Path) -> None:
    path = deep_folder(tmp_path) / ("n" * 100)
    with pytest.raises(OSError) as info, unix_address(path):
        pass
    assert info.value.errno == errno.ENAMETOOLONG
    assert info.value.filename == "n" * 100
