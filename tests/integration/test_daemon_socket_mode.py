"""The daemon's client socket ``qrexec.<domid>`` has mode 0660 (group ``qubes`` when that
group exists) whatever the umask, set before the socket appears under its name."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from qrexec.daemon import clients
from qrexec.daemon.clients import bind_unix


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_client_socket_mode_ignores_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "qrexec.5"
    old = os.umask(umask)
    try:
        sock = bind_unix(str(path))
    finally:
        os.umask(old)
    try:
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        try:
            expected_gid = grp.getgrnam("qubes").gr_gid
        except KeyError:
            expected_gid = os.getegid()
        assert info.st_gid == expected_gid
    finally:
        sock.close()


def test_mode_is_set_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever sees the name sees the final mode: check it at the moment of the rename."""
    seen: list[int] = []
    real_rename = os.rename

    def rename(src: str, dst: str, **kwargs: int) -> None:
        folder = kwargs.get("src_dir_fd")
        seen.append(stat.S_IMODE(os.stat(src, dir_fd=folder).st_mode))
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(clients.os, "rename", rename)
    old = os.umask(0o077)
    try:
        bind_unix(str(tmp_path / "qrexec.6")).close()
    finally:
        os.umask(old)
    assert seen == [0o660]
