"""Build the guests' initramfs images (uncompressed ``newc`` cpio) for the real-Xen job.

Each image is the concatenation of a *base* archive, made once per root filesystem and
cached, and a small *overlay* archive made on every run (this project's package, the guest
``/init``, the job's configuration). The kernel unpacks concatenated archives in order, so
the overlay's files land on top of the base. Why uncompressed: decompressing under TCG
costs more than loading the larger file.

* domU image: the root filesystem without docs, locales, apt lists, perl and Xen's tools.
* dom0 image: the root filesystem with Xen's tools, plus the domU kernel and domU image.

Does no booting and no downloading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

from qrexec.sim.xen.host import JobError

COMMON_EXCLUDES = (
    "./.complete",
    "./usr/share/doc",
    "./usr/share/man",
    "./usr/share/info",
    "./usr/share/locale",
    "./usr/share/i18n",
    "./usr/share/zoneinfo",
    "./var/lib/apt/lists",
    "./var/cache/apt",
    "./usr/lib/udev",
    "./usr/lib/x86_64-linux-gnu/gconv",
    "./boot",
)
DOMU_EXCLUDES = (
    "./usr/lib/xen-4.17",
    "./usr/share/perl",
    "./usr/share/perl5",
    "./usr/lib/x86_64-linux-gnu/perl",
    "./usr/lib/x86_64-linux-gnu/perl-base",
    "./usr/lib/x86_64-linux-gnu/perl5",
    "./usr/share/qemu",
    "./usr/lib/x86_64-linux-gnu/xenfsimage",
    "./usr/bin/perl",
    "./usr/bin/perl5.36.0",
)
#: Where the project lives inside the guests.
GUEST_PROJECT_DIR = "opt/qrexec-py"
GUEST_CONFIG = "etc/qrexec-xen/job.json"
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the repository (qrexec/, backends/, sim/)


def _walk(root: Path, excludes: Iterable[str]) -> Iterator[str]:
    """Relative paths ('./x') under root in cpio order, pruning excluded subtrees."""
    skip = set(excludes)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = "." + dirpath[len(str(root)) :]
        if rel_dir in skip:
            dirnames[:] = []
            continue
        yield rel_dir
        kept = []
        for name in sorted(dirnames):
            rel = f"{rel_dir}/{name}"
            if rel in skip:
                continue
            if os.path.islink(os.path.join(dirpath, name)):
                yield rel  # symlinked directory: archive the link, do not descend
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}"
            if rel not in skip:
                yield rel


def write_cpio(root: Path, out: Path, excludes: Iterable[str] = ()) -> None:
    """Archive ``root`` as newc cpio into ``out`` (owned by root, as the guest needs)."""
    names = "\n".join(_walk(root, excludes)) + "\n"
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as sink:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=root,
            input=names.encode(),
            stdout=sink,
            stderr=subprocess.PIPE,
            check=False,
        )
    if proc.returncode != 0:
        raise JobError(f"cpio of {root} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    tmp.rename(out)


def base_images(work: Path, rootfs: Path) -> tuple[Path, Path]:
    """The cached (dom0, domU) base archives of a root filesystem."""
    recipe = hashlib.sha256(repr((COMMON_EXCLUDES, DOMU_EXCLUDES)).encode()).hexdigest()[:8]
    dom0 = work / f"{rootfs.name}.{recipe}.dom0-base.cpio"
    domu = work / f"{rootfs.name}.{recipe}.domu-base.cpio"
    for stale in work.glob("rootfs-*.cpio"):
        if stale not in (dom0, domu):
            stale.unlink()
    if not dom0.exists():
        write_cpio(rootfs, dom0, COMMON_EXCLUDES)
    if not domu.exists():
        write_cpio(rootfs, domu, COMMON_EXCLUDES + DOMU_EXCLUDES)
    return dom0, domu


def _copy_project(dest: Path) -> None:
    """Copy the qrexec package with symlinks (backends/, sim/) resolved, minus caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache")
    shutil.copytree(PACKAGE_DIR / "qrexec", dest / "qrexec", symlinks=False, ignore=ignore)
    tests = PACKAGE_DIR / "tests"
    if tests.is_dir():
        shutil.copytree(tests, dest / "tests", symlinks=False, ignore=ignore)


