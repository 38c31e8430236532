"""The qube-selecting tokens of the modern policy format (spec §6.2): parsing, matching, expanding.

A token is what appears in the source or target column (``vm1``, ``uuid:…``, ``*``, ``@anyvm``,
``@adminvm``, ``@default``, ``@dispvm``, ``@dispvm:NAME``, ``@dispvm:@tag:T``, ``@tag:T``,
``@type:T``) or as a ``target=``/``default_target=`` value. Which tokens a place accepts is
the table of §6.2, encoded in :data:`ALLOWED`.

Requests are matched in *canonical* form: a qube's name (``dom0`` for the admin VM, whatever
the caller wrote: ``@adminvm``, ``dom0`` or dom0's uuid), or one of the keywords ``@default``,
``@dispvm`` and ``@dispvm:NAME``. This module does no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator

from qrexec.errors import PolicySyntaxError
from qrexec.policy.engine.system_info import (
    ADMIN_VM_NAME,
    ADMIN_VM_UUID,
    DomainInfo,
    SystemInfo,
    is_valid_qube_name,
    is_valid_uuid,
)

DEFAULT = "@default"
DISPVM = "@dispvm"
DISPVM_PREFIX = "@dispvm:"

_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")
_TYPE = re.compile(r"^[A-Za-z0-9_]+$")


class TokenKind(enum.Enum):
    NAME = "name"
    UUID = "uuid"
    WILDCARD = "*"
    ANYVM = "@anyvm"
    ADMINVM = "@adminvm"
    DEFAULT = "@default"
    DISPVM = "@dispvm"
    DISPVM_TEMPLATE = "@dispvm:NAME"
    DISPVM_TAG = "@dispvm:@tag:T"
    TAG = "@tag:T"
    TYPE = "@type:T"


class Column(enum.Enum):
    """Where a token appears; each place accepts a subset of the kinds (§6.2 table)."""

    SOURCE = "source"
    TARGET = "target"
    REDIRECT = "target=/default_target="
    REQUEST = "requested target"


_K = TokenKind
ALLOWED: dict[Column, frozenset[TokenKind]] = {
    Column.SOURCE: frozenset(set(TokenKind) - {_K.DEFAULT, _K.DISPVM}),
    Column.TARGET: frozenset(TokenKind),
    Column.REDIRECT: frozenset({_K.NAME, _K.UUID, _K.ADMINVM, _K.DISPVM, _K.DISPVM_TEMPLATE}),
    Column.REQUEST: frozenset(
        {_K.NAME, _K.UUID, _K.ADMINVM, _K.DEFAULT, _K.DISPVM, _K.DISPVM_TEMPLATE}
    ),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """A parsed token. ``value`` is the name, uuid (no prefix), tag, type or disposable
    template (``NAME`` or ``uuid:…``) it carries; ``text`` is how it was written."""

    kind: TokenKind
    value: str
    text: str

    def __str__(self) -> str:
        return self.text


def _classify(text: str) -> tuple[TokenKind, str] | str:
    """Kind and value of ``text``, or an error message.

    As in Qubes' engine, anything that is not ``*`` and does not start with ``@`` is a qube
    name, whatever its characters: ``uuid:1234`` or ``bad$name`` load and simply match no
    qube (:func:`never_matches` says why, for ``qubes-policy-lint``). Only a well-formed
    ``uuid:`` is read as a uuid. ``@`` keywords, tags and types are checked.
    """
    if text == "*":
        return _K.WILDCARD, ""
    if text in ("@anyvm", "@adminvm", "@default", "@dispvm"):
        return TokenKind(text), ""
    if text.startswith("@dispvm:@tag:"):
        tag = text[len("@dispvm:@tag:") :]
        return (_K.DISPVM_TAG, tag) if _TAG.match(tag) else f"invalid tag in {text!r}"
    if text.startswith(DISPVM_PREFIX):
        base = text[len(DISPVM_PREFIX) :]
        if not base or base.startswith("@"):
            return f"invalid disposable template in {text!r}"
        # Any name loads, dom0 included (it is never a disposable template, so such a rule
        # matches nothing): Qubes loads these too.
        return _K.DISPVM_TEMPLATE, base
    if text.startswith("@tag:"):
        tag = text[len("@tag:") :]
        return (_K.TAG, tag) if _TAG.match(tag) else f"invalid tag in {text!r}"
    if text.startswith("@type:"):
        typ = text[len("@type:") :]
        return (_K.TYPE, typ) if _TYPE.match(typ) else f"invalid type in {text!r}"
    if text.startswith("@"):
        return f"unknown keyword {text!r}"
    if text.startswith("uuid:"):
        uuid = text[len("uuid:") :].lower()
        if is_valid_uuid(uuid):
            return (_K.ADMINVM, "") if uuid == ADMIN_VM_UUID else (_K.UUID, uuid)
        return _K.NAME, text
    if text == ADMIN_VM_NAME:
        return _K.ADMINVM, ""
    return _K.NAME, text


def _dead_name(text: str) -> str | None:
    """Why the qube name or uuid ``text`` can never name a qube, or None if it could."""
    if text.startswith("uuid:"):
        uuid = text[len("uuid:") :].lower()
        return None if is_valid_uuid(uuid) else f"{text!r} is not a well-formed uuid"
    if not is_valid_qube_name(text):
        return f"{text!r} is not a valid qube name"
    return None


def never_matches(token: Token) -> str | None:
    """Why a token that loads can never match any qube on any system, or None.

    These are the tokens Qubes' engine accepts although they cannot name anything: names
    with characters (or a length) qube names cannot have, malformed ``uuid:`` forms, and
    ``@dispvm:`` of dom0 or of such a name. A policy that has them still loads (as in
    Qubes); ``qubes-policy-lint`` warns about them.
    """
    if token.kind is _K.NAME:
        return _dead_name(token.value)
    if token.kind is _K.DISPVM_TEMPLATE:
        base = token.value
        if base == ADMIN_VM_NAME or base.lower() == "uuid:" + ADMIN_VM_UUID:
            return f"{token.text!r}: dom0 is never a disposable template"
        dead = _dead_name(base)
        return f"{token.text!r}: {dead}" if dead is not None else None
    return None


def unknown_qube(token: Token, info: SystemInfo) -> str | None:
    """Why ``token`` names no qube of ``info``, or None.

    For names and uuids that do not exist there, and ``@dispvm:X`` where X does not exist or
    is not a disposable template: tokens that may match on another system (unlike those of
    :func:`never_matches`) but match nothing on this one.
    """
    if token.kind not in (_K.NAME, _K.UUID, _K.DISPVM_TEMPLATE) or never_matches(token):
        return None
    dom = info.get("uuid:" + token.value if token.kind is _K.UUID else token.value)
    if dom is None:
        return f"{token.text!r}: no such qube"
    if token.kind is _K.DISPVM_TEMPLATE and not dom.template_for_dispvms:
        return f"{token.text!r}: {dom.name} is not a disposable template"
    return None


def parse_token(text: str, column: Column, path: str, lineno: int | None) -> Token:
    """Parse ``text`` for ``column``; a token the column does not accept is a syntax error."""
    result = _classify(text)
    if isinstance(result, str):
        raise PolicySyntaxError(path, lineno, result)
    kind, value = result
    if kind not in ALLOWED[column]:
        raise PolicySyntaxError(path, lineno, f"{text!r} is not allowed as {column.value}")
    return Token(kind, value, text)


@dataclasses.dataclass(frozen=True, slots=True)
class InvalidTarget:
    """A requested target that cannot be a call's target: the request is refused before any
    rule is read (as Qubes' engine does, "invalid intended target")."""

    reason: str


def canonical_request_target(
    text: str, source: DomainInfo, info: SystemInfo
) -> str | InvalidTarget:
    """The requested target in canonical form (§6.2 evaluation step 1), or why it is invalid.

    A qube name or uuid that names no qube is ``@default``, as in Qubes. A keyword that
    cannot be a call's target (``@anyvm``, ``*``, ``@tag:T``…, unknown ``@`` words) and
    ``@dispvm:X`` where X is missing or not a disposable template are invalid: Qubes refuses
    those before any rule, and treating them as ``@default`` would let a ``@default`` rule
    allow or ask what the caller could not have named.
    """
    if text in ("", DEFAULT):
        return DEFAULT
    result = _classify(text)
    if isinstance(result, str):
        return InvalidTarget(result)
    kind, value = result
    if kind not in ALLOWED[Column.REQUEST]:
        return InvalidTarget(f"{text!r} cannot be the target of a call")
    if kind is _K.ADMINVM:
        return ADMIN_VM_NAME
    if kind is _K.DISPVM:
        return DISPVM
    if kind in (_K.NAME, _K.UUID):
        dom = info.get(text)
        return dom.name if dom is not None else DEFAULT
    # kind is DISPVM_TEMPLATE
    base = info.get(value)
    if base is None:
        return InvalidTarget(f"{text!r}: no qube {value!r}")
    if not base.template_for_dispvms:
        return InvalidTarget(f"{text!r}: {base.name} is not a disposable template")
    return DISPVM_PREFIX + base.name


def _domain_of(token: Token, info: SystemInfo) -> DomainInfo | None:
    if token.kind is _K.UUID:
        return info.get("uuid:" + token.value)
    return info.get(token.value)


def _dispvm_base(value: str, source: DomainInfo, info: SystemInfo) -> DomainInfo | None:
    """The disposable template a canonical ``@dispvm``/``@dispvm:NAME`` value refers to."""
    if value == DISPVM:
        name = source.default_dispvm
    elif value.startswith(DISPVM_PREFIX):
        name = value[len(DISPVM_PREFIX) :]
    else:
        return None
    return info.get(name) if name else None


def matches_target(token: Token, value: str, source: DomainInfo, info: SystemInfo) -> bool:
    """Does a target-column token match the canonical requested target ``value``?"""
    kind = token.kind
    if kind is _K.NAME:
        return value == token.value
    if kind is _K.WILDCARD:
        return True
    if kind is _K.ANYVM:
        return value != ADMIN_VM_NAME
    if kind is _K.ADMINVM:
        return value == ADMIN_VM_NAME
    if kind is _K.TAG:
        dom = info.get(value) if value[0] != "@" else None
        return dom is not None and token.value in dom.tags
    if kind is _K.TYPE:
        dom = info.get(value) if value[0] != "@" else None
        return dom is not None and dom.type == token.value
    if kind is _K.UUID:
        dom = info.get("uuid:" + token.value)
        return dom is not None and dom.name == value
    if kind is _K.DEFAULT:
        return value == DEFAULT
    if kind is _K.DISPVM:
        return value == DISPVM
    if kind is _K.DISPVM_TEMPLATE:
        # "@dispvm" means the source's default disposable template, so it matches too.
        # dom0 is never a disposable template (never_matches), whatever default_dispvm says.
        base = _dispvm_base(value, source, info)
        wanted = info.get(token.value)
        return (
            base is not None
            and wanted is not None
            and not wanted.is_admin
            and base.name == wanted.name
        )
    if kind is _K.DISPVM_TAG:
        base = _dispvm_base(value, source, info)
        return base is not None and base.template_for_dispvms and token.value in base.tags
    raise AssertionError(kind)


def matches_source(token: Token, source: DomainInfo, info: SystemInfo) -> bool:
    """Does a source-column token match the calling qube?

    ``@dispvm:NAME`` / ``@dispvm:@tag:T`` match a disposable whose template (the optional
    ``template`` system-info key) is NAME / carries tag T.
    """
    kind = token.kind
    if kind is _K.NAME:
        return source.name == token.value
    if kind is _K.WILDCARD:
        return True
    if kind is _K.ANYVM:
        return not source.is_admin
    if kind is _K.ADMINVM:
        return source.is_admin
    if kind is _K.TAG:
        return token.value in source.tags
    if kind is _K.TYPE:
        return source.type == token.value
    if kind is _K.UUID:
        return source.uuid == token.value
    if kind in (_K.DISPVM_TEMPLATE, _K.DISPVM_TAG):
        if source.type != "DispVM" or source.template is None:
            return False
        base = info.get(source.template)
        if base is None:
            return False
        if kind is _K.DISPVM_TAG:
            return token.value in base.tags
        wanted = info.get(token.value)
        return wanted is not None and not wanted.is_admin and wanted.name == base.name
    return False


def _dispvms(info: SystemInfo, source: DomainInfo) -> Iterator[str]:
    for dom in info:
        if dom.template_for_dispvms:
            yield DISPVM_PREFIX + dom.name
    if source.default_dispvm:
        base = info.get(source.default_dispvm)
        if base is not None:
            yield DISPVM_PREFIX + base.name


def expand_target(token: Token, source: DomainInfo, info: SystemInfo) -> Iterator[str]:
    """The concrete targets (canonical) a target token stands for: ask's candidate list."""
    kind = token.kind
    if kind in (_K.NAME, _K.UUID):
        dom = _domain_of(token, info)
        if dom is not None:
            yield dom.name
    elif kind in (_K.WILDCARD, _K.ANYVM):
        for dom in info:
            if kind is _K.WILDCARD or not dom.is_admin:
                yield dom.name
        yield from _dispvms(info, source)
    elif kind is _K.ADMINVM:
        yield ADMIN_VM_NAME
    elif kind is _K.TAG:
        yield from (dom.name for dom in info if token.value in dom.tags)
    elif kind is _K.TYPE:
        yield from (dom.name for dom in info if dom.type == token.value)
    elif kind is _K.DISPVM:
        base = _dispvm_base(DISPVM, source, info)
        if base is not None:
            yield DISPVM_PREFIX + base.name
    elif kind is _K.DISPVM_TEMPLATE:
        base = info.get(token.value)
        if base is not None and base.template_for_dispvms:
            yield DISPVM_PREFIX + base.name
    elif kind is _K.DISPVM_TAG:
        for dom in info:
            if dom.template_for_dispvms and token.value in dom.tags:
                yield DISPVM_PREFIX + dom.name
    # @default stands for no concrete qube.


def resolve_redirect(token: Token, source: DomainInfo, info: SystemInfo) -> str | None:
    """Canonical value of a ``target=``/``default_target=`` token; None if it names nothing."""
    kind = token.kind
    if kind is _K.ADMINVM:
        return ADMIN_VM_NAME
    if kind in (_K.NAME, _K.UUID):
        dom = _domain_of(token, info)
        return dom.name if dom is not None else None
    if kind is _K.DISPVM:
        return DISPVM
    if kind is _K.DISPVM_TEMPLATE:
        base = info.get(token.value)
        return DISPVM_PREFIX + base.name if base is not None else None
    return None
