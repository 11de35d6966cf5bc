"""K-centered patch sampling (Park et al., ECCV 2022): greedy k-center selection of a clip's patches.

A clip (B, C, T, H, W) is cut into T*h*w patches of C*p*p pixels. Each patch gets its scaled (t, h, w) position
appended, and greedy k-center (farthest-point) selection keeps the patches that cover that space best. With
hybrid frames, n whole frames at linspace positions are kept first and k-center fills the rest of the token
budget from the other frames.

`kcenter_sample` never builds the N x N distance matrix of the original code: it keeps one running
min-distance per point, O(B*N) memory beyond the input. The implementations share one contract:
- CUDA with Triton: one fused kernel for all k picks (models/kcenter_triton.py); KCENTER_TRITON=0 turns it off.
- CUDA without Triton: a batched loop with no host synchronisation (`_kcenter_batched`).
- CPU with Numba: a compiled loop per clip that skips the rows a lower bound rules out (models/kcenter_cpu.py);
  KCENTER_NUMBA=0 turns it off.
- CPU otherwise, or once the bound stops pruning (white noise): a lazy blocked search (`_kcenter_lazy_one`) that
  turns most of the arithmetic into matrix products.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from .kcenter_bound import lower_bound_summary

try:  # the fused kernel is optional: only used on CUDA tensors when Triton imports
    from .kcenter_triton import TRITON_AVAILABLE, FusedKernelUnavailable, kcenter_sample_triton
except ImportError:
    TRITON_AVAILABLE = False

log = logging.getLogger(__name__)

_FP32_UNIT_ROUNDOFF = 2.0 ** -24


@torch.no_grad()
def kcenter_sample(points: Tensor, k: int, start: Tensor | None = None,
                   generator: torch.Generator | None = None, groups: Tensor | None = None,
                   num_groups: int | None = None) -> Tensor:
    """Greedy k-center (farthest-point) selection with Euclidean distance.

    On CUDA the call does not wait for the GPU: a start given on the GPU is range-checked there (a device-side
    assert), one given on the CPU (as `seeded_starts` makes it) travels through pinned memory, and the groups are
    not counted when `num_groups` is given.

    Args:
        points: (B, N, D) finite float tensor (fp32 or bf16/fp16; distances are accumulated in fp32 or wider).
        k: number of points to pick per batch item, 1 <= k <= N (<= the number of groups with `groups`).
        start: (B,) index of each item's first pick; drawn uniformly (with `generator`) when None.
        groups: optional (N,) integer group of each point, the same for every item: picking a point removes every
            point of its group (e.g. one patch per place of a segment). None: each point is its own group.
        num_groups: the number of distinct values in `groups`, if the caller knows it; else counted, which waits
            for the GPU when `groups` is on it (a caller that samples every step passes it, as
            `KCenterTokenSampler` does).

    Returns:
        (B, k) int64 indices in the order chosen (column 0 == start). Each next pick is the point whose distance
        to its nearest chosen point is largest among the points not removed; ties go to the lowest index. Chosen
        points are never picked again, so k == N gives a permutation even when points repeat.
    """
    if points.dim() != 3:
        raise ValueError(f"points must have shape (B, N, D), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be a float tensor, got {points.dtype}")
    B, N, _ = points.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}], got {k!r}")
    if start is None:
        start = torch.randint(N, (B,), generator=generator, device=generator.device if generator else "cpu")
    start = torch.as_tensor(start)
    if start.shape != (B,) or start.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"start must be an integer tensor of shape ({B},), got {start.dtype} {tuple(start.shape)}")
    if start.device.type == "cpu":
        if B and not (0 <= int(start.min()) and int(start.max()) < N):
            raise ValueError(f"start indices must be in [0, {N}), got {start.tolist()}")
    else:  # int() of a GPU value waits for the GPU: checked there instead
        torch._assert_async(((start >= 0) & (start < N)).all(), f"start indices must be in [0, {N})")
    start = _to_device(start.long(), points.device)
    if groups is not None:
        groups = torch.as_tensor(groups)
        if groups.shape != (N,) or groups.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"groups must be an integer tensor of shape ({N},), got {groups.dtype} "
                             f"{tuple(groups.shape)}")
        num_groups = len(torch.unique(groups)) if num_groups is None else num_groups
        if k > num_groups:
            raise ValueError(f"k={k} picks cannot come from {num_groups} groups (one per group)")
        groups = _to_device(groups.long(), points.device)
    if B == 0:
        return torch.empty(0, k, dtype=torch.int64, device=points.device)
    # distances in fp32 or wider whatever autocast is active around the model (bf16 would change the picks)
    with torch.autocast(points.device.type, enabled=False):
        if points.is_cuda:
            return _kcenter_cuda(points, k, start, groups)
        return _kcenter_cpu(points.float(), k, start, groups)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`; from the CPU to a GPU through pinned memory, so the copy does not wait for the GPU's queue
    (a copy from pageable memory does)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_warned_causes: set[str] = set()  # why the fused kernel could not serve a call, each warned about once


def _kcenter_cuda(points: Tensor, k: int, start: Tensor, groups: Tensor | None = None) -> Tensor:
    """The fused kernel where Triton is there (KCENTER_TRITON=0 turns it off), else the batched loop. A call the
    kernel cannot serve (the driver refused its grid, Triton could not build its launcher) takes the batched loop
    too (same picks, slower), with a warning once per cause; the kernel decides whether later calls try again."""
    if TRITON_AVAILABLE and os.environ.get("KCENTER_TRITON", "1") != "0":
        try:
            return kcenter_sample_triton(points, k, start, groups=groups)
        except FusedKernelUnavailable as e:
            if e.cause not in _warned_causes:
                _warned_causes.add(e.cause)
                log.warning("%s; %s", e, e.fallback)
    return _kcenter_batched(points.float(), k, start, groups)


def mix_keys(*columns) -> np.ndarray:
    """One 64-bit hash per row of integer key columns (ints or 1-D arrays of one length), e.g. (seed, epoch,
    video index): a fixed function of the keys, the same on every machine, process and batch layout."""
    columns = [np.asarray(c, dtype=np.int64).astype(np.uint64) for c in columns]
    h = np.zeros(np.broadcast_shapes(*(c.shape for c in columns)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in columns:  # splitmix64 finaliser over each key in turn
            h = (h ^ c) + np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h


def seeded_starts(seeds: Tensor, num_points: int, stream: int | Tensor = 0) -> Tensor:
    """(B,) int64 clip seeds -> (B,) first picks in [0, num_points), a fixed function of (seed, stream)."""
    stream = stream.cpu().numpy() if isinstance(stream, Tensor) else stream
    return torch.from_numpy((mix_keys(seeds.cpu().numpy(), stream) % np.uint64(num_points)).astype(np.int64))


def _kcenter_batched(x: Tensor, k: int, start: Tensor, groups: Tensor | None = None) -> Tensor:
    """All clips at once, one bmm per pick, indices stay on the device (no host sync inside the loop).
    Runs with autocast off (see `kcenter_sample`): under bf16 autocast the bmm would round the distances."""
    B, N, _ = x.shape
    rows = torch.arange(B, device=x.device)
    sq = (x * x).sum(-1)  # (B, N)
    min_dist = torch.full((B, N), math.inf, device=x.device)
    picks = torch.empty(B, k, dtype=torch.int64, device=x.device)
    picks[:, 0] = last = start
    for i in range(1, k):
        center = x[rows, last]  # (B, D)
        dist = sq - 2 * torch.bmm(x, center.unsqueeze(-1)).squeeze(-1) + sq[rows, last].unsqueeze(-1)
        torch.minimum(min_dist, dist, out=min_dist)
        if groups is None:
            min_dist[rows, last] = -1.0  # chosen points are never picked again
        else:  # nor any point of their group
            min_dist.masked_fill_(groups[None, :] == groups[last][:, None], -1.0)
        last = min_dist.argmax(-1)
        picks[:, i] = last
    return picks


def _kcenter_cpu(x: Tensor, k: int, start: Tensor, groups: Tensor | None = None) -> Tensor:
    """One clip per thread, each running single-threaded ops.

    The per-clip search is many small steps; splitting each over the intra-op thread pool makes every one wait at
    a barrier for the slowest core, which on a shared machine costs more than the step. Clips in parallel keep
    every core busy instead (the compiled loop releases the GIL). torch's thread count is process-wide, so it is
    restored afterwards.
    """
    x = x.detach().contiguous()  # the compiled loop reads plain C-ordered arrays
    # each point its own group without `groups`: one code path, removing a pick's group removes the pick
    groups = torch.arange(x.shape[1]) if groups is None else groups.cpu().contiguous()

    def one(b: int) -> Tensor:
        # float64 sums of the fp32 rows, in blocks: the sum converts a copy first, and a copy of the whole clip
        # (35 MB, fresh pages) took 5x longer than blocks that stay in cache (29 ms vs 6 ms a clip)
        summary = torch.cat([lower_bound_summary(block, dtype=torch.float64) for block in x[b].split(256)])
        # finite exactly when the clip is (a float64 sum of fp32 values cannot overflow); the compiled loop's fast
        # math assumes it. (Not checked on CUDA, where it would cost a device sync.)
        if not bool(torch.isfinite(summary).all()):
            raise ValueError(f"points[{b}] must be finite, got NaN or inf")
        picks, min_dist = [int(start[b])], None
        greedy_pruned = _cpu_kernel()
        if greedy_pruned is not None:
            out, dist = np.empty(k, dtype=np.int64), np.empty(x.shape[1])
            out[0] = picks[0]
            n = greedy_pruned(x[b].numpy(), summary.numpy(), groups.numpy(), out, dist, _PROBE_PICKS,
                              _MAX_FULL_FRACTION)
            if n == k:
                return torch.from_numpy(out)
            picks, min_dist = out[:n].tolist(), torch.from_numpy(dist).float()
        return _kcenter_lazy_one(x[b], k, picks, min_dist, groups=groups)

    threads = torch.get_num_threads()
    if threads == 1 or x.shape[0] == 1:
        return torch.stack([one(b) for b in range(x.shape[0])])
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, x.shape[0])) as pool:
            return torch.stack(list(pool.map(one, range(x.shape[0]))))
    finally:
        torch.set_num_threads(threads)


# The compiled loop hands over to the blocked search when, over its first 8 picks, more than 60% of the rows had to
# be read in full: it would stay above the blocked search's average cost (~0.25 full scans a pick). At the paper's
# setting synthetic video clips read 18-37% of the rows over their first 8 picks and ~3% over a whole run,
# Gaussian points 100% and 91% (bench/RESULTS.md).
_PROBE_PICKS, _MAX_FULL_FRACTION = 8, 0.6


@functools.cache
def _cpu_kernel():
    """The compiled CPU loop, or None when Numba is missing or KCENTER_NUMBA=0 (the PyTorch path: same picks)."""
    if os.environ.get("KCENTER_NUMBA", "1") == "0":
        return None
    try:
        from .kcenter_cpu import greedy_pruned
    except ImportError:
        return None
    return greedy_pruned


class _Rerank:
    """Float64 squared distance of candidates to their nearest pick, for re-ranking fp32 near-ties.

    A float64 matrix product: its rounding (~1e-16 relative) is 1e9 times below the fp32 ties it resolves, and
    exact on integer-valued points, where exact ties go to the lowest index. The chosen points are kept as a
    growing float64 block, so a re-rank costs (candidates x picks x D), not a gather of every pick. Only the rows
    used are converted (a float64 copy of the clip cost 18 ms)."""

    def __init__(self, x: Tensor, capacity: int):
        self.x = x
        self.picks64 = torch.empty(capacity, x.shape[1], dtype=torch.float64)
        self.picks_sq = torch.empty(capacity, dtype=torch.float64)
        self.size = 0

    def min_dist(self, candidates: Tensor, picks: list[int]) -> Tensor:
        if self.size < len(picks):
            new = rows(self.x, torch.tensor(picks[self.size:])).double()
            self.picks64[self.size:len(picks)] = new
            self.picks_sq[self.size:len(picks)] = (new * new).sum(1)
            self.size = len(picks)
        c, p = rows(self.x, candidates).double(), self.picks64[:self.size]
        return ((c * c).sum(1)[:, None] - 2 * (c @ p.T) + self.picks_sq[None, :self.size]).amin(1)


def _kcenter_lazy_one(x: Tensor, k: int, picks: list[int], min_dist: Tensor | None = None, sync_every: int = 64,
                      chunk: int = 64, max_prefix: int = 512, groups: Tensor | None = None) -> Tensor:
    """Exact greedy k-center for one clip on the CPU, with most distances computed as matrix products.

    Continues the sequence `picks` (at least the start) to k picks; `min_dist` holds each point's squared
    distance to its nearest pick among picks[:-1] (points removed: -1), None when only the start is given.
    `groups` (N,): picking a point removes its group (None: each point is its own group).

    A point's min-distance only shrinks as centers are added, so a stale value is an upper bound. Every
    `sync_every` picks all points are brought up to date with one (N, m) product against the m newest centers and
    sorted by that bound. Between syncs only a prefix of the sorted order is kept exact (against the few newer
    centers); the prefix grows until its best value beats the stale bound of everything after it. A prefix longer
    than `max_prefix` (many near-equal distances, e.g. static background) triggers an early sync.

    Squared distances use |x|^2 - 2 x.c + |c|^2 in fp32. When several candidates are within `tol` of the best,
    they are re-ranked with float64 distances to every chosen center, so the result is the float64 greedy
    sequence (ties to the lowest index), not one that depends on fp32 rounding. `tol` is the statistical error
    bound u*sqrt(D)*(|x|+|c|)^2: 16x the largest error measured at the paper's setting (3.7e-4 vs 6.0e-3 on
    364k random pairs, D=771). The worst-case bound (D instead of sqrt(D)) is 28x looser and would send nearly
    every step to float64.
    """
    N, D = x.shape
    groups = torch.arange(N) if groups is None else groups
    sq = (x * x).sum(1)
    tol = _FP32_UNIT_ROUNDOFF * math.sqrt(D + 2) * 4 * float(sq.max()) + 1e-30
    rerank = None  # float64 re-ranking, set up at the first near-tie
    prefix = _Prefix(max_prefix + chunk, D)  # exact min-distances of order[:prefix.size], points kept contiguous

    first, synced = len(picks), len(picks) - 1  # picks[:synced] are folded into min_dist
    picks = list(picks)
    min_dist = torch.full((N,), math.inf) if min_dist is None else min_dist.clone()
    for i in range(first, k):
        last = picks[-1]
        if i == first or i - synced >= sync_every or prefix.size > max_prefix:
            new = torch.tensor(picks[synced:])
            dist = sq[:, None] - 2 * (x @ rows(x, new).T) + rows(sq, new)[None]  # (N, m)
            torch.minimum(min_dist, dist.amin(1), out=min_dist)
            min_dist[torch.isin(groups, rows(groups, new))] = -1.0  # the picks' groups are removed
            synced = i
            bound, order = torch.sort(min_dist, descending=True, stable=True)  # stable: ties keep index order
            prefix.size = 0
        elif prefix.size:
            prefix.add_center(x[last], sq[last], int(groups[last]))
        L = prefix.size
        best = float(prefix.exact[:L].max()) if L else -math.inf
        while L < N and float(bound[L]) >= best - 2 * tol:
            grow = order[L: L + chunk]
            points, values = rows(x, grow), bound[L: L + chunk].clone()
            if i > synced:
                newer = torch.tensor(picks[synced:])
                dist = rows(sq, grow)[:, None] - 2 * (points @ rows(x, newer).T) + rows(sq, newer)[None]
                torch.minimum(values, dist.amin(1), out=values)
                values[torch.isin(rows(groups, grow), rows(groups, newer))] = -1.0
            prefix.append(points, rows(sq, grow), grow, rows(groups, grow), values)
            L = prefix.size
            best = max(best, float(values.max()))
        near = (prefix.exact[:L] >= best - 2 * tol).nonzero().squeeze(1)
        if len(near) == 1:
            picks.append(int(prefix.index[near[0]]))
            continue
        rerank = rerank or _Rerank(x, k)
        candidates = prefix.index[near].sort().values  # ascending index: argmax keeps the lowest on exact ties
        picks.append(int(candidates[rerank.min_dist(candidates, picks).argmax()]))
    return torch.tensor(picks, dtype=torch.int64)


def rows(t: Tensor, index: Tensor) -> Tensor:
    # index_select, not t[index]: advanced indexing of a few rows costs ~40x more when the intra-op thread pool
    # shares its cores with other work (2 ms vs 50 us for 64 rows measured on a busy 2-core machine)
    return torch.index_select(t, 0, index)


class _Prefix:
    """The evaluated head of the sorted order: its points (contiguous, so a step is one matrix-vector product),
    squared norms, indices, groups and exact min-distances. Grows by doubling; `size = 0` empties it."""

    def __init__(self, capacity: int, dim: int):
        self.points, self.sq = torch.empty(capacity, dim), torch.empty(capacity)
        self.index, self.group = torch.empty(capacity, dtype=torch.int64), torch.empty(capacity, dtype=torch.int64)
        self.exact = torch.empty(capacity)
        self.size = 0

    def add_center(self, center: Tensor, center_sq: Tensor, center_group: int) -> None:
        n = self.size
        dist = self.sq[:n] - 2 * (self.points[:n] @ center) + center_sq
        torch.minimum(self.exact[:n], dist, out=self.exact[:n])
        self.exact[:n][self.group[:n] == center_group] = -1.0

    def append(self, points: Tensor, sq: Tensor, index: Tensor, group: Tensor, exact: Tensor) -> None:
        n, m = self.size, len(index)
        if n + m > len(self.index):
            grow = max(n + m, 2 * len(self.index))
            self.points = torch.cat([self.points[:n], torch.empty(grow - n, self.points.shape[1])])
            self.sq, self.index, self.group, self.exact = (torch.cat([t[:n], t.new_empty(grow - n)])
                                                           for t in (self.sq, self.index, self.group, self.exact))
        self.points[n:n + m], self.sq[n:n + m], self.exact[n:n + m] = points, sq, exact
        self.index[n:n + m], self.group[n:n + m] = index, group
        self.size = n + m


# ---------------------------------------------------------------------------------------------------------------
# Token selection: clip -> patches with positions -> hybrid frames + k-center picks.


def patchify(clip: Tensor, patch_size: int) -> Tensor:
    """(B, C, T, H, W) -> (B, T, H/p, W/p, C*p*p), pixels of a patch ordered (c, p1, p2) like a conv weight."""
    return rearrange(clip, "b c t (h p1) (w p2) -> b t h w (c p1 p2)", p1=patch_size, p2=patch_size)


def patch_coordinates(num_frames: int, grid: int, patch_size: int, pixel_std: float,
                      temporal_coef: float = 1.0, spatial_coef: float = 1.0) -> Tensor:
    """(T, grid, grid, 3) centred (t, h, w) positions appended to each patch, as in the original code.

    Extents are sqrt(p)/std in time and sqrt(p/2)/std in space, so one step in position weighs about as much as
    a patch of pixels that differ by a typical amount; the coefficients trade space against time.
    """
    t_range = math.sqrt(patch_size) / pixel_std
    s_range = math.sqrt(patch_size / 2) / pixel_std
    t = torch.linspace(-t_range / 2, t_range / 2, num_frames) * temporal_coef
    s = torch.linspace(-s_range / 2, s_range / 2, grid) * spatial_coef
    return torch.stack(torch.meshgrid(t, s, s, indexing="ij"), dim=-1)


def hybrid_frame_indices(num_frames: int, num_hybrid_frames: int) -> Tensor:
    return torch.linspace(0, num_frames - 1, num_hybrid_frames).long()


def segment_layout(num_frames: int, num_segments: int, num_hybrid_frames: int) -> tuple[Tensor, Tensor]:
    """Where the hybrid frames are and which frames each k-center run samples from.

    num_segments == 1 (the K-center ViT): hybrid frames at linspace(0, T-1, n); one run over all other frames.
    num_segments == S > 1 (TimeSformer, Motionformer): the T frames are cut into S segments of L = T/S; n segments
    at linspace(0, S-1, n) (truncated) keep their centre frame (L*s + L/2) whole; every other segment is a run.

    Returns:
        hybrid (n,) frame indices; runs (R, F) frame indices of each k-center run (R runs of F frames).
    """
    if num_segments == 1:
        hybrid = hybrid_frame_indices(num_frames, num_hybrid_frames)
        others = [t for t in range(num_frames) if t not in set(hybrid.tolist())]
        return hybrid, torch.tensor([others], dtype=torch.long)
    length = num_frames // num_segments
    hybrid_segments = torch.linspace(0, num_segments - 1, num_hybrid_frames).long()
    runs = [s for s in range(num_segments) if s not in set(hybrid_segments.tolist())]
    return length * hybrid_segments + length // 2, torch.tensor([list(range(length * s, length * (s + 1)))
                                                                 for s in runs], dtype=torch.long).view(-1, length)


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one budget come from: the hybrid frames kept whole, then `num_runs` k-center runs of
    `picks_per_run` picks each, run r choosing among the patches of frames run_frames[r]."""

    num_tokens: int
    num_segments: int
    hybrid_frames: Tensor  # (n,) frame indices
    run_frames: Tensor  # (R, F) frame indices of each run
    run_coords: Tensor  # (R, F*grid*grid, 3) the (t, h, w) position of each candidate
    run_places: Tensor  # (F*grid*grid,) the place of each candidate: its group under one_per_place
    num_hybrid_tokens: int
    num_kcenter_tokens: int
    num_runs: int  # 0 when every token is a hybrid frame's
    picks_per_run: int

    @property
    def candidates_per_run(self) -> int:
        return self.run_coords.shape[1]

    def to(self, device: torch.device) -> TokenLayout:
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in
                                            ("hybrid_frames", "run_frames", "run_coords", "run_places")})


