"""The import directions of the package, and no import circles, checked on the source.

Every ``import`` counts: at module level, inside functions (a deferred import still is a
dependency) and under ``TYPE_CHECKING``. The layers, bottom up:

* the shared small modules (:data:`SHARED`) import only each other;
* ``qrexec.protocol`` (pure), then ``qrexec.backends`` (transports);
* the policy: ``engine`` (pure) ← ``loading`` ← ``decision`` ← ``tools``;
* ``qrexec.services`` (running a service), shared by the three program packages;
* the programs ``qrexec.agent``, ``qrexec.daemon``, ``qrexec.client``: none imports another;
* ``qrexec.sim``, the testbed, on top of everything; nothing below imports it.

A new top-level module or package must be placed in :data:`ALLOWED` (the test says so).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Small modules every layer may use.
SHARED = frozenset(
    {
        "qrexec",
        "qrexec.errors",
        "qrexec.lazy_logging",
        "qrexec.unix_address",
        "qrexec.trace",
        "qrexec.pipe_buffers",
        "qrexec.listening",
        "qrexec.trace_merge",
        "qrexec._record",
        "qrexec.splice_support",
    }
)

#: component -> the components it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "shared": frozenset(),
    "protocol": frozenset({"shared"}),
    "backends": frozenset({"shared", "protocol"}),
    "policy": frozenset(),
    "policy.engine": frozenset({"shared"}),
    "policy.loading": frozenset({"shared", "policy.engine"}),
    "policy.decision": frozenset(
        {"shared", "protocol", "backends", "policy.engine", "policy.loading"}
    ),
    "policy.tools": frozenset(
        {"shared", "protocol", "backends", "policy.engine", "policy.loading", "policy.decision"}
    ),
    "services": frozenset({"shared", "protocol", "backends"}),
    "agent": frozenset({"shared", "protocol", "backends", "services"}),
    "daemon": frozenset(
        {"shared", "protocol", "backends", "services", "policy.engine", "policy.decision"}
    ),
    "client": frozenset({"shared", "protocol", "backends", "services"}),
    "air": frozenset({"shared"}),
    "sim": frozenset(
        {
            "shared",
            "protocol",
            "backends",
            "policy",
            "policy.engine",
            "policy.loading",
            "policy.decision",
            "policy.tools",
            "services",
            "agent",
            "daemon",
            "client",
            "air",
        }
    ),
}


def _module_files() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (the linked folders included)."""
    found: dict[str, Path] = {}
    roots = [
        (ROOT / "qrexec", "qrexec"),
        (ROOT / "backends", "qrexec.backends"),
        (ROOT / "sim", "qrexec.sim"),
    ]
    for base, prefix in roots:
        for path in base.rglob("*.py"):
            relative = path.relative_to(base)
            if base.name == "qrexec" and relative.parts[0] in ("backends", "sim"):
                continue  # the links: read through their real folders
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _module_files()


def _imports(name: str, path: Path) -> set[str]:
    """The qrexec modules ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    result: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if not (target == "qrexec" or target.startswith("qrexec.")):
                continue
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                result.add(target)
    return result


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def component(module: str) -> str:
    """The layer a module belongs to (see the module docstring)."""
    if module in SHARED:
        return "shared"
    parts = module.split(".")
    if parts[1] == "policy" and len(parts) >= 3:
        return f"policy.{parts[2]}"
    return parts[1]


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = sorted(m for m in MODULES if component(m) not in ALLOWED)
    assert not unknown, (
        f"place these modules in a layer of tests/test_import_layers.py (SHARED or ALLOWED): "
        f"{unknown}"
    )


def test_imports_go_only_in_the_allowed_directions() -> None:
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        own = component(module)
        for target in sorted(targets):
            other = component(target)
            if other != own and other not in ALLOWED.get(own, frozenset()):
                wrong.append(f"{module} ({own}) imports {target} ({other})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    found.append(sorted(members))
    return found


def test_no_import_circles() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_deferred_circle() -> None:
    """The checker itself: a circle closed only through a function-level import is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("qrexec.errors", "shared"),
        ("qrexec.policy.engine.tokens", "policy.engine"),
        ("qrexec.policy.decision.daemon", "policy.decision"),
        ("qrexec.services.lookup", "services"),
        ("qrexec.backends.socket", "backends"),
        ("qrexec.sim.testbed", "sim"),
    ],
)
def test_components_are_named_by_their_package(module: str, expected: str) -> None:
    assert module in MODULES
    assert component(module) == expected


def test_deferred_and_type_checking_imports_count(tmp_path: Path) -> None:
    """The scanner sees imports inside functions and TYPE_CHECKING blocks."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from qrexec.errors import QrexecError\n"
        "def f():\n    from qrexec.protocol import framing\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert _imports("qrexec.client.probe", probe) >= {"qrexec.errors", "qrexec.protocol.framing"}


def test_program_packages_do_not_import_each_other() -> None:
    """Spelled out on its own because it is the rule most likely to be broken by a shortcut."""
    programs = ("agent", "daemon", "client")
    crossings = defaultdict(set)
    for module, targets in GRAPH.items():
        own = component(module)
        if own in programs:
            for target in targets:
                other = component(target)
                if other in programs and other != own:
                    crossings[own].add(other)
    assert dict(crossings) == {}
