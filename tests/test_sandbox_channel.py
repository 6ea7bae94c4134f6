"""eval.sandbox_channel: the plain-data channel between a candidate's process and its tests' process.

The codec round-trips every plain type, the test side's decoder refuses whatever it was not built for, and a
candidate's objects never run a method on the test side (a lying `__eq__` stays in the candidate's process).
Both ends run here in two threads over a socketpair (the sandbox runs them in two processes).
"""

from __future__ import annotations

import json
import math
import socket
import threading
from collections import Counter, OrderedDict, namedtuple

import pytest

from eval import sandbox_channel as ch

CANDIDATE = """
import math
import cmath as sqrtlib
from collections import Counter

class Node:
    def __init__(self, v):
        self.v, self.left = v, None

def depth(n):
    return 0 if n is None else 1 + depth(n.left)

def values():
    return [1, (2,), {3: {4}}, b'ab', 1 + 2j, float('nan'), Counter('aab'), map(str, range(3)), None, True, 2**100]

def boom(kind):
    raise {'value': ValueError, 'custom': type('Mine', (Exception,), {})}[kind]('bad')

class Liar:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__

def lie():
    return Liar()

K = 42
"""


@pytest.fixture
def names():
    a, b = socket.socketpair()
    ns: dict = {}
    exec(CANDIDATE, ns)
    server = threading.Thread(target=ch.serve, args=(b.fileno(), b.fileno(), ns))
    server.start()
    try:
        yield ch.Client(a.fileno(), a.fileno()).names()
    finally:
        a.close()
        server.join(5)
        b.close()


def plain(obj):
    return ch.decode(json.loads(json.dumps(ch.encode(obj, lambda o: pytest.fail(f"not plain: {o!r}")))), None)


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**100), 1.5, "é\n", (), (1, [2, {3}]), {"a": (1,), 2: frozenset({3})}, b"\x00\xff", 1 - 2j,
     [[[]]], {(1, 2): None}],
)  # fmt: skip
def test_plain_values_round_trip(value):
    got = plain(value)
    assert got == value and type(got) is type(value)


def test_subclasses_travel_as_their_plain_type_and_floats_stay_exact():
    assert type(plain(Counter("aab"))) is dict and plain(Counter("aab")) == {"a": 2, "b": 1}
    assert type(plain(OrderedDict(a=1))) is dict
    assert type(plain(namedtuple("P", "x y")(1, 2))) is tuple
    assert plain(0.1 + 0.2) == 0.1 + 0.2 and math.isnan(plain(float("nan"))) and plain(float("-inf")) == -math.inf


def test_iterators_are_consumed_into_iterators():
    got = plain(map(str, range(3)))
    assert iter(got) is got and list(got) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "data",
    [["zz", []], ["t"], ["t", 1], ["d", [[1]]], ["b", 5], ["c", "1", 2], ["h", "1", "x"], [1, 2], {"a": 1}, [],
     ["l", [["l", [["o", []]]]]]],
)  # fmt: skip
def test_the_decoder_refuses_what_it_was_not_built_for(data):
    with pytest.raises(ch.ChannelError):
        ch.decode(data, lambda h, t: pytest.fail("no handle expected"))


def test_the_decoder_refuses_deep_nesting():
    data: list = ["l", []]
    for _ in range(ch.MAX_DEPTH + 5):
        data = ["l", [data]]
    with pytest.raises(ch.ChannelError, match="nesting"):
        ch.decode(data, None)


def test_a_frame_larger_than_the_limit_is_refused():
    a, b = socket.socketpair()
    try:
        a.send(ch.FRAME.pack(ch.MAX_FRAME + 1))
        with pytest.raises(ch.ChannelError, match="limit"):
            ch.recv(b.fileno())
    finally:
        a.close()
        b.close()


def test_calls_return_plain_values(names):
    got = names["values"]()
    assert got[:5] == [1, (2,), {3: {4}}, b"ab", 1 + 2j] and math.isnan(got[5])
    assert got[6] == {"a": 2, "b": 1} and list(got[7]) == ["0", "1", "2"] and got[8:] == [None, True, 2**100]
    assert names["K"] == 42 and names["math"] is math  # modules are imported on the test side, by name
    assert "sqrtlib" not in names  # a module under another name is not followed


def test_objects_stay_in_the_candidates_process(names):
    node = names["Node"](1)
    node.left = names["Node"](2)
    assert isinstance(node, ch.Remote) and node.v == 1 and names["depth"](node) == 2
    assert repr(node).startswith("<Node object")


def test_a_lying_eq_never_runs_on_the_test_side(names):
    liar = names["lie"]()
    assert isinstance(liar, ch.Remote)
    assert (liar == 5) is False and (liar == names["lie"]()) is False and liar == liar


def test_exceptions_are_raised_as_the_builtin_of_that_name(names):
    with pytest.raises(ValueError, match="bad"):
        names["boom"]("value")
    with pytest.raises(ch.RemoteError, match="Mine: bad"):
        names["boom"]("custom")


def test_the_test_side_never_sends_its_own_objects(names):
    with pytest.raises(ch.ChannelError, match="cannot pass a function"):
        names["depth"](lambda: None)


def test_a_candidate_that_already_exited_still_reports_its_exception():
    """The candidate raised at import, sent its exception and exited before the tests' first request was written:
    the write fails (broken pipe) but the tests still fail with the candidate's exception, not the pipe's."""
    import os
    import signal

    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in Python processes: EPIPE, not a signal
    try:
        requests, replies = os.pipe(), os.pipe()
        ch.send(replies[1], ["x", "KeyError", "'nope'"])
        os.close(replies[1])
        os.close(requests[0])  # the candidate's end of the requests pipe: gone
        client = ch.Client(replies[0], requests[1])
        with pytest.raises(KeyError, match="nope"):
            client.names()
        with pytest.raises(ch.ChannelError, match="went away"):  # and nothing more after it
            client.names()
        os.close(replies[0]), os.close(requests[1])
    finally:
        signal.signal(signal.SIGPIPE, old)