def console_scripts() -> dict[str, str]:
    """name -> 'module:function' from pyproject.toml's [project.scripts]."""
    data = tomllib.loads((PACKAGE_DIR / "pyproject.toml").read_text())
    scripts = data.get("project", {}).get("scripts", {})
    return {str(k): str(v) for k, v in scripts.items()}


def script_files() -> list[Path]:
    """The plain scripts pyproject.toml installs ([tool.setuptools] script-files)."""
    data = tomllib.loads((PACKAGE_DIR / "pyproject.toml").read_text())
    files = data.get("tool", {}).get("setuptools", {}).get("script-files", [])
    return [PACKAGE_DIR / str(name) for name in files]


def _write_scripts(bin_dir: Path) -> None:
    """Console-script wrappers like pip would make, pointing at the copied package."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in console_scripts().items():
        module, _, func = target.partition(":")
        script = bin_dir / name
        script.write_text(
            "#!/usr/bin/python3\n"
            "import sys\n"
            f"sys.path.insert(0, '/{GUEST_PROJECT_DIR}')\n"
            f"from {module} import {func.split('.')[0]} as _entry\n"
            f"sys.exit(_entry{''.join('.' + p for p in func.split('.')[1:])}())\n"
        )
        script.chmod(0o755)
    # The per-call clients are plain scripts (pyproject's script-files): the same text,
    # pointed at the copied package.
    for source in script_files():
        lines = source.read_text().splitlines(keepends=True)
        script = bin_dir / source.name
        script.write_text(
            "#!/usr/bin/python3\n"
            "import sys\n"
            f"sys.path.insert(0, '/{GUEST_PROJECT_DIR}')\n" + "".join(lines[1:])
        )
        script.chmod(0o755)


def build_overlay(
    stage: Path, *, role_config: dict[str, object], extra_files: dict[str, Path] | None = None
) -> None:
    """Fill ``stage`` with /init, the project, the scripts and the job configuration."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    init = stage / "init"
    shutil.copy2(Path(__file__).with_name("guest_init.sh"), init)
    init.chmod(0o755)
    _copy_project(stage / GUEST_PROJECT_DIR)
    # Byte-compile now (same 3.11 bytecode as the guests' python3): saves each short-lived
    # program under emulation from compiling its imports again.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(stage / GUEST_PROJECT_DIR)],
        check=False,
        stdout=subprocess.DEVNULL,
    )
    _write_scripts(stage / "usr" / "local" / "bin")
    config = stage / GUEST_CONFIG
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(role_config, indent=1, sort_keys=True))
    for rel, src in (extra_files or {}).items():
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)


def concatenate(parts: Iterable[Path], out: Path) -> str:
    """Write the concatenation of cpio archives to ``out``; return its sha256 (short)."""
    digest = hashlib.sha256()
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
    tmp.rename(out)
    return digest.hexdigest()[:16]


def build_images(
    work: Path, rootfs: Path, domu_kernel: Path, config: dict[str, object]
) -> tuple[Path, Path]:
    """Build this run's (dom0, domU) images; return their paths."""
    dom0_base, domu_base = base_images(work, rootfs)
    run_dir = work / "run"
    run_dir.mkdir(exist_ok=True)
    domu_overlay_dir = run_dir / "overlay-domu"
    build_overlay(domu_overlay_dir, role_config=config)
    domu_overlay = run_dir / "overlay-domu.cpio"
    write_cpio(domu_overlay_dir, domu_overlay)
    domu_image = run_dir / "domu.cpio"
    concatenate([domu_base, domu_overlay], domu_image)

    dom0_overlay_dir = run_dir / "overlay-dom0"
    build_overlay(
        dom0_overlay_dir,
        role_config=config,
        extra_files={"boot/domu-vmlinuz": domu_kernel, "boot/domu.cpio": domu_image},
    )
    dom0_overlay = run_dir / "overlay-dom0.cpio"
    write_cpio(dom0_overlay_dir, dom0_overlay)
    dom0_image = run_dir / "dom0.cpio"
    concatenate([dom0_base, dom0_overlay], dom0_image)
    return dom0_image, domu_image
