"""Sparse hot-path ops, dispatched to the native extension when it is built, else pure torch.

``commlib.ops.backend()`` says which path is active ('native' or 'torch'); both give identical
results (tests compare them bit for bit). Set ``COMMLIB_NATIVE=0`` to force the pure-torch path.
The native path takes float32 tensors on the CPU (and CUDA tensors when built with CUDA);
anything else goes to the torch path transparently.

Selection (indices int32, ascending):
  threshold_select(x, thr)                   entries with |x| >= thr
  topk_select(x, k)                          exact top-k (torch.topk)
  keep_largest(idx, vals, max_nnz)           the max_nnz largest |vals| of a selection (ties: lower index)
DGC (Lin et al. 2018):
  sampled_threshold(x, ratio, ...)           threshold estimate on a sample (blocks of 16 entries)
  dgc_threshold(u, v, g, m, ratio, ...)      the same on this step's v, without updating u, v
  dgc_update_select_(u, v, g, m, thr, ...)   momentum correction + selection + masking, one pass
Packing into wire Payloads (the layout of commlib.wire_format), for one collective:
  pack_threshold_(buf, off, x, thr, ...)     selection written as a full Payload -> (end, nnz)
  dgc_update_pack_(buf, off, u, v, g, ...)   DGC step written as a full Payload -> (end, nnz)
  unpack_scatter_add_(out, bufs, offsets)    validate + scatter-add every rank's payload -> UnpackResult
  scatter_add_(out, idx, vals, alpha)        out[idx] += alpha * vals (index range checked)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from commlib.ops import native, torch_ops, torch_pack
from commlib.ops.torch_ops import SAMPLE_BLOCK, dgc_sample_count, keep_largest, sample_plan, topk_select  # noqa: F401
from commlib.ops.torch_pack import Offsets, UnpackResult  # noqa: F401


def backend() -> str:
    """'native' when the C++ extension is loaded and used, else 'torch'."""
    return "native" if native.LIB is not None else "torch"


def native_status() -> str:
    """Why the native path is, or is not, active (e.g. 'native (avx512)', 'disabled by COMMLIB_NATIVE=0')."""
    return native.STATUS


def _native(*tensors: torch.Tensor) -> bool:
    return all(native.supports(t) for t in tensors) and len({t.device for t in tensors}) == 1


def threshold_select(x: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (int32, ascending) and values of the entries of flat ``x`` with |x| >= threshold."""
    return (native if _native(x) else torch_ops).threshold_select(x, threshold)


def sampled_threshold(x: torch.Tensor, ratio: float, sample_ratio: float = 0.01, offset: int = 0,
                      block: int = SAMPLE_BLOCK) -> float:
    """DGC threshold estimate: the smallest of the top ceil(s*ratio) magnitudes of the sample of
    ``sample_plan`` (blocks of ``block`` consecutive entries; 1: single entries with a stride)."""
    return (native if _native(x) else torch_ops).sampled_threshold(x, ratio, sample_ratio, offset, block)


def dgc_threshold(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, ratio: float, *,
                  nesterov: bool = False, sample_ratio: float = 0.01, offset: int = 0,
                  block: int = SAMPLE_BLOCK) -> float:
    """``sampled_threshold`` of the v this step's momentum correction will produce (reads the sample only)."""
    impl = native if _native(u, v, g) else torch_ops
    return impl.dgc_threshold(u, v, g, momentum, ratio, nesterov=nesterov, sample_ratio=sample_ratio, offset=offset,
                              block=block)


def dgc_update_select_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, threshold: float, *,
                       nesterov: bool = False, max_nnz: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """DGC step in place: u <- m·u + g, v <- v + u (Nesterov: u <- (u+g)·m, v <- v + u + g), select
    |v| >= threshold (at most max_nnz largest), zero u and v there; returns (indices, values)."""
    impl = native if _native(u, v, g) else torch_ops
    return impl.dgc_update_select_(u, v, g, momentum, threshold, nesterov=nesterov, max_nnz=max_nnz)


def pack_threshold_(buf: torch.Tensor, offset: int, x: torch.Tensor, threshold: float, *,
                    max_nnz: Optional[int] = None, slot: int = 0, scale: float = 1.0, flags: int = 0,
                    value_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    """Write the selection |x| >= threshold as a complete SPARSE Payload at buf[offset:]; (end, nnz)."""
    impl = native if _native(x) and buf.device == x.device else torch_pack
    return impl.pack_threshold_(buf, offset, x, threshold, max_nnz=max_nnz, slot=slot, scale=scale, flags=flags,
                                value_dtype=value_dtype)


def dgc_update_pack_(buf: torch.Tensor, offset: int, u: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     momentum: float, threshold: float, *, nesterov: bool = False, max_nnz: Optional[int] = None,
                     slot: int = 0, scale: float = 1.0, flags: int = 0,
                     value_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    """``dgc_update_select_`` writing its selection as a complete SPARSE Payload at buf[offset:]."""
    impl = native if _native(u, v, g) and buf.device == v.device else torch_pack
    return impl.dgc_update_pack_(buf, offset, u, v, g, momentum, threshold, nesterov=nesterov, max_nnz=max_nnz,
                                 slot=slot, scale=scale, flags=flags, value_dtype=value_dtype)


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out[indices] += alpha * values; out-of-range indices raise PayloadError before any write."""
    return (native if _native(out) else torch_ops).scatter_add_(out, indices, values, alpha)


def unpack_scatter_add_(out: torch.Tensor, bufs: torch.Tensor, offsets: Offsets, *, alpha: float = 1.0,
                        slot: Optional[int] = None, finite: str = "reject", on_error: str = "raise",
                        require_checksum: bool = False, max_abs: Optional[float] = None) -> UnpackResult:
    """Validate and scatter-add every rank's payload (row r of bufs, at offsets[r]) into out.
    See commlib.ops.torch_pack.unpack_scatter_add_ for the full contract."""
    impl = native if _native(out) and bufs.device == out.device else torch_pack
    return impl.unpack_scatter_add_(out, bufs, offsets, alpha=alpha, slot=slot, finite=finite, on_error=on_error,
                                    require_checksum=require_checksum, max_abs=max_abs)


def release_scratch() -> None:
    """Free the calling thread's native selection scratch (no-op on the torch path)."""
    if native.LIB is not None:
        native.release_scratch()
