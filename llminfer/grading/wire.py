"""The grader's wire between the process that scores and the process that runs student code.

Only plain data crosses it: `None`, `bool`, `int`, `float`, `str`, `bytes`, lists, tuples, dicts and dense
`torch.Tensor`s and their dtypes, plus a few tagged references (an object that stays in the student's process, a
student's process rebuilds an object from). A message is a JSON header followed by raw byte blobs (a tensor's
data, bytes), each length-prefixed and capped. The scoring side decodes with `json` and `torch.frombuffer`, so
what it gets back is always of those exact types, never an object of the student's making: no `pickle`.

Encoding, on the student's side, copies values out of subclasses (a namedtuple becomes a tuple, an `int`
subclass the plain `int` it claims to be) and refuses anything else with a message naming the type.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from dataclasses import dataclass
from numbers import Integral, Real

import torch

MAX_HEADER = 64 << 20      # bytes of JSON in one message
MAX_BLOBS = 1 << 30        # bytes of tensor data in one message
MAX_DEPTH = 64             # nesting of lists, tuples and dicts
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


class WireError(Exception):
    """A message that is malformed, too large or of a type the wire does not carry; the text says which."""


@dataclass(frozen=True)
class Handle:
    """An object that lives in the student's process (an instance of the student's class), by number."""

    number: int


@dataclass(frozen=True)
class Recipe:
    """An object the student's process builds itself: `llminfer.grading.support.RECIPES[name](*args)`."""

    name: str
    args: tuple


@dataclass(frozen=True)
class Method:
    """The answer to reading an attribute that is a method: call it through the handle."""

    name: str


class Encoder:
    """Turns a value into a JSON-ready tree and a list of blobs. `extra(value)` may return a tagged replacement
    (a Handle, a Recipe, a generator) for a value the wire does not carry as it is."""

    def __init__(self, extra=None):
        self.blobs: list[bytes] = []
        self.extra = extra

    def blob(self, data: bytes) -> int:
        self.blobs.append(data)
        return len(self.blobs) - 1

    def encode(self, value: object, depth: int = 0) -> object:
        if depth > MAX_DEPTH:
            raise WireError(f"the value is nested more than {MAX_DEPTH} levels deep")
        if value is None or type(value) in (bool, str):
            return value
        if type(value) is int or type(value) is float:
            return value
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, torch.Tensor):
            return {"x": self.tensor(value)}
        if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in DTYPES:
            return {"dt": str(value).removeprefix("torch.")}
        if isinstance(value, Handle):
            return {"h": value.number}
        if isinstance(value, Recipe):
            return {"r": [value.name, self.encode(list(value.args), depth + 1)]}
        if isinstance(value, Method):
            return {"m": value.name}
        if self.extra is not None:
            replaced = self.extra(value)
            if replaced is not None:
                return replaced(self) if callable(replaced) else self.encode(replaced, depth)
        if isinstance(value, Integral):
            return int(value.__index__())
        if isinstance(value, Real):
            return float(value)
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return {"b": self.blob(bytes(value))}
        if isinstance(value, list):
            return [self.encode(item, depth + 1) for item in list.__iter__(value)]
        if isinstance(value, tuple):
            return {"t": [self.encode(item, depth + 1) for item in tuple.__iter__(value)]}
        if isinstance(value, dict):
            return {"d": [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in dict.items(value)]}
        raise WireError(f"a {type(value).__module__}.{type(value).__qualname__} cannot be graded: return plain "
                        "data (tensors, numbers, strings, bytes, lists, tuples, dicts)")

    def tensor(self, value: torch.Tensor) -> list:
        # Tensor's own methods, called through the class: a subclass's overrides (__torch_function__) do not run.
        with torch._C.DisableTorchFunction():
            plain = torch.Tensor.detach(value)
            if plain.layout != torch.strided:
                plain = plain.to_dense()
            plain = plain.cpu().contiguous()
            if type(plain) is not torch.Tensor:
                plain = torch.Tensor._make_subclass(torch.Tensor, plain)
            name = str(plain.dtype).removeprefix("torch.")
            if name not in DTYPES:
                raise WireError(f"a tensor of dtype {plain.dtype} cannot be graded; use one of {', '.join(DTYPES)}")
            data = plain.reshape(-1).view(torch.uint8).numpy().tobytes() if plain.numel() else b""
            return [self.blob(data), name, list(plain.shape)]


