"""pytest plugin (entry point ``pytest11``): qrexec testbeds as fixtures for service authors.

Fixtures:

* ``qrexec_topology`` - the topology ``qrexec_testbed`` starts: the packaged default unless
  a test module or conftest overrides this fixture (returning a :class:`Topology`, or a path
  to a topology file), or the test is marked ``@pytest.mark.qrexec_topology(TOPOLOGY_OR_PATH)``.
* ``qrexec_testbed`` - a :class:`~qrexec.sim.harness.RunningTestbed` started for one test and
  torn down after it, with ``install_service``, ``set_policy``, ``set_ask_answers``, ``call``,
  ``exec``, ``audit``... A multi-host topology gives a
  :class:`~qrexec.sim.air.testbed.AirTestbed` instead: ``call("hostA:vm1", "hostB:vm2", …)``
  and ``hosts[NAME]``, each host a ``RunningTestbed`` (in container mode an
  :class:`~qrexec.sim.air.container_testbed.AirContainerTestbed`: ``call("hostA:vm1",
  "hostB:vm2", …)``, ``set_policy(HOST, …)``, ``audit(HOST)``).
* ``qrexec_testbed_factory`` - ``factory(topology=None)`` starts more testbeds in one test
  (all torn down after it).

Container mode: mark a test ``@pytest.mark.qrexec_mode("containers")`` (or parametrize
``qrexec_testbed`` indirectly with ``"processes"``/``"containers"``) and ``qrexec_testbed`` is a
:class:`~qrexec.sim.container_harness.ContainerTestbed`: the same helpers, with the topology
running as containers on a Docker engine (needs the ``containers`` extra, root or a running
engine; the session builds the image once, see sim/TESTING.md). Such tests should also carry
the ``compose`` marker, which the default test run deselects.

Safe under ``pytest -n auto``: each testbed has its own run directory (short, in /tmp, for
unix socket path limits) and its VMs get ids from a block no other testbed of the session
uses (allocated under a lock in the session's shared temporary folder). When a test fails,
the testbed's logs are attached to its report.

Importing this module is cheap: the testbed modules load when a fixture is first used.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from qrexec.sim.air.air_topology import AirTopology
    from qrexec.sim.air.container_testbed import AirContainerTestbed
    from qrexec.sim.container_harness import ContainerTestbed
    from qrexec.sim.engine import Engine
    from qrexec.sim.harness import RunningTestbed
    from qrexec.sim.topology import Topology

#: VM ids per testbed block (a topology with more VMs keeps its own ids).
ID_BLOCK = 100
ID_BLOCKS = 300
MODES = ("processes", "containers")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "qrexec_topology(topology): the Topology or topology file qrexec_testbed starts",
    )
    config.addinivalue_line(
        "markers",
        "qrexec_mode(mode): 'processes' (default) or 'containers': how qrexec_testbed runs",
    )


def _allocate_id_base(factory: pytest.TempPathFactory) -> int:
    """A block of domain ids no other testbed of this session (any xdist worker) has."""
    shared = factory.getbasetemp().parent
    counter = shared / "qrexec-sim-id-blocks"
    with open(shared / "qrexec-sim-id-blocks.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            used = int(counter.read_text())
        except (FileNotFoundError, ValueError):
            used = 0
        counter.write_text(str(used + 1))
    return ID_BLOCK * (used % ID_BLOCKS + 1)


def _as_topology(value: Any) -> Topology | AirTopology:
    from qrexec.sim.air.air_topology import AirTopology, load_any_topology
    from qrexec.sim.topology import Topology

    if isinstance(value, Topology | AirTopology):
        return value
    if isinstance(value, str | Path):
        return load_any_topology(value)
    raise TypeError(f"qrexec_topology: expected a Topology or a path, not {type(value).__name__}")


@pytest.fixture
def qrexec_topology(request: pytest.FixtureRequest) -> Topology | AirTopology:
    """The topology ``qrexec_testbed`` runs (override this fixture, or use the marker)."""
    marker = request.node.get_closest_marker("qrexec_topology")
    if marker is not None:
        return _as_topology(marker.args[0])
    from qrexec.sim.topology import default_topology

    return default_topology()


@pytest.fixture
def qrexec_testbed_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningTestbed]]:
    """Start testbeds on demand; every one is stopped after the test."""
    from qrexec.sim.harness import RunningTestbed

    started: list[RunningTestbed] = []

    def factory(topology: Topology | str | Path | None = None) -> RunningTestbed:
        from qrexec.sim.air.air_topology import AirTopology
        from qrexec.sim.topology import default_topology

        topo = default_topology() if topology is None else _as_topology(topology)
        if isinstance(topo, AirTopology):
            # Several hosts: each has its own vchan folder, so ids need no block.
            from qrexec.sim.air.testbed import AirTestbed

            air = AirTestbed(topo)
            started.append(air)  # type: ignore[arg-type]  # same close/logs/run_dir API
            air.up()
            return air  # type: ignore[return-value]
        if len(topo.vms) < ID_BLOCK:
            topo = topo.renumbered(_allocate_id_base(tmp_path_factory))
        testbed = RunningTestbed(topo)
        started.append(testbed)
        testbed.start()
        return testbed

    yield factory
    failed = False
    for testbed in reversed(started):
        try:
            logs = testbed.logs()
            if logs:
                request.node.add_report_section("teardown", f"qrexec-sim {testbed.run_dir}", logs)
        finally:
            try:
                testbed.close()
            except Exception:
                failed = True
    if failed:
        pytest.fail("a qrexec testbed could not be stopped cleanly")


def _mode(request: pytest.FixtureRequest) -> str:
    mode = getattr(request, "param", None)
    if mode is None:
        marker = request.node.get_closest_marker("qrexec_mode")
        mode = marker.args[0] if marker is not None else "processes"
    if mode not in MODES:
        raise ValueError(f"qrexec_testbed mode must be one of {MODES}, not {mode!r}")
    return str(mode)


@pytest.fixture(scope="session")
def qrexec_container_engine() -> Iterator[tuple[Engine, str, str]]:
    """(engine, image, base image) for container-mode testbeds, set up once per session:
    a Docker engine (a hardened dockerd is started, and stopped at the end, when none
    answers), the base image (built from the Debian mirror when missing) and this source
    tree's qrexec-sim image."""
    from qrexec.sim.container_harness import image_tag
    from qrexec.sim.engine import Engine

    engine = Engine()
    try:
        base = engine.ensure_base_image()
        image = engine.build_image(image_tag(), base)
        yield engine, image, base
    finally:
        engine.close()


