"""What policy needs to know about the qubes of one system, and where that knowledge comes from.

The data has the shape of qubesd's ``internal.GetSystemInfo`` answer, ``{"domains": {NAME:
{...}}}``, so the testbed writes the same JSON a real dom0 would return. Sources are pluggable
(:class:`SystemInfoSource`): a JSON file (what each emulated dom0 uses) or anything a real Xen
host backs, such as a qubesd client. Parsing is pure; only :func:`load_system_info` and
:class:`JsonFileSystemInfo` read a file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from qrexec.errors import SystemInfoError

#: dom0's name and uuid. dom0 is the admin VM; ``dom0``, ``@adminvm`` and its uuid are one qube.
ADMIN_VM_NAME = "dom0"
ADMIN_VM_UUID = "00000000-0000-0000-0000-000000000000"

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
_RUNNING_STATES = frozenset({"Running"})


def is_valid_uuid(text: str) -> bool:
    """True for the textual form ``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` (without ``uuid:``)."""
    return _UUID.match(text) is not None


def is_valid_qube_name(text: str) -> bool:
    """True for a name qubesd would accept: a letter, then up to 30 of ``A-Za-z0-9_.-``."""
    return _NAME.match(text) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class DomainInfo:
    """One qube as policy sees it.

    ``uuid`` is stored without the ``uuid:`` prefix. ``template`` is an extension to qubesd's
    data: for a disposable, the disposable template it was made from (lets ``@dispvm:NAME``
    match in the source column); None when unknown. ``relayvm``/``transport_rpc`` are set for
    RemoteVM qubes (Qubes Air).
    """

    name: str
    uuid: str | None = None
    type: str = "AppVM"
    tags: frozenset[str] = frozenset()
    default_dispvm: str | None = None
    template_for_dispvms: bool = False
    power_state: str = "Halted"
    guivm: str | None = None
    internal: bool = False
    icon: str | None = None
    label: str | None = None
    template: str | None = None
    relayvm: str | None = None
    transport_rpc: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.type == "AdminVM"

    @property
    def is_running(self) -> bool:
        """dom0 always counts as running (policy's ``autostart=no`` rule)."""
        return self.is_admin or self.power_state in _RUNNING_STATES


def _default_dom0() -> DomainInfo:
    return DomainInfo(name=ADMIN_VM_NAME, uuid=ADMIN_VM_UUID, type="AdminVM", power_state="Running")


class SystemInfo:
    """All qubes of one system, looked up by name or by ``uuid:UUID``.

    dom0 is always present (type AdminVM): when the data does not describe it, a plain one is
    added, because every policy names it (``@adminvm``) and calls to it must resolve.
    """

    __slots__ = ("_by_name", "_by_uuid")

    def __init__(self, domains: Mapping[str, DomainInfo] | None = None) -> None:
        by_name = dict(domains or {})
        if not any(d.is_admin for d in by_name.values()):
            by_name[ADMIN_VM_NAME] = _default_dom0()
        self._by_name: dict[str, DomainInfo] = by_name
        self._by_uuid: dict[str, DomainInfo] = {
            d.uuid.lower(): d for d in by_name.values() if d.uuid is not None
        }
        admin = next(d for d in by_name.values() if d.is_admin)
        self._by_uuid.setdefault(ADMIN_VM_UUID, admin)

    def __iter__(self) -> Iterator[DomainInfo]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name_or_uuid: str) -> DomainInfo | None:
        """The qube named ``name_or_uuid`` or with uuid ``uuid:…``; ``dom0`` is the admin VM."""
        if name_or_uuid.startswith("uuid:"):
            return self._by_uuid.get(name_or_uuid[5:].lower())
        return self._by_name.get(name_or_uuid)

    def __getitem__(self, name_or_uuid: str) -> DomainInfo:
        info = self.get(name_or_uuid)
        if info is None:
            raise KeyError(name_or_uuid)
        return info

    def guivm_for(self, name: str) -> str | None:
        """The qube that shows ``ask`` prompts for calls from ``name``.

        A qube whose ``guivm`` is unset counts dom0 as its GUI VM (dom0 is the GUI domain of a
        single-GUI Qubes system, and this is what makes ``ask`` work in the emulation, where no
        qube has a guivm property). Returns None only for unknown qubes.
        """
        info = self.get(name)
        if info is None:
            return None
        return info.guivm or ADMIN_VM_NAME

    def to_json_data(self) -> dict[str, Any]:
        """The ``{"domains": {...}}`` shape, as :func:`parse_system_info` reads it back."""
        domains: dict[str, Any] = {}
        for d in self._by_name.values():
            entry: dict[str, Any] = {
                "uuid": d.uuid,
                "type": d.type,
                "tags": sorted(d.tags),
                "default_dispvm": d.default_dispvm,
                "template_for_dispvms": d.template_for_dispvms,
                "power_state": d.power_state,
                "guivm": d.guivm,
                "internal": d.internal,
                "icon": d.icon,
                "label": d.label,
            }
            for key in ("template", "relayvm", "transport_rpc"):
                if getattr(d, key) is not None:
                    entry[key] = getattr(d, key)
            domains[d.name] = entry
        return {"domains": domains}


def _opt_str(name: str, key: str, value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SystemInfoError(f"domain {name!r}: {key} must be a string or null, not {value!r}")
    return value


def _flag(name: str, key: str, value: object) -> bool:
    # qubesd reports features such as "internal" as strings ("1", "" or missing).
    if value is None or value is False or value in ("", "0", 0):
        return False
    if value is True or value in ("1", 1, "True", "true", "yes"):
        return True
    raise SystemInfoError(f"domain {name!r}: {key} must be a boolean, not {value!r}")


def _domain(name: str, raw: object) -> DomainInfo:
    if not isinstance(raw, dict):
        raise SystemInfoError(f"domain {name!r}: expected an object, got {type(raw).__name__}")
    if not is_valid_qube_name(name):
        raise SystemInfoError(f"invalid qube name {name!r}")
    uuid = _opt_str(name, "uuid", raw.get("uuid"))
    if uuid is not None:
        uuid = uuid.removeprefix("uuid:")
        if not is_valid_uuid(uuid):
            raise SystemInfoError(f"domain {name!r}: invalid uuid {uuid!r}")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise SystemInfoError(f"domain {name!r}: tags must be a list of strings")
    dom_type = _opt_str(name, "type", raw.get("type")) or "AppVM"
    return DomainInfo(
        name=name,
        uuid=uuid.lower() if uuid is not None else None,
        type=dom_type,
        tags=frozenset(tags),
        default_dispvm=_opt_str(name, "default_dispvm", raw.get("default_dispvm")),
        template_for_dispvms=_flag(name, "template_for_dispvms", raw.get("template_for_dispvms")),
        power_state=_opt_str(name, "power_state", raw.get("power_state")) or "Halted",
        guivm=_opt_str(name, "guivm", raw.get("guivm")),
        internal=_flag(name, "internal", raw.get("internal")),
        icon=_opt_str(name, "icon", raw.get("icon")),
        label=_opt_str(name, "label", raw.get("label")),
        template=_opt_str(name, "template", raw.get("template")),
        relayvm=_opt_str(name, "relayvm", raw.get("relayvm")),
        transport_rpc=_opt_str(name, "transport_rpc", raw.get("transport_rpc")),
    )


def parse_system_info(data: object) -> SystemInfo:
    """Validate decoded ``internal.GetSystemInfo`` data; unknown per-domain keys are ignored."""
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise SystemInfoError('system info must be an object with a "domains" object')
    domains = {name: _domain(name, raw) for name, raw in data["domains"].items()}
    admins = [d.name for d in domains.values() if d.is_admin]
    if len(admins) > 1:
        raise SystemInfoError(f"more than one AdminVM: {', '.join(admins)}")
    if admins and admins[0] != ADMIN_VM_NAME:
        raise SystemInfoError(f"the AdminVM must be named {ADMIN_VM_NAME}, not {admins[0]!r}")
    if ADMIN_VM_NAME in domains and not domains[ADMIN_VM_NAME].is_admin:
        raise SystemInfoError(f"{ADMIN_VM_NAME} must have type AdminVM")
    return SystemInfo(domains)


def parse_system_info_json(text: str | bytes) -> SystemInfo:
    """:func:`parse_system_info` from JSON text."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SystemInfoError(f"system info is not valid JSON: {exc}") from exc
    return parse_system_info(data)


def load_system_info(path: str) -> SystemInfo:
    """Read a system-info JSON file (the testbed writes one per emulated dom0)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise SystemInfoError(f"cannot read system info {path}: {exc.strerror}") from exc
    try:
        return parse_system_info_json(text)
    except SystemInfoError as exc:
        raise SystemInfoError(f"{path}: {exc}") from exc


def dom0_only() -> SystemInfo:
    """A system with nothing but dom0: what tools use when given no system info."""
    return SystemInfo()


class SystemInfoSource(Protocol):
    """Anything that can say what the system looks like now (a file, qubesd, a test)."""

    def get_system_info(self) -> SystemInfo:
        """Current system info; raises SystemInfoError when it cannot be obtained."""
        ...


class StaticSystemInfo:
    """A fixed SystemInfo (tests, tools)."""

    def __init__(self, info: SystemInfo) -> None:
        self._info = info

    def get_system_info(self) -> SystemInfo:
        return self._info


class JsonFileSystemInfo:
    """System info from a JSON file, re-read only when the file changes (mtime, size, inode).

    The testbed rewrites the file when a qube starts or stops, so power state stays current.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._info: SystemInfo | None = None

    def get_system_info(self) -> SystemInfo:
        import os  # Local: keeps the module's top level free of I/O imports.

        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SystemInfoError(f"cannot read system info {self.path}: {exc.strerror}") from exc
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._info is None or stamp != self._stamp:
            self._info = load_system_info(self.path)
            self._stamp = stamp
        return self._info
