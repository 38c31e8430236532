"""The real-Xen job's driver in dom0: starts the domUs, runs the checks, prints markers.

Runs inside the emulated dom0 (started by the guest ``/init`` once xenstored, xen-init-dom0
and xenconsoled are up). The checks to run come from the job configuration in the order
given; each prints ``QXJ CHECK <name> PASS|FAIL ...``. Raw vchan checks are here; the
checks through the qrexec programs are in :mod:`qrexec.sim.xen.guest_qrexec`. At the end
the domUs' console logs are copied to the serial console (for diagnosis), the domains are
destroyed and ``QXJ DONE`` is printed.
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qrexec.backends.vchan import VchanBackend
from qrexec.backends.vchan_ring import vchan_path
from qrexec.backends.xenstore import XenStore
from qrexec.errors import TransportBroken, TransportError
from qrexec.sim.xen import guest_common as gc
from qrexec.sim.xen import guest_conformance, guest_qrexec
from qrexec.sim.xen.guest_common import CheckFailed, IntegrityFailed
from qrexec.sim.xen.guest_domu import PORT_ASYNC, PORT_BLOCKING, PORT_HOLD


def xl(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        ["xl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise CheckFailed(f"xl {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


class Dom0Job:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.total = int(config.get("bulk_bytes", 32 << 20))
        self.backend = VchanBackend()
        self.domids: dict[str, int] = {}
        self.qrexec = guest_qrexec.QrexecChecks(self)

    # -- domains ---------------------------------------------------------------------

    def create_domains(self) -> None:
        for name in self.config.get("domus", ["vm1", "vm2"]):
            cfg = Path(f"/run/xen-job/{name}.cfg")
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(
                f'name = "{name}"\ntype = "pv"\nkernel = "/boot/domu-vmlinuz"\n'
                f'ramdisk = "/boot/domu.cpio"\n'
                f'extra = "console=hvc0 rdinit=/init role=domu quiet"\n'
                f"memory = {int(self.config.get('domu_memory', 512))}\nvcpus = 1\n"
                'on_crash = "preserve"\n'
            )
            started = time.monotonic()
            xl("create", str(cfg), timeout=300)
            self.domids[name] = int(xl("domid", name).strip())
            gc.marker("METRIC", f"xl-create-{name}", f"{time.monotonic() - started:.1f}", "s")
        gc.marker("DOMAINS", " ".join(f"{n}={d}" for n, d in self.domids.items()))

    def follow_consoles(self) -> None:
        """Copy the domUs' console logs to our console as they grow (diagnosis only)."""

        def follow() -> None:
            offsets: dict[Path, int] = {}
            while True:
                for log in sorted(Path("/var/log/xen/console").glob("guest-*.log")):
                    name = log.stem.removeprefix("guest-")
                    with log.open("rb") as f:
                        f.seek(offsets.get(log, 0))
                        data = f.read()
                    cut = data.rfind(b"\n") + 1
                    offsets[log] = offsets.get(log, 0) + cut
                    for line in data[:cut].decode(errors="replace").splitlines():
                        print(f"[{name}] {line}", flush=True)
                time.sleep(0.5)

        threading.Thread(target=follow, daemon=True).start()

    def dump_consoles(self) -> None:
        for extra in sorted(Path("/var/log/qubes").glob("*.log")):
            for line in extra.read_text(errors="replace").splitlines()[-80:]:
                print(f"[dom0 {extra.name}] {line}", flush=True)

    # -- raw vchan checks ----------------------------------------------------------------

    def check_vchan_identity(self) -> str:
        if self.backend.own_domain != 0:
            raise CheckFailed(f"own domid from xenstore is {self.backend.own_domain}")
        with XenStore() as xs:
            domains = xs.list_domains()
            for name, domid in self.domids.items():
                if xs.domid_of(name) != domid or domains.get(domid) != name:
                    raise CheckFailed(f"xenstore name/id mismatch for {name}: {domains}")
        try:
            self.backend.listen(0, 9999)
        except TransportError as exc:
            if "loopback" not in str(exc):
                raise CheckFailed(f"loopback refused with an unexpected error: {exc}") from exc
        else:
            raise CheckFailed("loopback vchan was not refused")
        return f"domid 0, names {sorted(self.domids)}, loopback refused"

    def check_vchan_blocking(self) -> str:
        vm1 = self.domids["vm1"]
        listener = self.backend.listen(vm1, PORT_BLOCKING)
        stream = listener.accept(timeout=300)
        with XenStore() as xs:
            leftover = xs.read(vchan_path(0, vm1, PORT_BLOCKING) + "/event-channel")
        try:
            verdict = gc.exchange_blocking(stream, self.total, seed_out=1, seed_in=2)
            peer = gc.Verdict.from_line(gc.recv_line_blocking(stream))
            rtt = gc.ping_pong_blocking(stream, 200, initiator=True)
            stream.send(b"bye\n")
        finally:
            stream.close()
        self._judge("vchan-blocking", verdict, peer)
        if leftover is not None:
            raise CheckFailed("server did not remove its xenstore node after connect")
        rate = 2 * self.total / max(verdict.seconds, 1e-9) / 1e6
        gc.marker("METRIC", "vchan-blocking-throughput", f"{rate:.1f}", "MB/s")
        gc.marker("METRIC", "vchan-roundtrip", f"{rtt * 1e3:.2f}", "ms")
        return f"2x{self.total >> 20} MiB sha256 ok, {rate:.1f} MB/s, rtt {rtt * 1e3:.2f} ms"

    def check_vchan_async(self) -> str:
        vm1 = self.domids["vm1"]

        async def run() -> tuple[gc.Verdict, gc.Verdict]:
            stream = await self.backend.connect_async(vm1, PORT_ASYNC, timeout=300)
            try:
                verdict = await gc.exchange_async(stream, self.total, seed_out=3, seed_in=4)
                peer = gc.Verdict.from_line(await gc.recv_line_async(stream))
                await stream.send(b"bye\n")
            finally:
                await stream.aclose()
            return verdict, peer

        verdict, peer = asyncio.run(run())
        self._judge("vchan-async", verdict, peer)
        rate = 2 * self.total / max(verdict.seconds, 1e-9) / 1e6
        gc.marker("METRIC", "vchan-async-throughput", f"{rate:.1f}", "MB/s")
        return f"2x{self.total >> 20} MiB sha256 ok (domU server), {rate:.1f} MB/s"

    def conformance(self, name: str) -> str:
        """dom0's half of a conformance run; vm1 runs the other (see guest_conformance)."""
        vm1 = self.domids["vm1"]
        run = guest_conformance.RUNS[name]
        side = "a" if run.domu_side == "b" else "b"
        timeout = float(self.config.get("check_timeout", CHECK_TIMEOUT)) - 10
        rc, mine, failed = guest_conformance.run_half(name, side, vm1, timeout)
        node = f"/local/domain/{vm1}/{guest_conformance.RESULT_NODE}/{name}"
        deadline = time.monotonic() + 60
        with XenStore() as xs:
            while (theirs := xs.read(node)) is None and time.monotonic() < deadline:
                time.sleep(0.5)
        peer = theirs.decode(errors="replace").strip() if theirs else "vm1 reported nothing"
        if rc != 0 or not peer.startswith("rc=0 "):
            raise CheckFailed(f"dom0 side {side}: {mine} {failed} (rc={rc}); vm1: {peer}")
        return (
            f"{run.face} face, server in {'dom0' if side == 'a' else 'vm1'}: dom0 {mine}; "
            f"vm1 {peer.removeprefix('rc=0 ')}"
        )

    def check_vchan_peer_death(self) -> str:
        vm2 = self.domids["vm2"]
        stream = self.backend.listen(vm2, PORT_HOLD).accept(timeout=300)
        if stream.recv(64) != b"holding\n":
            raise CheckFailed("vm2 did not say it holds the stream")
        xl("destroy", "vm2")
        del self.domids["vm2"]
        started = time.monotonic()
        end = stream.recv(64)
        noticed = time.monotonic() - started
        if end != b"":
            raise CheckFailed(f"recv after peer death returned {end!r}, not end of stream")
        try:
            stream.send(b"x")
        except TransportBroken:
            pass
        else:
            raise CheckFailed("send to a dead domain did not raise TransportBroken")
        finally:
            stream.close()
        return f"end of stream {noticed:.1f}s after xl destroy, send raised TransportBroken"

    def _judge(self, what: str, mine: gc.Verdict, peer: gc.Verdict) -> None:
        if not mine.digest_ok or not peer.digest_ok:
            raise IntegrityFailed(
                f"{what}: sha256 mismatch (dom0 ok={mine.digest_ok}, domU ok={peer.digest_ok})"
            )
        if not mine.ok or not peer.ok:
            raise CheckFailed(f"{what}: dom0: {mine.error or 'ok'}; domU: {peer.error or 'ok'}")

    # -- running -----------------------------------------------------------------------

    def checks(self) -> dict[str, Callable[[], str]]:
        table: dict[str, Callable[[], str]] = {
            "vchan-identity": self.check_vchan_identity,
            "vchan-blocking": self.check_vchan_blocking,
            "vchan-async": self.check_vchan_async,
            "vchan-peer-death": self.check_vchan_peer_death,
        }
        for name in guest_conformance.RUNS:
            table[name] = functools.partial(self.conformance, name)
        table.update(self.qrexec.table())
        return table

    def run(self) -> None:
        table = self.checks()
        for name in self.config["checks"]:
            started = time.monotonic()
            check = table.get(name)
            try:
                if check is None:
                    raise CheckFailed("no such check in this driver")
                detail = run_with_timeout(
                    check, float(self.config.get("check_timeout", CHECK_TIMEOUT))
                )
            except IntegrityFailed as exc:
                gc.marker("INTEGRITY-FAIL", name, exc)
                gc.marker("CHECK", name, "FAIL", exc)
            except Exception as exc:
                traceback.print_exc(file=sys.stdout)
                gc.marker("CHECK", name, "FAIL", repr(exc))
            else:
                gc.marker("CHECK", name, "PASS", detail, f"({time.monotonic() - started:.1f}s)")


CHECK_TIMEOUT = 240.0


def run_with_timeout(check: Callable[[], str], timeout: float) -> str:
    """Run a check in a thread; a hung check fails instead of hanging the job."""
    outcome: list[str | BaseException] = []

    def target() -> None:
        try:
            outcome.append(check())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        raise CheckFailed(f"timed out after {timeout:.0f}s")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def main() -> int:
    config = gc.load_config()
    gc.setup_logging(config)
    job = Dom0Job(config)
    gc.marker("DOM0-UP", f"uptime={Path('/proc/uptime').read_text().split()[0]}")
    job.follow_consoles()
    try:
        job.create_domains()
        job.qrexec.prepare()
        job.run()
    except Exception as exc:
        traceback.print_exc(file=sys.stdout)
        gc.marker("ERROR", repr(exc))
    finally:
        job.qrexec.stop()
        job.dump_consoles()
        for name in list(job.domids):
            subprocess.run(["xl", "destroy", name], check=False, timeout=60)
        gc.marker("DONE", f"uptime={Path('/proc/uptime').read_text().split()[0]}")
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
