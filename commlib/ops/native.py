"""The native path: loads ``commlib._native`` (built from csrc/ by ``pip install -e .``) and wraps
its functions with the signatures, argument checks and errors of the pure-torch path.

``LIB`` is None when the extension is not built, fails to load, is stale (built from other
sources than this package's), or ``COMMLIB_NATIVE=0``; ``STATUS`` says which.  The wrappers
here accept what the dispatcher in commlib.ops routes to them: float32 data on the CPU (or on
CUDA when the extension was built with CUDA).

Memory: each op allocates its outputs only.  Selections collect candidates in per-thread
scratch owned by the calling thread (about 8 bytes per selected entry, grown on demand and
reused across calls; ``release_scratch()`` frees it); the sampled thresholds use 4 bytes per
sampled entry of the same scratch.  Non-contiguous inputs are copied once by ``.contiguous()``.
"""
from __future__ import annotations

import logging
import math
import os
from types import ModuleType
from typing import Optional, Tuple

import torch

from commlib.errors import ConfigError, PayloadError
from commlib.ops import torch_ops, torch_pack
from commlib.ops.torch_pack import Offsets, UnpackResult
from commlib.wire_format import Kind, payload_max_bytes

ABI_VERSION = 2  # must equal kAbiVersion in csrc/binding.cpp
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_log = logging.getLogger("commlib.ops")


def _load() -> Tuple[Optional[ModuleType], str]:
    if os.environ.get("COMMLIB_NATIVE", "1") == "0":
        return None, "disabled by COMMLIB_NATIVE=0"
    try:
        from commlib import _native  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"not built ({exc}); build it with `pip install --no-build-isolation -e .`"
    except Exception as exc:  # a broken binary must not break the package
        return None, f"failed to load ({type(exc).__name__}: {exc})"
    if _native.abi_version() != ABI_VERSION:
        return None, (f"stale build (ABI {_native.abi_version()}, this package needs {ABI_VERSION}); "
                      "rebuild with `pip install --no-build-isolation -e .`")
    return _native, f"native ({_native.isa()}{', cuda' if _native.has_cuda() else ''})"


LIB, STATUS = _load()
_log.debug("commlib.ops native path: %s", STATUS)


def supports(t: torch.Tensor) -> bool:
    """Whether the native path handles this tensor (dtype float32, device it was built for)."""
    if LIB is None or t.dtype != torch.float32:
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and LIB.has_cuda())


def _flat(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1)
    return x if x.is_contiguous() else x.contiguous()


def release_scratch() -> None:
    """Free the calling thread's selection scratch (it is otherwise kept for reuse)."""
    LIB.release_scratch()


