"""Disposables and autostart through the real daemon, policy daemon and qubesd stand-in."""

from __future__ import annotations

import pytest

from qrexec.sim.harness import RunningTestbed
from qrexec.sim.topology import parse_topology

pytestmark = pytest.mark.timeout(120)

# The template's service says whether the domain it runs in is fresh: it leaves a mark in
# the home folder and reports whether one was already there.
MARK = """#!/bin/sh
if [ -e "$HOME/mark" ]; then echo used; else echo fresh; fi
touch "$HOME/mark"
"""

TOPOLOGY = parse_topology(
    {
        "dom0": {
            "policy": [
                {
                    "file": "30-t.policy",
                    "text": "t.Mark * @anyvm @dispvm allow\n"
                    "t.Mark * @anyvm cold allow\n"
                    "t.Mark * @anyvm frozen allow autostart=no\n",
                }
            ]
        },
        "domain": [
            {"name": "work", "default_dispvm": "dvm"},
            {"name": "cold", "running": False, "service": [{"name": "t.Mark", "script": MARK}]},
            {"name": "frozen", "running": False, "service": [{"name": "t.Mark", "script": MARK}]},
            {
                "name": "dvm",
                "template_for_dispvms": True,
                "running": False,
                "service": [{"name": "t.Mark", "script": MARK}],
            },
        ],
    }
)


@pytest.mark.qrexec_topology(TOPOLOGY)
def test_each_dispvm_call_gets_a_new_domain_that_is_gone_afterwards(
    qrexec_testbed: RunningTestbed,
) -> None:
    before = set(qrexec_testbed.testbed.domain_states())
    for _ in range(2):
        result = qrexec_testbed.call("work", "@dispvm", "t.Mark")
        assert (result.returncode, result.text) == (0, "fresh\n"), result.stderr
        # Gone afterwards (the daemon kills it once the call has ended): no domain, no
        # process, no files.
        qrexec_testbed.wait_until(
            lambda: set(qrexec_testbed.testbed.domain_states()) == before, "the disposable's end"
        )
        assert set(qrexec_testbed.testbed.domain_states()) == before
        assert {s.record.domain for s in qrexec_testbed.status()} == {"dom0", "work"}
        assert not any(p.name.startswith("disp") for p in (qrexec_testbed.run_dir / "d").iterdir())
    log = (qrexec_testbed.run_dir / "logs" / "qubesd.dom0.log").read_text()
    created = [line.split("created disposable ")[1].split()[0] for line in log.splitlines()
               if "created disposable" in line]  # fmt: skip
    assert len(created) == 2 and created[0] != created[1]
    for name in created:
        assert f"killing {name}" in log
    audit = [r for r in qrexec_testbed.audit() if r["service"] == "t.Mark"]
    assert [r["target"] for r in audit] == ["@dispvm:dvm", "@dispvm:dvm"]
    # The template itself never ran.
    assert "dvm" not in qrexec_testbed.running_domains()


@pytest.mark.qrexec_topology(TOPOLOGY)
def test_autostart_starts_a_stopped_vm_and_autostart_no_refuses(
    qrexec_testbed: RunningTestbed,
) -> None:
    assert qrexec_testbed.running_domains() == ["dom0", "work"]
    result = qrexec_testbed.call("work", "cold", "t.Mark")
    assert (result.returncode, result.text) == (0, "fresh\n"), result.stderr
    assert "cold" in qrexec_testbed.running_domains()
    # Started once: the second call reaches the same, running domain.
    assert qrexec_testbed.call("work", "cold", "t.Mark").text == "used\n"
    refused = qrexec_testbed.call("work", "frozen", "t.Mark")
    assert refused.returncode == 126
    assert "frozen" not in qrexec_testbed.running_domains()
    assert not (qrexec_testbed.home("frozen") / "mark").exists()
