"""A Qubes-style file-copy service pair (``qubes.Filecopy``): the sender and the receiver.

The sender is the local program of ``qrexec-client-vm TARGET qubes.Filecopy``: it walks the
given trees and writes them to stdout; the receiver is the service in the target VM, which
unpacks them into ``~/QubesIncoming/<source VM>/``. Names, sizes, permission bits and
modification times are preserved.

The stream is Qubes' own (qfile-agent / qfile-unpacker), so either side can talk to a real
Qubes peer. All integers little-endian:

* per entry, a 32-byte header ``{u32 namelen, u32 mode, u64 filelen, u32 atime,
  u32 atime_nsec, u32 mtime, u32 mtime_nsec}``, then ``namelen`` bytes of relative name
  (NUL included), then ``filelen`` bytes of content for a regular file. A directory is sent
  once before its contents (created private) and once after them (final mode and times);
* the end of the stream is a full 32-byte header of zeros (``namelen`` 0);
* the receiver answers ``{u32 error_code, u32 pad, u64 crc32}`` (16 bytes, packed), then the
  extension ``{u32 last_namelen, last name bytes}`` (the last entry it handled, for error
  messages). The sender also accepts the 16 bytes alone, as older receivers send. The CRC is
  the standard CRC-32 (``zlib.crc32``) of every byte the receiver read, headers and the end
  marker included; the sender checks it against what it wrote.

The receiver treats the stream as hostile: names must be relative, NUL-terminated, without
``..`` or empty parts, at most 4095 bytes; every parent must be a directory created by this
transfer (or already a real directory, never a symlink); files are created exclusively; only
permission bits are applied; content is streamed to disk in chunks, so memory stays bounded.
Symlinks and special files are refused on both sides (Qubes copies symlinks; we do not, see
docs/decisions.md). Does nothing but the copy: no progress reporting, no GUI.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import stat
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: ``{u32 namelen, u32 mode, u64 filelen, u32 atime, u32 atime_nsec, u32 mtime, u32 mtime_nsec}``
HEADER = struct.Struct("<IIQIIII")
#: ``{u32 error_code, u32 pad, u64 crc32}``
RESULT = struct.Struct("<IIQ")
#: ``{u32 last_namelen}``, followed by that many bytes of name.
RESULT_EXT = struct.Struct("<I")
END_OF_STREAM = HEADER.pack(0, 0, 0, 0, 0, 0, 0)
MAX_NAME = 4096
CHUNK = 65536
_DOMAIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")


class CopyError(Exception):
    """The transfer failed; the message says what and where."""


class _CrcReader:
    """Reads exactly, keeping the crc32 of everything read."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.crc = 0

    def read_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.stream.read(size - len(data))
            if not chunk:
                raise CopyError(f"stream ended early ({len(data)} of {size} bytes)")
            data += chunk
        self.crc = zlib.crc32(data, self.crc)
        return data


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of stream."""
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------------------------------
# Sender


def encode_header(name: str, st: os.stat_result, length: int) -> bytes:
    """One entry's header and NUL-terminated name, as Qubes' qfile-agent writes them."""
    raw = os.fsencode(name) + b"\0"
    if len(raw) > MAX_NAME:
        raise CopyError(f"{name}: name too long")
    return (
        HEADER.pack(
            len(raw),
            st.st_mode,
            length,
            int(st.st_atime_ns // 1_000_000_000) & 0xFFFFFFFF,
            st.st_atime_ns % 1_000_000_000,
            int(st.st_mtime_ns // 1_000_000_000) & 0xFFFFFFFF,
            st.st_mtime_ns % 1_000_000_000,
        )
        + raw
    )


def _walk(path: Path, name: str) -> Iterator[tuple[Path, str, os.stat_result, bool]]:
    """(path, name, stat, closing) in send order: a dir, its contents, the dir again."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        yield path, name, st, False
        for child in sorted(os.listdir(path)):
            yield from _walk(path / child, f"{name}/{child}")
        yield path, name, os.lstat(path), True
    elif stat.S_ISREG(st.st_mode):
        yield path, name, st, False
    else:
        raise CopyError(f"{path}: only regular files and directories can be copied")


def read_result(answer: BinaryIO) -> tuple[int, int, str | None]:
    """(error code, crc32, last name or None) from the receiver's answer.

    The last name is None when the receiver sent no extension (older receivers); a
    truncated or oversized extension is an error, not an old receiver.
    """
    raw = _read_up_to(answer, RESULT.size)
    if len(raw) != RESULT.size:
        raise CopyError("the receiver did not confirm the transfer")
    error, _pad, crc = RESULT.unpack(raw)
    ext = _read_up_to(answer, RESULT_EXT.size)
    if not ext:
        return error, crc, None
    if len(ext) != RESULT_EXT.size:
        raise CopyError("the receiver's answer ends inside its extension")
    (namelen,) = RESULT_EXT.unpack(ext)
    if namelen > MAX_NAME:
        raise CopyError(f"the receiver's last name length {namelen} is over {MAX_NAME}")
    name = _read_up_to(answer, namelen)
    if len(name) != namelen:
        raise CopyError("the receiver's answer ends inside the last name")
    return error, crc, os.fsdecode(name.rstrip(b"\0"))


def _receiver_failed(error: int, last: str | None) -> CopyError:
    where = f" at {last!r}" if last else ""
    return CopyError(f"the receiver failed{where}: {os.strerror(error)}")


