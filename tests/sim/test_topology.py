"""The topology file: parsing, defaults, validation errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qrexec.sim.air.air_topology import load_air_topology
from qrexec.sim.topology import (
    TopologyError,
    default_topology,
    derived_uuid,
    load_topology,
    parse_topology,
)

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_default_topology_has_dom0_three_vms_and_a_dispvm_template() -> None:
    topo = default_topology()
    assert [d.name for d in topo.domains] == ["dom0", "vm1", "vm2", "vm3", "default-dvm"]
    assert topo.dom0.id == 0 and topo.dom0.type == "AdminVM"
    assert [d.name for d in topo.dispvm_templates()] == ["default-dvm"]
    assert topo.domain("default-dvm").running is False
    assert topo.domain("vm1").default_dispvm == "default-dvm"
    formats = sorted(p.format for p in topo.policies)
    assert formats == ["2011", "modern", "r4.0"]
    seed_policy = next(p for p in topo.policies if p.format == "2011")
    assert seed_policy.path == "/etc/qubes_rpc/policy/test.Add"
    assert seed_policy.text.strip() == "anyvm anyvm ask"


def test_seed_files_in_every_vm() -> None:
    for vm in default_topology().vms[:3]:
        paths = {f.path: f for f in vm.files}
        assert paths["/usr/bin/our_test_add_client"].mode == 0o755
        service = next(s for s in vm.services if s.name == "test.Add")
        assert service.directory == "/etc/qubes_rpc"
        assert service.program == "/usr/bin/our_test_add_server"


def test_ids_and_uuids_are_assigned_when_absent() -> None:
    topo = parse_topology({"domain": [{"name": "a", "id": 7}, {"name": "b"}, {"name": "c"}]})
    assert [d.id for d in topo.vms] == [7, 8, 9]
    assert topo.domain("b").uuid == derived_uuid("b")
    assert derived_uuid("b") != derived_uuid("c")


def test_renumbered_keeps_names_and_references() -> None:
    topo = default_topology().renumbered(500)
    assert [d.id for d in topo.domains] == [0, 501, 502, 503, 504]
    assert topo.domain("vm1").default_dispvm == "default-dvm"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"domain": [{"name": "vm1", "colour": "red"}]}, "domain[vm1]: unknown key(s) colour"),
        ({"domain": [{"name": "1bad"}]}, "domain[0].name"),
        ({"domain": [{"name": "dom0"}]}, "domain[0].name"),
        ({"domain": [{"name": "a", "id": 1}, {"name": "b", "id": 1}]}, "id 1 appears twice"),
        ({"domain": [{"name": "a"}, {"name": "a"}]}, "'a' appears twice"),
        ({"domain": [{"name": "a", "type": "Qube"}]}, "domain[a].type"),
        ({"domain": [{"name": "a", "id": True}]}, "domain[a].id"),
        ({"domain": [{"name": "a", "default_dispvm": "a"}]}, "not a disposable template"),
        ({"domain": [{"name": "a", "guivm": "nowhere"}]}, "guivm 'nowhere'"),
        ({"domain": [{"name": "a", "uuid": "nope"}]}, "domain[a].uuid"),
        (
            {"domain": [{"name": "a", "service": [{"name": "x y", "script": "s"}]}]},
            "domain[a].service[0].name",
        ),
        (
            {"domain": [{"name": "a", "service": [{"name": "x", "script": "s", "program": "/p"}]}]},
            "exactly one of",
        ),
        (
            {"domain": [{"name": "a", "service": [{"name": "x", "program": "rel/p"}]}]},
            "must be an absolute path",
        ),
        (
            {"domain": [{"name": "a", "file": [{"path": "/../etc/x", "text": ""}]}]},
            "domain[a].file[0].path",
        ),
        (
            {"dom0": {"policy": [{"format": "r5", "file": "x", "text": ""}]}},
            "dom0.policy[0].format",
        ),
        ({"dom0": {"policy": [{"file": "x", "text": ""}]}}, "end in .policy"),
        ({"dom0": {"policy": [{"format": "2011", "file": "../x", "text": ""}]}}, "plain file name"),
        ({"dom0": {"ask": "test.Add * * maybe"}}, "unknown answer"),
        ({"testbed": {"compose_disposable_slots": 99}}, "compose_disposable_slots"),
    ],
)
def test_validation_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(data)
    assert message in str(info.value)


def test_source_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "svc.sh").write_text("#!/bin/sh\necho from file\n")
    (tmp_path / "p.policy").write_text("x * @anyvm @anyvm allow\n")
    (tmp_path / "t.toml").write_text(
        '[[dom0.policy]]\nfile = "10-x.policy"\nsource = "p.policy"\n'
        '[[domain]]\nname = "a"\n[[domain.service]]\nname = "x"\nsource = "svc.sh"\n'
    )
    topo = load_topology(tmp_path / "t.toml")
    assert topo.domain("a").services[0].script == "#!/bin/sh\necho from file\n"
    assert topo.policies[0].text == "x * @anyvm @anyvm allow\n"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[[domain]\n")
    with pytest.raises(TopologyError, match=r"bad\.toml"):
        load_topology(tmp_path / "bad.toml")


def test_examples_parse() -> None:
    files = sorted(EXAMPLES.glob("*.toml"))
    assert files, "examples/ has topology files"
    for path in files:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
        if "host" in data:  # a multi-host file: every host's topology parses
            air = load_air_topology(path)
            assert all(host.topology.dom0.name == "dom0" for host in air.hosts)
            continue
        topo = load_topology(path)
        assert topo.dom0.name == "dom0"
        assert "domain" in data
