"""The real-Xen job's driver inside a domU (run by the guest ``/init``).

It plays the VM's part of each step dom0 runs, in the order listed for this domU's name
in the job configuration (``domu_steps``):

* ``raw-blocking``: vchan client of dom0 (port 9001), blocking face, bulk exchange + ping;
* ``raw-async``: vchan server for dom0 (port 9002), asyncio face, bulk exchange;
* ``conformance-*``: this domain's half of a conformance run (:mod:`guest_conformance`);
* ``services``: install the job's qrexec services (seed ``test.Add``, bulk source...);
* ``agent``: start ``qrexec-agent`` pinned to the vchan transport;
* ``hold``: connect to dom0 (port 9010) and read until the stream ends (dom0 then
  destroys this domain to check peer-death detection).

Results go back to dom0 over the vchans themselves; this domain's console is only a log.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import subprocess
import sys
import time
from pathlib import Path

from qrexec.backends.vchan import VchanBackend
from qrexec.backends.xenstore import XenStore
from qrexec.sim.xen import guest_common as gc
from qrexec.sim.xen import guest_conformance
from qrexec.sim.xen.guest_services import install_domu_services

PORT_BLOCKING = 9001
PORT_ASYNC = 9002
PORT_HOLD = 9010


def raw_blocking(backend: VchanBackend, total: int) -> None:
    stream = backend.connect(0, PORT_BLOCKING, timeout=300)
    try:
        verdict = gc.exchange_blocking(stream, total, seed_out=2, seed_in=1)
        stream.send(verdict.to_line())
        gc.ping_pong_blocking(stream, 200, initiator=False)
        gc.recv_line_blocking(stream)  # dom0's "bye": keep the rings until it is done
    finally:
        stream.close()
    gc.marker("DOMU-STEP", "raw-blocking", "ok" if verdict.ok else f"FAIL {verdict.error}")


async def raw_async(backend: VchanBackend, total: int) -> None:
    listener = await backend.listen_async(0, PORT_ASYNC)
    stream = await listener.accept()
    try:
        verdict = await gc.exchange_async(stream, total, seed_out=4, seed_in=3)
        await stream.send(verdict.to_line())
        await gc.recv_line_async(stream)
    finally:
        await stream.aclose()
    gc.marker("DOMU-STEP", "raw-async", "ok" if verdict.ok else f"FAIL {verdict.error}")


def conformance(name: str, timeout: float) -> None:
    """Run this domain's half of a conformance run; publish the result in xenstore."""
    run = guest_conformance.RUNS[name]
    rc, summary, failed = guest_conformance.run_half(name, run.domu_side, 0, timeout)
    with XenStore() as xs:
        xs.write(
            f"{guest_conformance.RESULT_NODE}/{name}",
            f"rc={rc} {summary} {failed}"[:2000].encode(),
        )
    gc.marker("DOMU-STEP", name, f"rc={rc} {summary}")


def start_agent(debug: bool) -> subprocess.Popen[bytes]:
    """Start qrexec-agent; with ``debug`` it logs verbosely to this domain's console."""
    env = dict(os.environ, QREXEC_TRANSPORT="vchan", PYTHONPATH="/opt/qrexec-py")
    env.pop("VCHAN_SOCKET_DIR", None)
    Path("/var/run/qubes").mkdir(parents=True, exist_ok=True)
    argv = ["qrexec-agent", "--transport", "vchan", *(["-v"] if debug else [])]
    log = None if debug else open("/var/log/qubes/qrexec-agent.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    gc.marker("DOMU-STEP", "agent", f"started pid {proc.pid}")
    return proc


def hold(backend: VchanBackend) -> None:
    stream = backend.connect(0, PORT_HOLD, timeout=None)
    stream.send(b"holding\n")
    while stream.recv(65536):
        pass
    stream.close()


def main() -> int:
    config = gc.load_config()
    gc.setup_logging(config)
    faulthandler.dump_traceback_later(
        int(config.get("check_timeout", 240)) // 2, repeat=True, file=sys.stdout
    )
    total = int(config.get("bulk_bytes", 32 << 20))
    backend = VchanBackend()
    with XenStore() as xs:
        raw_name = xs.read("name") or b"?"
    name = raw_name.decode(errors="replace")
    gc.marker("DOMU-UP", name, f"domid={backend.own_domain}")
    agent: subprocess.Popen[bytes] | None = None
    for step in config.get("domu_steps", {}).get(name, []):
        started = time.monotonic()
        try:
            if step == "raw-blocking":
                raw_blocking(backend, total)
            elif step == "raw-async":
                asyncio.run(raw_async(backend, total))
            elif step in guest_conformance.RUNS:
                conformance(step, float(config.get("check_timeout", 420)))
            elif step == "services":
                install_domu_services(name)
            elif step == "agent":
                agent = start_agent(bool(config.get("debug")))
            elif step == "hold":
                hold(backend)
            else:
                gc.marker("DOMU-STEP", step, "FAIL unknown step")
        except Exception as exc:
            gc.marker("DOMU-STEP", step, f"FAIL {exc!r}")
        print(f"step {step} took {time.monotonic() - started:.1f}s", file=sys.stderr)
    if agent is not None:
        return agent.wait()
    while True:  # dom0 destroys this domain when it is done
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