def send(paths: list[str], out: BinaryIO, answer: BinaryIO) -> tuple[int, int]:
    """Send the trees; return (files, bytes) after the receiver confirmed them."""
    crc = 0
    files = total = 0

    def put(data: bytes) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)
        out.write(data)

    try:
        for top in paths:
            top_path = Path(top)
            top_name = top_path.name or top_path.resolve().name
            for path, name, st, _closing in _walk(top_path, top_name):
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as source:
                        put(encode_header(name, st, st.st_size))
                        remaining = st.st_size
                        while remaining:
                            data = source.read(min(CHUNK, remaining))
                            if not data:
                                raise CopyError(f"{path}: file shrank while being sent")
                            put(data)
                            remaining -= len(data)
                    files += 1
                    total += st.st_size
                else:
                    put(encode_header(name, st, 0))
        put(END_OF_STREAM)
        out.flush()
    except BrokenPipeError:
        # The receiver gave up early; its answer (if any) says why.
        error, _crc, last = read_result(answer)
        raise _receiver_failed(error or errno.EPIPE, last) from None
    error, their_crc, last = read_result(answer)
    if error:
        raise _receiver_failed(error, last)
    if their_crc != crc:
        raise CopyError("checksum mismatch: the receiver got other bytes than were sent")
    return files, total


# ---------------------------------------------------------------------------------------
# Receiver


def _safe_name(raw: bytes) -> str:
    if not raw.endswith(b"\0") or b"\0" in raw[:-1]:
        raise CopyError("a name is not NUL-terminated (or holds a NUL)")
    name = os.fsdecode(raw[:-1])
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CopyError(f"unsafe name {name!r}")
    return name


def _check_parent(base: Path, name: str, made: set[str]) -> Path:
    """The target path, after checking that its parent is a real directory."""
    parent = name.rpartition("/")[0]
    if parent and parent not in made:
        parent_path = base / parent
        st = os.lstat(parent_path)  # raises if missing
        if not stat.S_ISDIR(st.st_mode):
            raise CopyError(f"{parent!r} is not a directory")
    return base / name


def encode_result(error: int, crc: int, last_name: bytes) -> bytes:
    """The receiver's answer: result header plus the last-name extension."""
    return RESULT.pack(error, 0, crc) + RESULT_EXT.pack(len(last_name)) + last_name


def receive(source: str, home: Path, stream: BinaryIO, out: BinaryIO) -> tuple[int, int]:
    """Unpack one transfer into home/QubesIncoming/SOURCE; return (files, bytes)."""
    if not _DOMAIN_RE.match(source):
        raise CopyError(f"invalid source domain name {source!r}")
    base = home / "QubesIncoming" / source
    base.mkdir(parents=True, exist_ok=True)
    reader = _CrcReader(stream)
    made: set[str] = set()
    files = total = 0
    error = 0
    last = b""
    try:
        while True:
            namelen, mode, length, atime, atime_ns, mtime, mtime_ns = HEADER.unpack(
                reader.read_exact(HEADER.size)
            )
            if namelen == 0:
                break
            if namelen > MAX_NAME:
                raise CopyError(f"name length {namelen} over {MAX_NAME}")
            name = _safe_name(reader.read_exact(namelen))
            last = os.fsencode(name)
            if atime_ns >= 1_000_000_000 or mtime_ns >= 1_000_000_000:
                raise CopyError(f"{name!r}: nanoseconds out of range")
            target = _check_parent(base, name, made)
            times = (atime * 1_000_000_000 + atime_ns, mtime * 1_000_000_000 + mtime_ns)
            if stat.S_ISDIR(mode):
                if length:
                    raise CopyError(f"directory {name!r} with content")
                if name in made:  # the closing header: final mode and times
                    os.chmod(target, stat.S_IMODE(mode) & 0o777)
                    os.utime(target, ns=times, follow_symlinks=False)
                else:
                    try:
                        os.mkdir(target, 0o700)
                    except FileExistsError:
                        if not stat.S_ISDIR(os.lstat(target).st_mode):
                            raise CopyError(f"{name!r} exists and is not a directory") from None
                    made.add(name)
            elif stat.S_ISREG(mode):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as sink:
                    remaining = length
                    while remaining:
                        data = reader.read_exact(min(CHUNK, remaining))
                        sink.write(data)
                        remaining -= len(data)
                os.chmod(target, stat.S_IMODE(mode) & 0o777)
                os.utime(target, ns=times, follow_symlinks=False)
                files += 1
                total += length
            else:
                raise CopyError(f"{name!r}: unsupported file type {stat.S_IFMT(mode):o}")
    except OSError as exc:
        error = exc.errno or errno.EIO
        raise CopyError(f"cannot write: {exc}") from exc
    except CopyError:
        error = errno.EINVAL
        raise
    finally:
        out.write(encode_result(error, reader.crc, last))
        out.flush()
    return files, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="qubes.Filecopy sender and receiver")
    sub = parser.add_subparsers(dest="mode", required=True)
    p_send = sub.add_parser("send", help="send trees to stdout (the local program)")
    p_send.add_argument("paths", nargs="+")
    sub.add_parser("receive", help="receive from stdin (the qubes.Filecopy service)")
    args = parser.parse_args(argv)
    try:
        if args.mode == "send":
            files, total = send(args.paths, sys.stdout.buffer, sys.stdin.buffer)
            print(f"qubes.Filecopy: sent {files} file(s), {total} byte(s)", file=sys.stderr)
        else:
            source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
            home = Path(os.environ.get("HOME") or os.path.expanduser("~"))
            files, total = receive(source, home, sys.stdin.buffer, sys.stdout.buffer)
            print(f"qubes.Filecopy: received {files} file(s), {total} byte(s) from {source}",
                  file=sys.stderr)  # fmt: skip
    except (CopyError, OSError) as exc:
        print(f"qubes.Filecopy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
