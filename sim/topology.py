"""The testbed's topology file: which domains exist, what they provide, and dom0's policy.

One TOML file (read with the standard library's :mod:`tomllib`) drives every way of running
a testbed: plain processes (``qrexec-sim up``), containers (``qrexec-sim compose``) and the
pytest plugin. The format is documented in ``sim/TOPOLOGY.md``; ``examples/`` has examples
and :func:`default_topology` is the one shipped in the package.

Everything in the file is validated here, at the boundary, with an error naming the key
that was wrong (:class:`TopologyError`), so the rest of the testbed works with clean
values. This module does no I/O besides reading the topology file and the files it names.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import uuid as uuid_mod
from collections.abc import Mapping
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from qrexec.errors import QrexecError
from qrexec.policy.decision.ask import parse_script

#: Domain types a topology may declare (dom0 is implicit and is the only AdminVM).
DOMAIN_TYPES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM")
#: Policy file formats dom0 understands.
POLICY_FORMATS = ("modern", "r4.0", "2011")
#: Where each policy format lives in dom0's file system.
POLICY_DIRS = {
    "modern": "/etc/qubes/policy.d",
    "r4.0": "/etc/qubes-rpc/policy",
    "2011": "/etc/qubes_rpc/policy",
}
#: Services shipped with this package, usable as ``builtin = NAME`` in a service entry.
BUILTIN_SERVICES = ("qubes.Filecopy",)
#: Namespace of the uuids derived from domain names (stable across runs and machines).
UUID_NAMESPACE = uuid_mod.UUID("6c0b6f5e-0d5e-4b8e-9a56-7a1f0f1d2a11")
#: Highest domain id: vchan domain ids are 16-bit and Xen reserves the top ones.
MAX_DOMAIN_ID = 32751

_NAME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}$")
_SERVICE_RE = re.compile(r"^[a-zA-Z0-9_.-]+(\+[a-zA-Z0-9_.+-]*)?$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_TAG_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
_POLICY_FILE_RE = re.compile(r"^[a-zA-Z0-9_.+-]+$")


class TopologyError(QrexecError):
    """The topology file is malformed; the message names the offending key."""


@dataclasses.dataclass
class FileSpec:
    """A file put into a domain's file system (a program, a config file, a one-line service)."""

    path: str
    text: str
    mode: int = 0o644


@dataclasses.dataclass
class ServiceSpec:
    """A qrexec service a domain provides: an executable file in a service directory.

    Exactly one of ``script`` (inline executable text), ``program`` (a one-line file naming
    the program, the 2011 style) or ``builtin`` (a service shipped with this package) is set.
    """

    name: str
    directory: str = "/etc/qubes-rpc"
    script: str | None = None
    program: str | None = None
    builtin: str | None = None
    rpc_config: str | None = None

    @classmethod
    def to_install(
        cls,
        name: str,
        script: str | None,
        program: str | None,
        rpc_config: str | None,
        directory: str | None,
    ) -> ServiceSpec:
        """What a test's ``install_service(...)`` asks for: an inline script, or a one-line
        2011 file naming ``program`` (then in ``/etc/qubes_rpc`` unless ``directory`` says)."""
        if (script is None) == (program is None):
            raise TopologyError("install_service: give exactly one of script and program")
        default_dir = "/etc/qubes_rpc" if program is not None else "/etc/qubes-rpc"
        return cls(
            name=name,
            directory=directory or default_dir,
            script=script,
            program=program,
            rpc_config=rpc_config,
        )


@dataclasses.dataclass
class PolicySpec:
    """One policy file of dom0, in one of the three formats."""

    format: str
    file: str
    text: str

    @property
    def path(self) -> str:
        """Absolute path of the file inside dom0's file system."""
        return f"{POLICY_DIRS[self.format]}/{self.file}"


@dataclasses.dataclass
class Domain:
    """One domain: dom0 (id 0, AdminVM) or a VM."""

    name: str
    id: int
    uuid: str
    type: str = "AppVM"
    tags: list[str] = dataclasses.field(default_factory=list)
    guivm: str | None = "dom0"
    default_user: str = "user"
    default_dispvm: str | None = None
    template_for_dispvms: bool = False
    running: bool = True
    label: str = "red"
    services: list[ServiceSpec] = dataclasses.field(default_factory=list)
    files: list[FileSpec] = dataclasses.field(default_factory=list)

    @property
    def is_dom0(self) -> bool:
        """True for the administrative domain."""
        return self.id == 0


