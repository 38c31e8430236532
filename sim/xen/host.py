"""Host-side preparation of the real-Xen job: packages, kernel/hypervisor, root filesystem.

Everything comes from Debian packages through the host's own apt configuration (the job
needs no other network). Results are cached in the work directory under names that carry
a hash of their inputs, so a re-run reuses them and a change of input rebuilds them; a
fresh machine builds everything.

Why the hypervisor version is taken from the root filesystem: debootstrap installs the
Xen tools of the base suite (bookworm) while the host's apt would pick the newer security
update for the hypervisor; Xen's tools and hypervisor must match, so we download the
hypervisor package of exactly the tools' version.

Does not boot anything (see :mod:`qrexec.sim.xen.boot`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: qemu/debootstrap/cpio build and boot the images; the Xen libraries let the host run
#: the binding's error-path tests (pytest -m xen tests/xen) after the job.
HOST_PACKAGES = ("qemu-system-x86", "debootstrap", "cpio", "libxenmisc4.17", "libxenstore4")
SUITE = "bookworm"
#: Packages of the guests' root filesystem (python3-ply: debootstrap does not resolve the
#: virtual package python3-pycparser needs, see shared/reference/xen-in-qemu.md).
GUEST_PACKAGES = (
    "xen-utils-4.17",
    "xenstore-utils",
    "python3",
    "python3-cffi",
    "python3-ply",
    "python3-pytest",
    "busybox",
    "kmod",
    "procps",
)
#: Bump when the way the root filesystem is made changes (invalidates the cache).
ROOTFS_RECIPE = "3"
APT_LOCK = ("-o", "DPkg::Lock::Timeout=300")


class JobError(Exception):
    """The job cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class KernelFiles:
    version: str  # e.g. 6.1.0-56-amd64
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<version>


def run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    capture: bool = False,
) -> str:
    """Run a command; raise JobError with its output tail on failure."""
    log.debug("$ %s", " ".join(cmd))
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if not capture else subprocess.PIPE,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout or "")[-3000:] + (proc.stderr or "")[-2000:]
        raise JobError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout or ""


def preflight(work: Path) -> None:
    """Fail early and clearly when this machine cannot run the job."""
    if os.geteuid() != 0:
        raise JobError("the real-Xen job must run as root (apt-get, debootstrap, chroot)")
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        raise JobError("the real-Xen job needs a Debian host with apt (bookworm packages)")
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 3 * 1024**3:
        raise JobError(f"not enough disk space in {work}: {free // 2**20} MiB free, need 3 GiB")
    meminfo = Path("/proc/meminfo").read_text()
    match = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    if match and int(match.group(1)) < 4 * 1024 * 1024:
        raise JobError(
            f"not enough memory: {int(match.group(1)) // 1024} MiB available, the emulated "
            "Xen machine needs about 4 GiB"
        )


