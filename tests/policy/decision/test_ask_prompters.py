"""Ask prompts and answers: JSON shape, answer validation, scripted/queued/terminal prompters."""

from __future__ import annotations

import asyncio
import json
import os
import select
from pathlib import Path

import pytest

from qrexec.errors import RemoteProtocolError
from qrexec.policy.decision.agent_client import PolicyAskPrompter
from qrexec.policy.decision.ask import (
    AskPrompt,
    DenyPrompter,
    QueuedPrompter,
    ScriptedPrompter,
    parse_ask_answer,
)
from qrexec.policy.decision.ask_terminal import TerminalPrompter, interpret_reply
from qrexec.policy.decision.notify import Notification
from qrexec.policy.decision.prompters import make_prompter

PROMPT = AskPrompt(
    source="work",
    service="qubes.Filecopy",
    argument="+",
    targets=("personal", "vault", "@dispvm:dvm"),
    default_target="",
    icons={"personal": "appvm-yellow"},
    requested_target="vault",
)


def test_prompt_json_has_exactly_the_spec_keys() -> None:
    data = json.loads(PROMPT.to_json())
    assert data == {
        "source": "work",
        "service": "qubes.Filecopy",
        "argument": "+",
        "targets": ["personal", "vault", "@dispvm:dvm"],
        "default_target": "",
        "icons": {"personal": "appvm-yellow"},
    }
    back = AskPrompt.from_json(PROMPT.to_json())
    assert back.targets == PROMPT.targets and back.icons == PROMPT.icons


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[]", "not a JSON object"),
        (b"{", "not JSON"),
        (b'{"source": 1}', "source must be a string"),
        (
            b'{"source":"a","service":"s","argument":"x","default_target":"","targets":[]}',
            "argument must start",
        ),
        (
            b'{"source":"a","service":"s","argument":"+","default_target":"","targets":"vm"}',
            "targets must be a list",
        ),
        (
            b'{"source":"a","service":"s","argument":"+","default_target":"",'
            b'"targets":[],"icons":{"a":1}}',
            "icons",
        ),
    ],
)
def test_prompt_json_validation(raw: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        AskPrompt.from_json(raw)


def test_notification_json_round_trip() -> None:
    note = Notification("deny", "test.Add", "+x", "work", "vm2")
    assert Notification.from_json(note.to_json()) == note


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[]", "^notification is not a JSON object$"),
        (b"{", "^notification is not JSON"),
        (b" " * 65537, "^notification longer than 65536 bytes$"),
        (b'{"resolution": "deny"}', "^notification: service must be a string$"),
        (
            b'{"resolution":"maybe","service":"s","argument":"+","source":"a","target":"b"}',
            "^notification: unknown resolution 'maybe'$",
        ),
    ],
)
def test_notification_json_validation(raw: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        Notification.from_json(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"deny", None),
        (b"deny\n", None),
        (b"allow:vault", "vault"),
        (b"allow:@dispvm:dvm\n", "@dispvm:dvm"),
    ],
)
def test_valid_answers(raw: bytes, expected: str | None) -> None:
    assert parse_ask_answer(raw, PROMPT) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"allow:sys-net", "not a candidate"),
        (b"allow:", "not a candidate"),
        (b"allow", "neither"),
        (b"yes", "neither"),
        (b"", "neither"),
        (b"deny\n\n", "neither"),
        (b"allow:vault\nextra", "not a candidate"),
        (b"allow:\xffvault", "not ASCII"),
        (b"allow:" + b"v" * 300, "longer than"),
    ],
)
def test_invalid_answers(raw: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        parse_ask_answer(raw, PROMPT)


@pytest.mark.parametrize(
    ("default", "requested", "targets", "expected"),
    [
        ("personal", "vault", ("personal", "vault"), "personal"),
        ("", "vault", ("personal", "vault"), "vault"),
        ("", "@default", ("personal", "vault"), None),
        ("", "@default", ("personal",), "personal"),
        ("gone", "@default", ("personal", "vault"), None),
    ],
)
def test_yes_target(
    default: str, requested: str, targets: tuple[str, ...], expected: str | None
) -> None:
    p = AskPrompt("a", "s", "+", targets, default_target=default, requested_target=requested)
    assert p.yes_target() == expected


def test_scripted_prompter_first_matching_rule(tmp_path: Path) -> None:
    script = tmp_path / "answers"
    script.write_text(
        "# service arg source answer\n"
        "qubes.Filecopy +other * deny\n"
        "qubes.Filecopy * work allow:personal\n"
        "* * * allow\n"
    )
    prompter = ScriptedPrompter(str(script))
    assert asyncio.run(prompter.ask(PROMPT, "dom0")) == b"allow:personal"
    other = AskPrompt("work", "qubes.Filecopy", "+other", ("vault",))
    assert asyncio.run(prompter.ask(other, "dom0")) == b"deny"
    third = AskPrompt("mail", "test.Add", "+", ("vault", "personal"), requested_target="vault")
    assert asyncio.run(prompter.ask(third, "dom0")) == b"allow:vault"
    # Re-read at every prompt: an edit takes effect at once.
    script.write_text("* * * deny\n")
    assert asyncio.run(prompter.ask(third, "dom0")) == b"deny"


def test_scripted_prompter_missing_broken_and_unmatched_deny(tmp_path: Path) -> None:
    assert asyncio.run(ScriptedPrompter(str(tmp_path / "none")).ask(PROMPT, "dom0")) == b"deny"
    broken = tmp_path / "broken"
    broken.write_text("* * allow\n")
    assert asyncio.run(ScriptedPrompter(str(broken)).ask(PROMPT, "dom0")) == b"deny"
    unmatched = tmp_path / "unmatched"
    unmatched.write_text("other.Service * * allow\n")
    assert asyncio.run(ScriptedPrompter(str(unmatched)).ask(PROMPT, "dom0")) == b"deny"


def test_scripted_silent_never_answers(tmp_path: Path) -> None:
    script = tmp_path / "answers"
    script.write_text("* * * silent\n")

    async def run() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await ScriptedPrompter(str(script)).ask(PROMPT, "dom0")

    asyncio.run(run())


def test_queued_prompter_records_prompts() -> None:
    q = QueuedPrompter(["allow", "allow:bogus", "deny"])

    async def run() -> list[bytes]:
        return [await q.ask(PROMPT, "gui") for _ in range(4)]

    assert asyncio.run(run()) == [b"allow:vault", b"allow:bogus", b"deny", b"deny"]
    assert [g for _, g in q.prompts] == ["gui"] * 4


def test_make_prompter_specs(tmp_path: Path) -> None:
    kw = {"agent_socket": str(tmp_path / "s"), "qrexec_client": "qrexec-client"}
    assert isinstance(make_prompter("deny", **kw), DenyPrompter)
    assert isinstance(make_prompter("scripted:/x", **kw), ScriptedPrompter)
    assert isinstance(make_prompter("policy-ask", **kw), PolicyAskPrompter)
    term = make_prompter("terminal:/dev/pts/9", **kw)
    assert isinstance(term, TerminalPrompter) and term.tty_path == "/dev/pts/9"
    for bad in ("scripted:", "zenity", "deny:x", "policy-ask:x"):
        with pytest.raises(ValueError, match="unknown prompter"):
            make_prompter(bad, **kw)
    assert asyncio.run(DenyPrompter().ask(PROMPT, "dom0")) == b"deny"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("y", "allow:vault"),
        ("YES\n", "allow:vault"),
        ("personal", "allow:personal"),
        ("n", "deny"),
        ("", "deny"),
        ("sys-net", None),
        ("maybe", None),
    ],
)
def test_terminal_interpretation(line: str, expected: str | None) -> None:
    assert interpret_reply(line, PROMPT) == expected


