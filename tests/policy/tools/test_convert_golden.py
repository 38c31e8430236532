"""qrexec-legacy-convert: hand-written golden conversions of the R4.0 and 2011 formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrexec.errors import PolicySyntaxError
from qrexec.policy.loading.legacy_convert import convert_dir, convert_files
from qrexec.policy.loading.memory_store import MemoryStore
from qrexec.policy.tools import legacy_convert_cli

R40 = "/etc/qubes-rpc/policy"
OLD = "/etc/qubes_rpc/policy"

R40_FILES = {
    f"{R40}/qubes.Filecopy": "## R4.0 policy for qubes.Filecopy\n$anyvm $anyvm ask\n",
    f"{R40}/test.Svc": (
        "$tag:work $dispvm:$tag:dvm allow,target=$dispvm:work-dvm,user=root\n"
        "work $default ask,default_target=$dispvm\n"
        "$include:include/admin\n"
        "$type:TemplateVM dom0 deny\n"
    ),
    f"{R40}/include/admin": (
        "$anyvm $adminvm allow,user=root\n$anyvm $default allow,target=$adminvm\n"
    ),
    f"{R40}/qubes.Gpg+sign": "vault $anyvm deny\nwork $dispvm:work-dvm allow\n",
}

R40_EXPECTED = f"""\
# Converted by qrexec-legacy-convert from the R4.0 policy in {R40}.
# Same decisions as reading it through !compat-4.0.

# {R40}/qubes.Filecopy:2: $anyvm $anyvm ask
qubes.Filecopy * @anyvm @anyvm ask

# {R40}/qubes.Gpg+sign:1: vault $anyvm deny
qubes.Gpg +sign vault @anyvm deny

# {R40}/qubes.Gpg+sign:2: work $dispvm:work-dvm allow
qubes.Gpg +sign work @dispvm:work-dvm allow

# implicit deny closing {R40}/qubes.Gpg+sign (nothing else matched there)
qubes.Gpg +sign @anyvm @anyvm deny

# implicit deny closing {R40}/qubes.Gpg+sign (nothing else matched there)
qubes.Gpg +sign @anyvm @adminvm deny

# {R40}/test.Svc:1: $tag:work $dispvm:$tag:dvm allow,target=$dispvm:work-dvm,user=root
test.Svc * @tag:work @dispvm:@tag:dvm allow target=@dispvm:work-dvm user=root

# {R40}/test.Svc:2: work $default ask,default_target=$dispvm
test.Svc * work @default ask default_target=@dispvm

# {R40}/include/admin:1: $anyvm $adminvm allow,user=root
test.Svc * @anyvm @adminvm allow user=root

# {R40}/include/admin:2: $anyvm $default allow,target=$adminvm
test.Svc * @anyvm @default allow target=@adminvm

# {R40}/test.Svc:4: $type:TemplateVM dom0 deny
test.Svc * @type:TemplateVM dom0 deny
"""

OLD_FILES = {
    f"{OLD}/test.Add": "# the seed's HOWTO\nanyvm anyvm ask\n",
    f"{OLD}/qubes.Filecopy": (
        "work vault allow,user=user\ndom0 anyvm allow\nanyvm dom0 deny\nwork dispvm allow\n"
        "anyvm anyvm ask,target=dispvm\npersonal work allow,target=dom0\ndispvm work deny\n"
    ),
}

OLD_EXPECTED = f"""\
# Converted by qrexec-legacy-convert from the 2011 policy in {OLD}.
# Same decisions as reading it through !compat-2011.

# {OLD}/qubes.Filecopy:1: work vault allow,user=user
qubes.Filecopy * work vault allow user=user

# {OLD}/qubes.Filecopy:2: dom0 anyvm allow
qubes.Filecopy * @adminvm @anyvm allow

# {OLD}/qubes.Filecopy:3: anyvm dom0 deny
qubes.Filecopy * @anyvm @adminvm deny

# {OLD}/qubes.Filecopy:4: work dispvm allow
qubes.Filecopy * work @dispvm allow

# {OLD}/qubes.Filecopy:5: anyvm anyvm ask,target=dispvm
qubes.Filecopy * @anyvm @anyvm ask target=@dispvm

# {OLD}/qubes.Filecopy:6: personal work allow,target=dom0
qubes.Filecopy * personal work allow target=@adminvm

# {OLD}/qubes.Filecopy:7: dispvm work deny
qubes.Filecopy * @type:DispVM work deny

# {OLD}/test.Add:2: anyvm anyvm ask
test.Add * @anyvm @anyvm ask
"""


def test_r40_directory_golden() -> None:
    assert convert_dir(MemoryStore(R40_FILES), "r4.0", R40) == R40_EXPECTED


def test_2011_directory_golden() -> None:
    assert convert_dir(MemoryStore(OLD_FILES), "2011", OLD) == OLD_EXPECTED


def test_single_file_with_argument_gets_its_implicit_denies() -> None:
    text = convert_files(MemoryStore(R40_FILES), "r4.0", [f"{R40}/qubes.Gpg+sign"], R40)
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "qubes.Gpg +sign vault @anyvm deny",
        "qubes.Gpg +sign work @dispvm:work-dvm allow",
        "qubes.Gpg +sign @anyvm @anyvm deny",
        "qubes.Gpg +sign @anyvm @adminvm deny",
    ]


def test_conversion_errors_name_file_and_line() -> None:
    store = MemoryStore({f"{R40}/test.Svc": "vm1 vm2 allow\nvm1 allow\n"})
    with pytest.raises(PolicySyntaxError, match=f"^{R40}/test.Svc:2: "):
        convert_dir(store, "r4.0", R40)
    with pytest.raises(PolicySyntaxError, match="cannot read"):
        convert_files(store, "r4.0", [f"{R40}/missing"], R40)


def test_cli_converts_directory_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "test.Add").write_text("anyvm anyvm ask\n")
    monkeypatch.setenv("QREXEC_2011_POLICY_DIR", str(old))
    assert legacy_convert_cli.main(["--from", "2011"]) == 0
    assert "test.Add * @anyvm @anyvm ask\n" in capsys.readouterr().out

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "test.Svc+x").write_text("$anyvm $dispvm allow\n")
    out = tmp_path / "35-converted.policy"
    assert legacy_convert_cli.main(["--input-dir", str(legacy), "-o", str(out)]) == 0
    assert "test.Svc +x @anyvm @dispvm allow\n" in out.read_text()
    assert legacy_convert_cli.main([str(legacy / "test.Svc+x")]) == 0
    assert "test.Svc +x @anyvm @anyvm deny" in capsys.readouterr().out

    (legacy / "test.Bad").write_text("$anyvm\n")
    assert legacy_convert_cli.main(["--input-dir", str(legacy)]) == 1
    assert f"{legacy}/test.Bad:1: " in capsys.readouterr().err
    assert legacy_convert_cli.main(["--input-dir", str(tmp_path / "none")]) == 1
