"""qrexec-client-vm's command line (spec §8): parsed without any process or socket."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qrexec.client.client_vm import build_trigger, resolve_local_program
from qrexec.client.client_vm_args import (
    DEFAULT_AGENT_SOCKET,
    HelpRequested,
    parse_args,
)
from qrexec.errors import UsageError
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import TriggerService4


def test_options_stop_at_the_first_non_option() -> None:
    opts = parse_args(["-t", "vm2", "svc+arg", "/bin/prog", "-T", "--x"], {})
    assert (opts.target, opts.service) == ("vm2", "svc+arg")
    assert opts.local_program == ("/bin/prog", "-T", "--x")
    assert opts.filter_stdout is True


def test_long_options_and_values() -> None:
    opts = parse_args(
        [
            "--buffer-size=131072",
            "--agent-socket=/tmp/a.sock",
            "--prefix-data",
            "pre",
            "--source-qube=relay",
            "--no-filter-escape-chars-stdout",
            "--filter-escape-chars-stderr",
            "vm2",
            "svc",
        ],
        {},
    )
    assert opts.buffer_size == 131072
    assert opts.agent_socket == "/tmp/a.sock"
    assert opts.prefix_data == b"pre"
    assert opts.source_qube == "relay"
    assert (opts.filter_stdout, opts.filter_stderr) == (False, True)


def test_agent_socket_from_environment_and_default() -> None:
    assert parse_args(["vm2", "svc"], {}).agent_socket == DEFAULT_AGENT_SOCKET
    env = {"QREXEC_AGENT_SOCKET": "/env.sock"}
    assert parse_args(["vm2", "svc"], env).agent_socket == "/env.sock"
    assert parse_args(["-a", "/flag.sock", "vm2", "svc"], env).agent_socket == "/flag.sock"


def test_dollar_reads_as_at() -> None:
    assert parse_args(["$dispvm:$tag:x", "svc"], {}).target == "@dispvm:@tag:x"


def test_no_tty_means_no_filtering() -> None:
    # Under pytest stdout and stderr are not terminals.
    opts = parse_args(["vm2", "svc"], {})
    assert (opts.filter_stdout, opts.filter_stderr) == (False, False)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["vm2"],
        ["--buffer-size=lots", "vm2", "svc"],
        ["--buffer-size=12", "vm2", "svc"],
        ["--unknown", "vm2", "svc"],
        ["vm2", ""],
        ["vm2", "+arg"],
        ["vm2", "s" * 65000],
        ["--use-stdin-socket", "vm2", "svc", "/bin/true"],
    ],
)
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv, {})


def test_help() -> None:
    with pytest.raises(HelpRequested):
        parse_args(["-h", "vm2", "svc"], {})


def test_limits_are_the_wire_limits() -> None:
    opts = parse_args(["t" * 63, "s" * 64999], {})
    frame = build_trigger(opts)
    (message,) = FrameDecoder(4).feed(frame)
    assert isinstance(message, TriggerService4)
    assert message.service_name == b"s" * 64999


def test_trigger_layout_is_always_v4_byte_for_byte() -> None:
    # R4.3's client sends TRIGGER_SERVICE4 whatever the version; the agent converts.
    opts = parse_args(["-s", "src", "vm2", "svc+arg"], {"QREXEC_PROTOCOL_VERSION": "3"})
    payload = (
        b"src".ljust(64, b"\0")
        + b"vm2".ljust(64, b"\0")
        + b"SOCKET".ljust(32, b"\0")
        + b"svc+arg\0"
    )
    assert build_trigger(opts) == struct.pack("<II", 0x213, len(payload)) + payload


def test_target_and_source_are_cut_to_63_bytes_and_only_target_gets_at() -> None:
    # Spec §15.7: silently cut, no usage error; `$` -> `@` on the target only.
    opts = parse_args(["-s", "$q" + "q" * 70, "$t" + "t" * 70, "svc"], {})
    frame = build_trigger(opts)
    payload = frame[8:]
    assert payload[:64] == (b"$q" + b"q" * 61) + b"\0"
    assert payload[64:128] == (b"@t" + b"t" * 61) + b"\0"
    assert payload[160:] == b"svc\0"


def test_local_program_resolved_inside_the_domain_root(tmp_path: Path) -> None:
    root = tmp_path
    program = root / "usr/bin/tool"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    env = {"QREXEC_DOMAIN_ROOT": str(root)}
    assert resolve_local_program(["/usr/bin/tool", "a"], env) == [str(program), "a"]
    # Not under the root: run as given (the host's /bin/sh).
    assert resolve_local_program(["/bin/sh"], env) == ["/bin/sh"]
    assert resolve_local_program(["/usr/bin/tool"], {}) == ["/usr/bin/tool"]
    assert resolve_local_program(["tool"], env) == ["tool"]
