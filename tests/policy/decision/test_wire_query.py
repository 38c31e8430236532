"""The §6.1 query (qrexec-daemon → policy) codec, from hand-written bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.policy.decision.wire import MAX_QUERY_BYTES, PolicyQuery, QueryDecoder, parse_query

V4_QUERY = (
    b"source=work\n"
    b"requested_source=\n"
    b"intended_target=personal\n"
    b"service_and_arg=qubes.Filecopy+arg\n"
    b"\n"
)


def test_v4_query_parses() -> None:
    q = parse_query(V4_QUERY)
    assert q == PolicyQuery(
        source="work",
        requested_source="",
        intended_target="personal",
        service_and_arg="qubes.Filecopy+arg",
    )
    assert (q.service, q.argument) == ("qubes.Filecopy", "+arg")


def test_v3_query_without_requested_source_and_with_extras() -> None:
    q = parse_query(
        b"source=work\nintended_target=@default\nservice_and_arg=test.Add\n"
        b"assume_yes_for_ask=yes\njust_evaluate=no\n\n"
    )
    assert q.requested_source is None
    assert q.assume_yes_for_ask is True
    assert q.just_evaluate is False
    assert (q.service, q.argument) == ("test.Add", "+")


def test_empty_intended_target_is_accepted() -> None:
    q = parse_query(b"source=a\nintended_target=\nservice_and_arg=s+\n\n")
    assert q.intended_target == ""
    assert q.argument == "+"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"source=a\nintended_target=b\nservice_and_arg=s\ndomain_id=3\n\n", "unknown key"),
        (b"source=a\nprocess_ident=1 2\nintended_target=b\nservice_and_arg=s\n\n", "unknown key"),
        (b"source=a\nsource=a\nintended_target=b\nservice_and_arg=s\n\n", "duplicate key"),
        (b"source=a\nservice_and_arg=s\n\n", "intended_target"),
        (b"intended_target=b\nservice_and_arg=s\n\n", "source"),
        (b"source=a\nintended_target=b\n\n", "service_and_arg"),
        (b"\n", "lacks required"),
        (b"source=a\nintended_target=b\nservice_and_arg=s\n", "empty line"),
        (b"source=a\nintended_target=b\nservice_and_arg=s\n\n\n", "not key=value"),
        (b"garbage\n\n", "not key=value"),
        (b"source=a\x00\nintended_target=b\nservice_and_arg=s\n\n", "NUL"),
        (b"source=\xe9\nintended_target=b\nservice_and_arg=s\n\n", "not ASCII"),
        (b"source=a b\nintended_target=b\nservice_and_arg=s\n\n", "source"),
        (b"source=\nintended_target=b\nservice_and_arg=s\n\n", "source: empty"),
        (b"source=a\nintended_target=b\nservice_and_arg=\n\n", "service_and_arg: empty"),
        (b"source=a\nintended_target=b\nservice_and_arg=s\njust_evaluate=maybe\n\n", "yes or no"),
        (b"source=a\nintended_target=b\nservice_and_arg=s\nassume_yes_for_ask=\n\n", "empty"),
        (b"source=a\r\nintended_target=b\nservice_and_arg=s\n\n", "not allowed"),
    ],
)
def test_bad_queries_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        parse_query(data)


def test_encode_matches_hand_written_bytes() -> None:
    q = PolicyQuery(
        source="work",
        requested_source="",
        intended_target="personal",
        service_and_arg="qubes.Filecopy+arg",
    )
    assert q.encode() == V4_QUERY
    extras = PolicyQuery("a", "b", "s", assume_yes_for_ask=True, just_evaluate=True)
    assert extras.encode() == (
        b"source=a\nintended_target=b\nservice_and_arg=s\n"
        b"assume_yes_for_ask=yes\njust_evaluate=yes\n\n"
    )


@pytest.mark.parametrize(
    "query",
    [
        PolicyQuery("a b", "t", "s"),
        PolicyQuery("", "t", "s"),
        PolicyQuery("a", "t\n", "s"),
        PolicyQuery("a", "t", "s" * MAX_QUERY_BYTES),
    ],
)
def test_encoder_refuses_what_the_parser_would(query: PolicyQuery) -> None:
    with pytest.raises(LocalProtocolError):
        query.encode()


def test_decoder_finds_the_terminator_split_at_every_byte() -> None:
    for cut in range(len(V4_QUERY) + 1):
        dec = QueryDecoder()
        first = dec.feed(V4_QUERY[:cut])
        if cut < len(V4_QUERY):
            assert first is None
            q = dec.feed(V4_QUERY[cut:])
        else:
            q = first
        assert q == parse_query(V4_QUERY)


def test_decoder_keeps_trailing_bytes_out_of_the_query() -> None:
    dec = QueryDecoder()
    q = dec.feed(V4_QUERY + b"extra")
    assert q is not None and q.source == "work"
    assert dec.trailing == b"extra"


def test_decoder_handles_a_lone_empty_line() -> None:
    with pytest.raises(RemoteProtocolError, match="lacks required"):
        QueryDecoder().feed(b"\n")


def test_decoder_caps_its_buffer() -> None:
    dec = QueryDecoder()
    chunk = b"x" * 4096
    with pytest.raises(RemoteProtocolError, match="without an empty line"):
        for _ in range(MAX_QUERY_BYTES // len(chunk) + 2):
            assert dec.feed(chunk) is None


def test_decoder_eof_before_terminator_is_an_error() -> None:
    dec = QueryDecoder()
    assert dec.feed(b"source=a\n") is None
    with pytest.raises(RemoteProtocolError, match="before the empty line"):
        dec.eof()


_ident = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)


@given(
    source=_ident,
    target=st.one_of(st.just(""), _ident),
    service=_ident,
    requested_source=st.one_of(st.none(), st.just(""), _ident),
    yes=st.booleans(),
    just=st.booleans(),
)
def test_round_trip(
    source: str,
    target: str,
    service: str,
    requested_source: str | None,
    yes: bool,
    just: bool,
) -> None:
    q = PolicyQuery(source, target, service, requested_source, yes, just)
    assert parse_query(q.encode()) == q


@given(st.binary(max_size=300))
def test_decoder_never_raises_anything_but_protocol_errors(data: bytes) -> None:
    dec = QueryDecoder()
    try:
        q = dec.feed(data)
    except RemoteProtocolError:
        return
    if q is None:
        assert b"\n\n" not in data and not data.startswith(b"\n")
    else:
        assert parse_query(q.encode()) == q