class KCenterTokenSampler(nn.Module):
    """Selects `num_tokens` patches of a clip: whole hybrid frames first, then k-center picks over the rest.

    forward(clip (B, C, T, H, W)) -> patches (B, K, C*p*p), t_index (B, K), s_index (B, K), where t_index is
    the frame of each patch and s_index = row * grid + col its place in the frame. Hybrid patches come first, in
    frame and raster order, then each k-center run's picks (`segment_layout`): in the order chosen, or sorted by
    place (`sort_by_place`, with `one_per_place` a run then reads as one mosaic frame). With `one_per_place` a
    pick removes the other patches of its place from its run.

    The first pick of each run is `start` ((B,) or (B, runs)), else a function of `seeds` (B,) (one int64 per
    clip, e.g. from (seed, epoch, video)) and the run, else drawn from torch's global RNG.

    forward's `num_tokens` and `num_segments` select another token budget than the one built (`layout`), with the
    same seeds: a trained model can run on fewer or more tokens than it was trained on.
    """

    def __init__(self, *, num_frames: int, img_size: int, patch_size: int, num_tokens: int,
                 num_hybrid_frames: int = 0, pixel_std: float = 0.5, temporal_coef: float = 1.0,
                 spatial_coef: float = 1.0, num_segments: int = 1, one_per_place: bool = False,
                 sort_by_place: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        per_frame = self.grid ** 2
        self.num_frames, self.num_hybrid_frames = num_frames, num_hybrid_frames
        self.one_per_place, self.sort_by_place = one_per_place, sort_by_place
        self.coords = patch_coordinates(num_frames, self.grid, patch_size, pixel_std, temporal_coef, spatial_coef)
        built = self.build_layout(num_tokens, num_segments)
        self.num_tokens, self.num_segments = num_tokens, num_segments
        self.num_hybrid_tokens, self.num_kcenter_tokens = built.num_hybrid_tokens, built.num_kcenter_tokens
        self.num_runs, self.picks_per_run = built.num_runs, built.picks_per_run
        frame_of = torch.arange(num_frames).repeat_interleave(per_frame)  # (T*grid*grid,)
        place_of = torch.arange(per_frame).repeat(num_frames)
        for name, value in (("hybrid_frames", built.hybrid_frames), ("run_frames", built.run_frames),
                            ("run_coords", built.run_coords), ("run_places", built.run_places),
                            ("frame_of", frame_of), ("place_of", place_of)):
            self.register_buffer(name, value, persistent=False)
        self._other_layouts: dict[tuple, TokenLayout] = {}  # (num_tokens, num_segments, device) -> layout

    def build_layout(self, num_tokens: int, num_segments: int, name: str = "model.num_tokens") -> TokenLayout:
        """The layout of `num_tokens` tokens over `num_segments` segments (CPU tensors), or a ValueError naming
        `name` and why they do not fit."""
        per_frame, num_frames, num_hybrid_frames = self.grid ** 2, self.num_frames, self.num_hybrid_frames
        if num_segments < 1 or num_frames % num_segments:
            raise ValueError(f"model.num_segments {num_segments} must divide num_frames {num_frames}")
        if num_hybrid_frames > (num_segments if num_segments > 1 else num_frames):
            raise ValueError(f"model.num_hybrid_frames {num_hybrid_frames} is more than the "
                             f"{'segments' if num_segments > 1 else 'frames'} there are")
        hybrid, runs = segment_layout(num_frames, num_segments, num_hybrid_frames)
        num_hybrid_tokens = num_hybrid_frames * per_frame
        num_kcenter_tokens = num_tokens - num_hybrid_tokens
        num_runs = len(runs) if num_kcenter_tokens else 0
        picks_per_run = num_kcenter_tokens // max(num_runs, 1)
        candidates = runs.shape[1] * per_frame
        fits = num_kcenter_tokens >= 0 and picks_per_run * max(num_runs, 1) == num_kcenter_tokens
        fits = fits and picks_per_run <= (per_frame if self.one_per_place else candidates)
        if not fits:
            raise ValueError(f"{name} {num_tokens} does not fit {num_hybrid_frames} hybrid frames of "
                             f"{per_frame} patches and an equal share of at most "
                             f"{per_frame if self.one_per_place else candidates} picks for each of {len(runs)} "
                             f"k-center runs of {runs.shape[1]} frames ({num_frames} frames, {num_segments} segments)")
        return TokenLayout(num_tokens=num_tokens, num_segments=num_segments, hybrid_frames=hybrid, run_frames=runs,
                           run_coords=self.coords[runs].flatten(1, 3), run_places=torch.arange(candidates) % per_frame,
                           num_hybrid_tokens=num_hybrid_tokens, num_kcenter_tokens=num_kcenter_tokens,
                           num_runs=num_runs, picks_per_run=picks_per_run)

    def layout(self, num_tokens: int | None = None, num_segments: int | None = None) -> TokenLayout:
        """The layout of a token budget (None: the one built), on the sampler's device; others are built once."""
        num_tokens = self.num_tokens if num_tokens is None else num_tokens
        num_segments = self.num_segments if num_segments is None else num_segments
        if (num_tokens, num_segments) == (self.num_tokens, self.num_segments):
            return TokenLayout(num_tokens=num_tokens, num_segments=num_segments, hybrid_frames=self.hybrid_frames,
                               run_frames=self.run_frames, run_coords=self.run_coords, run_places=self.run_places,
                               num_hybrid_tokens=self.num_hybrid_tokens, num_kcenter_tokens=self.num_kcenter_tokens,
                               num_runs=self.num_runs, picks_per_run=self.picks_per_run)
        key = (num_tokens, num_segments, self.frame_of.device)
        if key not in self._other_layouts:
            built = self.build_layout(num_tokens, num_segments, name="token budget")
            self._other_layouts[key] = built.to(self.frame_of.device)
        return self._other_layouts[key]

    @property
    def candidates_per_run(self) -> int:
        return self.run_coords.shape[1]

    def run_starts(self, seeds: Tensor, layout: TokenLayout | None = None) -> Tensor:
        """(B,) clip seeds -> (B * runs,) first picks: run r of a clip uses stream r (run 0: the ViT's one)."""
        layout = layout or self.layout()
        runs = torch.arange(layout.num_runs).repeat(len(seeds))
        return seeded_starts(seeds.cpu().repeat_interleave(layout.num_runs), layout.candidates_per_run, stream=runs)

    @torch.no_grad()
    def forward(self, clip: Tensor, start: Tensor | None = None, generator: torch.Generator | None = None,
                seeds: Tensor | None = None, num_tokens: int | None = None, num_segments: int | None = None):
        layout = self.layout(num_tokens, num_segments)
        patches = patchify(clip, self.patch_size)  # (B, T, h, w, C*p*p)
        B, T = patches.shape[:2]
        per_frame = self.grid ** 2
        flat_index = torch.arange(T * per_frame, device=clip.device).view(T, per_frame)
        chosen = [flat_index[layout.hybrid_frames].flatten().expand(B, -1)]  # (B, n*h*w) raster order
        if layout.num_kcenter_tokens:
            R = layout.num_runs
            pixels = patches[:, layout.run_frames].flatten(0, 1).flatten(1, 3)  # (B*R, N, C*p*p), run-major
            coords = layout.run_coords.to(pixels.dtype).repeat(B, 1, 1)  # (B*R, N, 3)
            if start is not None:
                start = torch.as_tensor(start).reshape(-1)
            elif seeds is not None:
                start = self.run_starts(seeds, layout)
            # a pick removes its place: per_frame groups, known here, so not counted (on the GPU) at every call
            groups, num_groups = (layout.run_places, per_frame) if self.one_per_place else (None, None)
            picks = kcenter_sample(torch.cat([pixels, coords], dim=-1), layout.picks_per_run, start, generator,
                                   groups=groups, num_groups=num_groups)  # (B*R, q)
            if self.sort_by_place:
                picks = picks.gather(1, (picks % per_frame).sort(dim=1, stable=True).indices)
            run_index = flat_index[layout.run_frames].flatten(1)  # (R, N) index in the whole clip of each candidate
            picks = run_index.repeat(B, 1).gather(1, picks)  # back to indices in the whole clip
            chosen.append(picks.view(B, R * layout.picks_per_run))
        index = torch.cat(chosen, dim=1)  # (B, K)
        tokens = torch.gather(patches.flatten(1, 3), 1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return tokens, self.frame_of[index], self.place_of[index]
