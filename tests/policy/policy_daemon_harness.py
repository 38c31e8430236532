"""Test harness for the policy daemon tests: a policy tree in tmp_path, the daemon running
in a thread with its own event loop, and a raw §6.1 client on a blocking unix socket.

The client knows nothing of our codec: tests hand it literal request bytes and parse the
answer lines themselves, so the daemon is checked against the spec, not against itself.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qrexec.policy.decision.daemon import build_parser, serve

UUIDS = {
    "work": "11111111-1111-1111-1111-111111111111",
    "personal": "22222222-2222-2222-2222-222222222222",
    "vault": "33333333-3333-3333-3333-333333333333",
    "dvm": "44444444-4444-4444-4444-444444444444",
    "sys-gui": "55555555-5555-5555-5555-555555555555",
}

SYSTEM_INFO = {
    "domains": {
        "dom0": {"type": "AdminVM", "power_state": "Running", "icon": "adminvm-black"},
        "work": {
            "uuid": UUIDS["work"],
            "power_state": "Running",
            "default_dispvm": "dvm",
            "icon": "appvm-red",
            "tags": ["guivm-sys-gui"],
        },
        "personal": {
            "uuid": UUIDS["personal"],
            "power_state": "Running",
            "icon": "appvm-yellow",
            "guivm": "sys-gui",
        },
        "vault": {"uuid": UUIDS["vault"], "power_state": "Halted", "icon": "appvm-black"},
        "dvm": {"uuid": UUIDS["dvm"], "template_for_dispvms": True, "power_state": "Halted"},
        "sys-gui": {"uuid": UUIDS["sys-gui"], "power_state": "Running"},
    }
}

POLICY = """\
test.Allow * work personal allow
test.Allow * work @adminvm allow user=root
test.Ask * work @anyvm ask default_target=personal
test.AskNoDefault * work @anyvm ask
test.Disp * work @dispvm allow
test.Redirect * work @anyvm allow target=vault
test.Notify * work @anyvm allow notify=yes
test.Quiet * @anyvm @anyvm deny notify=no
test.Deny * @anyvm @anyvm deny
"""


@dataclass
class PolicyTree:
    root: Path
    policy_dir: Path = field(init=False)
    system_info: Path = field(init=False)
    audit: Path = field(init=False)
    answers: Path = field(init=False)
    socket: Path = field(init=False)
    eval_socket: Path = field(init=False)
    gui_socket: Path = field(init=False)

    def __post_init__(self) -> None:
        self.policy_dir = self.root / "policy.d"
        self.policy_dir.mkdir()
        self.system_info = self.root / "system-info.json"
        self.system_info.write_text(json.dumps(SYSTEM_INFO))
        self.audit = self.root / "audit.jsonl"
        self.answers = self.root / "answers"
        self.answers.write_text("* * * deny\n")
        self.socket = self.root / "policy.sock"
        self.eval_socket = self.root / "eval.sock"
        self.gui_socket = self.root / "gui.sock"
        self.write_policy(POLICY)

    def write_policy(self, text: str, name: str = "30-user.policy") -> None:
        (self.policy_dir / name).write_text(text)

    def argv(self, *extra: str) -> list[str]:
        return [
            "--socket-path", str(self.socket),
            "--eval-socket-path", str(self.eval_socket),
            "--gui-socket-path", str(self.gui_socket),
            "--policy-path", str(self.policy_dir),
            "--legacy-policy-dir", str(self.root / "legacy"),
            "--policy-2011-dir", str(self.root / "policy-2011"),
            "--system-info", str(self.system_info),
            "--audit-log", str(self.audit),
            "--ask-prompter", f"scripted:{self.answers}",
            *extra,
        ]  # fmt: skip

    def audit_records(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@contextmanager
def running_daemon(tree: PolicyTree, *extra: str) -> Iterator[None]:
    """The daemon in a thread; stopped (and checked to have stopped cleanly) on exit."""
    args = build_parser().parse_args(tree.argv(*extra))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []
    stop_box: list[asyncio.Event] = []

    def run() -> None:
        async def main() -> None:
            stop, ready = asyncio.Event(), asyncio.Event()
            stop_box.append(stop)
            task = asyncio.create_task(serve(args, {}, ready=ready, stop=stop))
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            started.set()
            await task

        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            failure.append(exc)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "daemon did not start"
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop_box[0].set)
        thread.join(30)
        assert not thread.is_alive(), "daemon did not stop"
        if failure:
            raise failure[0]


def raw_call(path: Path, data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data`` as is and read the answer until the daemon closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(path))
        if data:
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def query(source: str, target: str, call: str, *extra: str) -> bytes:
    lines = [f"source={source}", f"intended_target={target}", f"service_and_arg={call}", *extra]
    return ("\n".join(lines) + "\n\n").encode()


def answer_fields(data: bytes) -> dict[str, str]:
    """Parse an answer the way §6.1 describes it (independent of our codec)."""
    text = data.decode("ascii")
    assert text.endswith("\n") and not text.endswith("\n\n"), data
    out: dict[str, str] = {}
    for line in text[:-1].split("\n"):
        key, _, value = line.partition("=")
        assert key not in out, f"duplicate {key}"
        out[key] = value
    return out
