"""qubes.Filecopy: a tree round-trips with names, sizes, modes and times; hostile streams fail."""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from qrexec.sim import filecopy
from qrexec.sim.filecopy import END_OF_STREAM, HEADER, RESULT, CopyError, receive, send


def _pipe_copy(
    paths: list[str], home: Path, source: str = "vm1"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Run sender and receiver connected by two pipes, as qrexec would connect them."""
    to_receiver_r, to_receiver_w = os.pipe()
    to_sender_r, to_sender_w = os.pipe()
    result: dict[str, object] = {}

    def run_receiver() -> None:
        with os.fdopen(to_receiver_r, "rb") as inp, os.fdopen(to_sender_w, "wb") as out:
            try:
                result["receiver"] = receive(source, home, inp, out)
            except CopyError as exc:
                result["receiver"] = exc

    thread = threading.Thread(target=run_receiver)
    thread.start()
    with os.fdopen(to_receiver_w, "wb") as out, os.fdopen(to_sender_r, "rb") as answer:
        sent = send(paths, out, answer)
    thread.join(10)
    received = result["receiver"]
    assert isinstance(received, tuple), received
    return sent, received


def test_tree_round_trip_preserves_names_sizes_modes_times(tmp_path: Path) -> None:
    src = tmp_path / "src" / "tree"
    (src / "sub" / "empty").mkdir(parents=True)
    (src / "a.txt").write_text("hello\n")
    (src / "sub" / "big.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "script").write_text("#!/bin/sh\n")
    os.chmod(src / "a.txt", 0o600)
    os.chmod(src / "sub" / "script", 0o751)
    os.chmod(src / "sub", 0o750)
    os.utime(src / "a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    home = tmp_path / "home"
    sent, received = _pipe_copy([str(src)], home)
    assert sent == received == (3, 6 + 300_000 + 10)
    dest = home / "QubesIncoming" / "vm1" / "tree"
    for original in [src, *src.rglob("*")]:
        copy = dest / original.relative_to(src)
        assert copy.exists(), copy
        assert copy.stat().st_mode == original.stat().st_mode
        if original.is_file():
            assert copy.read_bytes() == original.read_bytes()
    assert (dest / "a.txt").stat().st_mtime_ns == 1_600_000_000_987_654_321


def _stream(*entries: tuple[bytes, int, bytes]) -> bytes:
    data = b""
    for name, mode, content in entries:
        data += HEADER.pack(len(name), mode, len(content), 0, 0, 0, 0) + name + content
    return data + END_OF_STREAM


# Hand-written vectors of Qubes' layout: a file "a" (mode 0100644, content "hi", atime 1.2,
# mtime 3.4), one directory "d" (mode 040755) and the end marker.
FILE_A = bytes.fromhex(
    "02000000"  # namelen 2 ("a\0")
    "a4810000"  # mode 0o100644
    "0200000000000000"  # filelen 2 (u64)
    "01000000"  # atime 1
    "02000000"  # atime_nsec 2
    "03000000"  # mtime 3
    "04000000"  # mtime_nsec 4
    "6100"  # "a\0"
    "6869"  # "hi"
)
DIR_D = bytes.fromhex(
    "02000000" "ed410000" "0000000000000000" "00000000" "00000000" "00000000" "00000000" "6400"
)  # fmt: skip
END = bytes.fromhex("00" * 32)


def test_layout_pinned_by_hand_written_hex() -> None:
    assert HEADER.size == 32 and RESULT.size == 16
    assert END_OF_STREAM == END
    assert HEADER.unpack(FILE_A[:32]) == (2, 0o100644, 2, 1, 2, 3, 4)
    assert filecopy.encode_result(0, 0xC3AF4DFC, b"a") == bytes.fromhex(
        "00000000" "00000000" "fc4dafc300000000" "01000000" "61"
    )  # fmt: skip


def test_receiver_answers_crc_of_every_byte_read_and_the_last_name(tmp_path: Path) -> None:
    out = io.BytesIO()
    assert receive("vm1", tmp_path, io.BytesIO(FILE_A + END), out) == (1, 2)
    # crc32 over both headers' bytes, the name, the content and the end marker.
    assert out.getvalue() == bytes.fromhex("00000000 00000000 fc4dafc300000000 01000000 61")
    copy = tmp_path / "QubesIncoming" / "vm1" / "a"
    st = copy.stat()  # before reading it, which may move atime
    assert (st.st_mode, st.st_atime_ns, st.st_mtime_ns) == (0o100644, 1_000_000_002, 3_000_000_004)
    assert copy.read_bytes() == b"hi"
    out = io.BytesIO()
    assert receive("vm1", tmp_path, io.BytesIO(DIR_D + DIR_D + END), out) == (0, 0)
    assert out.getvalue() == bytes.fromhex("00000000 00000000 8054584e00000000 01000000 64")


def test_sender_writes_qubes_layout(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hi")
    os.chmod(tmp_path / "a", 0o644)
    os.utime(tmp_path / "a", ns=(1_000_000_002, 3_000_000_004))
    out = io.BytesIO()
    answer = io.BytesIO(bytes.fromhex("00000000 00000000 fc4dafc300000000 01000000 61"))
    assert send([str(tmp_path / "a")], out, answer) == (1, 2)
    assert out.getvalue() == FILE_A + END


class _AnswerWithCrcOf:
    """An old receiver's answer (no extension) carrying the crc of what was written to ``out``,
    computed when the sender reads it."""

    def __init__(self, out: io.BytesIO) -> None:
        self.out = out
        self.answer: io.BytesIO | None = None

    def read(self, size: int = -1) -> bytes:
        if self.answer is None:
            self.answer = io.BytesIO(RESULT.pack(0, 0, zlib.crc32(self.out.getvalue())))
        return self.answer.read(size)


def test_sender_sends_a_directory_before_and_after_its_contents(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"")
    out = io.BytesIO()
    assert send([str(tmp_path / "d")], out, _AnswerWithCrcOf(out)) == (1, 0)  # type: ignore[arg-type]
    names = []
    data = out.getvalue()
    while True:
        namelen, mode, length = HEADER.unpack(data[:32])[:3]
        if namelen == 0:
            assert data == END
            break
        names.append((data[32 : 32 + namelen], stat.S_IFMT(mode)))
        data = data[32 + namelen + length :]
    assert names == [(b"d\0", stat.S_IFDIR), (b"d/f\0", stat.S_IFREG), (b"d\0", stat.S_IFDIR)]


def test_sender_accepts_old_receivers_without_the_extension(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hi")
    os.utime(tmp_path / "a", ns=(1_000_000_002, 3_000_000_004))
    os.chmod(tmp_path / "a", 0o644)
    old_answer = io.BytesIO(bytes.fromhex("00000000 00000000 fc4dafc300000000"))
    assert send([str(tmp_path / "a")], io.BytesIO(), old_answer) == (1, 2)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("02000000 00000000 0000000000000000 03000000 612f62", "failed at 'a/b': No such file"),
        ("16000000 00000000 0000000000000000", "receiver failed: Invalid argument"),
        ("00000000 00000000 fc4dafc300000000 0100", "ends inside its extension"),
        ("00000000 00000000 fc4dafc300000000 05000000 61", "ends inside the last name"),
        ("00000000 00000000 fc4dafc300000000 00100100", "last name length"),
        ("00000000 00000000 fc4d", "did not confirm"),
    ],
)
def test_sender_checks_the_answer(tmp_path: Path, answer: str, message: str) -> None:
    (tmp_path / "a").write_bytes(b"hi")
    os.utime(tmp_path / "a", ns=(1_000_000_002, 3_000_000_004))
    os.chmod(tmp_path / "a", 0o644)
    with pytest.raises(CopyError, match=message):
        send([str(tmp_path / "a")], io.BytesIO(), io.BytesIO(bytes.fromhex(answer)))


def test_sender_reports_the_receivers_error_when_it_stops_reading(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 1_000_000)

    class Closed(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    answer = io.BytesIO(bytes.fromhex("1c000000 00000000 0000000000000000 03000000 626967"))
    with pytest.raises(CopyError, match="failed at 'big': No space left"):
        send([str(tmp_path / "big")], Closed(), answer)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (_stream((b"../evil\0", 0o100644, b"x")), "unsafe name"),
        (_stream((b"/etc/evil\0", 0o100644, b"x")), "unsafe name"),
        (_stream((b"a//b\0", 0o100644, b"x")), "unsafe name"),
        (_stream((b"noterm", 0o100644, b"x")), "NUL"),
        (_stream((b"a\0b\0", 0o100644, b"x")), "NUL"),
        (_stream((b"missing/f\0", 0o100644, b"x")), "cannot write"),
        (_stream((b"dev\0", 0o020644, b"")), "unsupported file type"),
        (_stream((b"d\0", 0o040755, b"content")), "directory 'd' with content"),
        (_stream((b"link\0", 0o120777, b"/etc")), "unsupported file type 120000"),
        (HEADER.pack(2, 0o100644, 0, 0, 1_000_000_000, 0, 0) + b"a\0" + END, "nanoseconds"),
        (HEADER.pack(100_000, 0o100644, 0, 0, 0, 0, 0), "name length"),
        (HEADER.pack(4, 0o100644, 10, 0, 0, 0, 0) + b"abc\0" + b"short", "stream ended early"),
    ],
)
def test_hostile_streams_are_refused(tmp_path: Path, stream: bytes, message: str) -> None:
    out = io.BytesIO()
    with pytest.raises(CopyError, match=message):
        receive("vm1", tmp_path, io.BytesIO(stream), out)
    error, _pad, _crc = struct.unpack("<IIQ", out.getvalue()[:16])
    assert error != 0
    (namelen,) = struct.unpack("<I", out.getvalue()[16:20])
    assert len(out.getvalue()) == 20 + namelen  # the extension names the last entry read
    assert not (tmp_path.parent / "evil").exists()


def test_existing_file_is_not_overwritten_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    base = tmp_path / "QubesIncoming" / "vm1"
    base.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(CopyError, match="not a directory"):
        receive("vm1", tmp_path, io.BytesIO(_stream((b"link/f\0", 0o100644, b"x"))), io.BytesIO())
    assert not (outside / "f").exists()
    (base / "taken").write_text("mine")
    with pytest.raises(CopyError, match="cannot write"):
        receive("vm1", tmp_path, io.BytesIO(_stream((b"taken\0", 0o100644, b"x"))), io.BytesIO())
    assert (base / "taken").read_text() == "mine"


def test_bad_source_name_and_unsupported_sender_input(tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="source domain"):
        receive("../x", tmp_path, io.BytesIO(_stream()), io.BytesIO())
    (tmp_path / "l").symlink_to("/etc")
    with pytest.raises(CopyError, match="only regular files"):
        send([str(tmp_path / "l")], io.BytesIO(), io.BytesIO())


def test_sender_notices_a_receiver_that_does_not_confirm(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(CopyError, match="did not confirm"):
        send([str(tmp_path / "f")], io.BytesIO(), io.BytesIO(b""))
    bad = struct.pack("<IIQ", 0, 0, 12345)
    with pytest.raises(CopyError, match="checksum mismatch"):
        send([str(tmp_path / "f")], io.BytesIO(), io.BytesIO(bad))
    assert filecopy.main(["send", str(tmp_path / "nonexistent")]) == 1
