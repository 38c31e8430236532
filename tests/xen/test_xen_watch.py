"""qrexec-xen-watch's decisions: which daemons to start and stop between two snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrexec.backends import xen_watch

pytestmark = pytest.mark.xen


def test_sync_starts_new_restarted_and_stops_gone_domains(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    start = f"sh -c 'echo start $0 $1 >> {log}' {{name}} {{domid}}"
    stop = f"sh -c 'echo stop $0 $1 >> {log}' {{name}} {{domid}}"
    known = {"work": 3, "old": 4, "same": 5}
    now = {"work": 7, "new": 8, "same": 5}  # work was restarted with a new id
    xen_watch.sync(known, now, start, stop)
    assert sorted(log.read_text().splitlines()) == [
        "start new 8",
        "start work 7",
        "stop old 4",
        "stop work 3",
    ]
