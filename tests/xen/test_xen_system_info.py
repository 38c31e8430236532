"""System info on a Xen host: the configuration file and its merge with running domains.

The xenstore half (which domains run, their uuids) is exercised inside Xen by the real-Xen
job's ``qrexec-setup`` check; here the merge and the file format are checked with
explicit inputs, and the result goes through the policy's own system-info parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrexec.errors import SystemInfoError
from qrexec.policy.engine.system_info import parse_system_info
from qrexec.policy.tools.xen_system_info import (
    build_system_info_data,
    read_config,
    write_json_atomically,
)

pytestmark = pytest.mark.xen

CONFIG = """\
# comment
[DEFAULT]
tags = xen
[work]
tags = work, project-x   # inline comment
default_dispvm = dvm
[dvm]
template_for_dispvms = yes
[disp42]
type = DispVM
template = dvm
[offline]
uuid = 4f1c0a8e-1111-4222-8333-944455556666
"""
UUID = "0b0c1d2e-aaaa-4bbb-8ccc-ddddeeeeffff"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "xen-domains.conf"
    path.write_text(text)
    return str(path)


def test_merge_running_domains_with_the_file(tmp_path: Path) -> None:
    config = read_config(write(tmp_path, CONFIG))
    running = {"work": {"xid": 3, "uuid": UUID}, "dvm": {"xid": 4}, "stray": {"xid": 9}}
    info = parse_system_info(build_system_info_data(running, config))

    assert info["dom0"].is_admin and info["dom0"].power_state == "Running"
    work = info["work"]
    assert work.tags == frozenset({"work", "project-x"})
    assert work.default_dispvm == "dvm"
    assert work.uuid == UUID and work.power_state == "Running"
    assert info[f"uuid:{UUID}"].name == "work"
    assert info["dvm"].template_for_dispvms
    assert info["disp42"].type == "DispVM" and info["disp42"].template == "dvm"
    assert info["disp42"].power_state == "Halted"
    assert info["offline"].uuid == "4f1c0a8e-1111-4222-8333-944455556666"
    # a running domain missing from the file gets the [DEFAULT] values
    assert info["stray"].tags == frozenset({"xen"}) and info["stray"].type == "AppVM"


def test_missing_file_means_xenstore_only(tmp_path: Path) -> None:
    config = read_config(str(tmp_path / "absent.conf"))
    info = parse_system_info(build_system_info_data({"vm1": {"xid": 1}}, config))
    assert sorted(info.names) == ["dom0", "vm1"]
    assert info["vm1"].type == "AppVM" and info["vm1"].power_state == "Running"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[work]\ncolour = red\n", "unknown key 'colour'"),
        ("[work]\ntemplate_for_dispvms = maybe\n", "must be yes or no"),
        ("[9bad]\ntype = AppVM\n", "invalid domain name"),
        ("[work\n", "xen-domains.conf"),
    ],
)
def test_bad_files_are_rejected_with_the_reason(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(SystemInfoError, match=complaint):
        read_config(write(tmp_path, text))


def test_only_dom0_may_be_the_admin_vm(tmp_path: Path) -> None:
    config = read_config(write(tmp_path, "[evil]\ntype = AdminVM\n"))
    with pytest.raises(SystemInfoError, match="only dom0"):
        build_system_info_data({}, config)


def test_output_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "system-info.json"
    target.write_text("old")
    data = build_system_info_data({"vm1": {"xid": 1}}, {})
    write_json_atomically(str(target), data)
    assert json.loads(target.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["system-info.json"]
