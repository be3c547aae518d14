"""Find every tensor of an ONNX model that points to external data, without `onnx`.

The device runtime has numpy and onnxruntime only, so this reads the protobuf wire
format itself, following just the messages through which a tensor can be reached
(model -> graphs, functions, training info -> nodes -> attributes -> tensors, sparse
tensors, nested graphs) and skipping every other field unread. Field numbers are those of
`onnx.proto` (stable since IR version 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# message kinds and, per kind, the fields that hold messages worth following
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _TRAINING, _FUNCTION, _ENTRY = range(9)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _FUNCTION: {7: _NODE, 11: _ATTR},
}
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64  # subgraph nesting deeper than this is not a model we wrote


class ProtoError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


@dataclass
class ExternalTensor:
    name: str
    data_location: int = 0
    entries: list = field(default_factory=list)  # (key, value) of external_data, in order

    def values(self, key: str) -> list[str]:
        """Every value given for `key` (a repeated key is reported each time)."""
        return [v for k, v in self.entries if k == key]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtoError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message: an int for varints, a memoryview
    for length-delimited fields, None for fixed-width ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ProtoError("length-delimited field runs past its message")
            yield number, wire, buf[pos:pos + n]
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(buf):
                raise ProtoError("fixed-width field runs past its message")
            yield number, wire, None
        else:  # groups (3, 4) are not used by ONNX
            raise ProtoError(f"unsupported wire type {wire}")


def _text(value) -> str:
    if not isinstance(value, memoryview):
        raise ProtoError("expected a string field")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtoError("string field is not UTF-8") from None


def _tensor(buf: memoryview) -> ExternalTensor:
    t = ExternalTensor(name="")
    for number, wire, value in _fields(buf):
        if number == _TENSOR_NAME and wire == 2:
            t.name = _text(value)
        elif number == _TENSOR_LOCATION and wire == 0:
            t.data_location = value
        elif number == _TENSOR_EXTERNAL and wire == 2:
            key = val = ""
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    key = _text(v)
                elif n == 2 and w == 2:
                    val = _text(v)
            t.entries.append((key, val))
    return t


def _walk(buf: memoryview, kind: int, depth: int, out: list) -> None:
    if depth > _MAX_DEPTH:
        raise ProtoError("graphs nested too deeply")
    if kind == _TENSOR:
        t = _tensor(buf)
        if t.entries or t.data_location == EXTERNAL:
            out.append(t)
        return
    children = _CHILDREN[kind]
    for number, wire, value in _fields(buf):
        child = children.get(number)
        if child is not None and wire == 2:
            _walk(value, child, depth + 1, out)


def external_tensors(data: bytes) -> list[ExternalTensor]:
    """Every tensor of the serialized ModelProto `data` that has external_data entries or
    the EXTERNAL data location (initializers, constants in attributes, sparse tensors, in
    the main graph, subgraphs, functions and training info). Raises `ProtoError` on bytes
    that are not a well-formed protobuf."""
    out: list[ExternalTensor] = []
    _walk(memoryview(data), _MODEL, 0, out)
    return out
