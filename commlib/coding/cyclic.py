"""Cyclic repetition gradient code (Tandon et al., ICML 2017, cyclic repetition scheme; random
construction of B; docs/algorithms.md §3)."""
from __future__ import annotations

from typing import FrozenSet, List, Optional

import numpy as np

from commlib.coding.gc import GRADIENT_CODES, GradientCode, NotDecodable
from commlib.errors import ConfigError


def cyclic_support(n: int, s: int, worker: int) -> List[int]:
    """Partitions of worker ``i`` in a cyclic code: {i, i+1, ..., i+s} mod n."""
    return [(worker + k) % n for k in range(s + 1)]


@GRADIENT_CODES.register("cyclic", "cyclic-repetition", "crc")
class CyclicRepetitionCode(GradientCode):
    """Random cyclic code: works for every n > s, at the price of a linear solve to decode.

    Construction (Tandon et al. 2017, cyclic repetition scheme): ``H`` (s x n) has i.i.d. N(0,1) entries in
    its first n-1 columns and last column = minus the row sums, so ``H 1 = 0``. Row ``i`` of
    ``B`` has support ``{i, ..., i+s} mod n``, ``B[i, i] = 1``, and the other entries solve
    ``H[:, S_i minus i] v = -H[:, i]``, so every row of ``B`` lies in the null space of ``H``;
    any n-s rows span it and therefore reach ``1``. ``seed`` fixes ``H``.

    The random ``B_F`` can be badly conditioned (cond ~1e6 at n=10, s=2): decoding runs in
    float64 and checks its residual; prefer :class:`FractionalRepetitionCode` when (s+1) | n.
    """

    seeded = True

    def __init__(self, n: int, s: int, seed: int = 0) -> None:
        n, s = int(n), int(s)
        if not 0 <= s < n:
            raise ConfigError(f"need 0 <= s < n, got n={n}, s={s}")
        self.seed: Optional[int] = int(seed)
        super().__init__(self._construct(n, s, np.random.default_rng(seed)), s)

    @staticmethod
    def _construct(n: int, s: int, rng: np.random.Generator) -> np.ndarray:
        B = np.zeros((n, n), dtype=np.float64)
        if s == 0:
            return np.eye(n)
        # Tandon et al. 2017, cyclic scheme: H = [N(0,1)^{s x (n-1)}, -row sums], so H·1 = 0.
        Ht = rng.standard_normal((s, n - 1))
        H = np.concatenate([Ht, -Ht.sum(axis=1, keepdims=True)], axis=1)
        for i in range(n):
            rest = cyclic_support(n, s, i)[1:]
            B[i, i] = 1.0
            try:
                # cyclic scheme: B[i, S_i \ i] = -H[:, S_i \ i]^{-1} H[:, i].
                B[i, rest] = np.linalg.solve(H[:, rest], -H[:, i])
            except np.linalg.LinAlgError as exc:
                raise ConfigError(f"cyclic code: singular block for worker {i}; try another seed") from exc
        return B

    def _solve(self, F: FrozenSet[int]) -> np.ndarray:
        # The rows of a random construction span the (n-s)-dimensional null space of H, and with
        # probability 1 no fewer than n-s of them reach 1: skip the solve for smaller sets.
        if self.seed is not None and len(F) < self.n - self.s:
            raise NotDecodable(
                f"straggler pattern not decodable: {len(F)} finished workers, the cyclic "
                f"(n={self.n}, s={self.s}) code needs {self.n - self.s}",
                F,
            )
        return super()._solve(F)

    @classmethod
    def from_matrix(cls, B: np.ndarray, s: Optional[int] = None) -> "CyclicRepetitionCode":
        """Wrap a given cyclic matrix (row i supported on {i..i+s} mod n), e.g. the paper's
        n=3 example ``[[1/2, 1, 0], [0, 1, -1], [1/2, 0, 1]]``."""
        mat = np.asarray(B, dtype=np.float64)
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] == 0:
            raise ConfigError(f"B must be a non-empty square matrix, got shape {mat.shape}")
        n = mat.shape[0]
        if s is None:
            s = int(max(np.count_nonzero(row) for row in mat)) - 1
        s = int(s)
        if not 0 <= s < n:
            raise ConfigError(f"need 0 <= s < n, got n={n}, s={s}")
        for i in range(n):
            outside = set(np.flatnonzero(mat[i]).tolist()) - set(cyclic_support(n, s, i))
            if outside:
                raise ConfigError(
                    f"row {i} has nonzeros at {sorted(outside)}, outside the cyclic support "
                    f"{cyclic_support(n, s, i)}"
                )
        code = cls.__new__(cls)
        code.seed = None
        GradientCode.__init__(code, mat, s)
        return code
