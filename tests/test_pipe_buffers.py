"""Bulk pipes and sockets get larger kernel buffers, and nothing else is touched."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from qrexec.pipe_buffers import BULK_BUFFER_SIZE, enlarge_pipe, enlarge_send_buffer


def test_a_pipe_grows_to_the_bulk_size_where_the_system_allows_it() -> None:
    read_end, write_end = os.pipe()
    try:
        enlarge_pipe(read_end)
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        assert fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) == min(BULK_BUFFER_SIZE, limit)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_files_closed_fds_and_sockets_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    enlarge_pipe(fd)  # not a pipe: nothing happens, nothing raises
    os.close(fd)
    enlarge_pipe(fd)  # closed: best effort, no error
    left, right = socket.socketpair()
    with left, right:
        before = left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        enlarge_send_buffer(left)
        assert left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= before