class Decoder:
    """The inverse of `Encoder`, on bytes from the other process: builds only plain types and tensors.
    `extra(tag, payload)` turns the tagged references this side accepts into objects; any other tag is an error."""

    def __init__(self, blobs: list[bytes], extra=None):
        self.blobs, self.extra = blobs, extra

    def decode(self, tree: object, depth: int = 0) -> object:
        if depth > MAX_DEPTH:
            raise WireError(f"the value is nested more than {MAX_DEPTH} levels deep")
        if tree is None or type(tree) in (bool, int, float, str):
            return tree
        if type(tree) is list:
            return [self.decode(item, depth + 1) for item in tree]
        if type(tree) is not dict or len(tree) != 1:
            raise WireError("malformed message: an untagged object")
        (tag, payload), = tree.items()
        if tag == "t" and type(payload) is list:
            return tuple(self.decode(item, depth + 1) for item in payload)
        if tag == "d" and type(payload) is list:
            out = {}
            for pair in payload:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed message: a dict entry that is not a pair")
                key = self.decode(pair[0], depth + 1)
                try:
                    out[key] = self.decode(pair[1], depth + 1)
                except TypeError:
                    raise WireError(f"a dict key of type {type(key).__name__} is not hashable") from None
            return out
        if tag == "b":
            return self.blob(payload)
        if tag == "x":
            return self.tensor(payload)
        if tag == "dt" and payload in DTYPES:
            return DTYPES[payload]
        if self.extra is not None:
            return self.extra(tag, payload, self)
        raise WireError(f"malformed message: unknown tag {tag!r}")

    def blob(self, index: object) -> bytes:
        if type(index) is not int or not 0 <= index < len(self.blobs):
            raise WireError("malformed message: a blob index out of range")
        return self.blobs[index]

    def tensor(self, payload: object) -> torch.Tensor:
        if type(payload) is not list or len(payload) != 3:
            raise WireError("malformed message: a tensor entry")
        index, name, shape = payload
        data = self.blob(index)
        if name not in DTYPES or type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
            raise WireError(f"malformed message: a tensor of dtype {name!r} and shape {shape!r}")
        dtype = DTYPES[name]
        numel = 1
        for n in shape:
            numel *= n
        itemsize = dtype.itemsize
        if numel * itemsize != len(data):
            raise WireError(f"malformed message: a tensor of shape {shape} and dtype {name} with {len(data)} bytes")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def pack(message: dict, extra=None) -> bytes:
    """A message as bytes: 8-byte header length, JSON header (with the blob sizes), blobs."""
    encoder = Encoder(extra)
    tree = {key: encoder.encode(value) for key, value in message.items()}
    header = json.dumps({"message": tree, "blobs": [len(b) for b in encoder.blobs]}).encode()
    return b"".join([struct.pack("<Q", len(header)), header, *encoder.blobs])


def send(fd: int, message: dict, extra=None) -> None:
    data = memoryview(pack(message, extra))
    while data:
        written = os.write(fd, data)
        data = data[written:]


class Timeout(Exception):
    """The other process did not answer in time."""


class Closed(Exception):
    """The other process closed its end (it exited)."""


# Bytes read from a pipe past the end of the last message, by (descriptor, inode): a descriptor number closed and
# reused for another pipe does not inherit them.
_PENDING: dict[tuple[int, int], bytes] = {}


def _read_exactly(fd: int, n: int, deadline: float | None, ahead: bool = True) -> bytes:
    """n bytes from `fd`; with `ahead`, what the read brings beyond them is kept for the next message (only for a
    pipe no other process reads: a forked child would inherit what was read ahead and its parent too)."""
    key = (fd, os.fstat(fd).st_ino)
    pending = _PENDING.pop(key, b"")
    chunks, left = [pending[:n]], n - len(pending[:n])
    if len(pending) > n:
        _PENDING[key] = pending[n:]
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise Timeout
        chunk = os.read(fd, max(left, 1 << 16) if ahead else left)
        if not chunk:
            raise Closed
        if len(chunk) > left:
            _PENDING[key] = chunk[left:]
            chunk = chunk[:left]
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def forget(fd: int) -> None:
    """Drop what was read ahead on `fd` (before it is closed)."""
    for key in [key for key in _PENDING if key[0] == fd]:
        del _PENDING[key]


def receive(fd: int, deadline: float | None = None, extra=None, ahead: bool = True) -> dict:
    """The next message from `fd`, decoded; `Timeout` past `deadline` (time.monotonic), `Closed` at EOF,
    `WireError` if it is malformed or too large. `ahead=False` reads no byte past the message."""
    (size,) = struct.unpack("<Q", _read_exactly(fd, 8, deadline, ahead))
    if size > MAX_HEADER:
        raise WireError(f"a message header of {size:,} bytes (the limit is {MAX_HEADER:,})")
    try:
        header = json.loads(_read_exactly(fd, size, deadline, ahead))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"malformed message: {type(exc).__name__}") from None
    if type(header) is not dict or type(header.get("message")) is not dict or type(header.get("blobs")) is not list:
        raise WireError("malformed message: no header")
    sizes = header["blobs"]
    if not all(type(n) is int and n >= 0 for n in sizes) or sum(sizes) > MAX_BLOBS:
        raise WireError(f"malformed message: blobs of {sizes!r} bytes (at most {MAX_BLOBS:,} in all)")
    blobs = [_read_exactly(fd, n, deadline, ahead) for n in sizes]
    decoder = Decoder(blobs, extra)
    try:
        return {key: decoder.decode(value) for key, value in header["message"].items()}
    except RecursionError:
        raise WireError("malformed message: nested too deeply") from None
