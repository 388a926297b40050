"""Flag Aggregator (Almasi, Mehta, Rathore, Ravi, Nguyen, "Flag Aggregator: Scalable
Distributed Training under Failures and Augmented Losses using Convex Optimization",
ICLR 2024, arXiv 2302.05865; code hamidralmasi/FlagAggregator, aggregators/flag_median.py and
center_algorithms_torch.py, read for the facts below).

With x_i = g_i / ||g_i|| (zero rows stay zero), FlagIRLS looks for an r-dimensional subspace Y
minimising sum_i sqrt(1 - ||Y^T x_i||^2):
  1. Y_0 = the Q factor of a seeded uniform(-0.5, 0.5) d x r matrix Z.
  2. Up to ``iterations`` times (stop early once the objective stops decreasing, or is ~0):
     w_i = (|1 - ||Y^T x_i||^2| + eps)^(-1/4); if lam > 0 also, for every ordered pair i != j,
     w_ij = lam / (p (p-1)) (|1 - ||Y^T (x_i - x_j)||^2| + eps)^(-1/4) on column x_i - x_j;
     Y = top-r left singular vectors of [w_i x_i ..., w_ij (x_i - x_j) ...].
     If the last step did not decrease the objective, the previous Y is kept.
  3. Aggregate = (1/r) sum_i Y Y^T x_i.

Nothing of size d x d, nor even d x p, is formed. The columns all lie in span{x_i}, so with
G = X X^T (p x p, one pass over the stack) = V L V^T, the coordinates of x_i in an
orthonormal basis Q of that span are P = L^(1/2) V^T, and the weighted matrix A A^T equals
Q (P K P^T) Q^T with K = diag(w_i^2) + sum_{i != j} w_ij^2 (e_i - e_j)(e_i - e_j)^T. Its top-r
eigenvectors E give Y = Q E, i.e. the thin SVD of the d x p matrix, done in p-space.
Y_0 enters only through Z^T x_i and Z^T Z, computed in the same pass as G.

Magnitude: the reference returns a combination of *unit* vectors, which loses the gradient
scale. ``rescale=True`` (an addition of ours, off by default) rescales the output to the
median input norm (the mean of the two middle norms for even n).

Memory/time: ``cache_init=True`` (default) keeps Z (d x r, in the stack's dtype) between calls
of the same shape, since Y_0 is the same every call (the reference re-seeds each call); this
saves drawing d*r random numbers per call at the cost of r/n of the input's memory.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from commlib.aggregate.base import AGGREGATORS
from commlib.aggregate.points import Part, Points, chunk_columns, current_part, product_dtype
from commlib.aggregate.robust import RobustAggregator
from commlib.errors import ConfigError

_OBJ_TOL = 1e-10  # reference: stop when the decrease or the objective falls below 1e-10


def flag_init_matrix(d: int, r: int, seed: int) -> torch.Tensor:
    """The seeded uniform(-0.5, 0.5) d x r matrix Z whose Q factor is Y_0 (float32, CPU).

    Rows are drawn in order from one CPU generator; ``_ZRows`` streams the same rows chunk by
    chunk (tests check both against each other)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(d, r, generator=g) - 0.5


class _ZRows:
    """Streams Z^T column chunks (r, e - s) in increasing order, from a cache or a generator."""

    def __init__(self, d: int, r: int, seed: int, dtype: torch.dtype, device: torch.device,
                 cached: Optional[torch.Tensor], gram: Optional[torch.Tensor] = None) -> None:
        self.r, self.dtype, self.device, self.cached, self.gram = r, dtype, device, cached, gram
        self.g = torch.Generator().manual_seed(int(seed)) if cached is None else None

    def __call__(self, s: int, e: int) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[:, s:e]
        z = torch.rand(e - s, self.r, generator=self.g) - 0.5
        return z.t().to(dtype=self.dtype, device=self.device)


