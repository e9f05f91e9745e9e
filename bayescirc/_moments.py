"""Dense-block moments behind :func:`bayescirc.scores.sufficient_statistics`.

The scores of a chunk of inputs are scattered into a dense block
``values[input, method, edge]`` with a boolean twin ``observed`` (unscored
cells hold 0). An input's *observation pattern* for an edge is the bit code of
the methods that scored it; :class:`PatternMoments` sums, per edge and
pattern, the count, the scores and their cross-products in float64.

Why a dense block: scattering rows by index and reducing whole planes is a
few passes of vectorised numpy over memory, where grouping rows costs a sort.
Most inputs carry one pattern on every edge they score (say exact + EAP on the
exact subset, EAP only elsewhere); such inputs are summed plane by plane with
no mask, and only inputs whose pattern varies from edge to edge pay for masks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DenseBlock", "PatternMoments", "TooManyMethods", "pattern_codes"]


class TooManyMethods(ValueError):
    """More methods than the observation-pattern codes hold (64)."""

SUB_BLOCK = 4  # inputs converted to float64 at a time: small enough to stay in cache


def code_dtype(n_methods: int) -> np.dtype:
    """Smallest unsigned integer type that holds one bit per method."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_methods <= np.dtype(dtype).itemsize * 8:
            return np.dtype(dtype)
    raise TooManyMethods(f"{n_methods} methods: at most 64 are supported in one scores file")


def pattern_codes(observed: np.ndarray) -> np.ndarray:
    """Bit code of the observing methods: ``(inputs, methods, edges)`` bool -> ``(inputs, edges)``."""
    dtype = code_dtype(observed.shape[1])
    code = observed[:, 0].astype(dtype)
    bit = np.empty_like(code)
    for m in range(1, observed.shape[1]):
        np.left_shift(observed[:, m], dtype.type(m), out=bit, dtype=dtype)
        code |= bit
    return code


