"""Qubes' own C qrexec programs (R4.3), built on the unix-socket vchan, as a reference peer.

The interop and differential tests and the benchmarks run the same calls through these
programs and through ours. The source is not part of this project: it lives in
``shared/reference/c-peer/`` beside the project's folder (or wherever ``QREXEC_CPEER_SRC``
points), and its ``build.sh`` compiles it in a few seconds. This module only finds that
source, builds it once into a cache folder keyed by the source's content, and says where the
programs are. It never copies or changes the C code, and it does not run the programs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from qrexec.errors import QrexecError

#: The programs build.sh leaves in ``OUT/bin``.
PROGRAMS = (
    "qrexec-agent",
    "qrexec-client-vm",
    "qrexec-daemon",
    "qrexec-client",
    "qrexec-fork-server",
)

#: What build.sh needs on the machine (Debian package names, for the error message).
BUILD_DEPENDENCIES = ("gcc", "make", "pkg-config", "libpam0g-dev")


class CPeerUnavailable(QrexecError):
    """The C reference programs cannot be built here (no source, or no compiler)."""


def source_dir() -> Path:
    """Where the C programs' source and ``build.sh`` are.

    ``QREXEC_CPEER_SRC`` wins; otherwise the first ``shared/reference/c-peer`` found beside
    the project's folder or one of its parents (where the workplace, its worktrees and CI's
    clone lay it), then beside the current folder or one of its parents (a regular install
    lives in site-packages, far from the checkout it was built from).
    """
    override = os.environ.get("QREXEC_CPEER_SRC")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent.parent
    for folder in (*here.parents, *Path.cwd().resolve().parents, Path.cwd().resolve()):
        candidate = folder / "shared" / "reference" / "c-peer"
        if (candidate / "build.sh").is_file():
            return candidate
    return here.parent / "shared" / "reference" / "c-peer"


def _fingerprint(src: Path) -> str:
    """A hash of every file's path and content, so an edited source gets a new build."""
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink()):
        digest.update(str(path.relative_to(src)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """``QREXEC_CPEER_CACHE``, else ``$XDG_CACHE_HOME/qrexec-py`` (``~/.cache/qrexec-py``)."""
    override = os.environ.get("QREXEC_CPEER_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "qrexec-py"


def build(src: Path | None = None, cache: Path | None = None) -> Path:
    """Build the C programs (once per source content) and return their ``bin`` folder.

    Safe to call from several processes at once (pytest-xdist workers): the build runs under
    an exclusive lock on the cache folder, and a complete earlier build is reused.
    Raises :class:`CPeerUnavailable` with the reason when the source or a tool is missing.
    """
    src = source_dir() if src is None else src
    if not (src / "build.sh").is_file():
        raise CPeerUnavailable(f"no C reference source at {src} (set QREXEC_CPEER_SRC)")
    missing = [tool for tool in ("gcc", "make", "pkg-config") if shutil.which(tool) is None]
    if missing:
        raise CPeerUnavailable(
            f"cannot build the C reference programs: missing {', '.join(missing)} "
            f"(Debian: apt-get install {' '.join(BUILD_DEPENDENCIES)})"
        )
    root = (cache_root() if cache is None else cache).resolve()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"c-peer-{_fingerprint(src)}"
    bindir = out / "bin"
    with open(root / "c-peer.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((bindir / name).exists() for name in PROGRAMS):
            return bindir
        result = subprocess.run(
            ["bash", str(src / "build.sh"), str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not all((bindir / n).exists() for n in PROGRAMS):
            raise CPeerUnavailable(
                f"building the C reference programs failed (exit {result.returncode}; "
                f"needs {', '.join(BUILD_DEPENDENCIES)}):\n{result.stderr[-2000:]}"
            )
    return bindir


def program(name: str, bindir: Path) -> Path:
    """The path of one C program in a built ``bin`` folder."""
    if name not in PROGRAMS:
        raise ValueError(f"unknown C program {name!r}; one of {', '.join(PROGRAMS)}")
    return bindir / name
