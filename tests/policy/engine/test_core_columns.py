"""Every token in every column of §6.2: accepted where the table allows it, rejected elsewhere."""

from __future__ import annotations

import pytest

from qrexec.policy.engine.system_info import DomainInfo
from qrexec.policy.engine.tokens import InvalidTarget, canonical_request_target
from qrexec.policy.loading.memory_store import policy_from_text
from tests.policy.policy_core_support import DEFAULT_DVM_UUID, VM1_UUID, VM2_UUID, system

# token → allowed in (source, target, target=, default_target=, as requested target)
TABLE = [
    ("vm1", True, True, True, True, True),
    (f"uuid:{VM1_UUID}", True, True, True, True, True),
    ("*", True, True, False, False, False),
    ("@anyvm", True, True, False, False, False),
    ("@adminvm", True, True, True, True, True),
    ("dom0", True, True, True, True, True),
    ("@default", False, True, False, False, True),
    ("@dispvm", False, True, True, True, True),
    ("@dispvm:default-dvm", True, True, True, True, True),
    ("@dispvm:@tag:dvm-tag", True, True, False, False, False),
    ("@tag:tag1", True, True, False, False, False),
    ("@type:AppVM", True, True, False, False, False),
]

# Unknown keywords and bad tags, types or disposable bases are errors, as in Qubes.
INVALID = [
    "@foo",
    "@tag:",
    "@type:",
    "@dispvm:@anyvm",
    "@dispvm:",
    "@dispvm:@tag:",
    "@dispvm:@adminvm",
    "@tag:a/b",
    "@type:App-VM",
    "@Anyvm",
]


def _parses(line: str) -> bool:
    """True when the one-line policy loads (a syntax error makes a deny-all policy)."""
    return policy_from_text(line + "\n").error is None


@pytest.mark.parametrize(("token", "src", "tgt", "redir", "dflt", "req"), TABLE)
def test_token_accepted_exactly_where_allowed(
    token: str, src: bool, tgt: bool, redir: bool, dflt: bool, req: bool
) -> None:
    assert _parses(f"test.Svc * {token} vm2 deny") is src
    assert _parses(f"test.Svc * vm1 {token} deny") is tgt
    assert _parses(f"test.Svc * vm1 vm2 allow target={token}") is redir
    assert _parses(f"test.Svc * vm1 vm2 ask default_target={token}") is dflt
    assert _parses(f"test.Svc * vm1 vm2 ask target={token}") is redir
    canonical = canonical_request_target(token, system()["vm1"], system())
    assert isinstance(canonical, str) is req


@pytest.mark.parametrize("token", INVALID)
def test_invalid_token_rejected_in_every_column(token: str) -> None:
    for line in (
        f"test.Svc * {token} vm2 deny",
        f"test.Svc * vm1 {token} deny",
        f"test.Svc * vm1 vm2 allow target={token}",
        f"test.Svc * vm1 vm2 ask default_target={token}",
    ):
        policy = policy_from_text(line + "\n")
        assert policy.error is not None, line
        assert policy.error.lineno == 1


def test_rejection_names_file_line_and_token() -> None:
    policy = policy_from_text("# comment\n\ntest.Svc * @default vm2 deny\n", "/p/10-x.policy")
    assert policy.error is not None
    assert str(policy.error).startswith("/p/10-x.policy:3: ")
    assert "@default" in str(policy.error) and "source" in str(policy.error)


@pytest.mark.parametrize(
    ("requested", "canonical"),
    [
        ("", "@default"),
        ("@default", "@default"),
        ("vm2", "vm2"),
        (f"uuid:{VM1_UUID}", "vm1"),
        (f"uuid:{VM1_UUID.upper()}", "vm1"),
        ("dom0", "dom0"),
        ("@adminvm", "dom0"),
        ("uuid:00000000-0000-0000-0000-000000000000", "dom0"),
        ("@dispvm", "@dispvm"),
        ("@dispvm:default-dvm", "@dispvm:default-dvm"),
        (f"@dispvm:uuid:{DEFAULT_DVM_UUID}", "@dispvm:default-dvm"),
        # a name or uuid that names no qube is @default, as in Qubes
        ("nonexistent", "@default"),
        ("uuid:99999999-9999-9999-9999-999999999999", "@default"),
        ("uuid:1234", "@default"),
        ("bad$name", "@default"),
        ("bad name!", "@default"),
    ],
)
def test_requested_target_canonical_form(requested: str, canonical: str) -> None:
    info = system()
    source: DomainInfo = info["vm1"]
    assert canonical_request_target(requested, source, info) == canonical


@pytest.mark.parametrize(
    ("requested", "why"),
    [
        ("@anyvm", "cannot be the target"),
        ("*", "cannot be the target"),
        ("@tag:tag1", "cannot be the target"),
        ("@type:AppVM", "cannot be the target"),
        ("@dispvm:@tag:dvm-tag", "cannot be the target"),
        ("@foo", "unknown keyword"),
        ("@dispvm:", "invalid disposable template"),
        ("@dispvm:vm2", "not a disposable template"),
        (f"@dispvm:uuid:{VM2_UUID}", "not a disposable template"),
        ("@dispvm:dom0", "not a disposable template"),
        ("@dispvm:uuid:00000000-0000-0000-0000-000000000000", "not a disposable template"),
        ("@dispvm:nonexistent", "no qube"),
        ("@dispvm:uuid:99999999-9999-9999-9999-999999999999", "no qube"),
    ],
)
def test_invalid_requested_target(requested: str, why: str) -> None:
    info = system()
    canonical = canonical_request_target(requested, info["vm1"], info)
    assert isinstance(canonical, InvalidTarget)
    assert why in canonical.reason
