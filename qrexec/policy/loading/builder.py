"""Assemble a Policy from policy directories: file-name rules, merging, directives, legacy files.

All file access goes through a :class:`PolicyStore` (the filesystem in
:mod:`qrexec.policy.loading.fs_loader`, a dict in
:mod:`qrexec.policy.loading.memory_store`), so this module
holds the whole loading logic of spec §6.2/§6.3 yet does no I/O itself:

* policy.d: regular ``*.policy`` files not starting with ``.``; a considered file whose name
  has a character outside ``[0-9a-z_.-]`` denies everything; directories merged by file name
  (the first directory wins), files read in C-locale order;
* ``!include``, ``!include-dir``, ``!include-service`` (R4.0 syntax), ``!compat-4.0``;
* ``!compat-2011`` (ours): the 2011 per-service directory, read like ``!compat-4.0`` reads the
  R4.0 one;
* a system with no policy.d directory at all but a 2011 directory runs on the 2011 files alone,
  as the 2011 design did (no match → deny, with a hint naming the file to create).

Any syntax error anywhere yields a Policy that denies everything, with ``path:line: reason``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import Protocol

from qrexec.errors import PolicySyntaxError
from qrexec.policy.engine.model import RuleRef
from qrexec.policy.engine.parser import (
    COMPAT_40,
    COMPAT_2011,
    INCLUDE,
    INCLUDE_DIR,
    INCLUDE_SERVICE,
    Directive,
    Statement,
    parse_policy_text,
)
from qrexec.policy.engine.policy import NoMatchHint, Policy
from qrexec.policy.engine.rules import Rule, build_rule
from qrexec.policy.loading.legacy import parse_2011_text, parse_r40_text, split_legacy_name
from qrexec.policy.loading.paths import PolicyPaths

log = logging.getLogger(__name__)

POLICY_SUFFIX = ".policy"
_GOOD_FILE_NAME = re.compile(r"^[0-9a-z_.-]+$")
_MAX_INCLUDE_DEPTH = 32


@dataclasses.dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    #: A regular file (symlinks followed), as opposed to a directory, socket, dangling link…
    is_file: bool


class PolicyStore(Protocol):
    """Read-only access to policy files. Missing paths raise OSError (FileNotFoundError)."""

    def is_dir(self, path: str) -> bool: ...

    def list_dir(self, path: str) -> list[DirEntry]: ...

    def read_text(self, path: str) -> str: ...


class _RecordingStore:
    """Remembers every path looked at, so the Policy can name its sources."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        self.sources: set[str] = set()

    def is_dir(self, path: str) -> bool:
        self.sources.add(path)
        return self.store.is_dir(path)

    def list_dir(self, path: str) -> list[DirEntry]:
        self.sources.add(path)
        return self.store.list_dir(path)

    def read_text(self, path: str) -> str:
        self.sources.add(path)
        return self.store.read_text(path)


def considered_policy_files(directory: str, entries: list[DirEntry]) -> list[str]:
    """Names of the policy files of a directory, C-locale sorted; raises on a bad name.

    Ignored: non-regular files, names not ending in ``.policy``, names starting with ``.``.
    """
    names = []
    for entry in entries:
        if (
            not entry.is_file
            or entry.name.startswith(".")
            or not entry.name.endswith(POLICY_SUFFIX)
        ):
            continue
        if not _GOOD_FILE_NAME.match(entry.name):
            raise PolicySyntaxError(
                posixpath.join(directory, entry.name),
                None,
                "invalid character in policy file name (allowed: 0-9 a-z _ . -); "
                "denying every call",
            )
        names.append(entry.name)
    return sorted(names, key=lambda n: n.encode())


def _read(store: _RecordingStore, path: str, where: Directive | None) -> str:
    try:
        return store.read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if where is None:
            raise PolicySyntaxError(path, None, f"cannot read: {why}") from exc
        raise PolicySyntaxError(where.path, where.lineno, f"cannot read {path}: {why}") from exc


