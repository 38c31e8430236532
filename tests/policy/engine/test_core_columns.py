"""Every token in every column of §6.2: accepted where the table allows it, rejected elsewhere."""

from __future__ import annotations

import pytest

from qrexec.policy.engine.system_info import DomainInfo
from qrexec.policy.engine.tokens import canonical_request_target
from qrexec.policy.loading.memory_store import policy_from_text
from tests.policy.policy_core_support import VM1_UUID, system

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

INVALID = [
    "@foo",
    "@tag:",
    "@type:",
    "uuid:1234",
    "vm!1",
    "@dispvm:@anyvm",
    "-vm",
    "$anyvm",
    "@dispvm:",
    "@dispvm:@tag:",
    "@tag:a/b",
    "vm1,allow",
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
    assert (canonical != "@default" or token == "@default") is req


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
        ("@dispvm:vm2", "@default"),  # not a disposable template
        ("@dispvm:nonexistent", "@default"),
        ("nonexistent", "@default"),
        ("uuid:99999999-9999-9999-9999-999999999999", "@default"),
        ("@anyvm", "@default"),
        ("*", "@default"),
        ("@tag:tag1", "@default"),
        ("bad name!", "@default"),
    ],
)
def test_requested_target_canonical_form(requested: str, canonical: str) -> None:
    info = system()
    source: DomainInfo = info["vm1"]
    assert canonical_request_target(requested, source, info) == canonical
