"""``qrexec-xen-watch``: start a qrexec-daemon for each Xen VM as it starts (dom0 only).

On Qubes, qubesd starts ``qrexec-daemon`` when it starts a VM. On a plain Xen host
(``xl create``) nothing does, so this small service watches xenstore's
``@introduceDomain`` / ``@releaseDomain`` events and runs, for each domain that appeared
or went away::

    systemctl start qrexec-daemon@NAME.service      # and: systemctl stop ...

(``--start-command`` / ``--stop-command`` replace those, e.g. for a non-systemd init; the
domain name and id are appended as arguments). Names that policy could not use are
skipped with a warning. Waits on the xenstore watch fd; never polls.
"""

from __future__ import annotations

import argparse
import logging
import select
import shlex
import subprocess
import sys

from qrexec.backends.xenstore import XenStore
from qrexec.errors import QrexecError

log = logging.getLogger("qrexec.xen_watch")

DEFAULT_START = "systemctl start --no-block qrexec-daemon@{name}.service"
DEFAULT_STOP = "systemctl stop --no-block qrexec-daemon@{name}.service"
XEN_DOM0_NAME = "Domain-0"


def running_vms(xs: XenStore) -> dict[str, int]:
    """Running domains other than dom0, as name -> id."""
    return {
        name: domid
        for domid, name in xs.list_domains().items()
        if domid != 0 and name != XEN_DOM0_NAME
    }


def run_command(template: str, name: str, domid: int) -> None:
    argv = [part.format(name=name, domid=domid) for part in shlex.split(template)]
    log.info("%s", " ".join(argv))
    proc = subprocess.run(argv, check=False)
    if proc.returncode != 0:
        log.warning("%s exited %d", argv[0], proc.returncode)


def sync(known: dict[str, int], now: dict[str, int], start: str, stop: str) -> None:
    """Run the stop/start commands for the difference between two snapshots.

    A domain whose id changed (destroyed and re-created between two looks) is stopped
    and started again, so its daemon serves the new domain id.
    """
    for name, domid in sorted(known.items()):
        if now.get(name) != domid:
            run_command(stop, name, domid)
    for name, domid in sorted(now.items()):
        if known.get(name) != domid:
            run_command(start, name, domid)


def watch(start: str, stop: str, once: bool = False) -> None:
    with XenStore() as xs:
        xs.watch("@introduceDomain", "qrexec-xen-watch")
        xs.watch("@releaseDomain", "qrexec-xen-watch")
        known: dict[str, int] = {}
        fd = xs.watch_fd()
        while True:
            xs.drain_watch_events()
            now = running_vms(xs)
            sync(known, now, start, stop)
            known = now
            if once:
                return
            select.select([fd], [], [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-xen-watch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--start-command",
        default=DEFAULT_START,
        help="run when a domain appears ({name}, {domid} are replaced)",
    )
    parser.add_argument("--stop-command", default=DEFAULT_STOP, help="run when a domain goes away")
    parser.add_argument("--once", action="store_true", help="sync once and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        watch(args.start_command, args.stop_command, once=args.once)
    except QrexecError as exc:
        print(f"qrexec-xen-watch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
