"""qrexec._record: the lean dataclass stand-in behaves like dataclasses for what it covers."""

from __future__ import annotations

import dataclasses

import pytest

from qrexec._record import FrozenInstanceError, dataclass, replace
from qrexec.protocol.messages import ExecRequest, Hello, TriggerService4


@dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 7


@dataclasses.dataclass(frozen=True, slots=True)
class RealPoint:
    x: int
    y: int = 7


@dataclass
class Mutable:
    a: int
    b: list[int]


def test_same_behaviour_as_a_real_frozen_slotted_dataclass() -> None:
    lean, real = Point(1), RealPoint(1)
    assert (lean.x, lean.y) == (real.x, real.y) == (1, 7)
    assert repr(lean) == "Point(x=1, y=7)" and repr(real).endswith("RealPoint(x=1, y=7)")
    assert lean == Point(1, 7) and lean != Point(2) and lean != (1, 7)
    assert hash(lean) == hash(Point(x=1, y=7))
    assert Point.__slots__ == RealPoint.__slots__ == ("x", "y")
    assert not hasattr(lean, "__dict__")
    assert Point.__match_args__ == RealPoint.__match_args__
    with pytest.raises(FrozenInstanceError):
        lean.x = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        real.x = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    match lean:
        case Point(x, y):
            assert (x, y) == (1, 7)


def test_mutable_records_are_not_hashable_and_accept_assignment() -> None:
    record = Mutable(1, [2])
    record.a = 5
    assert record == Mutable(5, [2])
    with pytest.raises(TypeError):
        hash(record)


def test_replace_on_records_and_real_dataclasses() -> None:
    assert replace(Point(1), y=2) == Point(1, 2)
    assert replace(RealPoint(1), y=2) == RealPoint(1, 2)
    trigger = TriggerService4(b"", b"vm2", b"SOCKET", b"svc")
    assert replace(trigger, request_id=b"7").request_id == b"7"


def test_protocol_messages_are_records() -> None:
    hello = Hello(3)
    assert hello == Hello(3) and {hello: 1}[Hello(3)] == 1
    assert repr(ExecRequest(0x200, 0, 0, b"x")).startswith("ExecRequest(msg_type=")


def test_non_default_after_default_is_refused() -> None:
    with pytest.raises(TypeError, match="follows a default"):

        @dataclass
        class Bad:
            a: int = 1
            b: int
