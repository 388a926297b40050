"""The value rule of commlib's wire format (stated in full in ``commlib.wire``): which decoded
values a receiver accepts. A leaf module: ``commlib.wire_format``, ``commlib.wire`` and the
packing ops in ``commlib.ops`` all apply it.
"""
from __future__ import annotations

import math
import struct
from typing import Optional

import torch

from commlib.errors import NonFiniteError, PayloadError

_PACK_CODE = {torch.float32: "<f", torch.float16: "<e"}


def round_to(x: float, dtype: torch.dtype) -> float:
    """IEEE round-to-nearest of a Python float into ``dtype`` (overflow gives +-Inf), as a float."""
    if dtype == torch.float64 or x != x:
        return float(x)
    code = _PACK_CODE.get(dtype)
    if code is None:  # bfloat16: no struct format
        return float(torch.tensor(x, dtype=torch.float64).to(dtype))
    try:
        return struct.unpack(code, struct.pack(code, x))[0]
    except OverflowError:  # struct refuses what rounds to Inf
        return math.copysign(math.inf, x)


def product_in(a: float, b: float, dtype: torch.dtype) -> float:
    """round_dtype(a * b) for a, b representable in ``dtype``: the exact product rounded once
    (float32/16/bf16 products are exact in float64, so one rounding of the double product)."""
    return round_to(a * b, dtype)


def check_scale(scale: float, *, target: torch.dtype = torch.float32, alpha: float = 1.0) -> None:
    """The scale half of the value rule (``commlib.wire``); raises NonFiniteError/PayloadError."""
    if not math.isfinite(scale):
        raise NonFiniteError(f"payload scale is {scale}")
    if not scale > 0:
        raise PayloadError(f"payload scale must be > 0, got {scale!r}")
    s_t = round_to(scale, target)
    if not math.isfinite(s_t):
        raise NonFiniteError(f"payload scale {scale!r} overflows {target}")
    if s_t < torch.finfo(target).tiny:
        raise PayloadError(f"payload scale {scale!r} is not a normal {target} number")
    if alpha != 1.0 and not math.isfinite(round_to(float(alpha) * scale, target)):
        raise NonFiniteError(f"alpha * scale = {float(alpha) * scale!r} overflows {target}")


def check_values(values: torch.Tensor, scale: float, *, target: torch.dtype = torch.float32,
                 alpha: float = 1.0, max_abs: Optional[float] = None, finite: bool = True,
                 slot: int = 0) -> None:
    """The value rule (``commlib.wire``) for one payload's values (any wire dtype).

    Rounding to ``target`` and multiplying by a positive number are monotone, so the rule holds
    for every value iff it holds for the largest magnitude: one ``aminmax`` pass, then scalars.
    Raises NonFiniteError (a non-finite value, or one that overflows ``target`` after scale and
    cast) or PayloadError (a bad scale, or a value over ``max_abs``).
    """
    if target not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise PayloadError(f"unsupported target dtype {target}")
    check_scale(scale, target=target, alpha=alpha)
    if values.numel() == 0 or (not finite and max_abs is None):
        return
    lo, hi = (float(v) for v in torch.aminmax(values))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        if finite:
            raise NonFiniteError(f"payload for slot {slot} holds NaN or Inf values")
        peak = float("nan")
    else:
        peak = round_to(max(-lo, hi), target)
    s_t = round_to(scale, target)
    decoded = product_in(peak, s_t, target) if peak == peak else peak
    if finite:
        addend = decoded if alpha == 1.0 else product_in(peak, round_to(float(alpha) * scale, target), target)
        if not (math.isfinite(decoded) and math.isfinite(addend)):
            raise NonFiniteError(f"payload for slot {slot}: a value (max |value| {max(-lo, hi):g}, scale "
                                 f"{scale:g}) is not finite in {target}")
    if max_abs is not None and not abs(decoded) <= max_abs:
        raise PayloadError(f"payload for slot {slot}: decoded |value| up to {abs(decoded):g} exceeds max_abs {max_abs:g}")
