"""The filesystem loader, change detection, system info, and the purity of the core modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qrexec.errors import SystemInfoError
from qrexec.policy.engine.model import Action, Request
from qrexec.policy.engine.system_info import (
    JsonFileSystemInfo,
    SystemInfo,
    load_system_info,
    parse_system_info,
    parse_system_info_json,
)
from qrexec.policy.loading.fs_loader import FilesystemPolicyLoader, fingerprint, load_policy
from qrexec.policy.loading.paths import PolicyPaths
from tests.policy.policy_core_support import SYSTEM_DATA, VM1_UUID, system

PURE_MODULES = [
    "qrexec.policy.engine.model",
    "qrexec.policy.engine.tokens",
    "qrexec.policy.engine.rules",
    "qrexec.policy.engine.parser",
    "qrexec.policy.loading.legacy",
    "qrexec.policy.engine.evaluation",
    "qrexec.policy.engine.policy",
    "qrexec.policy.loading.builder",
    "qrexec.policy.loading.memory_store",
    "qrexec.policy.loading.paths",
    "qrexec.policy.loading.legacy_convert",
]
FORBIDDEN_IMPORTS = {
    "socket",
    "asyncio",
    "subprocess",
    "selectors",
    "shutil",
    "glob",
    "os",
    "pathlib",
    "io",
    "threading",
    "multiprocessing",
}


def test_pure_modules_import_no_io_machinery() -> None:
    code = (
        "import sys\n"
        # logging is allowed (the core logs its warnings); what it pulls in (threading) is
        # not ours. Whether site already imported it depends on the environment.
        "import logging\n"
        "before = set(sys.modules)\n"  # the interpreter's start-up imports are not ours
        f"for m in {PURE_MODULES!r}: __import__(m)\n"
        "bad = {'socket', 'asyncio', 'subprocess', 'selectors', 'shutil', 'glob', 'threading'}\n"
        "print(sorted(bad & (set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_do_no_io_themselves(module: str) -> None:
    path = Path(__import__(module, fromlist=["x"]).__file__)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_IMPORTS, module
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in FORBIDDEN_IMPORTS, module
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("open", "print", "input", "exec", "eval"), module


# --- filesystem loader -----------------------------------------------------------------------


def _paths(tmp_path: Path) -> PolicyPaths:
    return PolicyPaths(
        policy_dirs=(str(tmp_path / "run"), str(tmp_path / "etc")),
        legacy_dir=str(tmp_path / "legacy"),
        dir_2011=str(tmp_path / "old"),
    )


def test_filesystem_loader_reads_and_notices_changes(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    user = tmp_path / "etc" / "30-user.policy"
    user.write_text("test.Svc * vm1 vm2 allow\n")
    loader = FilesystemPolicyLoader(_paths(tmp_path))
    req = Request("test.Svc", "+", "vm1", "vm2")
    assert loader.policy.evaluate(req, system()).action is Action.ALLOW
    assert not loader.changed() and not loader.reload_if_changed()

    # an edit that breaks the syntax denies everything, and says where
    user.write_text("test.Svc * vm1 vm2 allow\nbroken\n")
    os.utime(user, ns=(1, 1))
    assert loader.reload_if_changed()
    res = loader.policy.evaluate(req, system())
    assert res.action is Action.DENY and f"{user}:2" in res.reason

    # a new file in a watched directory
    user.write_text("test.Svc * vm1 vm2 allow\n")
    assert loader.reload_if_changed()
    (tmp_path / "etc" / "10-deny.policy").write_text("test.Svc * vm1 vm2 deny\n")
    assert loader.reload_if_changed()
    assert loader.policy.evaluate(req, system()).action is Action.DENY

    # a directory that did not exist before appears
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "10-deny.policy").write_text("test.Svc * vm1 vm2 ask\n")
    assert loader.reload_if_changed()
    assert loader.policy.evaluate(req, system()).action is Action.ASK


def test_included_files_are_sources(tmp_path: Path) -> None:
    (tmp_path / "etc" / "include").mkdir(parents=True)
    (tmp_path / "etc" / "30-a.policy").write_text("!include include/x\n!compat-4.0\n")
    inc = tmp_path / "etc" / "include" / "x"
    inc.write_text("test.Svc * vm1 vm2 allow\n")
    policy = load_policy(_paths(tmp_path))
    assert str(inc) in policy.sources and str(tmp_path / "legacy") in policy.sources
    before = fingerprint(policy.sources)
    inc.write_text("test.Svc * vm1 vm2 deny\n\n")
    assert fingerprint(policy.sources) != before


def test_filesystem_file_rules(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "10-a.policy").write_text("test.Svc * vm1 vm2 allow\n")
    (etc / "20-dir.policy").mkdir()  # not a regular file: ignored
    (etc / "30-link.policy").symlink_to(etc / "10-a.policy")  # symlink to a file counts
    (etc / "40-dangling.policy").symlink_to(etc / "nothing")  # dangling: ignored
    policy = load_policy(_paths(tmp_path))
    assert policy.error is None
    assert [r.ref.path for r in policy.rules] == [
        str(etc / "10-a.policy"),
        str(etc / "30-link.policy"),
    ]
    (etc / "50-Bad.policy").write_text("")
    assert load_policy(_paths(tmp_path)).error is not None


def test_unreadable_policy_file_denies(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "10-a.policy").write_bytes(b"test.Svc * vm1 vm2 allow \xff\n")
    policy = load_policy(_paths(tmp_path))
    assert policy.error is not None and policy.error.path == str(etc / "10-a.policy")


# --- system info -----------------------------------------------------------------------------


def test_system_info_lookup_and_defaults() -> None:
    info = system()
    assert info["vm1"].uuid == VM1_UUID and info[f"uuid:{VM1_UUID}"].name == "vm1"
    assert info["uuid:00000000-0000-0000-0000-000000000000"].name == "dom0"
    assert info["vm1"].tags == frozenset({"tag1"}) and info["vm1"].icon == "red"
    assert info["sys-hidden"].internal and not info["vm1"].internal
    assert info["dom0"].is_running and info["vm1"].is_running and not info["vm2"].is_running
    assert info.get("ghost") is None and "vm1" in info and "ghost" not in info


def test_guivm_defaults_to_dom0() -> None:
    data = json.loads(json.dumps(SYSTEM_DATA))
    data["domains"]["vm3"]["guivm"] = "sys-gui"
    info = parse_system_info(data)
    assert info.guivm_for("vm1") == "dom0"
    assert info.guivm_for("dom0") == "dom0"
    assert info.guivm_for("vm3") == "sys-gui"
    assert info.guivm_for("ghost") is None


def test_dom0_always_present() -> None:
    info = parse_system_info({"domains": {"vm1": {"type": "AppVM"}}})
    assert info["dom0"].type == "AdminVM" and info["@adminvm" if False else "dom0"].is_running
    assert SystemInfo().names == ["dom0"]


def test_round_trip_through_json(tmp_path: Path) -> None:
    path = tmp_path / "system.json"
    path.write_text(json.dumps(system().to_json_data()))
    again = load_system_info(str(path))
    assert {d.name: d for d in again} == {d.name: d for d in system()}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("[]", "domains"),
        ('{"domains": []}', "domains"),
        ('{"domains": {"vm1": 3}}', "expected an object"),
        ('{"domains": {"bad name": {}}}', "invalid qube name"),
        ('{"domains": {"vm1": {"uuid": "nope"}}}', "invalid uuid"),
        ('{"domains": {"vm1": {"tags": "a"}}}', "tags"),
        ('{"domains": {"vm1": {"template_for_dispvms": "maybe"}}}', "boolean"),
        ('{"domains": {"vm1": {"default_dispvm": 5}}}', "default_dispvm"),
        ('{"domains": {"a": {"type": "AdminVM"}}}', "must be named dom0"),
        ('{"domains": {"dom0": {"type": "AppVM"}}}', "must have type AdminVM"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_system_info(data: str, message: str) -> None:
    with pytest.raises(SystemInfoError, match=message):
        parse_system_info_json(data)


def test_json_file_source_rereads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "system.json"
    path.write_text(json.dumps({"domains": {"vm1": {"power_state": "Halted"}}}))
    source = JsonFileSystemInfo(str(path))
    assert not source.get_system_info()["vm1"].is_running
    assert source.get_system_info() is source.get_system_info()
    path.write_text(json.dumps({"domains": {"vm1": {"power_state": "Running"}}}) + " ")
    assert source.get_system_info()["vm1"].is_running
    path.unlink()
    with pytest.raises(SystemInfoError, match="cannot read"):
        source.get_system_info()


def test_2011_only_system_switches_to_policy_d_when_it_appears(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "test.Add").write_text("anyvm anyvm ask\n")
    loader = FilesystemPolicyLoader(_paths(tmp_path))
    req = Request("test.Add", "+", "vm1", "vm2")
    assert loader.policy.evaluate(req, system()).action is Action.ASK
    assert str(old / "test.Add") in loader.policy.sources
    (tmp_path / "etc").mkdir()  # from now on 2011 files count only through !compat-2011
    assert loader.reload_if_changed()
    res = loader.policy.evaluate(req, system())
    assert res.action is Action.DENY and "30-user.policy" in res.reason
    (tmp_path / "etc" / "35-compat.policy").write_text("!compat-2011\n")
    assert loader.reload_if_changed()
    assert loader.policy.evaluate(req, system()).action is Action.ASK
