"""``qrexec-sim``: run a dom0 + VMs qrexec system on this machine or in containers.

Commands (``qrexec-sim COMMAND --help`` for details)::

    up [--topology FILE] [--trace]  start the testbed (returns once every agent said HELLO)
    status                          each process: running or dead (exit 1 if any is dead)
    exec VM 'USER:cmd'              run a command in a VM from dom0 (qrexec-client)
    call SOURCE TARGET SERVICE[+ARG] [--] [PROGRAM ARGS...]
                                    call a service from a domain (through policy from a VM)
    logs [NAME...]                  the programs' logs and the policy audit log
    trace                           per-call timelines of a testbed started with up --trace
    down                            stop everything that up started, remove its sockets
    compose [--topology FILE]       print the compose file for a topology (a multi-host
                                    file: -o FILE, keys written to FILE's folder)
    demo                            the README walk-through: up, calls, file copy, down

The run directory (``--run-dir`` or ``$QREXEC_SIM_RUN_DIR``) holds one testbed's state, so
several testbeds run side by side with different directories. ``container`` is what
the containers run; people do not call it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from qrexec.errors import QrexecError
from qrexec.sim.audit_format import format_audit_line
from qrexec.sim.rundir import default_run_dir
from qrexec.sim.topology import Topology, default_topology, load_topology

log = logging.getLogger("qrexec.sim")


def _topology(path: str | None) -> Topology:
    return load_topology(path) if path else default_topology()


def _progress(message: str) -> None:
    print(f"qrexec-sim: {message}", file=sys.stderr, flush=True)


def _is_air(run_dir: str) -> bool:
    """A multi-host testbed runs (or ran) in ``run_dir``."""
    return (Path(run_dir) / "air-state.json").exists()


def cmd_up(args: argparse.Namespace) -> int:
    from qrexec.sim.testbed import Testbed

    if args.topology and _multi_host_file(args.topology):
        from qrexec.sim.air.air_topology import load_air_topology
        from qrexec.sim.air.testbed import AirTestbed

        air = AirTestbed(load_air_topology(args.topology), Path(args.run_dir), mode=args.network)
        air.up(progress=_quiet if args.quiet else _progress)
        print(air.path)
        return 0
    testbed = Testbed(args.run_dir, _topology(args.topology))
    testbed.up(progress=_quiet if args.quiet else _progress, trace=args.trace)
    print(testbed.run.path)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from qrexec.sim.testbed import Testbed
    from qrexec.trace_merge import merge

    path = Testbed(args.run_dir).trace_file
    if not path.exists():
        print(f"no trace in {path.parent}: start the testbed with `qrexec-sim up --trace`")
        return 1
    sys.stdout.write(merge([path.read_text(errors="replace")], show_loose=args.loose))
    return 0


def _quiet(_: str) -> None:
    pass


def _multi_host_file(path: str) -> bool:
    import tomllib

    try:
        with open(path, "rb") as handle:
            return "host" in tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # load_topology reports it


def cmd_status(args: argparse.Namespace) -> int:
    from qrexec.sim.testbed import Testbed

    if _is_air(args.run_dir):
        from qrexec.sim.air.testbed import AirTestbed

        lines = AirTestbed.open(Path(args.run_dir)).status()
        print("\n".join(lines))
        return 1 if any(line.endswith("DEAD") for line in lines) or not lines else 0

    testbed = Testbed(args.run_dir)
    statuses = testbed.status()
    if not statuses:
        print(f"no testbed running in {testbed.run.path}")
        return 1
    dead = 0
    for entry in statuses:
        record = entry.record
        word = "running" if entry.alive else "DEAD"
        dead += not entry.alive
        print(f"{record.role:14} {record.domain:14} pid {record.pid:<8} {word}")
    domains = testbed.domain_states()
    up = sorted(n for n, d in domains.items() if d.running)
    print(f"domains running: {', '.join(up)}")
    if dead:
        print(f"{dead} process(es) dead: the testbed is broken; run `qrexec-sim down`")
        return 1
    return 0


def _run_passthrough(argv: list[str], env: dict[str, str], cwd: str | None) -> int:
    import subprocess

    return subprocess.run(argv, env=env, cwd=cwd, check=False).returncode


def cmd_exec(args: argparse.Namespace) -> int:
    from qrexec.sim.testbed import Testbed

    testbed = Testbed(args.run_dir)
    argv, env = testbed.exec_argv(args.vm, args.cmdline)
    return _run_passthrough(argv, env, None)


def cmd_call(args: argparse.Namespace) -> int:
    from qrexec.sim.testbed import Testbed

    program = list(args.program)
    if program[:1] == ["--"]:
        program = program[1:]
    if _is_air(args.run_dir):
        from qrexec.sim.air.testbed import AirTestbed

        air = AirTestbed.open(Path(args.run_dir))
        argv, env, cwd = air.call_argv(args.source, args.target, args.service, program)
        return _run_passthrough(argv, env, cwd)
    testbed = Testbed(args.run_dir)
    argv, env, cwd = testbed.call_argv(args.source, args.target, args.service, program)
    return _run_passthrough(argv, env, cwd)


def cmd_logs(args: argparse.Namespace) -> int:
    from qrexec.sim.rundir import RunDir

    run = RunDir(args.run_dir)
    files = sorted(run.log_dir.glob("*.log")) if run.log_dir.exists() else []
    if args.names:
        files = [f for f in files if any(n in f.stem.split(".") for n in args.names)]
    for path in files:
        print(f"==> {path.name} <==")
        text = path.read_text(errors="replace")
        lines = text.splitlines()[-args.lines :] if args.lines else text.splitlines()
        for line in lines:
            print(line)
    print("==> policy audit log <==")
    if run.audit_log.exists():
        for line in run.audit_log.read_text(errors="replace").splitlines():
            print(line if args.raw else format_audit_line(line))
    else:
        print("(no decisions yet)")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from qrexec.sim.testbed import Testbed

    if _is_air(args.run_dir):
        from qrexec.sim.air.testbed import AirTestbed

        air = AirTestbed.open(Path(args.run_dir))
        air.down()
        (Path(args.run_dir) / "air-state.json").unlink(missing_ok=True)
        if not args.quiet:
            _progress(f"stopped every host of the multi-host testbed in {args.run_dir}")
        return 0
    testbed = Testbed(args.run_dir)
    stopped = testbed.down()
    if not args.quiet:
        _progress(f"stopped {len(stopped)} process(es); sockets removed from {testbed.run.path}")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from qrexec.sim.compose import render_compose

    if args.topology and _multi_host_file(args.topology):
        return _compose_multi_host(args)
    if args.topology:
        topo_path = Path(args.topology)
        out_dir = Path(args.output).parent if args.output else Path.cwd()
        rel = os.path.relpath(topo_path.parent.absolute(), out_dir.absolute())
        context = os.path.relpath(Path(args.context).absolute(), out_dir.absolute())
        text = render_compose(
            load_topology(topo_path),
            source=topo_path.name,
            topology_dir=rel,
            topology_name=topo_path.name,
            build_context=context,
        )
    else:
        text = render_compose(default_topology())
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _bind_source(relative: str) -> str:
    """A relative folder as a compose bind source (``examples`` alone names a volume)."""
    return relative if relative.startswith((".", "/")) else "./" + relative


def _compose_multi_host(args: argparse.Namespace) -> int:
    """``compose --topology MULTI.toml -o FILE``: FILE, and FILE's OpenSSH keys beside it."""
    from qrexec.sim.air.air_topology import load_air_topology
    from qrexec.sim.air.compose_air import render_air_compose, write_ssh_material

    if not args.output:
        raise ValueError("a multi-host compose file comes with its keys: give -o FILE")
    topo_path = Path(args.topology)
    air = load_air_topology(topo_path)
    output = Path(args.output)
    out_dir = output.absolute().parent
    ssh_dir = output.absolute().with_name(output.stem + "-ssh")
    write_ssh_material(air, ssh_dir)
    text = render_air_compose(
        air,
        source=topo_path.name,
        ssh_dir="./" + ssh_dir.name,
        topology_dir=_bind_source(os.path.relpath(topo_path.parent.absolute(), out_dir)),
        topology_name=topo_path.name,
        build_context=os.path.relpath(Path(args.context).absolute(), out_dir),
    )
    output.write_text(text)
    _progress(f"wrote {output} and its OpenSSH keys in {ssh_dir}")
    return 0


