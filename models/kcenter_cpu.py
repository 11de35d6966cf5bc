"""Greedy k-center for one clip on the CPU: a compiled loop (Numba) that reads a row in full only when a cheap
lower bound says the new center may be nearer to it than its current nearest center.

Per pick, every row's 16-value summary (models/kcenter_bound.py) is compared with the new center's, which costs
~50x less than a full row; on video patches ~97% of the rows stop there (bench/RESULTS.md). What is left is
memory-bound, which is why this is a loop over rows and not PyTorch ops: those would copy the surviving rows out
before a product, and copying them costs more than reading them once.

Distances are accumulated in float64 (the fp32 inputs are exact in float64, the sum is vectorised), so the picks
are the float64 greedy sequence without a separate re-rank, with exact ties going to the lowest index.
"""
from __future__ import annotations

import numba
import numpy as np

# Fast math lets the compiler reorder and vectorise the sums (~20% faster than reordering alone). It also assumes no
# inf or NaN: min-distances start at the largest finite float64, and the points must be finite.
_MAX_FLOAT64 = np.finfo(np.float64).max


@numba.njit(nogil=True, fastmath=True, cache=True)
def greedy_pruned(x, summary, groups, picks, min_dist, probe, max_full_fraction):  # pragma: no cover (compiled)
    """Fill picks[1:] with the greedy k-center sequence from picks[0].

    Args:
        x: (N, D) float32 finite points, C-contiguous.
        summary: (N, R) float64 lower-bound summary of x (`lower_bound_summary`).
        groups: (N,) int64 group of each point: a pick removes its whole group (arange(N): only itself).
        picks: (k,) int64, picks[0] set by the caller.
        min_dist: (N,) float64 output: squared distance of each point to its nearest folded-in pick (-1: removed).
        probe, max_full_fraction: after `probe` picks, give up when more than this fraction of the rows were read
            in full (data the bound cannot prune, such as white noise, where a blocked matrix product is faster).

    Returns:
        n, the number of valid picks. n == k when done; otherwise min_dist is exact for picks[:n - 1] (chosen
        points -1) and picks[n - 1] is the next pick, not yet folded in.
    """
    N, D = x.shape
    R = summary.shape[1]
    k = picks.shape[0]
    # The summary's float64 rounding, so a bound is never trusted beyond its own precision.
    scale = 0.0
    for j in range(N):
        for r in range(R):
            scale = max(scale, summary[j, r] * summary[j, r])
    margin = 16.0 * R * 2.0 ** -53 * scale
    min_dist[:] = _MAX_FLOAT64
    full = 0
    for i in range(1, k):
        c = picks[i - 1]
        group = groups[c]
        best, best_index = -2.0, 0
        for j in range(N):
            dj = min_dist[j]
            if groups[j] == group:
                dj = -1.0  # chosen points are never picked again, nor the other points of their group
            elif dj > 0.0:
                bound = 0.0
                for r in range(R):
                    diff = summary[j, r] - summary[c, r]
                    bound += diff * diff
                if bound - margin < dj:
                    full += 1
                    dist = 0.0
                    for t in range(D):
                        diff = np.float64(x[j, t]) - np.float64(x[c, t])
                        dist += diff * diff
                    dj = min(dj, dist)
            min_dist[j] = dj
            if dj > best:  # strict: the lowest index wins an exact tie
                best, best_index = dj, j
        picks[i] = best_index
        if i == probe and full > max_full_fraction * N * probe:
            return i + 1
    return k