@dataclasses.dataclass
class Topology:
    """dom0 plus the VMs, dom0's policy and the scripted answer to ``ask`` rules."""

    domains: list[Domain]
    policies: list[PolicySpec] = dataclasses.field(default_factory=list)
    #: The scripted prompter's rules for ``ask``: lines ``SERVICE ARGUMENT SOURCE ANSWER``.
    ask: str = "* * * allow\n"
    #: Disposable slots pre-created per compose file (containers cannot be made on demand).
    compose_disposable_slots: int = 2

    @property
    def dom0(self) -> Domain:
        """The administrative domain (always present)."""
        return self.domains[0]

    @property
    def vms(self) -> list[Domain]:
        """Every domain but dom0, in file order."""
        return self.domains[1:]

    def domain(self, name: str) -> Domain:
        """The domain called ``name``; :class:`TopologyError` if there is none."""
        for dom in self.domains:
            if dom.name == name:
                return dom
        raise TopologyError(f"no domain named {name!r} in the topology")

    def dispvm_templates(self) -> list[Domain]:
        """Domains that disposables may be based on."""
        return [d for d in self.vms if d.template_for_dispvms]

    def renumbered(self, id_base: int) -> Topology:
        """A copy whose VM ids are ``id_base + i`` (so testbeds side by side never collide)."""
        copy = dataclasses.replace(self, domains=[dataclasses.replace(self.dom0)])
        for index, dom in enumerate(self.vms, start=1):
            copy.domains.append(dataclasses.replace(dom, id=id_base + index))
        copy.validate()
        return copy

    def validate(self) -> None:
        """Check cross-references (unique names and ids, existing dispvm templates...)."""
        names: set[str] = set()
        ids: set[int] = set()
        for dom in self.domains:
            if dom.name in names:
                raise TopologyError(f"domain name {dom.name!r} appears twice")
            if dom.id in ids:
                raise TopologyError(f"domain id {dom.id} appears twice ({dom.name!r})")
            if not 0 <= dom.id <= MAX_DOMAIN_ID:
                raise TopologyError(f"domain {dom.name!r}: id {dom.id} out of 0..{MAX_DOMAIN_ID}")
            names.add(dom.name)
            ids.add(dom.id)
        if self.dom0.name != "dom0" or self.dom0.id != 0:
            raise TopologyError("the first domain must be dom0 with id 0")
        for dom in self.domains:
            if dom.default_dispvm is not None:
                target = self.domain(dom.default_dispvm)
                if not target.template_for_dispvms:
                    raise TopologyError(
                        f"domain {dom.name!r}: default_dispvm {dom.default_dispvm!r} is not "
                        "a disposable template (template_for_dispvms = true)"
                    )
            if dom.guivm is not None and dom.guivm not in names:
                raise TopologyError(f"domain {dom.name!r}: guivm {dom.guivm!r} does not exist")
        try:
            parse_script(self.ask, "dom0.ask")
        except ValueError as exc:
            raise TopologyError(str(exc)) from exc


def derived_uuid(name: str) -> str:
    """The uuid a domain gets when the topology names none: stable, derived from the name."""
    return str(uuid_mod.uuid5(UUID_NAMESPACE, name))


# ---------------------------------------------------------------------------------------
# Parsing