def cmd_container(args: argparse.Namespace) -> int:
    from qrexec.sim import container

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.host:
        # One host of a multi-host compose project (sim/air/compose_air.py).
        from qrexec.sim.air import container_relay
        from qrexec.sim.air.air_topology import load_air_topology

        air = load_air_topology(args.topology)
        topology, remote_vms = container_relay.host_view(air, args.host)
        if args.role == "dom0":
            return container.Dom0Supervisor(topology, remote_vms).run()
        sidecar = container_relay.relay_sidecar(air, args.host, args.role)
        return container.run_vm(topology, args.role, sidecar)
    topology = _topology(args.topology)
    if args.role == "dom0":
        return container.Dom0Supervisor(topology).run()
    return container.run_vm(topology, args.role)


def cmd_demo(args: argparse.Namespace) -> int:
    from qrexec.sim.demo import run_demo

    return run_demo(args.run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-sim",
        description="A dom0 + VMs qrexec testbed: plain processes or containers.",
    )
    parser.add_argument(
        "--run-dir",
        default=str(default_run_dir()),
        help="the testbed's state directory (default $QREXEC_SIM_RUN_DIR or %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the testbed")
    p.add_argument(
        "--topology", help="topology file, single- or multi-host (default: the packaged default)"
    )
    p.add_argument(
        "--network",
        choices=("netns", "loopback"),
        help="multi-host only: namespaces (root; the default as root) or loopback ports",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--trace", action="store_true", help="trace every call's stages (QREXEC_TRACE)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("trace", help="merge the trace lines into one timeline per call")
    p.add_argument("--loose", action="store_true", help="also list lines linked to no call")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("status", help="report each process")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("exec", help="run USER:cmd in a VM from dom0")
    p.add_argument("vm")
    p.add_argument("cmdline", metavar="USER:cmd")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("call", help="call a service from a domain (HOST:VM across hosts)")
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("service", metavar="SERVICE[+ARG]")
    p.add_argument("program", nargs=argparse.REMAINDER, metavar="[--] PROGRAM ARGS")
    p.set_defaults(func=cmd_call)

    p = sub.add_parser("logs", help="show logs and the policy audit log")
    p.add_argument("names", nargs="*", help="only these domains or roles")
    p.add_argument("-n", "--lines", type=int, default=0, help="last N lines of each log")
    p.add_argument("--raw", action="store_true", help="audit log as JSON lines")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("down", help="stop the testbed")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("compose", help="print a compose file for a topology")
    p.add_argument("--topology", help="topology file (default: the packaged default)")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--context", default=".", help="the repository (the image's build context)")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("demo", help="the README walk-through")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("container")  # what the containers run; not listed
    p.add_argument("role")
    p.add_argument("--topology")
    p.add_argument("--host", help="the host this container belongs to (multi-host files)")
    p.set_defaults(func=cmd_container)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("container",):
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="qrexec-sim: %(message)s",
        )
    try:
        result: int = args.func(args)
        return result
    except (QrexecError, RuntimeError, ValueError, TimeoutError, OSError) as exc:
        print(f"qrexec-sim: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
