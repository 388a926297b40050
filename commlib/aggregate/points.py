"""Lazy linear combinations of the rows of an (n, d) stack, and their geometry.

Every robust rule here needs only (a) inner products / distances between a handful of vectors
and (b) one weighted sum of the rows at the end. Pre-aggregators (NNM, bucketing, clipping,
ARC) replace the n rows by m vectors y = W x that are themselves linear combinations of the
rows. ``Points`` keeps such vectors as an (m, n) coefficient matrix over the source rows and
never materialises them: distance-based rules work on an (m, m) Gram matrix, coordinate-wise
rules stream column chunks ``W @ X[:, s:e]``, and the result is one ``c @ X``. Peak extra
memory is O(n^2 + d + n * chunk), whatever the chain of pre-aggregators.

Numerics: the Gram matrix is accumulated in float64, chunk by chunk, on rows centred at a
reference row (the row of median norm). Centring removes a large common component (honest
gradients that agree) from the products, and choosing the median-norm row rather than the
mean keeps a huge Byzantine row from becoming the centre. The origin is carried as one more
point (centred row ``-c``), so norms and inner products of non-affine combinations are exact
quadratic forms too.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

_CPU_CHUNK_ELEMS = 1 << 19  # elements per chunk buffer on CPU (stays in cache)
_GPU_CHUNK_ELEMS = 1 << 26


#: Largest |entry| for which float32 products of centred rows, summed over one chunk, cannot
#: overflow (4 * 2^100 * 2^19 columns < float32's max 2^128); beyond it products run in float64.
_FLOAT32_PRODUCT_PEAK = 2.0 ** 50


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype inner products of the rows of ``x`` are computed in, before float64 sums.

    float64 on CUDA and for float64 stacks; on CPU the stack's float32 (fast) unless an entry is
    so large that a product could overflow: a finite Byzantine row near float32's range must not
    turn its distances into Inf (which would make it look *close*, or give NaN weights)."""
    if x.dtype == torch.float64 or x.device.type == "cuda" or x.numel() == 0:
        return torch.float64
    lo, hi = torch.aminmax(x)
    return torch.float64 if max(-float(lo), float(hi)) > _FLOAT32_PRODUCT_PEAK else x.dtype


@dataclass(frozen=True)
class Part:
    """The rows are coordinates ``[offset, offset + d)`` of vectors of ``total`` coordinates held
    in parts (a sharded parameter server): ``allreduce`` sums a tensor over every part's call
    (all parts make the same calls in the same order, and get the same sum)."""

    allreduce: Callable[[torch.Tensor], torch.Tensor]
    offset: int
    total: int


_PART = threading.local()


@contextmanager
def vectors_in_parts(part: Part) -> Iterator[None]:
    """Within this block every rule sees the geometry of the whole vectors: row norms, the Gram
    matrix and distances are sums over coordinates, so each part's partial sums are added up
    with ``part.allreduce`` and every part selects the same rows (exact up to summation order)."""
    prev = getattr(_PART, "part", None)
    _PART.part = part
    try:
        yield
    finally:
        _PART.part = prev


def current_part() -> Optional[Part]:
    """The :class:`Part` of the enclosing :func:`vectors_in_parts`, or None (whole vectors)."""
    return getattr(_PART, "part", None)


