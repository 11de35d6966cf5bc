"""Greedy k-center selection of a whole batch in one Triton launch (CUDA), exact in fp32, O(B*N) extra memory.

The PyTorch loop pays several kernel launches per pick; at the paper's setting (B=8 clips, 5684 candidates of 771
values, 980 picks) that is ~4k launches. Here one launch does every pick:

- grid (B, P): program (b, p) owns rows [p*S, (p+1)*S) of clip b and keeps their running min-distance. P is
  chosen so that B*P programs are resident at once (at most one per SM), because
- after each pick the P programs of a clip publish their slice's (best value, index) and meet at a barrier on an
  atomic counter; each then reduces the P partials itself (ties to the lowest index), so all agree on the next
  pick without a second launch.
- Most rows are never read in full: a point's min-distance changes only if the new center is nearer than it. The
  group means of the coordinates give an exact lower bound (models/kcenter_bound.py), kept in a small (B, N, R)
  summary, R ~ D/64. A row whose bound is already beyond its min-distance is skipped; only the others stream
  their D values. On video patches (smooth within a patch) most rows are skipped; on white noise few are, and the
  kernel is then close to a plain scan.

Distances are summed as (x - c)^2 in fp32 (fp32 or bf16/fp16 inputs), not |x|^2 - 2x.c + |c|^2, so there is no
cancellation; the picks match the float64 greedy sequence except at near-ties (relative gaps ~1e-6).

Under TRITON_INTERPRET=1 (CPU tests) the programs of a grid run one after another, so a barrier among several
would wait forever: the interpreter is always given P = 1.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .kcenter_bound import SLACK, lower_bound_summary

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    TRITON_AVAILABLE = False

BLOCK_N, BLOCK_D = 64, 64


def default_parts(batch: int, n: int, device: torch.device) -> int:
    """Programs per clip: every SM busy, all programs resident (the barrier needs it), >= BLOCK_N rows each."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms // max(batch, 1), triton.cdiv(n, BLOCK_N)))


@torch.no_grad()
def kcenter_sample_triton(points: Tensor, k: int, start: Tensor, parts: int | None = None,
                          stats: Tensor | None = None, groups: Tensor | None = None) -> Tensor:
    """Same contract as `kcenter_sample` (arguments already checked there).

    Args:
        points: (B, N, D) fp32/bf16/fp16, CUDA (or CPU under TRITON_INTERPRET=1).
        start: (B,) first pick of each clip.
        groups: optional (N,) group of each point: a pick removes its group (the same for every clip).
        parts: programs per clip (default: fill the GPU; 1 under the interpreter).
        stats: optional (B,) int64 tensor; receives the number of rows whose full distance was computed.
    Returns:
        (B, k) int64 picks in the order chosen.
    """
    B, N, D = points.shape
    x = points.contiguous()
    summary = lower_bound_summary(x)
    parts = parts or default_parts(B, N, x.device)
    if not 1 <= parts <= N:
        raise ValueError(f"parts must be in [1, N={N}], got {parts}")
    slice_len = triton.cdiv(triton.cdiv(N, parts), BLOCK_N) * BLOCK_N
    parts = triton.cdiv(N, slice_len)  # no program without rows
    block_p = triton.next_power_of_2(parts)
    picks = torch.empty(B, k, dtype=torch.int64, device=x.device)
    picks[:, 0] = start
    min_dist = torch.full((B, N), math.inf, dtype=torch.float32, device=x.device)
    partial_val = torch.empty(B, 2, block_p, dtype=torch.float32, device=x.device)
    partial_idx = torch.empty(B, 2, block_p, dtype=torch.int32, device=x.device)
    arrivals = torch.zeros(B, dtype=torch.int32, device=x.device)
    full_rows = stats if stats is not None else torch.zeros(B, dtype=torch.int64, device=x.device)
    group_of = (groups if groups is not None else start).to(device=x.device, dtype=torch.int32)  # unread if None
    try:
        # cooperative: the driver guarantees that every program of the grid is resident at once (the barrier spins
        # until all have arrived), or refuses the launch, e.g. under MPS with an SM limit or beside a persistent
        # kernel, instead of letting the barrier wait forever
        _kcenter_kernel[(B, parts)](
            x, summary, start.to(device=x.device, dtype=torch.int32), picks, min_dist, partial_val, partial_idx,
            arrivals, full_rows, group_of, N, D, k, slice_len, parts, R=summary.shape[-1], BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D, BLOCK_P=block_p, SLACK=SLACK, COUNT_ROWS=stats is not None, HAS_GROUPS=groups is not None,
            num_warps=4, launch_cooperative_grid=True)
    except RuntimeError as e:
        if "cooperative" not in str(e).lower():
            raise
        raise CooperativeLaunchRefused(f"the driver refused the fused K-center kernel's cooperative launch of "
                                       f"{B} x {parts} programs: {e}") from e
    return picks


class CooperativeLaunchRefused(RuntimeError):
    """The GPU cannot hold the kernel's whole grid at once (other work holds SMs): callers fall back."""


