"""The real-Xen job: build Debian-based dom0/domU images, boot Xen under QEMU, check qrexec.

Run as root on a Debian bookworm machine (fresh or not)::

    python3 -m qrexec.sim.xen            # or: sim/xen/run-job

Stages (each prints its wall time): preflight, host packages, kernel, root filesystem
(debootstrap, cached), hypervisor, images, boot. Downloads and the root filesystem are
cached in the work directory (``--work-dir``, default ``/var/cache/qrexec-xen-job``) under
names keyed by their inputs. The boot is re-run once, loudly, only when every failed check
failed on a hash mismatch (the emulation's known data-corruption mode); a repeat fails.
Exit status: 0 all checks passed, 1 a check failed, 2 the machine cannot run the job.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qrexec.sim.xen import boot, host, images

log = logging.getLogger(__name__)

RAW_CHECKS = [
    "vchan-identity",
    "vchan-blocking",
    "vchan-async",
    "conformance-blocking",
    "conformance-asyncio",
    "conformance-domu-server-blocking",
    "conformance-domu-server-asyncio",
]
QREXEC_CHECKS = [
    "qrexec-setup",
    "qrexec-dom0-to-vm",
    "qrexec-vm-to-dom0",
    "qrexec-test-add",
    "qrexec-bulk",
    "qrexec-refused",
    "qrexec-latency",
]
LAST_CHECKS = ["vchan-peer-death"]  # destroys vm2, so it runs last
ALL_CHECKS = RAW_CHECKS + QREXEC_CHECKS + LAST_CHECKS
#: The default list: every check whose programs exist in this build.
DEFAULT_CHECKS = ALL_CHECKS


class StageClock:
    """Prints and records the wall time of each stage."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self.start = time.monotonic()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"== xen job: {name}", flush=True)
        began = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - began
            self.times.append((name, took))
            print(f"== xen job: {name} took {took:.1f}s", flush=True)

    def summary(self) -> str:
        rows = [f"  {name:<24} {secs:7.1f}s" for name, secs in self.times]
        rows.append(f"  {'total':<24} {time.monotonic() - self.start:7.1f}s")
        return "\n".join(rows)


def domu_steps(checks: list[str]) -> dict[str, list[str]]:
    """What each domU does, in order, for the chosen checks."""
    vm1: list[str] = ["services"]
    vm2: list[str] = ["services"]
    if "vchan-blocking" in checks:
        vm1.append("raw-blocking")
    if "vchan-async" in checks:
        vm1.append("raw-async")
    vm1 += [c for c in checks if c.startswith("conformance-")]
    if any(c.startswith("qrexec-") for c in checks):
        vm1.append("agent")
        vm2.append("agent")
    if "vchan-peer-death" in checks:
        vm2.append("hold")
    return {"vm1": vm1, "vm2": vm2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m qrexec.sim.xen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/var/cache/qrexec-xen-job"))
    parser.add_argument(
        "--checks",
        default="default",
        help=f"comma list, 'default' or 'all' (choices: {', '.join(ALL_CHECKS)})",
    )
    parser.add_argument("--bulk-mib", type=int, default=32, help="bulk size each way (MiB)")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per boot")
    parser.add_argument("--check-timeout", type=float, default=420, help="seconds per check")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def choose_checks(spec: str) -> list[str]:
    if spec == "default":
        return list(DEFAULT_CHECKS)
    if spec == "all":
        return list(ALL_CHECKS)
    chosen = [c for c in spec.split(",") if c]
    unknown = sorted(set(chosen) - set(ALL_CHECKS))
    if unknown:
        raise host.JobError(f"unknown checks: {', '.join(unknown)}")
    return [c for c in ALL_CHECKS if c in chosen]  # run order is fixed


def run_job(args: argparse.Namespace, clock: StageClock) -> int:
    checks = choose_checks(args.checks)
    work: Path = args.work_dir
    with clock.stage("preflight"):
        host.preflight(work)
    with clock.stage("host packages"):
        host.ensure_host_packages()
    with clock.stage("kernel"):
        kernel = host.fetch_kernel(work)
    with clock.stage("root filesystem"):
        rootfs = host.build_rootfs(work, kernel)
    with clock.stage("hypervisor"):
        xen = host.fetch_hypervisor(work, host.installed_version(rootfs, "xen-utils-4.17"))
    config: dict[str, object] = {
        "checks": checks,
        "bulk_bytes": args.bulk_mib << 20,
        "domus": ["vm1", "vm2"],
        "domu_steps": domu_steps(checks),
        "debug": bool(args.verbose),
        "check_timeout": args.check_timeout,
    }
    with clock.stage("images"):
        dom0_image, _ = images.build_images(work, rootfs, kernel.vmlinuz, config)
    command = boot.qemu_command(xen, kernel.vmlinuz, dom0_image)
    print(f"checks: {', '.join(checks)}", flush=True)
    attempts = 0
    while True:
        attempts += 1
        with clock.stage(f"boot {attempts}"):
            result = boot.boot(command, work / f"serial-{attempts}.log", args.timeout)
        failed = result.failed_checks(checks)
        if not failed and result.done and not result.errors:
            break
        if attempts == 1 and result.only_integrity(checks):
            print(
                "!" * 72 + "\n!! INTEGRITY FAILURE (hash mismatch) in checks "
                f"{', '.join(failed)}: re-running the boot ONCE.\n!! A repeat fails the "
                "job. See " + str(result.log_path) + "\n" + "!" * 72,
                flush=True,
            )
            continue
        break
    report(result, checks, attempts)
    return 0 if not result.failed_checks(checks) and result.done and not result.errors else 1


def report(result: boot.BootResult, checks: list[str], attempts: int) -> None:
    print("== xen job: results", flush=True)
    for name in checks:
        verdict, text = result.checks.get(name, ("MISSING", "no marker in the serial log"))
        print(f"  {verdict:<7} {name}: {text}")
    for name, value in sorted(result.metrics.items()):
        print(f"  metric  {name}: {value}")
    for error in result.errors:
        print(f"  error   {error}")
    if not result.done:
        print(f"  error   the guest never printed DONE (QEMU exit {result.exit_code})")
    print(f"  boots: {attempts} ({attempts - 1} re-run after an integrity failure)")
    print(f"  serial log: {result.log_path}")
    passed = len(checks) - len(result.failed_checks(checks))
    print(f"xen job: {passed} passed, {len(checks) - passed} failed", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    clock = StageClock()
    try:
        code = run_job(args, clock)
    except host.JobError as exc:
        print(f"xen job: CANNOT RUN: {exc}", file=sys.stderr, flush=True)
        code = 2
    print("== xen job: wall time per stage\n" + clock.summary(), flush=True)
    return code
