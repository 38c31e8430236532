"""Per-service rpc-config files (spec §7): a tiny TOML subset read with :mod:`tomllib`.

Keys (anything else is logged and ignored, as upstream warns and goes on):

* ``wait-for-session`` - bool, or the integers 0/1: run ``qubes.WaitForSession`` first;
* ``force-user`` - string: run the service as this user instead of the requested one;
* ``skip-service-descriptor`` - bool: socket services get no descriptor line;
* ``exit-on-client-eof`` / ``exit-on-service-eof`` - bool, socket services only: end the
  call when the caller's stdin ends / when the service closes its side.

``force-user`` conflicts with the three socket options. A broken file fails the call
(:class:`~qrexec.errors.ServiceError`, exit 125). Reads one file; runs nothing.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from typing import Any

from qrexec.errors import ServiceError

log = logging.getLogger(__name__)

#: Upstream reads at most this much of a config file.
MAX_CONFIG_SIZE = 65536


@dataclass(frozen=True, slots=True)
class RpcConfig:
    wait_for_session: bool = False
    force_user: str | None = None
    skip_service_descriptor: bool = False
    exit_on_client_eof: bool = False
    exit_on_service_eof: bool = False


def _as_bool(key: str, value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if key == "wait-for-session" and isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ServiceError(f"{path}: {key} must be true or false, not {value!r}")


def parse_rpc_config(text: str, path: str = "<rpc-config>") -> RpcConfig:
    """Parse one rpc-config file's text; ServiceError naming the file on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ServiceError(f"{path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in (
            "wait-for-session",
            "skip-service-descriptor",
            "exit-on-client-eof",
            "exit-on-service-eof",
        ):
            values[key.replace("-", "_")] = _as_bool(key, value, path)
        elif key == "force-user":
            if not isinstance(value, str) or not value or ":" in value:
                raise ServiceError(f"{path}: force-user must be a user name, not {value!r}")
            values["force_user"] = value
        else:
            log.warning("%s: unknown key %r ignored", path, key)
    config = RpcConfig(**values)
    if config.force_user and (
        config.skip_service_descriptor or config.exit_on_client_eof or config.exit_on_service_eof
    ):
        raise ServiceError(
            f"{path}: force-user cannot be combined with skip-service-descriptor or exit-on-*-eof"
        )
    return config


def load_rpc_config(path: str | None) -> RpcConfig:
    """Read and parse ``path``; ``None`` (no file) is the default configuration."""
    if path is None:
        return RpcConfig()
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ServiceError(f"cannot read rpc-config {path}: {exc}") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ServiceError(f"rpc-config {path} is larger than {MAX_CONFIG_SIZE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceError(f"rpc-config {path} is not UTF-8: {exc}") from None
    return parse_rpc_config(text, path)
