"""Compressors: compress(x) -> Payload, decompress(p) -> Tensor (docs/algorithms.md §1)."""
from commlib.compress.base import COMPRESSORS, Compressor, k_of  # noqa: F401
from commlib.compress.identity import BF16, FP16, Identity  # noqa: F401
from commlib.compress.randk import RandK  # noqa: F401
from commlib.compress.topk import DGCTopK, TopK  # noqa: F401