# ---- selection -----------------------------------------------------------------------------------
def threshold_select(x: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    x = _flat(x)
    torch_ops.check_index_range(x.numel())
    return LIB.threshold_select(x, float(threshold))


def _max_nnz(max_nnz: Optional[int]) -> int:
    if max_nnz is None:
        return -1
    if max_nnz < 0:
        raise ConfigError(f"max_nnz must be >= 0, got {max_nnz}")
    return int(max_nnz)


def _packed(offset: int, have: int, res: Tuple[int, int], vd: torch.dtype) -> Tuple[int, int]:
    end, nnz = res
    if end < 0:
        raise torch_pack.too_small(offset, payload_max_bytes(Kind.SPARSE, nnz, vd), have, nnz)
    return end, nnz


def pack_threshold_(buf: torch.Tensor, offset: int, x: torch.Tensor, threshold: float, *,
                    max_nnz: Optional[int] = None, slot: int = 0, scale: float = 1.0, flags: int = 0,
                    value_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    torch_pack.check_buffer(buf, offset)
    vd = torch_pack.value_dtype_of(value_dtype, torch.float32)
    x = _flat(x)
    torch_ops.check_index_range(x.numel())
    res = LIB.pack_threshold(buf, int(offset), x, float(threshold), _max_nnz(max_nnz), int(slot), float(scale),
                             int(flags), _CODES[vd])
    return _packed(offset, buf.numel(), res, vd)


# ---- thresholds ----------------------------------------------------------------------------------
def sampled_threshold(x: torch.Tensor, ratio: float, sample_ratio: float = 0.01, offset: int = 0,
                      block: int = torch_ops.SAMPLE_BLOCK) -> float:
    x = x.reshape(-1)  # a 1-D strided tensor stays a view: the kernel reads it with its stride
    if x.numel() == 0:
        return math.inf
    plan = torch_ops.sample_plan(x.numel(), ratio, sample_ratio, offset, block)
    return LIB.sampled_threshold(x, plan.start, plan.stride, plan.count, plan.top, _log2(plan.block))


def dgc_threshold(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, ratio: float, *,
                  nesterov: bool = False, sample_ratio: float = 0.01, offset: int = 0,
                  block: int = torch_ops.SAMPLE_BLOCK) -> float:
    torch_ops.check_state(u, v, g)
    if v.numel() == 0:
        return math.inf
    plan = torch_ops.sample_plan(v.numel(), ratio, sample_ratio, offset, block)
    return LIB.dgc_threshold(u.view(-1), v.view(-1), _flat(g), float(momentum), bool(nesterov), plan.start,
                             plan.stride, plan.count, plan.top, _log2(plan.block))


def _log2(block: int) -> int:
    return block.bit_length() - 1  # sample_plan's blocks are powers of two


# ---- DGC fused step ------------------------------------------------------------------------------
def dgc_update_select_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, threshold: float, *,
                       nesterov: bool = False, max_nnz: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    torch_ops.check_state(u, v, g)
    return LIB.dgc_update_select(u.view(-1), v.view(-1), _flat(g), float(momentum), bool(nesterov),
                                 float(threshold), _max_nnz(max_nnz))


def dgc_update_pack_(buf: torch.Tensor, offset: int, u: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     momentum: float, threshold: float, *, nesterov: bool = False, max_nnz: Optional[int] = None,
                     slot: int = 0, scale: float = 1.0, flags: int = 0,
                     value_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    torch_pack.check_buffer(buf, offset)
    torch_ops.check_state(u, v, g)
    vd = torch_pack.value_dtype_of(value_dtype, torch.float32)
    res = LIB.dgc_update_pack(buf, int(offset), u.view(-1), v.view(-1), _flat(g), float(momentum), bool(nesterov),
                              float(threshold), _max_nnz(max_nnz), int(slot), float(scale), int(flags), _CODES[vd])
    return _packed(offset, buf.numel(), res, vd)


# ---- scatter-add ---------------------------------------------------------------------------------
_INDEX_DTYPES = (torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8)


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    if indices.numel() != values.numel():
        raise PayloadError(f"{indices.numel()} indices but {values.numel()} values")
    if (indices.dtype not in _INDEX_DTYPES or values.dtype not in _VALUE_DTYPES or not out.is_contiguous()
            or values.device != out.device or indices.device != out.device):
        return torch_ops.scatter_add_(out, indices, values, alpha)
    err = LIB.scatter_add(out.view(-1), _flat(indices), _flat(values), float(alpha))
    if err:
        raise PayloadError(err)
    return out


def unpack_scatter_add_(out: torch.Tensor, bufs: torch.Tensor, offsets: Offsets, *, alpha: float = 1.0,
                        slot: Optional[int] = None, finite: str = "reject", on_error: str = "raise",
                        require_checksum: bool = False, max_abs: Optional[float] = None) -> UnpackResult:
    offs = torch_pack.check_unpack(out, bufs, offsets, finite, on_error, max_abs)
    ends, nnz, flags, codes, msgs = LIB.unpack_scatter_add(
        out.view(-1), bufs, torch.tensor(offs, dtype=torch.int64), float(alpha), -1 if slot is None else int(slot),
        finite == "reject", math.inf if max_abs is None else float(max_abs), bool(require_checksum),
        on_error == "skip")
    res = UnpackResult(list(ends), list(nnz), list(flags), {r: m for r, m in enumerate(msgs) if codes[r] > 0})
    if on_error == "raise":
        torch_pack.raise_first(res, codes)
    return res

