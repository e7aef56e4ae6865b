"""Writes ONNX models without the ``onnx`` package.

An ONNX model is a protocol-buffers message (``onnx.proto``, proto2). The BERT graph uses a
small part of it: nodes with int, float and int-list attributes, small constant tensors, large
tensors whose data ONNX Runtime receives from memory, and typed inputs and outputs. This module
encodes exactly that part, in the order and form the ``onnx`` package itself writes (a test
checks that ``onnx`` reads our bytes back and writes the same bytes), so running the model
needs ONNX Runtime and nothing else.

Encoding, in short: each field is a key ``(field number << 3) | wire type`` and a value;
integers and enums are varints (wire type 0; negative ones as 64-bit two's complement), floats
4 little-endian bytes (wire type 5), and strings, bytes and nested messages a varint length and
the bytes (wire type 2). Repeated numbers are written one field each (proto2, not packed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

IR_VERSION = 8  # read by every ONNX Runtime since 1.10; enough for opset 17
FLOAT, INT8, INT64, FLOAT16 = 1, 3, 7, 10  # TensorProto.DataType
_DATA_TYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}
_ATTRIBUTE_FLOAT, _ATTRIBUTE_INT, _ATTRIBUTE_INTS = 1, 2, 7  # AttributeProto.AttributeType
_EXTERNAL = 1  # TensorProto.DataLocation

Attribute = int | float | Sequence[int]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers: 64-bit two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _text(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _messages(field: int, messages: Iterable[bytes]) -> bytes:
    return b"".join(_bytes(field, message) for message in messages)


def attribute(name: str, value: Attribute) -> bytes:
    """An ``AttributeProto``: an int, a float or a list of ints."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Sequence)):
        raise TypeError(f"unsupported attribute {name}={value!r}")
    if isinstance(value, int):
        return _text(1, name) + _int(3, value) + _int(20, _ATTRIBUTE_INT)
    if isinstance(value, float):
        return _text(1, name) + _float(2, value) + _int(20, _ATTRIBUTE_FLOAT)
    ints = b"".join(_int(8, int(item)) for item in value)
    return _text(1, name) + ints + _int(20, _ATTRIBUTE_INTS)


def node(
    op_type: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    domain: str = "",
    **attributes: Attribute,
) -> bytes:
    """A ``NodeProto``, of the default domain unless ``domain`` names another (ONNX Runtime's
    own operators are in ``com.microsoft``); attributes in name order, as ``onnx`` writes
    them."""
    return (
        b"".join(_text(1, name) for name in inputs)
        + b"".join(_text(2, name) for name in outputs)
        + _text(4, op_type)
        + _messages(5, (attribute(k, v) for k, v in sorted(attributes.items())))
        + (_text(7, domain) if domain else b"")
    )


def tensor(name: str, array: npt.NDArray[np.generic]) -> bytes:
    """A ``TensorProto`` holding ``array`` (float32 or int64) in the graph itself."""
    array = np.asarray(array)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return _dims_and_type(array.shape, _DATA_TYPES[array.dtype]) + _text(8, name) + _bytes(9, data)


def external_tensor(name: str, shape: Sequence[int], data_type: int = FLOAT) -> bytes:
    """A ``TensorProto`` whose data is not in the graph: ONNX Runtime is handed it separately
    (``SessionOptions.add_external_initializers``) and never reads the location."""
    location = _text(1, "location") + _text(2, "in-memory")
    return (
        _dims_and_type(shape, data_type)
        + _text(8, name)
        + _bytes(13, location)
        + _int(14, _EXTERNAL)
    )


def _dims_and_type(shape: Sequence[int], data_type: int) -> bytes:
    return b"".join(_int(1, int(size)) for size in shape) + _int(2, data_type)


def value_info(name: str, data_type: int, shape: Sequence[str] | None = None) -> bytes:
    """A ``ValueInfoProto``: a graph input or output, its dimensions named (``"batch"``) or,
    with ``shape=None``, left unstated."""
    tensor_type = _int(1, data_type)
    if shape is not None:
        tensor_type += _bytes(2, _messages(1, (_text(2, dim) for dim in shape)))
    return _text(1, name) + _bytes(2, _bytes(1, tensor_type))


def model(
    name: str,
    nodes: Sequence[bytes],
    initializers: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    opset: int,
    domains: Sequence[tuple[str, int]] = (),
) -> bytes:
    """A serialized ``ModelProto`` holding one graph, using the default operator set ``opset``
    and the operator sets ``domains`` names, as (domain, version) pairs."""
    graph = (
        _messages(1, nodes)
        + _text(2, name)
        + _messages(5, initializers)
        + _messages(11, inputs)
        + _messages(12, outputs)
    )
    operator_sets = [_text(1, "") + _int(2, opset)]
    operator_sets += [_text(1, domain) + _int(2, version) for domain, version in domains]
    return _int(1, IR_VERSION) + _bytes(7, graph) + _messages(8, operator_sets)
