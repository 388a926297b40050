"""Compressor interface: compress(x) -> Payload, decompress(p) -> Tensor.

Each compressor states what kind of operator it is, the two classes of the EF literature:
- contractive (biased): ||C(x) - x||^2 <= (1 - delta) ||x||^2 with delta in (0, 1]  -> ``delta()``
- unbiased: E C(x) = x and E||C(x) - x||^2 <= omega ||x||^2                          -> ``omega()``
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Optional

import torch

from commlib.errors import ConfigError
from commlib.registry import Registry
from commlib.wire import Kind, Payload

COMPRESSORS: "Registry[Compressor]" = Registry("compressor")


def k_of(numel: int, ratio: float) -> int:
    """Number of entries a ratio keeps: ceil(ratio * numel), at least 1 (for numel > 0)."""
    if numel == 0:
        return 0
    return int(min(numel, max(1, math.ceil(ratio * numel))))


class Compressor(ABC):
    """Turns a flat tensor into a Payload. Stateless: state lives in feedback objects."""

    name: ClassVar[str]
    #: True when E[C(x)] = x.
    unbiased: ClassVar[bool] = False
    #: Payload kind this compressor emits (the DDP runtime sizes buffers from it).
    kind: ClassVar[Kind] = Kind.SPARSE
    #: True for the identity (and lossless dense) operator.
    is_identity: ClassVar[bool] = False

    def __init__(self, ratio: Optional[float] = None) -> None:
        if ratio is not None and not (0.0 < float(ratio) <= 1.0):
            raise ConfigError(f"{self.name}: ratio must be in (0, 1], got {ratio}")
        self.ratio = None if ratio is None else float(ratio)

    def _ratio(self, ratio: Optional[float]) -> float:
        r = self.ratio if ratio is None else float(ratio)
        if r is None:
            return 1.0
        if not 0.0 < r <= 1.0:
            raise ConfigError(f"{self.name}: ratio must be in (0, 1], got {r}")
        return r

    # -- what the operator guarantees ------------------------------------------
    def delta(self, numel: int, ratio: Optional[float] = None) -> Optional[float]:
        """Contraction parameter delta (None when the operator is not contractive)."""
        return None

    def omega(self, numel: int, ratio: Optional[float] = None) -> Optional[float]:
        """Variance parameter omega of an unbiased operator (None when biased)."""
        return None

    # -- sizes --------------------------------------------------------------------
    def max_nnz(self, numel: int, ratio: Optional[float] = None) -> int:
        """Most values one payload of this compressor can carry for a tensor of numel entries."""
        return k_of(numel, self._ratio(ratio))

    def value_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype of the payload values for an input of this dtype."""
        return dtype

    def max_bytes(self, numel: int, dtype: torch.dtype, ratio: Optional[float] = None) -> int:
        return Payload.max_bytes(self.kind, self.max_nnz(numel, ratio), self.value_dtype(dtype))

    # -- the operator ---------------------------------------------------------------
    @abstractmethod
    def compress(self, x: torch.Tensor, *, ratio: Optional[float] = None, seed: int = 0, slot: int = 0) -> Payload:
        """Compress a flat tensor. ``seed`` feeds randomised compressors; ``slot`` is copied to the payload."""

    def pack_(self, buf: torch.Tensor, offset: int, x: torch.Tensor, *, ratio: Optional[float] = None,
              seed: int = 0, slot: int = 0) -> Payload:
        """``compress`` written straight into a send buffer at buf[offset:] (8-byte aligned, room for
        ``max_bytes``): returns the payload as views of the bytes written (``is_packed_at(offset)``).
        Compressors with a fused kernel (DGC's selection) override it; this default compresses,
        then copies the payload in."""
        p = self.compress(x, ratio=ratio, seed=seed, slot=slot)
        p.encode_into(buf, offset)
        return Payload.view(buf, offset, p.kind, p.numel, p.nnz, p.values.dtype, slot=p.slot, scale=p.scale,
                            flags=p.flags, seed=p.seed)

    def decompress(self, payload: Payload, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return payload.to_dense(dtype)

    def __call__(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """C(x) as a dense tensor of x's shape and dtype (for tests and pure-math use)."""
        flat = x.reshape(-1)
        return self.decompress(self.compress(flat, **kw), x.dtype).reshape(x.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"
