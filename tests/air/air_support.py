"""A three-host topology for the cross-host tests (hostA, hostB, hostC), as TOML text."""

from __future__ import annotations

import tomllib

from qrexec.sim.air.air_topology import AirTopology, parse_air_topology

CLIENT = "#!/bin/sh\necho $1 $2\nexec cat >&2\n"
SERVER = "#!/bin/sh\nread arg1 arg2\necho $(($arg1+$arg2))\n"
# A service that copies stdin to stdout (bulk data both ways).
CAT = "#!/bin/sh\nexec cat\n"


def _host(name: str, policy: str, remotes: list[tuple[str, str, str]], vm_extra: str = "") -> str:
    lines = [
        "[[host]]",
        f'name = "{name}"',
        'relay = "relay"',
        "[host.topology.dom0]",
        'ask = "* * * allow\\n"',
        "[[host.topology.dom0.policy]]",
        'file = "30-air.policy"',
        f'text = """\n{policy}"""',
        "[[host.topology.domain]]",
        'name = "relay"',
        "[[host.topology.domain]]",
        'name = "vm1"',
        "[[host.topology.domain.file]]",
        'path = "/usr/bin/our_test_add_client"',
        f"text = {CLIENT!r}".replace("'", '"'),
        "mode = 0o755",
        "[[host.topology.domain]]",
        'name = "vm2"',
        "[[host.topology.domain.file]]",
        'path = "/usr/bin/our_test_add_server"',
        f"text = {SERVER!r}".replace("'", '"'),
        "mode = 0o755",
        "[[host.topology.domain.service]]",
        'name = "test.Add"',
        'program = "/usr/bin/our_test_add_server"',
        "[[host.topology.domain.service]]",
        'name = "test.Cat"',
        f"script = {CAT!r}".replace("'", '"'),
        vm_extra,
    ]
    for local, host, remote in remotes:
        lines += [
            "[[host.remote]]",
            f'name = "{local}"',
            f'remote_host = "{host}"',
            f'remote_name = "{remote}"',
        ]
    return "\n".join(lines) + "\n"


POLICY_A = "test.Add * vm1 hostB-vm2 allow\ntest.Cat * vm1 hostB-vm2 allow\n"
POLICY_B = "test.Add * hostA-vm1 vm2 allow\ntest.Cat * hostA-vm1 vm2 allow\n"
POLICY_C = "test.Add * vm1 hostB-vm2 allow\n"

TOPOLOGY = (
    _host("hostA", POLICY_A, [("hostB-vm2", "hostB", "vm2")])
    + _host("hostB", POLICY_B, [("hostA-vm1", "hostA", "vm1"), ("hostC-vm1", "hostC", "vm1")])
    + _host("hostC", POLICY_C, [("hostB-vm2", "hostB", "vm2")])
)


def topology() -> AirTopology:
    """The parsed three-host topology."""
    return parse_air_topology(tomllib.loads(TOPOLOGY))