@torch.no_grad()
def count_full_rows(points: Tensor, picks: Tensor) -> Tensor:
    """(B,) rows whose full distance the kernel computes for these picks: its skipping rule replayed in PyTorch.

    The kernel's memory traffic is about (rows * D + N * R) values per step, so this predicts its speed on a given
    kind of data without a GPU (bench/bench_sampler.py reports it at the paper's setting)."""
    x = points.float()
    summary = lower_bound_summary(x)
    counts = []
    for b in range(x.shape[0]):
        min_dist = torch.full((x.shape[1],), math.inf)
        count = 0
        for last in picks[b, :-1].tolist():
            bound = ((summary[b] - summary[b, last]) ** 2).sum(-1)
            need = bound < min_dist * SLACK
            count += int(need.sum())
            min_dist = torch.where(need, torch.minimum(min_dist, ((x[b] - x[b, last]) ** 2).sum(-1)), min_dist)
            min_dist[last] = -1.0
        counts.append(count)
    return torch.tensor(counts)


if TRITON_AVAILABLE:

    @triton.jit
    def _kcenter_kernel(x_ptr, s_ptr, start_ptr, picks_ptr, min_ptr, part_val_ptr, part_idx_ptr, arrivals_ptr,
                        rows_ptr, groups_ptr, N, D, K, slice_len, P, R: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, SLACK: tl.constexpr,
                        COUNT_ROWS: tl.constexpr, HAS_GROUPS: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        row0 = p * slice_len
        row1 = tl.minimum(row0 + slice_len, N)
        x_b = x_ptr + b * N * D
        s_b = s_ptr + b * N * R
        min_b = min_ptr + b * N
        r_cols = tl.arange(0, R)
        d_cols = tl.arange(0, BLOCK_D)
        slots = tl.arange(0, BLOCK_P)
        last = tl.load(start_ptr + b)  # int32: the pick whose distances are folded in next
        full_rows = tl.zeros((), dtype=tl.int32)
        for i in range(1, K):
            center_s = tl.load(s_b + last * R + r_cols)  # (R,)
            best_val = -1.0
            best_idx = N
            if HAS_GROUPS:
                last_group = tl.load(groups_ptr + last)
            for t in range(row0, row1, BLOCK_N):
                rows = t + tl.arange(0, BLOCK_N)
                in_slice = rows < row1
                md = tl.load(min_b + rows, mask=in_slice, other=-1.0)  # (BLOCK_N,)
                if HAS_GROUPS:  # the pick's group is removed (the pick with it) before any row is read
                    group = tl.load(groups_ptr + rows, mask=in_slice, other=-1)
                    md = tl.where(group == last_group, -1.0, md)
                s = tl.load(s_b + rows[:, None] * R + r_cols[None, :], mask=in_slice[:, None], other=0.0)
                gap = s - center_s[None, :]
                bound = tl.sum(gap * gap, axis=1)  # <= squared distance to the center
                need = in_slice & (bound < md * SLACK)  # chosen rows hold -1: never needed
                if tl.max(need.to(tl.int32), axis=0) > 0:
                    dist = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for d0 in range(0, D, BLOCK_D):
                        cols = d0 + d_cols
                        in_d = cols < D
                        xt = tl.load(x_b + rows[:, None] * D + cols[None, :], mask=need[:, None] & in_d[None, :],
                                     other=0.0).to(tl.float32)
                        ct = tl.load(x_b + last * D + cols, mask=in_d, other=0.0).to(tl.float32)
                        diff = xt - ct[None, :]
                        dist += tl.sum(diff * diff, axis=1)
                    md = tl.where(need, tl.minimum(md, dist), md)
                    if COUNT_ROWS:
                        full_rows += tl.sum(need.to(tl.int32), axis=0)
                md = tl.where(rows == last, -1.0, md)  # a chosen point is never picked again
                tl.store(min_b + rows, md, mask=in_slice)
                tile_best = tl.max(md, axis=0)
                tile_idx = tl.min(tl.where(md == tile_best, rows, N), axis=0)  # lowest index on ties
                best_idx = tl.where(tile_best > best_val, tile_idx, best_idx)  # earlier tiles win ties
                best_val = tl.maximum(best_val, tile_best)

            # Publish this slice's best, wait for the clip's other programs, reduce their partials. Partials are
            # double-buffered by step parity: a program can only overwrite a buffer two steps on, after every
            # program has passed the barrier in between, i.e. has finished reading it.
            slot = (b * 2 + i % 2) * BLOCK_P
            tl.store(part_val_ptr + slot + p, best_val)
            tl.store(part_idx_ptr + slot + p, best_idx)
            tl.debug_barrier()  # every thread's stores done before the release below
            arrived = tl.atomic_add(arrivals_ptr + b, 1, sem="acq_rel", scope="gpu") + 1
            while arrived < P * i:
                arrived = tl.atomic_add(arrivals_ptr + b, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
            valid = slots < P
            vals = tl.load(part_val_ptr + slot + slots, mask=valid, other=-2.0, volatile=True)
            idxs = tl.load(part_idx_ptr + slot + slots, mask=valid, other=N, volatile=True)
            top = tl.max(vals, axis=0)
            last = tl.min(tl.where(vals == top, idxs, N), axis=0)
            if p == 0:
                tl.store(picks_ptr + b * K + i, last.to(tl.int64))
        if COUNT_ROWS:
            tl.atomic_add(rows_ptr + b, full_rows.to(tl.int64))
