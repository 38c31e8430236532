"""``qrexec-sim demo``: the README walk-through, on a fresh machine, with nothing but the repo.

It brings up the default topology (dom0, vm1-vm3 and a disposable template) as plain
processes, then shows, checking each result:

1. the seed's ``test.Add`` from vm1 to vm2, exactly as the 2011 HOWTO runs it
   (``qrexec_client_vm vm2 test.Add /usr/bin/our_test_add_client 11 22``); dom0's 2011 policy
   says ``anyvm anyvm ask`` and the scripted prompter answers yes;
2. a directory tree copied from vm1 to vm2 with ``qubes.Filecopy`` (names, sizes and modes
   preserved, landing in vm2's ``~/QubesIncoming/vm1/``);
3. the same copy the other way, which the policy denies (exit 126);
4. what the policy decided for each call, from the audit log;

and tears everything down. Exit status 0 only if every step gave the expected result.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from qrexec.sim.audit_format import format_audit_line
from qrexec.sim.harness import CallResult, RunningTestbed
from qrexec.sim.topology import default_topology


def _say(text: str = "") -> None:
    print(text, flush=True)


def _show(result: CallResult) -> None:
    for name, data in (("stdout", result.stdout), ("stderr", result.stderr)):
        for line in data.decode(errors="replace").splitlines():
            _say(f"      {name}: {line}")
    _say(f"      exit code: {result.returncode}")


def _make_tree(base: Path) -> dict[str, tuple[int, int]]:
    """A small tree with varied modes; returns relative path -> (mode, size)."""
    (base / "notes").mkdir(parents=True)
    (base / "photos" / "2011").mkdir(parents=True)
    (base / "notes" / "todo.txt").write_text("copy files between qubes\n")
    (base / "notes" / "secret.txt").write_text("only for me\n")
    (base / "photos" / "2011" / "seed.bin").write_bytes(bytes(range(256)) * 512)
    (base / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(base / "notes" / "secret.txt", 0o600)
    os.chmod(base / "run.sh", 0o755)
    os.chmod(base / "photos", 0o750)
    return _describe(base)


def _describe(base: Path) -> dict[str, tuple[int, int]]:
    tree = {}
    for path in sorted(base.rglob("*")):
        st = path.lstat()
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        tree[str(path.relative_to(base))] = (stat.S_IMODE(st.st_mode), size)
    return tree


def run_demo(run_dir: str | None = None) -> int:
    """Run the walk-through; 0 when every step behaved as expected."""
    del run_dir  # the demo always uses a fresh folder of its own
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        _say(f"   [{'ok' if ok else 'FAILED'}] {what}")
        if not ok:
            failures.append(what)

    path = Path(tempfile.mkdtemp(prefix="qsim-demo-", dir="/tmp"))
    testbed = RunningTestbed(default_topology(), path)
    _say("== qrexec-sim demo: dom0 + vm1, vm2, vm3 (+ disposable template default-dvm)")
    try:
        testbed.start(progress=lambda m: _say(f"   {m}"))

        _say("\n== 1. The seed's HOWTO: test.Add from vm1 to vm2")
        _say("   vm1$ qrexec-client-vm vm2 test.Add /usr/bin/our_test_add_client 11 22")
        _say("   dom0 policy /etc/qubes_rpc/policy/test.Add (2011 format): anyvm anyvm ask")
        result = testbed.call(
            "vm1", "vm2", "test.Add", program=["/usr/bin/our_test_add_client", "11", "22"]
        )
        _show(result)
        check(result.returncode == 0 and result.stderr.strip() == b"33", "11 + 22 = 33, after ask")

        _say("\n== 2. qubes.Filecopy: a directory tree from vm1 to vm2")
        source = testbed.home("vm1") / "Documents"
        sent = _make_tree(source)
        for name, (mode, size) in sent.items():
            _say(f"   vm1:~/Documents/{name:28} mode {mode:04o} size {size}")
        result = testbed.call(
            "vm1",
            "vm2",
            "qubes.Filecopy",
            program=[sys.executable, "-m", "qrexec.sim.filecopy", "send", "Documents"],
        )
        _show(result)
        landed = testbed.home("vm2") / "QubesIncoming" / "vm1" / "Documents"
        received = _describe(landed) if landed.exists() else {}
        _say("   vm2:~/QubesIncoming/vm1/Documents now holds:")
        for name, (mode, size) in received.items():
            _say(f"   vm2:~/QubesIncoming/vm1/Documents/{name:28} mode {mode:04o} size {size}")
        check(result.returncode == 0, "the copy succeeded")
        check(received == sent, "names, sizes and modes preserved in ~/QubesIncoming/vm1/")
        same = all(
            (landed / n).read_bytes() == (source / n).read_bytes()
            for n, (m, s) in sent.items()
            if (source / n).is_file()
        )
        check(bool(received) and same, "contents identical")

        _say("\n== 3. The same copy from vm2 to vm1: the policy denies it")
        result = testbed.call(
            "vm2",
            "vm1",
            "qubes.Filecopy",
            program=[sys.executable, "-m", "qrexec.sim.filecopy", "send", "QubesIncoming"],
        )
        _show(result)
        check(result.returncode == 126, "refused with exit code 126")
        check(not (testbed.home("vm1") / "QubesIncoming").exists(), "nothing arrived in vm1")

        _say("\n== 4. What dom0's policy decided (audit log)")
        records = testbed.audit()
        dom0_root = str(testbed.root("dom0"))
        for record in records:
            _say("   " + format_audit_line(json.dumps(record)).replace(dom0_root, ""))
        results = [(r.get("service"), r.get("source"), r.get("result")) for r in records]
        check(("test.Add", "vm1", "ask-allowed") in results, "test.Add: ask, answered allow")
        check(("qubes.Filecopy", "vm1", "allow") in results, "vm1 -> vm2 copy: allow")
        check(("qubes.Filecopy", "vm2", "deny") in results, "vm2 -> vm1 copy: deny")
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
        _say(f"   error: {exc}")
        _say(testbed.logs()[-4000:])
    finally:
        _say("\n== teardown")
        testbed.testbed.down()
        _say(f"   stopped every process; removing {path}")
        shutil.rmtree(path, ignore_errors=True)
    if failures:
        _say(f"\ndemo FAILED: {len(failures)} step(s): {'; '.join(failures)}")
        return 1
    _say("\ndemo passed: every step gave the expected result")
    return 0