def _read_until(fd: int, needles: list[bytes]) -> bytes:
    data = b""
    while not all(n in data for n in needles):
        ready, _, _ = select.select([fd], [], [], 30)
        if not ready:
            break
        data += os.read(fd, 65536)
    return data


def test_terminal_prompter_on_a_pty() -> None:
    master, slave = os.openpty()
    tty_path = os.ttyname(slave)
    try:

        async def run() -> bytes:
            prompter = TerminalPrompter(tty_path)
            task = asyncio.create_task(prompter.ask(PROMPT, "dom0"))
            await asyncio.sleep(0)
            os.write(master, b"sys-net\n")  # not a candidate: asked again
            os.write(master, b"@dispvm:dvm\n")
            return await task

        answer = asyncio.run(run())
        assert answer == b"allow:@dispvm:dvm"
        # pty output reaches the master side asynchronously: read until it has all come.
        shown = _read_until(master, [b"qubes.Filecopy+", b"Answer y, n or one of", b"-> allow"])
        assert b"work wants to call qubes.Filecopy+" in shown
    finally:
        os.close(master)
        os.close(slave)


def test_terminal_prompter_denies_when_the_terminal_goes_away() -> None:
    master, slave = os.openpty()
    tty_path = os.ttyname(slave)
    os.close(slave)

    async def run() -> bytes:
        task = asyncio.create_task(TerminalPrompter(tty_path).ask(PROMPT, "dom0"))
        for _ in range(5):
            await asyncio.sleep(0)
        os.close(master)
        return await task

    assert asyncio.run(run()) == b"deny"
