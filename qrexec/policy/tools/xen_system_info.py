"""Policy's system info on a plain Xen host (no qubesd): xenstore plus a small config file.

What xenstore knows: which domains run, their ids, names (``/local/domain/<id>/name``) and
uuids (``/local/domain/<id>/vm`` = ``/vm/<uuid>``). What it does not know - Qubes'
properties that policy rules match on - comes from an INI file, by default
``/etc/qubes/xen-domains.conf`` (``QREXEC_XEN_DOMAINS_CONF``)::

    # Every section is one domain, by its Xen name. All keys are optional.
    [DEFAULT]                  # applies to every section below
    type = AppVM
    [work]
    tags = work, project-x     # comma-separated; policy's @tag:NAME
    default_dispvm = dvm       # what @dispvm means for calls from work
    [dvm]
    template_for_dispvms = yes # may be used as @dispvm:dvm
    [disp42]
    type = DispVM
    template = dvm             # lets @dispvm:dvm match it as a source
    [sys-net]
    uuid = 4f1c...-...         # used when xenstore has none (domain not running)
    guivm = dom0
    internal = no

Domains listed in the file but not running show as ``Halted``; running domains missing
from the file get the ``[DEFAULT]`` values. Xen's ``Domain-0`` is Qubes' ``dom0``
(AdminVM). Names are validated as qubesd would; an invalid one in xenstore is ignored
with a warning, an invalid file raises SystemInfoError naming the file and key.

Use as a :class:`~qrexec.policy.engine.system_info.SystemInfoSource` (:class:`XenSystemInfo`), or
run ``qrexec-xen-system-info --output /run/qubes/system-info.json`` (e.g. whenever a VM
starts) and give that file to ``qrexec-policy-daemon --system-info``, which re-reads it
when it changes.
"""

from __future__ import annotations

import argparse
import configparser
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qrexec.errors import QrexecError, SystemInfoError
from qrexec.policy.engine.system_info import (
    ADMIN_VM_NAME,
    ADMIN_VM_UUID,
    SystemInfo,
    is_valid_qube_name,
    is_valid_uuid,
    parse_system_info,
)

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/qubes/xen-domains.conf"
CONFIG_ENV = "QREXEC_XEN_DOMAINS_CONF"
XEN_DOM0_NAME = "Domain-0"
_STRING_KEYS = ("type", "default_dispvm", "guivm", "icon", "label", "template", "uuid")
_BOOL_KEYS = ("template_for_dispvms", "internal")
_KNOWN_KEYS = frozenset(_STRING_KEYS + _BOOL_KEYS + ("tags",))


def read_config(path: str) -> dict[str, dict[str, Any]]:
    """Parse the INI file into ``{name: {key: value}}`` (missing file = empty)."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise SystemInfoError(f"{path}: {exc}") from exc
    domains: dict[str, dict[str, Any]] = {}
    for section in parser.sections():
        if not is_valid_qube_name(section):
            raise SystemInfoError(f"{path}: invalid domain name [{section}]")
        domains[section] = _section(path, section, parser[section])
    defaults = _section(path, "DEFAULT", parser.defaults())
    domains["*"] = defaults
    return domains


def _section(path: str, name: str, raw: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in _KNOWN_KEYS:
            raise SystemInfoError(f"{path}: [{name}] unknown key {key!r}")
        if key == "tags":
            values["tags"] = [t.strip() for t in text.split(",") if t.strip()]
        elif key in _BOOL_KEYS:
            lowered = text.strip().lower()
            if lowered not in ("yes", "no", "true", "false", "1", "0"):
                raise SystemInfoError(f"{path}: [{name}] {key} must be yes or no")
            values[key] = lowered in ("yes", "true", "1")
        else:
            values[key] = text.strip()
    return values


def running_domains() -> dict[str, dict[str, Any]]:
    """``{name: {"uuid": ..., "xid": id}}`` of the domains xenstore lists (dom0 only)."""
    from qrexec.backends.xenstore import XenStore  # lazy: loads the Xen libraries

    running: dict[str, dict[str, Any]] = {}
    with XenStore() as xs:
        for domid, name in xs.list_domains().items():
            if domid == 0 or name == XEN_DOM0_NAME:
                continue
            if not is_valid_qube_name(name):
                log.warning("ignoring domain %d with a name policy cannot use: %r", domid, name)
                continue
            entry: dict[str, Any] = {"xid": domid}
            vm_path = xs.read(f"/local/domain/{domid}/vm")
            if vm_path:
                uuid = vm_path.decode("ascii", "replace").rsplit("/", 1)[-1]
                if is_valid_uuid(uuid):
                    entry["uuid"] = uuid
            running[name] = entry
    return running


def build_system_info_data(
    running: Mapping[str, Mapping[str, Any]], config: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Merge running domains and configuration into ``internal.GetSystemInfo`` shape."""
    defaults = dict(config.get("*", {}))
    domains: dict[str, Any] = {
        ADMIN_VM_NAME: {
            "type": "AdminVM",
            "uuid": ADMIN_VM_UUID,
            "power_state": "Running",
            "tags": list(config.get(ADMIN_VM_NAME, {}).get("tags", [])),
        }
    }
    names = (set(running) | set(config)) - {"*", ADMIN_VM_NAME}
    for name in sorted(names):
        entry: dict[str, Any] = {"type": "AppVM", "tags": []}
        entry.update(defaults)
        entry.update(config.get(name, {}))
        live = running.get(name)
        entry["power_state"] = "Running" if live is not None else "Halted"
        if live is not None and "uuid" in live:
            entry["uuid"] = live["uuid"]  # xenstore wins over the file for running domains
        if entry.get("type") == "AdminVM":
            raise SystemInfoError(f"domain {name!r}: only dom0 can be the AdminVM")
        domains[name] = entry
    return {"domains": domains}


class XenSystemInfo:
    """A SystemInfoSource for a Xen host without qubesd (see the module docstring)."""

    def __init__(self, config_path: str | None = None) -> None:
        self.config_path = config_path or os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)

    def get_system_info(self) -> SystemInfo:
        try:
            running = running_domains()
        except QrexecError as exc:
            raise SystemInfoError(f"cannot read domains from xenstore: {exc}") from exc
        data = build_system_info_data(running, read_config(self.config_path))
        return parse_system_info(data)


def write_json_atomically(path: str, data: Mapping[str, Any]) -> None:
    """Replace ``path`` in one rename, so readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".system-info.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-xen-system-info",
        description="Write policy's system info (internal.GetSystemInfo JSON) from xenstore "
        f"and {DEFAULT_CONFIG}.",
    )
    parser.add_argument(
        "--config", help=f"domains file (default ${CONFIG_ENV} or {DEFAULT_CONFIG})"
    )
    parser.add_argument("--output", help="write here atomically (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    config_path = args.config or os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)
    try:
        data = build_system_info_data(running_domains(), read_config(config_path))
        parse_system_info(data)  # validate before publishing
    except QrexecError as exc:
        print(f"qrexec-xen-system-info: {exc}", file=sys.stderr)
        return 1
    if args.output:
        write_json_atomically(args.output, data)
    else:
        json.dump(data, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
