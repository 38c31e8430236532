"""Boot Xen under QEMU (TCG) and judge the run from the serial console's marker lines.

The QEMU settings are those of shared/reference/xen-in-qemu.md: TCG (KVM is not usable on
these machines), ``-cpu max,-smap`` (SMAP emulation crashes a PV dom0), and Xen booted with
``xsave=0`` (with XSAVE on, about one boot in eleven silently corrupted bulk data). QEMU
runs under ``timeout`` and its serial output is read through a pipe, copied to a log file
and parsed here; pass/fail is decided on the host, never inside the guest.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = re.compile(r"QXJ (\S+) ?(.*)$")
CHECK = re.compile(r"(\S+) (PASS|FAIL) ?(.*)$")


@dataclass
class BootResult:
    """What the markers of one boot said."""

    checks: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (verdict, text)
    integrity_failures: list[str] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    done: bool = False
    seconds: float = 0.0
    exit_code: int | None = None
    log_path: Path | None = None

    def failed_checks(self, expected: list[str]) -> list[str]:
        return [c for c in expected if self.checks.get(c, ("MISSING", ""))[0] != "PASS"]

    def only_integrity(self, expected: list[str]) -> bool:
        """True when every failed check failed on a hash mismatch (re-run allowed)."""
        failed = self.failed_checks(expected)
        return bool(failed) and self.done and set(failed) <= set(self.integrity_failures)


def qemu_command(
    xen: Path,
    dom0_kernel: Path,
    dom0_image: Path,
    *,
    memory_mib: int = 3072,
    dom0_mem: str = "1536M",
) -> list[str]:
    xen_args = (
        f"console=com1 com1=115200,8n1 dom0_mem={dom0_mem},max:{dom0_mem} "
        "dom0_max_vcpus=2 xsave=0 loglvl=warning guest_loglvl=warning"
    )
    dom0_args = "console=hvc0 earlyprintk=xen rdinit=/init role=dom0 quiet loglevel=4"
    for path in (xen, dom0_kernel, dom0_image):
        if "," in str(path):
            raise ValueError(f"QEMU's -initrd cannot take a path with a comma: {path}")
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max,-smap",
        "-m",
        str(memory_mib),
        "-smp",
        "2",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-nodefaults",
        "-kernel",
        str(xen),
        "-append",
        xen_args,
        "-initrd",
        f"{dom0_kernel} {dom0_args},{dom0_image}",
    ]


def parse_line(line: str, result: BootResult) -> str | None:
    """Record one serial line's marker; return a short progress text for the host log."""
    match = MARKER.search(line)
    if not match:
        return None
    kind, rest = match.group(1), match.group(2).strip()
    if kind == "CHECK":
        check = CHECK.match(rest)
        if check:
            result.checks[check.group(1)] = (check.group(2), check.group(3))
            return f"check {check.group(1)}: {check.group(2)} {check.group(3)}"
    elif kind == "INTEGRITY-FAIL":
        result.integrity_failures.append(rest.split(" ", 1)[0])
        return f"INTEGRITY FAILURE: {rest}"
    elif kind == "METRIC":
        parts = rest.split(" ", 1)
        if len(parts) == 2:
            result.metrics[parts[0]] = parts[1]
        return f"metric {rest}"
    elif kind == "ERROR":
        result.errors.append(rest)
        return f"guest error: {rest}"
    elif kind == "DONE":
        result.done = True
        return f"guest done ({rest})"
    return f"{kind.lower()} {rest}"


def boot(
    command: list[str], log_path: Path, timeout: float, *, started_at: float | None = None
) -> BootResult:
    """Run QEMU under ``timeout``; stream and parse its serial console."""
    result = BootResult(log_path=log_path)
    begin = started_at or time.monotonic()
    full = ["timeout", "--kill-after=10", str(int(timeout)), *command]
    with (
        log_path.open("w", encoding="utf-8", errors="replace", buffering=1) as log,
        subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as proc,
    ):
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            log.write(line + "\n")
            progress = parse_line(line, result)
            if progress:
                print(f"  [{time.monotonic() - begin:6.1f}s] {progress}", flush=True)
        result.exit_code = proc.wait()
    result.seconds = time.monotonic() - begin
    if result.exit_code == 124:
        result.errors.append(f"QEMU timed out after {timeout:.0f}s (see {log_path})")
    sys.stdout.flush()
    return result
