"""A hostile worker's forged, well-formed messages (every CRC valid) for tests/test_hostile.py.

``FORGED`` maps a name to a function of the honest payloads of one send (a list of
``commlib.Payload``) that returns the forged payloads' bytes, one ``bytes`` per slot, each with a
valid CRC-32. ``message_bytes`` wraps them in a Message. Every entry must be rejected by a
receiver that applies commlib's wire rules (layout, index range and order, the value rule).
"""
from __future__ import annotations

import struct
import zlib
from typing import Callable, Dict, List

import torch

from commlib.wire import Payload

_MSG = struct.Struct("<4sHHIIQQ")  # the Message header of commlib/wire.py
_CRC_AT = 52  # the payload header's crc field


def recrc(raw: bytearray) -> bytes:
    """Recompute a payload's CRC-32 after tampering (header with the crc zeroed + body)."""
    raw[_CRC_AT:_CRC_AT + 4] = b"\0\0\0\0"
    raw[_CRC_AT:_CRC_AT + 4] = struct.pack("<I", zlib.crc32(bytes(raw)))
    return bytes(raw)


def message_bytes(parts: List[bytes], sender: int, step: int) -> bytes:
    used = _MSG.size + sum(len(p) for p in parts)
    return _MSG.pack(b"CLMS", 1, 0, len(parts), sender, step, used) + b"".join(parts)


def _bias_slot(honest: List[Payload]) -> int:
    """The smallest slot (a bias): room for wider dtypes in fixed-capacity collectives."""
    return min(range(len(honest)), key=lambda j: honest[j].numel)


def _matrix_slot(honest: List[Payload]) -> int:
    return max(range(len(honest)), key=lambda j: honest[j].numel)


def _replace(honest: List[Payload], j: int, forged: Payload, *, free: bool = False) -> List[bytes]:
    """Honest payloads with slot j replaced; ``free``: the largest other slot becomes a SKIP (so a
    wider forged payload still fits a fixed-capacity buffer)."""
    forged.slot = j
    big = _matrix_slot(honest)
    out = []
    for i, p in enumerate(honest):
        if i == j:
            out.append(forged.to_bytes())
        elif free and i == big:
            out.append(Payload.skip(p.numel, slot=i).to_bytes())
        else:
            out.append(p.to_bytes())
    return out


def _dense(honest, j, values, scale=1.0, free=False):
    n = honest[j].numel
    vals = values.reshape(-1)
    vals = vals.repeat(n // vals.numel() + 1)[:n] if vals.numel() != n else vals
    return _replace(honest, j, Payload.dense(vals.clone(), scale=scale), free=free)


def _full(dtype, value):
    return torch.tensor([value], dtype=dtype)


def _sparse(honest, idx, values=None, numel=None):
    j = _matrix_slot(honest)
    idx = torch.tensor(idx, dtype=torch.int32)
    vals = torch.full((idx.numel(),), 0.01) if values is None else values
    return _replace(honest, j, Payload.sparse(idx, vals, honest[j].numel if numel is None else numel))


def _flip(honest: List[Payload], j: int, byte: int, bit: int) -> List[bytes]:
    """One bit of slot j's encoding flipped (byte offset from the payload start), CRC recomputed."""
    out = [p.to_bytes() for p in honest]
    raw = bytearray(out[j])
    raw[byte] ^= 1 << bit
    out[j] = recrc(raw)
    return out


def _nan_in(where: str):
    def forge(honest):
        j = 0 if where == "first" else len(honest) - 1
        vals = honest[j].to_dense().clone()
        vals[vals.numel() // 2] = float("nan") if where != "inf" else float("inf")
        return _replace(honest, j, Payload.dense(vals))
    return forge


def _flip_sparse_sign(honest: List[Payload]) -> List[bytes]:
    j = _matrix_slot(honest)
    parts = _sparse(honest, [1, 2, 3])
    raw = bytearray(parts[j])
    raw[64 + 3] ^= 0x80  # the first index's sign bit
    parts[j] = recrc(raw)
    return parts


FORGED: Dict[str, Callable[[List[Payload]], List[bytes]]] = {
    # the scale: 1e300 x 1.0 overflows float32 (this killed the server before); zero, negative,
    # subnormal, NaN, Inf scales
    "scale-1e300": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 1.0), 1e300),
    "scale-1e38-x-3e38": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 3e38), 1e38),
    "scale-zero": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 1.0), 0.0),
    "scale-negative": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 1.0), -1.0),
    "scale-subnormal-f32": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 1.0), 1e-40),
    "scale-subnormal-f64": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 1.0), 5e-324),
    "scale-nan": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 1.0), float("nan")),
    "scale-inf": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 1.0), float("inf")),
    # huge values per dtype (finite on the wire, Inf in float32 after scale and cast)
    "f64-1e200": lambda h: _dense(h, _bias_slot(h), _full(torch.float64, 1e200), free=True),
    "f64-1.1e215": lambda h: _dense(h, _bias_slot(h), _full(torch.float64, 1.1e215), free=True),
    "f64-just-over-f32-max": lambda h: _dense(h, _bias_slot(h), _full(torch.float64, 3.4028236e38), free=True),
    "f16-65504-x-2^120": lambda h: _dense(h, _bias_slot(h), _full(torch.float16, 65504.0), 2.0 ** 120),
    "bf16-3.3e38-x-2": lambda h: _dense(h, _bias_slot(h), _full(torch.bfloat16, 3.3e38), 2.0),
    "int8-127-x-1e37": lambda h: _dense(h, _bias_slot(h), torch.tensor([127], dtype=torch.int8), 1e37),
    "f32-3e38-x-2": lambda h: _dense(h, _bias_slot(h), _full(torch.float32, 3e38), 2.0),
    # NaN / Inf in the values of the first and the last slot
    "nan-first-slot": _nan_in("first"),
    "nan-last-slot": _nan_in("last"),
    "inf-last-slot": _nan_in("inf"),
    # sizes and indices
    "wrong-numel": lambda h: _replace(h, _bias_slot(h), Payload.dense(torch.zeros(h[_bias_slot(h)].numel + 1)),
                                      free=True),
    "duplicated-indices": lambda h: _sparse(h, [3, 3, 9]),
    "unsorted-indices": lambda h: _sparse(h, [9, 3, 5]),
    "index-equals-numel": lambda h: _sparse(h, [0, h[_matrix_slot(h)].numel]),
    "negative-index": lambda h: _sparse(h, [-1, 4]),
    # one bit flipped, CRC recomputed: the scale's exponent (1.0 -> Inf), an index's sign bit,
    # the numel field, the dtype code
    "flip-scale-exponent": lambda h: _flip(h, _bias_slot(h), 47, 6),
    "flip-numel-bit": lambda h: _flip(h, _bias_slot(h), 16, 3),
    "flip-dtype-bit": lambda h: _flip(h, _bias_slot(h), 7, 1),
    "flip-sparse-index-sign": lambda h: _flip_sparse_sign(h),
}