def _topology_file(request: pytest.FixtureRequest, topology: Any) -> Path | None:
    """The topology file a container testbed mounts (None: the packaged default)."""
    from qrexec.sim.topology import Topology, default_topology

    marker = request.node.get_closest_marker("qrexec_topology")
    if marker is not None and isinstance(marker.args[0], str | Path):
        return Path(marker.args[0])
    if isinstance(topology, str | Path):
        return Path(topology)
    if isinstance(topology, Topology) and topology == default_topology():
        return None
    raise TypeError(
        "container mode needs its topology as a file: mark the test "
        "@pytest.mark.qrexec_topology(PATH) or return a path from qrexec_topology"
    )


@pytest.fixture
def qrexec_testbed(
    request: pytest.FixtureRequest, qrexec_topology: Any
) -> Iterator[RunningTestbed | ContainerTestbed | AirContainerTestbed]:
    """A testbed of ``qrexec_topology``, running for this test (processes or containers)."""
    if _mode(request) == "processes":
        factory = request.getfixturevalue("qrexec_testbed_factory")
        yield factory(qrexec_topology)
        return
    from qrexec.sim.air.air_topology import AirTopology
    from qrexec.sim.air.container_testbed import AirContainerTestbed
    from qrexec.sim.container_harness import ContainerTestbed

    engine, image, base = request.getfixturevalue("qrexec_container_engine")
    topology_file = _topology_file(request, qrexec_topology)
    testbed: ContainerTestbed | AirContainerTestbed
    if topology_file is not None and isinstance(_as_topology(topology_file), AirTopology):
        # Several hosts: one compose project, hosts joined by their relays (sim/air).
        testbed = AirContainerTestbed(engine, topology_file, image=image, base=base)
    else:
        testbed = ContainerTestbed(engine, topology_file=topology_file, image=image, base=base)
    try:
        testbed.start()
        yield testbed
        died = testbed.project.unexpected_exits()
        if died:
            pytest.fail(f"containers died during the test: {', '.join(died)}")
    finally:
        try:
            logs = testbed.logs()
            request.node.add_report_section("teardown", f"qrexec-sim {testbed.project.name}", logs)
        except Exception as exc:  # a broken project must still be taken down
            request.node.add_report_section("teardown", "qrexec-sim", f"no logs: {exc}")
        testbed.close()