def dpkg_installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], text=True, capture_output=True, check=False
    )
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def ensure_host_packages() -> None:
    """Install the host packages the job needs (no-op when present)."""
    missing = [p for p in HOST_PACKAGES if not dpkg_installed(p)]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lists = list(Path("/var/lib/apt/lists").glob("*_Packages*"))
    if missing or not lists or not _apt_knows("xen-hypervisor-4.17-amd64"):
        run(["apt-get", *APT_LOCK, "update", "-q"], env=env)
    if not missing:
        return
    run(["apt-get", *APT_LOCK, "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    if shutil.which("qemu-system-x86_64") is None:
        raise JobError("qemu-system-x86_64 is still missing after installing qemu-system-x86")


def _apt_knows(package: str) -> bool:
    proc = subprocess.run(
        ["apt-cache", "madison", package], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and package in proc.stdout


def debian_mirror() -> str:
    """The Debian mirror the host's apt uses for the base suite."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for block in sources.read_text().split("\n\n"):
            if re.search(rf"^Suites:.*\b{SUITE}\b", block, re.M) and "security" not in block:
                match = re.search(r"^URIs:\s*(\S+)", block, re.M)
                if match:
                    return match.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and fields[2] == SUITE:
                return fields[1]
    return "http://deb.debian.org/debian"


def _download(package: str, version: str | None, dest: Path) -> Path:
    """``apt-get download`` one package into ``dest`` (cached by file name)."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{package}={version}" if version else package
    existing = sorted(dest.glob(f"{package}_*.deb"))
    if version:
        wanted = version.replace(":", "%3a")
        existing = [p for p in existing if f"_{wanted}_" in p.name]
    if existing:
        return existing[-1]
    run(["apt-get", *APT_LOCK, "download", "-q", spec], cwd=dest)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise JobError(f"apt-get download {spec} produced no .deb in {dest}")
    return found[-1]


def kernel_package_name() -> str:
    out = run(["apt-cache", "depends", "linux-image-amd64"])
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", out)
    if not match:
        raise JobError(f"cannot resolve the kernel package of linux-image-amd64:\n{out}")
    return match.group(1)


def fetch_kernel(work: Path) -> KernelFiles:
    """Download and unpack Debian's kernel (PV dom0 and domU capable)."""
    package = kernel_package_name()
    deb = _download(package, None, work / "debs")
    unpacked = work / f"unpacked-{deb.stem}"
    if not (unpacked / ".complete").exists():
        shutil.rmtree(unpacked, ignore_errors=True)
        run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        (unpacked / ".complete").touch()
    vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise JobError(f"no vmlinuz in {deb}")
    version = vmlinuz[0].name.removeprefix("vmlinuz-")
    return KernelFiles(version, vmlinuz[0], unpacked / "lib" / "modules" / version)


def fetch_hypervisor(work: Path, version: str) -> Path:
    """Download the hypervisor package of ``version``; return the uncompressed ELF."""
    deb = _download("xen-hypervisor-4.17-amd64", version, work / "debs")
    unpacked = work / f"unpacked-{deb.stem}"
    elf = unpacked / "xen.elf"
    if not elf.exists():
        shutil.rmtree(unpacked, ignore_errors=True)
        run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        gz = sorted((unpacked / "boot").glob("xen-*-amd64.gz"))
        if not gz:
            raise JobError(f"no /boot/xen-*.gz in {deb}")
        import gzip

        tmp = elf.with_suffix(".tmp")
        tmp.write_bytes(gzip.decompress(gz[0].read_bytes()))
        tmp.rename(elf)
    return elf


def rootfs_key(kernel: KernelFiles, mirror: str) -> str:
    text = "\n".join([ROOTFS_RECIPE, SUITE, mirror, kernel.version, *GUEST_PACKAGES])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_rootfs(work: Path, kernel: KernelFiles) -> Path:
    """debootstrap the guests' root filesystem with the kernel's Xen modules (cached)."""
    mirror = debian_mirror()
    root = work / f"rootfs-{rootfs_key(kernel, mirror)}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for stale in work.glob("rootfs-*"):
        shutil.rmtree(stale, ignore_errors=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(GUEST_PACKAGES)}",
            SUITE,
            str(root),
            mirror,
        ]
    )
    target = root / "lib" / "modules" / kernel.version / "kernel" / "drivers"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        kernel.modules_dir / "kernel" / "drivers" / "xen", target / "xen", dirs_exist_ok=True
    )
    for meta in kernel.modules_dir.glob("modules.*"):
        shutil.copy2(meta, root / "lib" / "modules" / kernel.version / meta.name)
    run(["chroot", str(root), "depmod", kernel.version])
    (root / ".complete").write_text(kernel.version + "\n")
    return root


def installed_version(root: Path, package: str) -> str:
    """Version of a package installed in a chroot (from its dpkg status file)."""
    status = (root / "var" / "lib" / "dpkg" / "status").read_text()
    for block in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", block, re.M):
            match = re.search(r"^Version: (\S+)$", block, re.M)
            if match:
                return match.group(1)
    raise JobError(f"{package} is not installed in {root}")