def chunk_columns(rows: int, device: torch.device, elems: Optional[int] = None) -> int:
    """Columns per chunk so that a (rows, chunk) buffer holds about ``elems`` elements."""
    if elems is None:
        elems = _GPU_CHUNK_ELEMS if device.type == "cuda" else _CPU_CHUNK_ELEMS
    return max(256, elems // max(1, rows))


class Source:
    """The (n, d) stack itself, with its centred Gram matrix computed once and cached."""

    def __init__(self, stack: torch.Tensor) -> None:
        self.stack = stack
        self.n, self.d = stack.shape
        self._gram: Optional[torch.Tensor] = None
        self._center: Optional[int] = None

    @property
    def center(self) -> int:
        """Index of the reference row (median norm; lowest index on ties)."""
        if self._center is None:
            part = current_part()
            if part is None:
                norms = torch.linalg.vector_norm(self.stack, dim=1).double().cpu()
            else:  # squared norms of the whole rows (same order as the norms)
                norms = part.allreduce(_row_sq_norms(self.stack)).cpu()
            order = torch.sort(norms, stable=True).indices
            self._center = int(order[(self.n - 1) // 2])
        return self._center

    def gram(self) -> torch.Tensor:
        """(n+1, n+1) float64 Gram matrix of ``[x_1 - c, ..., x_n - c, -c]`` (row n: the origin)."""
        if self._gram is None:
            self._gram = self._compute()
        return self._gram

    def _compute(self) -> torch.Tensor:
        x, n, d = self.stack, self.n, self.d
        # CPU: float32 products of centred rows, summed in float64 per chunk; CUDA (or huge
        # entries): float64 products.
        work = product_dtype(x)
        chunk = chunk_columns(n + 1, x.device)
        acc = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=x.device)
        buf = torch.empty(n + 1, min(chunk, max(d, 1)), dtype=work, device=x.device)
        c_row = x[self.center]
        for s in range(0, d, chunk):
            e = min(d, s + chunk)
            b = buf[:, : e - s]
            c = c_row[s:e].to(work)
            torch.sub(x[:, s:e], c, out=b[:n])
            torch.neg(c, out=b[n])
            acc.add_(b @ b.t())
        part = current_part()
        if part is not None:  # the centred Gram of the whole rows: a sum over the parts
            acc = part.allreduce(acc)
        return 0.5 * (acc + acc.t())


class Points:
    """m vectors ``y_i = sum_j coeffs[i, j] x_j`` over the rows of a source stack.

    ``coeffs`` is an (m, n) float64 matrix, or None for the rows themselves. Rows of ``coeffs``
    need not sum to one: the origin absorbs the rest, so scaled vectors (clipping) are points
    like any other.
    """

    def __init__(self, stack_or_source, coeffs: Optional[torch.Tensor] = None) -> None:
        self.source = stack_or_source if isinstance(stack_or_source, Source) else Source(stack_or_source)
        self.coeffs = coeffs
        self._cache: Dict[str, torch.Tensor] = {}
        # Rescaled rows (clipping, ARC) stream as x * scale instead of a matrix product.
        self._diag: Optional[torch.Tensor] = None
        if coeffs is not None and coeffs.shape[0] == coeffs.shape[1]:
            dg = torch.diagonal(coeffs)
            if torch.equal(coeffs, torch.diag(dg)):
                self._diag = dg

    # -- shape ----------------------------------------------------------------------------------
    @property
    def stack(self) -> torch.Tensor:
        return self.source.stack

    @property
    def m(self) -> int:
        return self.source.n if self.coeffs is None else int(self.coeffs.shape[0])

    @property
    def d(self) -> int:
        return self.source.d

    @property
    def dtype(self) -> torch.dtype:
        return self.stack.dtype

    @property
    def device(self) -> torch.device:
        return self.stack.device

    def coefficient_matrix(self) -> torch.Tensor:
        """(m, n) float64 coefficients over the source rows (identity for the rows themselves)."""
        if self.coeffs is None:
            return torch.eye(self.source.n, dtype=torch.float64, device=self.device)
        return self.coeffs

    def mix(self, w: torch.Tensor) -> "Points":
        """The points ``z_k = sum_i w[k, i] y_i`` (w: (m', m)), still lazy."""
        w = w.to(dtype=torch.float64, device=self.device)
        return Points(self.source, w if self.coeffs is None else w @ self.coeffs)

    # -- geometry -------------------------------------------------------------------------------
    def _affine(self) -> torch.Tensor:
        """(m + 1, n + 1) coefficients of ``[y_1..y_m, origin]`` over the Gram rows."""
        n, m = self.source.n, self.m
        a = torch.zeros(m + 1, n + 1, dtype=torch.float64, device=self.device)
        c = self.coefficient_matrix()
        a[:m, :n] = c
        a[:m, n] = 1.0 - c.sum(dim=1)
        a[m, n] = 1.0
        return a

    def gram(self) -> torch.Tensor:
        """(m + 1, m + 1) float64 Gram matrix of ``[y_1..y_m, 0]`` in a centred frame.

        Only differences are meaningful: for coefficient vectors u, v with equal sums,
        ``||sum u_i p_i - sum v_i p_i||^2 = (u - v)^T K (u - v)``.
        """
        if "gram" not in self._cache:
            a = self._affine()
            k = a @ self.source.gram() @ a.t()
            self._cache["gram"] = 0.5 * (k + k.t())
        return self._cache["gram"]

    def sq_dists(self) -> torch.Tensor:
        """(m, m) float64 squared Euclidean distances (exact zeros on the diagonal)."""
        k = self.gram()[: self.m, : self.m]
        q = torch.diagonal(k)
        dist = (q[:, None] + q[None, :] - 2.0 * k).clamp_(min=0.0)
        dist.fill_diagonal_(0.0)
        return dist

    def sq_norms(self) -> torch.Tensor:
        """(m,) float64 squared norms."""
        if "sq_norms" not in self._cache:
            if self.coeffs is None and self.source._gram is None and current_part() is None:
                self._cache["sq_norms"] = _row_sq_norms(self.stack)
            else:
                k = self.gram()
                m = self.m
                q = torch.diagonal(k)[:m] - 2.0 * k[:m, m] + k[m, m]
                self._cache["sq_norms"] = q.clamp(min=0.0)
        return self._cache["sq_norms"]

    def sq_dists_to(self, v: torch.Tensor) -> torch.Tensor:
        """(m,) float64 ||y_i - v||^2 for a d-vector v, computed directly chunk by chunk
        (O(m d) per call: cheaper than the Gram for a one-off point)."""
        out = torch.zeros(self.m, dtype=torch.float64, device=self.device)
        v = v.to(dtype=self.dtype, device=self.device)
        for s, e, y in self.chunks():
            out.add_(torch.linalg.vector_norm(y - v[s:e], dim=1).double().square())
        part = current_part()
        return out if part is None else part.allreduce(out)

    # -- back to R^d ----------------------------------------------------------------------------
    def combine(self, w: torch.Tensor) -> torch.Tensor:
        """``sum_i w_i y_i`` as a fresh d-vector in the stack's dtype."""
        w = w.to(dtype=torch.float64, device=self.device)
        c = w if self.coeffs is None else w @ self.coeffs
        return c.to(self.dtype) @ self.stack

    def chunks(self, elems: Optional[int] = None) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(s, e, Y[:, s:e])``; a view of the stack when the points are its rows."""
        x = self.stack
        m, d = self.m, self.d
        step = chunk_columns(m + 1, self.device, elems)
        w = None if self.coeffs is None else self.coeffs.to(self.dtype)
        dg = None if self._diag is None else self._diag.to(self.dtype)[:, None]
        for s in range(0, d, step):
            e = min(d, s + step)
            if w is None:
                yield s, e, x[:, s:e]
            else:
                yield s, e, (x[:, s:e] * dg if dg is not None else w @ x[:, s:e])

    def materialize(self) -> torch.Tensor:
        """The (m, d) points as a fresh tensor (for rules that need them explicitly)."""
        if self.coeffs is None:
            return self.stack.clone()
        if self._diag is not None:
            return self.stack * self._diag.to(self.dtype)[:, None]
        return self.coeffs.to(self.dtype) @ self.stack


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms, chunk by chunk (no full float64 copy)."""
    n, d = x.shape
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    step = chunk_columns(n, x.device)
    for s in range(0, d, step):  # per-chunk norms in the stack's dtype, summed in float64
        out.add_(torch.linalg.vector_norm(x[:, s: s + step], dim=1).double().square())
    return out