class DenseBlock:
    """Scores of a chunk of inputs scattered by (position, method, edge).

    ``grow`` makes room for methods and edges met after allocation (a file's
    first row group need not name every edge); positions are fixed.
    """

    def __init__(self, n_positions: int, n_methods: int, n_edges: int, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self.values = np.zeros((n_positions, n_methods, n_edges), self.dtype)
        self.observed = np.zeros((n_positions, n_methods, n_edges), bool)
        self.rows = 0

    @staticmethod
    def bytes_per_cell(dtype) -> int:
        return np.dtype(dtype).itemsize + 1

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.observed.nbytes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.values.shape

    def grow(self, n_methods: int, n_edges: int) -> None:
        W, M, E = self.values.shape
        if n_methods <= M and n_edges <= E:
            return
        shape = (W, max(M, n_methods), max(E, n_edges))
        for name in ("values", "observed"):
            old = getattr(self, name)
            new = np.zeros(shape, old.dtype)
            new[:, :M, :E] = old
            setattr(self, name, new)

    def scatter(self, pos: np.ndarray, method: np.ndarray, edge: np.ndarray, score: np.ndarray) -> None:
        """Write one batch of rows; codes must be within the block's shape."""
        _, M, E = self.values.shape
        flat = pos.astype(np.int64, copy=False) * M
        flat += method
        flat *= E
        flat += edge
        self.values.reshape(-1)[flat] = score
        self.observed.reshape(-1)[flat] = True
        self.rows += len(flat)

    def n_observed(self) -> int:
        """Distinct cells written; fewer than ``rows`` means duplicate rows."""
        return int(np.count_nonzero(self.observed))


class PatternMoments:
    """Per edge and observation pattern: counts, sums and cross-products (float64).

    Accumulators are keyed by the pattern's bit code; :meth:`add` may be called
    once per chunk of inputs. Only the upper triangle ``m <= k`` of ``cross``
    is accumulated; :meth:`arrays` mirrors it.
    """

    def __init__(self, n_methods: int, n_edges: int):
        self.n_methods, self.n_edges = n_methods, n_edges
        self._acc: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _slot(self, code: int):
        if code not in self._acc:
            M, E = self.n_methods, self.n_edges
            self._acc[code] = (np.zeros(E, np.int64), np.zeros((M, E)), np.zeros((M, M, E)))
        return self._acc[code]

    def members(self, code: int) -> list[int]:
        return [m for m in range(self.n_methods) if code >> m & 1]

    def add(self, block: DenseBlock) -> None:
        """Add the moments of every input in ``block`` (positions with no scores add nothing)."""
        values, observed = block.values, block.observed
        M, E = values.shape[1], values.shape[2]
        if (M, E) != (self.n_methods, self.n_edges):
            raise ValueError(f"block has {M} methods x {E} edges, moments expect {self.n_methods} x {self.n_edges}")
        code = pattern_codes(observed)
        top = code.max(axis=1)
        # an input is uniform when every edge it scores has the same pattern
        uniform = ((code == top[:, None]) | (code == 0)).all(axis=1)
        for c in np.unique(top[uniform]):
            if c == 0:
                continue
            rows = np.flatnonzero(uniform & (top == c))
            self._add_uniform(values, code, rows, int(c))
        mixed = np.flatnonzero(~uniform)
        for start in range(0, len(mixed), SUB_BLOCK):
            rows = mixed[start:start + SUB_BLOCK]
            self._add_mixed(values[rows].astype(np.float64), code[rows])

    def _add_uniform(self, values: np.ndarray, code: np.ndarray, rows: np.ndarray, c: int) -> None:
        n, sums, cross = self._slot(c)
        members = self.members(c)
        n += (code[rows] == c).sum(axis=0)
        for start in range(0, len(rows), SUB_BLOCK):
            v = values[rows[start:start + SUB_BLOCK]].astype(np.float64)  # unscored cells are 0: no mask needed
            for i, m in enumerate(members):
                sums[m] += v[:, m].sum(axis=0)
                for k in members[i:]:
                    cross[m, k] += np.einsum("be,be->e", v[:, m], v[:, k])

    def _add_mixed(self, v: np.ndarray, code: np.ndarray) -> None:
        for c in np.unique(code):
            if c == 0:
                continue
            n, sums, cross = self._slot(int(c))
            members = self.members(int(c))
            mask = code == c
            n += mask.sum(axis=0)
            for i, m in enumerate(members):
                vm = np.where(mask, v[:, m], 0.0)
                sums[m] += vm.sum(axis=0)
                for k in members[i:]:
                    cross[m, k] += np.einsum("be,be->e", vm, v[:, k])

    def codes(self) -> list[int]:
        """Bit codes of the patterns seen, in order of first appearance."""
        return list(self._acc)

    def edge_counts(self) -> np.ndarray:
        """Per edge, the number of (input, pattern) cells summed: 0 for an edge never scored."""
        total = np.zeros(self.n_edges, np.int64)
        for n, _, _ in self._acc.values():
            total += n
        return total

    def arrays(self, codes: list[int], methods: np.ndarray, edges: np.ndarray):
        """``(n, sums, cross)`` as ``(E', P)``, ``(E', P, M')``, ``(E', P, M', M')`` for the given pattern codes.

        ``methods`` and ``edges`` select (and order) the output's methods and
        edges by their index in the accumulators; ``cross`` is made symmetric.
        """
        E, M, P = len(edges), len(methods), len(codes)
        n = np.zeros((E, P), np.int64)
        sums = np.zeros((E, P, M))
        cross = np.zeros((E, P, M, M))
        for p, c in enumerate(codes):
            cn, cs, cc = self._acc[c]
            n[:, p] = cn[edges]
            sums[:, p, :] = cs[np.ix_(methods, edges)].T
            upper = cc[np.ix_(methods, methods, edges)]  # (M', M', E') in output method order
            for i in range(M):
                for j in range(M):
                    a, b = methods[i], methods[j]
                    cross[:, p, i, j] = upper[i, j] if a <= b else upper[j, i]
        return n, sums, cross