def _list(store: _RecordingStore, path: str, where: Directive | None) -> list[DirEntry]:
    try:
        return store.list_dir(path)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if where is None:
            raise PolicySyntaxError(path, None, f"cannot list directory: {why}") from exc
        raise PolicySyntaxError(where.path, where.lineno, f"cannot list {path}: {why}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class _LegacyFormat:
    name: str
    directory: str
    parse: Callable[[str, str, str, str], list[Statement]]


class _Builder:
    def __init__(self, store: PolicyStore, paths: PolicyPaths) -> None:
        self.store = _RecordingStore(store)
        self.paths = paths
        self.rules: list[Rule] = []
        self.stack: list[str] = []

    # --- modern files -------------------------------------------------------------------

    def load_policy_dirs(self, dirs: list[str]) -> None:
        chosen: dict[str, str] = {}
        for directory in dirs:
            for name in considered_policy_files(directory, _list(self.store, directory, None)):
                chosen.setdefault(name, directory)
        for name in sorted(chosen, key=lambda n: n.encode()):
            directory = chosen[name]
            self.load_file(posixpath.join(directory, name), directory, None)

    @contextlib.contextmanager
    def _reading(self, path: str) -> Iterator[None]:
        """Track ``path`` on the include stack: no loops, no unbounded nesting."""
        if path in self.stack:
            raise PolicySyntaxError(path, None, "include loop")
        if len(self.stack) >= _MAX_INCLUDE_DEPTH:
            raise PolicySyntaxError(path, None, "includes nested too deeply")
        self.stack.append(path)
        try:
            yield
        finally:
            self.stack.pop()

    def load_file(self, path: str, base: str, where: Directive | None) -> None:
        with self._reading(path):
            for statement in parse_policy_text(_read(self.store, path, where), path):
                if isinstance(statement, Rule):
                    self.rules.append(statement)
                else:
                    self.directive(statement, base)

    def directive(self, d: Directive, base: str) -> None:
        def resolve(p: str) -> str:
            return posixpath.normpath(posixpath.join(base, p))

        if d.name == INCLUDE:
            self.load_file(resolve(d.args[0]), base, d)
        elif d.name == INCLUDE_DIR:
            directory = resolve(d.args[0])
            for name in considered_policy_files(directory, _list(self.store, directory, d)):
                self.load_file(posixpath.join(directory, name), base, d)
        elif d.name == INCLUDE_SERVICE:
            service, argument, path = d.args
            self.load_legacy_file(resolve(path), service, argument, d, _r40(self.paths))
        elif d.name == COMPAT_40:
            self.load_legacy_dir(_r40(self.paths), d)
        elif d.name == COMPAT_2011:
            self.load_legacy_dir(_f2011(self.paths), d)
        else:  # parse_directive() let through something unknown
            raise AssertionError(d.name)

    # --- legacy per-service files -------------------------------------------------------

    def load_legacy_file(
        self, path: str, service: str, argument: str, where: Directive | None, fmt: _LegacyFormat
    ) -> None:
        with self._reading(path):
            for statement in fmt.parse(_read(self.store, path, where), path, service, argument):
                if isinstance(statement, Rule):
                    self.rules.append(statement)
                else:  # $include: another file of the same format, for the same service
                    target = posixpath.normpath(posixpath.join(fmt.directory, statement.args[0]))
                    self.load_legacy_file(target, service, argument, statement, fmt)

    def load_legacy_dir(self, fmt: _LegacyFormat, where: Directive | None) -> None:
        """Every per-service file of a legacy directory, argument-specific files first.

        In R4.0 a ``SERVICE+ARG`` file replaced ``SERVICE`` for that argument; reading it
        first and closing it with implicit denies keeps that meaning. ``SERVICE`` files get no
        implicit deny, so a request they do not match falls through to later rules.
        """
        if not self.store.is_dir(fmt.directory):
            log.info("%s: %s does not exist, nothing to load", fmt.name, fmt.directory)
            return
        services: list[tuple[str, str, str]] = []
        for entry in _list(self.store, fmt.directory, where):
            if not entry.is_file or entry.name.startswith("."):
                continue
            path = posixpath.join(fmt.directory, entry.name)
            try:
                service, argument = split_legacy_name(entry.name, path)
            except PolicySyntaxError:
                log.warning("%s: ignoring %s (not a SERVICE[+ARG] name)", fmt.name, path)
                continue
            services.append((service, argument, entry.name))
        services.sort(key=lambda s: (s[0].encode(), s[1] == "*", s[2].encode()))
        for service, argument, name in services:
            path = posixpath.join(fmt.directory, name)
            self.load_legacy_file(path, service, argument, where, fmt)
            if argument != "*":
                self.add_implicit_denies(service, argument, path, where)

    def add_implicit_denies(
        self, service: str, argument: str, path: str, where: Directive | None
    ) -> None:
        ref_path, ref_line = (where.path, where.lineno) if where else (path, 0)
        for target in ("@anyvm", "@adminvm"):
            text = f"{service} {argument} @anyvm {target} deny  (implicit, after {path})"
            ref = RuleRef(ref_path, ref_line, text)
            self.rules.append(build_rule(service, argument, "@anyvm", target, "deny", [], ref))


def _r40(paths: PolicyPaths) -> _LegacyFormat:
    return _LegacyFormat("!compat-4.0", paths.legacy_dir, parse_r40_text)


def _parse_2011(text: str, path: str, service: str, argument: str) -> list[Statement]:
    return list(parse_2011_text(text, path, service, argument))


def _f2011(paths: PolicyPaths) -> _LegacyFormat:
    return _LegacyFormat("!compat-2011", paths.dir_2011, _parse_2011)


def build_policy(store: PolicyStore, paths: PolicyPaths) -> Policy:
    """Load the whole policy of one dom0; never raises for bad policy (it denies instead)."""
    builder = _Builder(store, paths)
    existing = [d for d in paths.policy_dirs if builder.store.is_dir(d)]
    try:
        if existing:
            hint = NoMatchHint("modern", paths.user_policy_file)
            builder.load_policy_dirs(existing)
        elif builder.store.is_dir(paths.dir_2011):
            hint = NoMatchHint("2011", paths.dir_2011)
            builder.load_legacy_dir(_f2011(paths), None)
        else:
            hint = NoMatchHint("modern", paths.user_policy_file)
            log.warning("no policy directory exists (%s): denying everything", paths.policy_dirs)
    except PolicySyntaxError as exc:
        log.error("policy error, denying every call: %s", exc)
        return Policy.failed(exc, builder.store.sources)
    return Policy(builder.rules, sources=builder.store.sources, hint=hint)


LEGACY_FORMATS = ("r4.0", "2011")


def _legacy_format(name: str, paths: PolicyPaths) -> _LegacyFormat:
    if name == "r4.0":
        return _r40(paths)
    if name == "2011":
        return _f2011(paths)
    raise ValueError(f"unknown legacy format {name!r} (known: {', '.join(LEGACY_FORMATS)})")


def read_legacy_dir(store: PolicyStore, fmt: str, directory: str) -> list[Rule]:
    """All rules a legacy directory contributes (as ``!compat-4.0``/``!compat-2011`` read it,
    implicit denies included); raises PolicySyntaxError."""
    paths = PolicyPaths(legacy_dir=directory, dir_2011=directory)
    builder = _Builder(store, paths)
    builder.load_legacy_dir(_legacy_format(fmt, paths), None)
    return builder.rules


def read_legacy_file(
    store: PolicyStore, fmt: str, path: str, include_dir: str, *, implicit_deny: bool = True
) -> list[Rule]:
    """Rules of one legacy per-service file (service and argument from its name).

    ``$include:`` paths resolve against ``include_dir``. With ``implicit_deny`` an
    argument-specific file is closed by the two implicit denies, as in a directory.
    """
    paths = PolicyPaths(legacy_dir=include_dir, dir_2011=include_dir)
    builder = _Builder(store, paths)
    service, argument = split_legacy_name(posixpath.basename(path), path)
    builder.load_legacy_file(path, service, argument, None, _legacy_format(fmt, paths))
    if implicit_deny and argument != "*":
        builder.add_implicit_denies(service, argument, path, None)
    return builder.rules
