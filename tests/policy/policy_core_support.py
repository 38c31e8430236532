"""Shared test data for the policy-core tests: one small system and helpers to evaluate."""

from __future__ import annotations

from qrexec.policy.engine.model import Request, Resolution
from qrexec.policy.engine.policy import Policy
from qrexec.policy.engine.system_info import SystemInfo, parse_system_info
from qrexec.policy.loading.memory_store import policy_from_text

VM1_UUID = "11111111-1111-1111-1111-111111111111"
VM2_UUID = "22222222-2222-2222-2222-222222222222"
DOM0_UUID = "00000000-0000-0000-0000-000000000000"
DEFAULT_DVM_UUID = "dddddddd-dddd-dddd-dddd-dddddddddddd"

SYSTEM_DATA = {
    "domains": {
        "dom0": {
            "type": "AdminVM",
            "uuid": DOM0_UUID,
            "tags": ["dom0-tag"],
            "power_state": "Running",
            "default_dispvm": "default-dvm",
        },
        "vm1": {
            "type": "AppVM",
            "uuid": VM1_UUID,
            "tags": ["tag1"],
            "power_state": "Running",
            "default_dispvm": "default-dvm",
            "icon": "red",
        },
        "vm2": {
            "type": "AppVM",
            "uuid": VM2_UUID,
            "tags": ["tag2"],
            "power_state": "Halted",
            "default_dispvm": "other-dvm",
        },
        "vm3": {
            "type": "AppVM",
            "tags": ["tag1", "tag2"],
            "power_state": "Running",
            "default_dispvm": None,
        },
        "default-dvm": {
            "type": "AppVM",
            "uuid": DEFAULT_DVM_UUID,
            "tags": ["dvm-tag"],
            "template_for_dispvms": True,
            "power_state": "Halted",
        },
        "other-dvm": {"type": "AppVM", "tags": [], "template_for_dispvms": True},
        "tmpl": {"type": "TemplateVM", "tags": ["tag1"]},
        "disp12": {
            "type": "DispVM",
            "template": "default-dvm",
            "power_state": "Running",
            "default_dispvm": "default-dvm",
        },
        "sys-hidden": {"type": "AppVM", "internal": True, "tags": ["tag1"]},
    }
}


def system() -> SystemInfo:
    return parse_system_info(SYSTEM_DATA)


def evaluate(
    policy: Policy | str, source: str, target: str, service: str = "test.Svc", argument: str = "+"
) -> Resolution:
    if isinstance(policy, str):
        policy = policy_from_text(policy)
    return policy.evaluate(Request(service, argument, source, target), system())


def outcome(res: Resolution) -> tuple[str, str | None]:
    """(action, target) — the part of a resolution most tests compare."""
    return res.action.value, res.target
