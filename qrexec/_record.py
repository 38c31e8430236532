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
methods are closures over the field names (no source is compiled, unlike dataclasses),
so defining a class costs microseconds; creating an instance costs about a microsecond more.
``dataclasses.replace``/``asdict`` do not work on these classes; :func:`replace` does.
"""

from __future__ import annotations

from operator import attrgetter

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


def _make_init(names: tuple[str, ...], defaults: dict[str, object]) -> object:
    count = len(names)
    setter = object.__setattr__  # works for frozen and plain records alike

    def __init__(self: object, *args: object, **kwargs: object) -> None:
        if len(args) > count:
            raise TypeError(f"takes {count} positional arguments but {len(args)} were given")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"got multiple values for argument {name!r}")
            setter(self, name, value)
        for name in names[len(args) :]:
            if name in kwargs:
                value = kwargs.pop(name)
            elif name in defaults:
                value = defaults[name]
            else:
                raise TypeError(f"missing required argument: {name!r}")
            setter(self, name, value)
        if kwargs:
            raise TypeError(f"got an unexpected keyword argument {next(iter(kwargs))!r}")

    return __init__


def _build(cls: type, frozen: bool, slots: bool) -> type:
    # The class's own annotations (not inherited ones), as dataclasses reads them.
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
    for position, name in enumerate(names):
        if name not in defaults and any(other in defaults for other in names[:position]):
            raise TypeError(f"non-default field {name!r} follows a default one in {cls.__name__}")
    # No generated source (dataclasses compiles some per class, milliseconds at start-up):
    # closures over the field names, with attrgetter (C) for equality and hashing.
    values = attrgetter(*names) if names else (lambda record: ())

    def __eq__(self: object, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(values(self) == values(other))

    def __hash__(self: object) -> int:
        return hash(values(self))

    def __repr__(self: object) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{self.__class__.__qualname__}({fields})"

    body_dict = dict(cls.__dict__)
    body_dict["__init__"] = _make_init(names, defaults)
    body_dict["__eq__"] = __eq__
    body_dict["__repr__"] = __repr__
    body_dict["__hash__"] = __hash__ if frozen else None
    body_dict["__match_args__"] = names
    if frozen:
        body_dict["__setattr__"] = _frozen_setattr
        body_dict["__delattr__"] = _frozen_delattr
    if slots:
        for name in names:
            body_dict.pop(name, None)
        body_dict["__slots__"] = names
        body_dict.pop("__dict__", None)
        body_dict.pop("__weakref__", None)
    body_dict["__record_fields__"] = names
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