class _Table:
    """A TOML table being consumed: every key must be known, and is checked for its type."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        if not isinstance(data, Mapping):
            raise TopologyError(f"{where}: expected a table")
        self.data = dict(data)
        self.where = where

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.data.pop(key, default)
        if value is not None and not isinstance(value, kind):
            raise TopologyError(f"{self.where}.{key}: wrong type {type(value).__name__}")
        if isinstance(value, bool) and kind is int:
            raise TopologyError(f"{self.where}.{key}: expected an integer, not a boolean")
        return value

    def finish(self) -> None:
        if self.data:
            unknown = ", ".join(sorted(self.data))
            raise TopologyError(f"{self.where}: unknown key(s) {unknown}")


def _text(table: _Table, base: Path | None, what: str) -> str | None:
    """Read ``text`` inline or from ``source`` (relative to the topology file)."""
    text: str | None = table.take("text", str)
    source: str | None = table.take("source", str)
    if text is not None and source is not None:
        raise TopologyError(f"{table.where}: give either text or source for the {what}, not both")
    if source is not None:
        if base is None:
            raise TopologyError(f"{table.where}.source: only allowed in a topology file")
        try:
            return (base / source).read_text()
        except OSError as exc:
            raise TopologyError(f"{table.where}.source: cannot read {source!r}: {exc}") from exc
    return text


def _abs_path(value: str, where: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or "\0" in value:
        raise TopologyError(f"{where}: {value!r} must be an absolute path without '..'")
    return str(path)


def _parse_file(data: Mapping[str, Any], where: str, base: Path | None) -> FileSpec:
    table = _Table(data, where)
    path = _abs_path(table.take("path", str, ""), f"{where}.path")
    mode = table.take("mode", int, 0o644)
    if not 0 <= mode <= 0o7777:
        raise TopologyError(f"{where}.mode: {mode:o} is not a file mode")
    text = _text(table, base, "file")
    table.finish()
    if text is None:
        raise TopologyError(f"{where}: a file needs text or source")
    return FileSpec(path=path, text=text, mode=mode)


def _parse_service(data: Mapping[str, Any], where: str, base: Path | None) -> ServiceSpec:
    table = _Table(data, where)
    name = table.take("name", str, "")
    if not _SERVICE_RE.match(name) or len(name) > 255:
        raise TopologyError(f"{where}.name: {name!r} is not a service name (SERVICE[+ARG])")
    script = table.take("script", str)
    source = table.take("source", str)
    if source is not None:
        if script is not None:
            raise TopologyError(f"{where}: give either script or source, not both")
        if base is None:
            raise TopologyError(f"{where}.source: only allowed in a topology file")
        try:
            script = (base / source).read_text()
        except OSError as exc:
            raise TopologyError(f"{where}.source: cannot read {source!r}: {exc}") from exc
    program = table.take("program", str)
    builtin = table.take("builtin", str)
    if sum(x is not None for x in (script, program, builtin)) != 1:
        raise TopologyError(f"{where}: give exactly one of script, source, program, builtin")
    if builtin is not None and builtin not in BUILTIN_SERVICES:
        raise TopologyError(f"{where}.builtin: unknown {builtin!r}; known: {BUILTIN_SERVICES}")
    if program is not None:
        program = _abs_path(program, f"{where}.program")
    default_dir = "/etc/qubes_rpc" if program is not None else "/etc/qubes-rpc"
    directory = _abs_path(table.take("dir", str, default_dir), f"{where}.dir")
    rpc_config = table.take("rpc_config", str)
    table.finish()
    return ServiceSpec(
        name=name,
        directory=directory,
        script=script,
        program=program,
        builtin=builtin,
        rpc_config=rpc_config,
    )


def _parse_policy(data: Mapping[str, Any], where: str, base: Path | None) -> PolicySpec:
    table = _Table(data, where)
    fmt = table.take("format", str, "modern")
    if fmt not in POLICY_FORMATS:
        raise TopologyError(f"{where}.format: {fmt!r} is not one of {POLICY_FORMATS}")
    file = table.take("file", str, "")
    if not _POLICY_FILE_RE.match(file) or file in (".", ".."):
        raise TopologyError(f"{where}.file: {file!r} is not a plain file name")
    if fmt == "modern" and not file.endswith(".policy"):
        raise TopologyError(f"{where}.file: modern policy files end in .policy ({file!r})")
    text = _text(table, base, "policy")
    table.finish()
    if text is None:
        raise TopologyError(f"{where}: a policy needs text or source")
    return PolicySpec(format=fmt, file=file, text=text)


def _parse_domain_common(table: _Table, dom: Domain, base: Path | None, default_user: str) -> None:
    """Keys that dom0 and VMs share: tags, default user, services, files."""
    tags = table.take("tags", list, [])
    for tag in tags:
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            raise TopologyError(f"{table.where}.tags: {tag!r} is not a valid tag")
    dom.tags = list(tags)
    dom.default_user = table.take("default_user", str, default_user)
    if not _USER_RE.match(dom.default_user):
        raise TopologyError(f"{table.where}.default_user: {dom.default_user!r} is not a user name")
    services = table.take("service", list, [])
    dom.services = [
        _parse_service(s, f"{table.where}.service[{i}]", base) for i, s in enumerate(services)
    ]
    files = table.take("file", list, [])
    dom.files = [_parse_file(f, f"{table.where}.file[{i}]", base) for i, f in enumerate(files)]


def parse_topology(data: Mapping[str, Any], base: Path | None = None) -> Topology:
    """Build a :class:`Topology` from parsed TOML; ``base`` resolves ``source`` paths."""
    top = _Table(data, "topology")
    testbed = _Table(top.take("testbed", dict, {}), "testbed")
    default_user = testbed.take("default_user", str, "user")
    slots = testbed.take("compose_disposable_slots", int, 2)
    if not 0 <= slots <= 16:
        raise TopologyError("testbed.compose_disposable_slots: expected 0..16")
    testbed.finish()

    dom0_table = _Table(top.take("dom0", dict, {}), "dom0")
    dom0 = Domain(name="dom0", id=0, uuid="00000000-0000-0000-0000-000000000000", type="AdminVM")
    dom0.guivm = None
    _parse_domain_common(dom0_table, dom0, base, default_user)
    ask = dom0_table.take("ask", str, "* * * allow\n")
    policies = [
        _parse_policy(p, f"dom0.policy[{i}]", base)
        for i, p in enumerate(dom0_table.take("policy", list, []))
    ]
    dom0_table.finish()

    domains = [dom0]
    raw_domains = top.take("domain", list, [])
    top.finish()
    explicit_ids = [d.get("id") for d in raw_domains if isinstance(d, Mapping)]
    next_id = max([i for i in explicit_ids if isinstance(i, int)] + [0]) + 1
    for index, raw in enumerate(raw_domains):
        table = _Table(raw, f"domain[{index}]")
        name = table.take("name", str, "")
        if not _NAME_RE.match(name) or name == "dom0":
            raise TopologyError(f"domain[{index}].name: {name!r} is not a valid VM name")
        table.where = f"domain[{name}]"
        dom_id = table.take("id", int)
        if dom_id is None:
            dom_id, next_id = next_id, next_id + 1
        uuid_text = table.take("uuid", str) or derived_uuid(name)
        try:
            uuid_text = str(uuid_mod.UUID(uuid_text))
        except ValueError as exc:
            raise TopologyError(f"domain[{name}].uuid: {uuid_text!r} is not a uuid") from exc
        dom = Domain(name=name, id=dom_id, uuid=uuid_text)
        dom.type = table.take("type", str, "AppVM")
        if dom.type not in DOMAIN_TYPES:
            raise TopologyError(f"domain[{name}].type: {dom.type!r} is not one of {DOMAIN_TYPES}")
        dom.guivm = table.take("guivm", str, "dom0")
        dom.default_dispvm = table.take("default_dispvm", str)
        dom.template_for_dispvms = table.take("template_for_dispvms", bool, False)
        dom.running = table.take("running", bool, True)
        dom.label = table.take("label", str, "red")
        _parse_domain_common(table, dom, base, default_user)
        table.finish()
        domains.append(dom)

    topology = Topology(domains=domains, policies=policies, ask=ask, compose_disposable_slots=slots)
    topology.validate()
    return topology


def read_topology_file(path: Path) -> dict[str, Any]:
    """The parsed TOML of a topology file (single- or multi-host), errors as TopologyError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise TopologyError(f"cannot read topology {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: {exc}") from exc


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file."""
    path = Path(path)
    return parse_topology(read_topology_file(path), base=path.parent)


def default_topology_text() -> str:
    """The text of the topology shipped with the package (dom0, vm1-vm3, a dispvm template)."""
    return resources.files("qrexec.sim").joinpath("data/default-topology.toml").read_text()


def default_topology() -> Topology:
    """The default topology, parsed."""
    return parse_topology(tomllib.loads(default_topology_text()))
