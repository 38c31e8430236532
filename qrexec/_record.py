"""A lean stand-in for :func:`dataclasses.dataclass`, for modules the per-call clients load.

Importing :mod:`dataclasses` pulls in ``inspect``, ``ast``, ``dis``, ``tokenize``, ``re``
and ``copy``: several milliseconds on every ``qrexec-client`` start, for classes that only
need an ``__init__``, equality, a hash and a repr. Modules on the client path write::

    if TYPE_CHECKING:
        from dataclasses import dataclass
    else:
        from qrexec._record import dataclass

so type checkers see real dataclasses while the program runs this. It supports what those
modules use and nothing more: fields from the class's own annotations (no inheritance of
fields, no ``field()``, no ``ClassVar``/``InitVar``), plain defaults, ``frozen``, ``slots``,
``eq`` with ``__hash__`` for frozen classes, ``repr`` and ``__match_args__``. The generated
methods are compiled once per class, like dataclasses does, so instances cost the same.
``dataclasses.replace``/``asdict`` do not work on these classes; :func:`replace` does.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record (as dataclasses' exception of that name)."""


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _build(cls: type, frozen: bool, slots: bool) -> type:
    # The class's own annotations (not inherited ones), as dataclasses reads them.
    names = list(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
    params = []
    for name in names:
        if name in defaults:
            params.append(f"{name}=__defaults[{name!r}]")
        elif any(other in defaults for other in names[: names.index(name)]):
            raise TypeError(f"non-default field {name!r} follows a default one in {cls.__name__}")
        else:
            params.append(name)
    setter = "__object_setattr(self, {0!r}, {0})" if frozen else "self.{0} = {0}"
    body = "\n".join(f"    {setter.format(name)}" for name in names) or "    pass"
    fields = "".join(f"self.{name}," for name in names)
    other_fields = "".join(f"other.{name}," for name in names)
    source = (
        f"def __init__(self, {', '.join(params)}):\n{body}\n"
        "def __eq__(self, other):\n"
        "    if other.__class__ is not self.__class__:\n"
        "        return NotImplemented\n"
        f"    return ({fields}) == ({other_fields})\n"
        "def __hash__(self):\n"
        f"    return hash(({fields}))\n"
        "def __repr__(self):\n"
        "    return self.__class__.__qualname__ + '(' + ', '.join(\n"
        f"        f'{{n}}={{getattr(self, n)!r}}' for n in {tuple(names)!r}) + ')'\n"
    )
    namespace: dict[str, object] = {"__defaults": defaults, "__object_setattr": object.__setattr__}
    exec(source, namespace)
    body_dict = dict(cls.__dict__)
    for name in ("__init__", "__eq__", "__repr__"):
        body_dict[name] = namespace[name]
    body_dict["__hash__"] = namespace["__hash__"] if frozen else None
    body_dict["__match_args__"] = tuple(names)
    if frozen:
        body_dict["__setattr__"] = _frozen_setattr
        body_dict["__delattr__"] = _frozen_delattr
    if slots:
        for name in names:
            body_dict.pop(name, None)
        body_dict["__slots__"] = tuple(names)
        body_dict.pop("__dict__", None)
        body_dict.pop("__weakref__", None)
    body_dict["__record_fields__"] = tuple(names)
    new = type(cls)(cls.__name__, cls.__bases__, body_dict)
    new.__qualname__ = cls.__qualname__
    return new


def dataclass(cls: type | None = None, /, *, frozen: bool = False, slots: bool = False) -> object:
    """``@dataclass`` / ``@dataclass(frozen=..., slots=...)`` (module docstring)."""

    def wrap(target: type) -> type:
        return _build(target, frozen, slots)

    return wrap if cls is None else wrap(cls)


def replace(record: T, **changes: object) -> T:
    """A copy of ``record`` with some fields changed (works on real dataclasses too)."""
    names = getattr(record, "__record_fields__", None)
    if names is None:
        import dataclasses

        return dataclasses.replace(record, **changes)  # type: ignore[type-var]
    values = {name: getattr(record, name) for name in names}
    values.update(changes)
    return type(record)(**values)
