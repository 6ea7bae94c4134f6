"""The plain-data channel between a candidate's process and the process that runs its tests.

Why. Tests that run in the candidate's own process can be fooled by it: it can read the harness's secrets out of
its own memory, replace what the tests call (builtins, `__eq__`), or trace the test function. So the tests run in
a second process and reach the candidate only through this channel, which carries *data*, never objects: what
the tests compare is built by the test process itself from plain values, so no candidate-defined method ever runs
on the test side.

Values. Encoded as JSON with tags (`encode` / `decode`):

    None, bool, int, float (nan/inf too), str           as JSON
    ["t", [...]] tuple   ["l", [...]] list   ["s", [...]] set   ["f", [...]] frozenset   ["d", [[k, v], ...]] dict
    ["b", "hex"] bytes   ["c", re, im] complex
    ["i", [...]] an iterator or generator, consumed on the candidate side and rebuilt as iter(list)
    ["h", id, "type name"] a handle: any other object stays in the candidate's process; the test side holds a
                         `Remote` it can call, read and set attributes on, and pass back as an argument

Subclasses of the plain types travel as the plain type (a Counter as a dict, a namedtuple as a tuple, an IntEnum
as an int): the test side compares values, as `==` would for these types. Exceptions raised by the candidate
travel as ["x", "TypeName", "message"] and are raised on the test side as the builtin exception of that name
(ValueError, IndexError, ...) or as `RemoteError`.

Safety of the test side. `decode` runs on bytes the candidate controls: it only builds the types above (json,
then tags checked one by one), refuses unknown tags, nesting deeper than MAX_DEPTH, and frames larger than
MAX_FRAME bytes (a `ChannelError`, which fails the test). Nothing received is evaluated or unpickled.

Frames are length-prefixed (4 bytes, little endian) JSON, one request and one reply at a time.
"""

from __future__ import annotations

import builtins
import json
import os
import struct
from collections.abc import Iterator
from types import GeneratorType

FRAME = struct.Struct("<I")
MAX_FRAME = 64 << 20  # bytes per message
MAX_DEPTH = 200  # nesting of containers


class ChannelError(Exception):
    """The other side broke the protocol, went away, or sent something too large or malformed."""


class RemoteError(Exception):
    """An exception of a non-builtin type, raised by the candidate's code."""


# ---------------------------------------------------------------------------------------------------- codec

_ITERATORS = (GeneratorType, Iterator)


def encode(obj, handle, depth: int = 0):
    """`obj` as tagged JSON data; `handle(obj)` registers anything else and returns its id."""
    if depth > MAX_DEPTH:
        raise ChannelError(f"nesting deeper than {MAX_DEPTH}")
    d = depth + 1
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, int):  # IntEnum, IntFlag (bool is not subclassable)
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, tuple):
        return ["t", [encode(x, handle, d) for x in obj]]
    if isinstance(obj, list):
        return ["l", [encode(x, handle, d) for x in obj]]
    if isinstance(obj, dict):
        return ["d", [[encode(k, handle, d), encode(v, handle, d)] for k, v in obj.items()]]
    if isinstance(obj, frozenset):
        return ["f", [encode(x, handle, d) for x in obj]]
    if isinstance(obj, set):
        return ["s", [encode(x, handle, d) for x in obj]]
    if isinstance(obj, (bytes, bytearray)):
        return ["b", bytes(obj).hex()]
    if isinstance(obj, complex):
        return ["c", obj.real, obj.imag]
    if isinstance(obj, _ITERATORS):
        return ["i", [encode(x, handle, d) for x in obj]]
    return ["h", handle(obj), type(obj).__name__]


def decode(data, remote, depth: int = 0):
    """The value `encode` produced; `remote(id, type name)` makes the test side's stand-in for a handle."""
    if depth > MAX_DEPTH:
        raise ChannelError(f"nesting deeper than {MAX_DEPTH}")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not list or not data or type(data[0]) is not str:
        raise ChannelError(f"malformed value: {type(data).__name__}")
    tag, d = data[0], depth + 1
    body = data[1:]
    if tag in ("t", "l", "s", "f", "i", "d") and (len(body) != 1 or type(body[0]) is not list):
        raise ChannelError(f"malformed {tag!r} value")
    if tag == "t":
        return tuple(decode(x, remote, d) for x in body[0])
    if tag == "l":
        return [decode(x, remote, d) for x in body[0]]
    if tag == "s":
        return {decode(x, remote, d) for x in body[0]}
    if tag == "f":
        return frozenset(decode(x, remote, d) for x in body[0])
    if tag == "i":
        return iter([decode(x, remote, d) for x in body[0]])
    if tag == "d":
        pairs = body[0]
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise ChannelError("malformed dict")
        return {decode(k, remote, d): decode(v, remote, d) for k, v in pairs}
    if tag == "b" and len(body) == 1 and type(body[0]) is str:
        return bytes.fromhex(body[0])
    if tag == "c" and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    if tag == "h" and len(body) == 2 and type(body[0]) is int and type(body[1]) is str:
        return remote(body[0], body[1])
    raise ChannelError(f"unknown or malformed tag {tag!r}")


