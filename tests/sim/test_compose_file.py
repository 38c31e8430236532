"""The generated compose file: the root compose.yaml does not drift, and isolation holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qrexec.sim.cli import main as sim_main
from qrexec.sim.compose import build_compose, render_compose, to_yaml
from qrexec.sim.topology import default_topology, load_topology

REPO = Path(__file__).parents[2]


def test_root_compose_yaml_is_the_generated_one() -> None:
    """compose.yaml must be regenerated (`qrexec-sim compose > compose.yaml`) on changes."""
    assert (REPO / "compose.yaml").read_text() == render_compose(default_topology())


def test_yaml_text_parses_back_to_the_document() -> None:
    document = build_compose(default_topology())
    assert yaml.safe_load(to_yaml(document)) == document
    assert yaml.safe_load(to_yaml({"a": [], "b": {}, "c": [{"x": 1, "y": [True, None]}]})) == {
        "a": [],
        "b": {},
        "c": [{"x": 1, "y": [True, None]}],
    }


def _mounted_pairs(service: dict[str, object]) -> set[tuple[int, int]]:
    pairs = set()
    for volume in service["volumes"]:  # type: ignore[attr-defined]
        match = re.fullmatch(r"vchan-(\d+)-(\d+):/run/vchan/pair\.(\d+)\.(\d+)", volume)
        if match:
            assert match.group(1, 2) == match.group(3, 4)
            pairs.add((int(match.group(1)), int(match.group(2))))
    return pairs


def test_each_container_mounts_only_its_own_pairs() -> None:
    topo = default_topology()
    services = build_compose(topo)["services"]
    assert isinstance(services, dict)
    ids = {name: int(svc["environment"]["VCHAN_DOMAIN"]) for name, svc in services.items()}
    assert ids["dom0"] == 0 and ids["vm1"] == 1
    assert {"dispslot1", "dispslot2"} <= set(services)
    for name, svc in services.items():
        own = ids[name]
        pairs = _mounted_pairs(svc)
        assert all(own in pair for pair in pairs), f"{name} mounts a foreign pair"
        others = set(ids.values()) - {own}
        expected = {tuple(sorted((own, o))) for o in others}
        if name == "dom0":
            assert pairs == expected
        else:
            assert pairs == expected  # dom0 plus every other VM (direct data vchans)
        assert svc["network_mode"] == "none" and svc["init"] is True
        assert svc["environment"]["QREXEC_VCHAN_LAYOUT"] == "isolated"
        assert svc["environment"]["QREXEC_TRANSPORT"] == "socket"


def test_power_volumes_are_shared_with_dom0_only() -> None:
    services = build_compose(default_topology())["services"]
    assert isinstance(services, dict)
    for name, svc in services.items():
        power = [v for v in svc["volumes"] if v.startswith("power-")]
        if name == "dom0":
            assert len(power) == len(services) - 1
        else:
            assert power == [f"power-{name}:/run/qubes-sim/power"]


def test_compose_from_a_topology_file_mounts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = REPO / "examples" / "split-gpg.toml"
    out = tmp_path / "compose.yaml"
    assert (
        sim_main(["compose", "--topology", str(example), "-o", str(out), "--context", str(REPO)])
        == 0
    )
    document = yaml.safe_load(out.read_text())
    assert set(document["services"]) == {"dom0", "work", "vault", "dvm", "dispslot1"}
    vault = document["services"]["vault"]
    assert vault["command"][-2:] == ["--topology", "/etc/qrexec-sim/topology/split-gpg.toml"]
    mount = next(v for v in vault["volumes"] if v.endswith(":ro"))
    assert (tmp_path / mount.split(":")[0]).resolve() == example.parent.resolve()
    assert (tmp_path / vault["build"]["context"]).resolve() == REPO.resolve()
    topo = load_topology(example)
    assert int(vault["environment"]["VCHAN_DOMAIN"]) == topo.domain("vault").id