def _source_products(x: torch.Tensor, zrows: "_ZRows") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X X^T, Z^T X^T and Z^T Z in float64, in one pass over column chunks.

    Flag needs inner products of unit vectors, not distances, so no centring (and no copy of
    the stack) is needed: on CPU, float32 products on views of the stack summed in float64
    per chunk; on CUDA, for float64 stacks or huge entries, float64 products."""
    n, d = x.shape
    r = zrows.r
    work = product_dtype(x)
    gx = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    zx = torch.zeros(r, n, dtype=torch.float64, device=x.device)
    ztz = torch.zeros(r, r, dtype=torch.float64, device=x.device)
    step = chunk_columns(n + r, x.device)
    for s in range(0, d, step):
        e = min(d, s + step)
        xc = x[:, s:e].to(work)
        z = zrows(s, e).to(work)
        gx.add_(xc @ xc.t())
        zx.add_(z @ xc.t())
        if zrows.gram is None:
            ztz.add_(z @ z.t())
    if zrows.gram is not None:
        ztz = zrows.gram.to(dtype=torch.float64, device=x.device)
    return 0.5 * (gx + gx.t()), zx, ztz


def _chunked_gram(rows: torch.Tensor) -> torch.Tensor:
    """rows @ rows^T in float64 without a full float64 copy."""
    out = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
    for s in range(0, rows.shape[1], 1 << 16):
        c = rows[:, s: s + (1 << 16)].double()
        out.add_(c @ c.t())
    return out


def _sine_objective(proj_sq: torch.Tensor) -> torch.Tensor:
    """sum_i sqrt(max(0, 1 - ||Y^T x_i||^2)) (reference calc_error_1_2, 'sine')."""
    return (1.0 - proj_sq).clamp(min=0.0).sqrt().sum()


def _pair_weights(u: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """(p, p) w_ij^2 of the pair columns (0 on the diagonal); u: (k, p) projections Y^T x_i."""
    p = u.shape[1]
    diff_sq = (u[:, :, None] - u[:, None, :]).square().sum(dim=0)
    w = lam / (p * (p - 1)) * ((1.0 - diff_sq).abs() + eps).pow(-0.25)
    w.fill_diagonal_(0.0)
    return w.square()


def _irls(pk: torch.Tensor, u0: torch.Tensor, r: int, iterations: int, lam: float,
          eps: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """FlagIRLS in the coordinates ``pk`` (k, p) of the unit inputs.

    ``u0`` (r, p): Y_0^T x_i. Returns ``(U, E)``: the projections Y^T x_i of the subspace kept
    and its basis E (k, r') in those coordinates, or E = None when Y_0 itself is kept.
    """
    def step(u: torch.Tensor) -> torch.Tensor:
        w2 = ((1.0 - u.square().sum(dim=0)).abs() + eps).pow(-0.5)  # w_i^2
        kmat = torch.diag(w2)
        if lam > 0:
            pw = _pair_weights(u, lam, eps)
            kmat = kmat + 2.0 * (torch.diag(pw.sum(dim=1)) - pw)  # sum_{i != j} w_ij^2 (e_i - e_j)(.)^T
        h = pk @ kmat @ pk.t()  # P K P^T: the weighted A A^T in the orthonormal basis
        _, e = torch.linalg.eigh(0.5 * (h + h.t()))
        return e[:, -min(r, e.shape[1]):].flip(1)  # top eigenvectors = top left singular vectors

    u, e_cur = u0, None
    err = _sine_objective(u.square().sum(dim=0))
    prev_u, prev_e = u, e_cur
    diff = torch.tensor(1.0, dtype=torch.float64)
    it = 1
    while it <= iterations and diff > _OBJ_TOL and err > _OBJ_TOL:  # reference irls_flag loop
        prev_u, prev_e = u, e_cur
        e_cur = step(u)
        u = e_cur.t() @ pk
        new_err = _sine_objective(u.square().sum(dim=0))
        diff, err = err - new_err, new_err
        it += 1
    if not diff > 0:  # the last step did not decrease the objective: keep the previous Y
        return prev_u, prev_e
    return u, e_cur


@AGGREGATORS.register("flag", "flag-aggregator", "flag-median")
class FlagAggregator(RobustAggregator):
    """Args:
        r: subspace dimension (default ceil(n/2); the paper runs p = 15 with r = 8).
        iterations: FlagIRLS iterations (reference: 4).
        lam: weight of the pair terms (default 0: none).
        eps: weight regulariser (1e-7).
        seed: seed of Y_0 (reference: 1).
        rescale: scale the output to the median input norm (see module docstring).
        cache_init: keep Z between calls (see module docstring).
        f: accepted for the common interface (checked n > 2f); Flag does not use it.
    """

    def __init__(self, f: int = 0, r: Optional[int] = None, iterations: int = 4, lam: float = 0.0,
                 eps: float = 1e-7, seed: int = 1, rescale: bool = False, cache_init: bool = True) -> None:
        super().__init__(f)
        if r is not None and int(r) < 1:
            raise ConfigError(f"flag: r must be >= 1, got {r}")
        if int(iterations) < 0 or float(lam) < 0.0 or not float(eps) > 0.0:
            raise ConfigError(f"flag: need iterations >= 0, lam >= 0, eps > 0; got {iterations}, {lam}, {eps}")
        self.r = None if r is None else int(r)
        self.iterations, self.lam, self.eps = int(iterations), float(lam), float(eps)
        self.seed, self.rescale, self.cache_init = int(seed), bool(rescale), bool(cache_init)
        self._z: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def rank(self, n: int) -> int:
        return (n + 1) // 2 if self.r is None else self.r

    def check_n(self, n: int) -> None:
        super().check_n(n)
        if self.rank(n) > n:
            raise ConfigError(f"flag: r={self.r} exceeds the number of inputs n={n}")
        if self.lam > 0 and n < 2:
            raise ConfigError("flag: pair terms (lam > 0) need at least 2 inputs")

    def _z_rows(self, points: Points, r: int) -> _ZRows:
        part = current_part()
        if part is not None:
            return self._z_rows_of_part(points, r, part)
        if not self.cache_init:
            return _ZRows(points.d, r, self.seed, points.dtype, points.device, None)
        key = (points.d, r, self.seed, points.dtype, str(points.device))
        # one read of the cache: DDP runs buckets' callbacks on other threads, which may replace it
        entry = self._z.get(key)
        if entry is None:
            zt = flag_init_matrix(points.d, r, self.seed).t().contiguous().to(dtype=points.dtype, device=points.device)
            entry = (zt, _chunked_gram(zt))
            self._z = {key: entry}
        zt, ztz = entry
        return _ZRows(points.d, r, self.seed, points.dtype, points.device, zt, ztz)

    def _z_rows_of_part(self, points: Points, r: int, part: Part) -> _ZRows:
        """Rows ``[offset, offset + d)`` of the whole vectors' Z, and the whole Z^T Z."""
        key = (part.total, part.offset, points.d, r, self.seed, points.dtype, str(points.device))
        entry = self._z.get(key)  # one read, as in _z_rows
        if entry is None:
            z = flag_init_matrix(part.total, r, self.seed)[part.offset: part.offset + points.d]
            zt = z.t().contiguous().to(dtype=points.dtype, device=points.device)
            entry = (zt, part.allreduce(_chunked_gram(zt)))
            self._z = {key: entry}
        zt, ztz = entry
        if not self.cache_init:
            self._z = {}
        return _ZRows(points.d, r, self.seed, points.dtype, points.device, zt, ztz)

    def aggregate_points(self, points: Points) -> torch.Tensor:
        p, r = points.m, self.rank(points.m)
        part = current_part()
        d = points.d if part is None else part.total
        if r > d:
            raise ConfigError(f"flag: r={r} exceeds the dimension d={d}")
        zrows = self._z_rows(points, r)
        gx, zx, ztz = _source_products(points.stack, zrows)
        if part is not None:  # products of the whole vectors: sums over the parts
            gx, zx = part.allreduce(gx), part.allreduce(zx)
        coeffs = points.coefficient_matrix()
        inner = coeffs @ gx @ coeffs.t()  # <y_i, y_j>
        zy = zx @ coeffs.t()  # Z^T y_i, (r, p)
        norms = torch.diagonal(inner).clamp(min=0.0).sqrt()
        scale = 1.0 / norms.clamp(min=1e-12)  # F.normalize semantics: zero rows stay zero
        gn = inner * scale[:, None] * scale[None, :]  # <x^_i, x^_j>
        # Y_0 = Z R^-1 (Z^T Z = R^T R): Y_0^T x^_i = R^-T Z^T x^_i
        chol = torch.linalg.cholesky(ztz)
        u0 = torch.linalg.solve_triangular(chol, zy * scale[None, :], upper=False)  # (r, p)

        lam_vals, vecs = torch.linalg.eigh(gn)
        tol = lam_vals.max().clamp(min=0.0) * (1e-12 if points.dtype == torch.float64 else 1e-6)
        keep = lam_vals > tol
        lam_k, v_k = lam_vals[keep], vecs[:, keep]
        pk = lam_k.sqrt()[:, None] * v_k.t()  # (k, p) coordinates of x^_i in an orthonormal basis

        u, e_cur = _irls(pk, u0, r, self.iterations, self.lam, self.eps)
        total = u.sum(dim=1)  # Y^T sum_i x^_i
        if e_cur is None:  # Y = Y_0: (1/r) Z R^-1 (Y_0^T s)
            coef = torch.linalg.solve_triangular(chol.t(), total[:, None], upper=True)[:, 0] / r
            out = self._z_times(points, zrows, coef)
        else:  # Y = X^T V L^-1/2 E: weights on the normalised points
            w = v_k @ ((e_cur @ total) / lam_k.sqrt()) / r
            out = points.combine(w * scale)
        if self.rescale:
            out_norm = torch.linalg.vector_norm(out)
            if part is not None:
                out_norm = part.allreduce(out_norm.double().square()).sqrt().to(out.dtype)
            if out_norm > 0:
                out.mul_(torch.quantile(norms, 0.5).to(out.dtype) / out_norm)
        return out

    def _z_times(self, points: Points, zrows: _ZRows, coef: torch.Tensor) -> torch.Tensor:
        """Z @ coef as a d-vector (one more pass over Z; regenerated when not cached)."""
        if zrows.cached is not None:
            return coef.to(points.dtype) @ zrows.cached
        fresh = _ZRows(points.d, zrows.r, self.seed, points.dtype, points.device, None)
        out = torch.empty(points.d, dtype=points.dtype, device=points.device)
        step = 1 << 16
        c = coef.to(points.dtype)
        for s in range(0, points.d, step):
            e = min(points.d, s + step)
            out[s:e] = c @ fresh(s, e)
        return out