def exception(name: str, message: str) -> BaseException:
    """The test side's exception for one the candidate raised: the builtin of that name, else RemoteError."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        try:
            return cls(message)
        except Exception:  # e.g. UnicodeDecodeError needs five arguments
            pass
    return RemoteError(f"{name}: {message}")


# --------------------------------------------------------------------------------------------------- frames


def send(fd: int, obj) -> None:
    data = json.dumps(obj, allow_nan=True).encode()
    if len(data) > MAX_FRAME:
        raise ChannelError(f"message of {len(data)} bytes (limit {MAX_FRAME})")
    data = FRAME.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def recv(fd: int):
    head = _read(fd, FRAME.size)
    (n,) = FRAME.unpack(head)
    if n > MAX_FRAME:
        raise ChannelError(f"message of {n} bytes (limit {MAX_FRAME})")
    try:
        return json.loads(_read(fd, n))
    except ValueError as e:
        raise ChannelError(f"malformed message: {e}") from None


def _read(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise ChannelError("the other side went away")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------------------------------- the two ends

MODULE_TAG = "m"  # in the names reply only: a module the candidate imported, re-imported by name on the test side


def serve(rfd: int, wfd: int, namespace: dict) -> None:
    """The candidate's side: answer requests about `namespace` (its module's globals) until the tests hang up.

    Requests: ["names"] → {name: value, handle or ["m", module name]}; ["call", h, args, kwargs];
    ["getattr", h, name]; ["setattr", h, name, value]; ["repr", h]. Replies: ["ok", value] or
    ["x", exception type name, message]."""
    objects: dict[int, object] = {}

    def handle(obj) -> int:
        objects[id(obj)] = obj  # kept alive: the id stays valid for the whole run
        return id(obj)

    def local(h: int, _type: str):
        if h not in objects:
            raise ChannelError(f"no object {h}")
        return objects[h]

    while True:
        try:
            req = recv(rfd)
        except ChannelError:
            return
        try:
            op = req[0]
            if op == "names":
                out = {}
                for name, value in list(namespace.items()):
                    if name.startswith("__"):
                        continue
                    mod = getattr(value, "__spec__", None) if type(value).__name__ == "module" else None
                    out[name] = [MODULE_TAG, value.__name__] if mod is not None else encode(value, handle)
                reply = ["ok", out]
            elif op == "call":
                fn, args, kwargs = local(req[1], ""), decode(req[2], local), decode(req[3], local)
                reply = ["ok", encode(fn(*args, **kwargs), handle)]
            elif op == "getattr":
                reply = ["ok", encode(getattr(local(req[1], ""), req[2]), handle)]
            elif op == "setattr":
                setattr(local(req[1], ""), req[2], decode(req[3], local))
                reply = ["ok", None]
            elif op == "repr":
                reply = ["ok", repr(local(req[1], ""))]
            else:
                raise ChannelError(f"unknown request {op!r}")
        except Exception as e:
            try:
                reply = ["x", type(e).__name__, str(e)[:2000]]
            except Exception:
                reply = ["x", type(e).__name__, ""]
        send(wfd, reply)


class Client:
    """The tests' side: requests to the candidate's process, answers rebuilt as plain values or `Remote`s."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd

    def _handle(self, obj) -> int:
        if isinstance(obj, Remote):
            return object.__getattribute__(obj, "_h")
        raise ChannelError(f"cannot pass a {type(obj).__name__} to the candidate (only plain data and its own objects)")

    def remote(self, h: int, type_name: str) -> Remote:
        return Remote(self, h, type_name)

    def request(self, op: str, *args):
        message = [op, *[encode(a, self._handle) if i else a for i, a in enumerate(args)]]
        try:
            send(self.wfd, message)
        except BrokenPipeError:  # the candidate has exited; its last words (an exception) may still be in the pipe
            pass
        reply = recv(self.rfd)
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return reply[1] if op == "names" else decode(reply[1], self.remote)
        if type(reply) is list and len(reply) == 3 and reply[0] == "x" and all(type(x) is str for x in reply[1:]):
            raise exception(reply[1], reply[2])
        raise ChannelError("malformed reply")

    def names(self) -> dict:
        """The candidate's top-level names as the tests will see them."""
        import importlib
        import sys

        raw = self.request("names")
        if type(raw) is not dict:
            raise ChannelError("malformed names")
        out = {}
        for name, value in raw.items():
            if type(value) is list and len(value) == 2 and value[0] == MODULE_TAG and type(value[1]) is str:
                # `import math` (or `import os.path`, which binds os): the test side imports the same standard
                # module itself; a module bound to another name (`import cmath as math`) is not followed
                if value[1].split(".")[0] == name and name in sys.stdlib_module_names:
                    out[name] = importlib.import_module(name)
                continue
            out[name] = decode(value, self.remote)
        return out


class Remote:
    """An object that lives in the candidate's process: call it, read or set its attributes, pass it back.
    Equal only to itself (a candidate's `__eq__` never runs on the test side)."""

    __slots__ = ("_client", "_h", "_type")

    def __init__(self, client: Client, h: int, type_name: str):
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_h", h)
        object.__setattr__(self, "_type", type_name)

    def __call__(self, *args, **kwargs):
        return self._client.request("call", self._h, list(args), kwargs)

    def __getattr__(self, name: str):
        return object.__getattribute__(self, "_client").request("getattr", object.__getattribute__(self, "_h"), name)

    def __setattr__(self, name: str, value) -> None:
        self._client.request("setattr", self._h, name, value)

    def __repr__(self) -> str:
        text = self._client.request("repr", self._h)
        return text if type(text) is str else f"<remote {self._type}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Remote) and object.__getattribute__(other, "_h") == self._h

    def __hash__(self) -> int:
        return hash(self._h)
