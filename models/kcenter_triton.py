"""Greedy k-center selection of a whole batch in one Triton launch (CUDA), exact in fp32, O(B*N) extra memory.

The PyTorch loop pays several kernel launches per pick; at the paper's setting (B=8 clips, 5684 candidates of 771
values, 980 picks) that is ~4k launches. Here one launch does every pick:

- grid (B, P): program (b, p) owns rows [p*S, (p+1)*S) of clip b and keeps their running min-distance. P aims at
  one program per SM over the batch (`plan_parts`), and never more than the GPU holds at once, because
- after each pick the P programs of a clip publish their slice's (best value, index) and meet at a barrier on an
  atomic counter; each then reduces the P partials itself (ties to the lowest index), so all agree on the next
  pick without a second launch. With P > 1 the grid is launched cooperative: the driver either holds every
  program at once or refuses (the caller then takes the PyTorch loop for that call). With P = 1 no program waits
  for another, so the launch is a plain one, of any size.
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
import subprocess
import traceback

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
NUM_WARPS = 4


class FusedKernelUnavailable(RuntimeError):
    """The fused kernel cannot serve this call; the caller takes its PyTorch loop (same picks, slower).

    `cause` names why, in a form that is the same from call to call (for a warning once per cause)."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class CooperativeLaunchRefused(FusedKernelUnavailable):
    """The driver would not hold the grid at once (other work holds SMs, MPS with an SM limit, a capacity estimate
    off): this call only; the next one tries the kernel again."""

    fallback = "this call takes the PyTorch loop (same picks, slower); the next call tries the kernel again"


class LauncherBuildFailed(FusedKernelUnavailable):
    """Triton could not build or load its C launcher (no C compiler, no Python.h, no libcuda.so found): for the rest
    of the process, since the toolchain does not appear mid-run and a retry would run the compiler at every step."""

    fallback = "every call of this process takes the PyTorch loop (same picks, slower)"


_launcher_failure: LauncherBuildFailed | None = None  # set once Triton failed to build its launcher in this process

# The exceptions Triton's launcher build raises (`_build_failure`): RuntimeError (no C compiler found),
# CalledProcessError (the compiler failed, e.g. no Python.h), FileNotFoundError (CC names no program, no ldconfig),
# ImportError (the built module does not load), AssertionError (libcuda.so.1 not found).
_BUILD_ERRORS = (RuntimeError, OSError, ImportError, AssertionError, subprocess.SubprocessError)
_BUILD_FUNCTIONS = {"compile_module_from_src", "compile_module_from_file", "libcuda_dirs", "library_dirs"}


def _build_failure(e: BaseException) -> bool:
    """Whether `e` came out of Triton's build of its C launcher, not out of the kernel or our arguments.

    Decided by where it was raised, not by its message: a frame in triton/runtime/build.py (compiler lookup, the
    compiler run, loading the built module) or in the backend's module build and libcuda search (the functions in
    `_BUILD_FUNCTIONS`; Triton versions differ in which file holds them). A ValueError from an argument check, or a
    CUDA error from the kernel itself, is none of these and is raised as it is."""
    if not isinstance(e, _BUILD_ERRORS):
        return False
    while e is not None:  # the error itself, or one it was raised from or while handling
        for frame, _ in traceback.walk_tb(e.__traceback__):
            code = frame.f_code
            path = code.co_filename.replace(os.sep, "/")
            if path.endswith("triton/runtime/build.py") or ("/triton/" in path and code.co_name in _BUILD_FUNCTIONS):
                return True
        e = e.__cause__ or e.__context__
    return False


def resident_programs(*, sms: int, regs_per_thread: int, num_warps: int, shared_per_block: int,
                      regs_per_sm: int = 65536, threads_per_sm: int = 2048, shared_per_sm: int = 0,
                      max_blocks_per_sm: int = 16, warp_size: int = 32) -> int:
    """How many programs of one kernel the GPU holds at once, as CUDA's occupancy calculator counts them.

    Args:
        regs_per_thread: the compiled kernel's register count (n_regs).
        shared_per_block: its shared memory in bytes (metadata.shared); 1 KB more per block is reserved by CUDA
            (sm_80 and later).
        shared_per_sm: shared memory of an SM in bytes; 0: unknown, not a limit.
        max_blocks_per_sm: 16 or 32 on sm_75..sm_90; with 4 warps the thread limit binds first anyway.
    """
    warp_regs = -(-regs_per_thread * warp_size // 256) * 256  # registers are given to a warp 256 at a time
    per_sm = [regs_per_sm // warp_regs // num_warps, threads_per_sm // (num_warps * warp_size), max_blocks_per_sm]
    if shared_per_sm:
        per_sm.append(shared_per_sm // (shared_per_block + 1024))
    return sms * max(0, min(per_sm))


def plan_parts(batch: int, n: int, *, sms: int, resident: int | None = None) -> int:
    """Programs per clip: one program per SM over the batch, at most `resident` in all, >= BLOCK_N rows each.

    The result is already rounded to whole slices of BLOCK_N rows (no program without rows). It is 1 when the batch
    has at least as many clips as there are SMs or programs that fit: a launch of one program per clip needs no
    co-residency, so it is a plain launch and takes any batch.

    A batch is not cut into chunks launched one after another with more programs per clip each. In total the chunks
    stream the same B*N rows over the same SMs as one launch does, plus one launch and k barrier rounds per chunk;
    they can win only on rounding, where SMs / B falls just short of an integer (70 clips on 132 SMs: one launch of
    70 programs, where two chunks of 35 clips x 3 programs would keep 105 SMs busy). That has not been measured on a
    GPU (bench/bench_sampler.py would show it), so the plan stays one launch; it is this function to change.
    """
    target = sms if resident is None else min(sms, resident)
    parts = max(1, min(target // max(batch, 1), triton.cdiv(n, BLOCK_N)))
    return triton.cdiv(n, _slice_len(n, parts))


def _slice_len(n: int, parts: int) -> int:
    return triton.cdiv(triton.cdiv(n, parts), BLOCK_N) * BLOCK_N


def _resident_programs_of(kernel, device: torch.device) -> int:
    """`resident_programs` of a compiled kernel on `device`. Attributes are read with getattr: Triton 3.x fills
    n_regs (and n_spills) when the kernel is loaded (`_init_handles`) and keeps the shared memory in
    metadata.shared (`shared` in older versions). A register count that cannot be read is taken as 255, the most a
    thread can have, so the estimate errs towards fewer programs."""
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        init()
    regs = getattr(kernel, "n_regs", None) or 255
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    shared = shared if shared is not None else getattr(kernel, "shared", 0)
    props = torch.cuda.get_device_properties(device)
    return resident_programs(sms=props.multi_processor_count, regs_per_thread=regs, num_warps=NUM_WARPS,
                             shared_per_block=shared or 0,
                             regs_per_sm=getattr(props, "regs_per_multiprocessor", None) or 65536,
                             threads_per_sm=getattr(props, "max_threads_per_multi_processor", None) or 2048,
                             shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", None) or 0,
                             warp_size=getattr(props, "warp_size", None) or 32)


def default_parts(batch: int, n: int, device: torch.device, compile_for=None) -> int:
    """`plan_parts` for this GPU and kernel; 1 under the interpreter or off CUDA.

    compile_for(parts) compiles (without launching) the kernel a grid of that many parts runs: the register count
    that bounds the programs held at once is the compiled kernel's, and it may differ with the parts (BLOCK_P is a
    constant of the kernel). So the plan is checked against the kernel it launches, narrowing until it fits."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    parts = plan_parts(batch, n, sms=sms)
    while parts > 1 and compile_for is not None:
        fitting = plan_parts(batch, n, sms=sms, resident=_resident_programs_of(compile_for(parts), device))
        if fitting >= parts:  # only ever narrowed: a narrower grid's kernel may hold fewer registers, not more
            break
        parts = fitting
    return parts


@torch.no_grad()
def kcenter_sample_triton(points: Tensor, k: int, start: Tensor, parts: int | None = None,
                          stats: Tensor | None = None, groups: Tensor | None = None) -> Tensor:
    """Same contract as `kcenter_sample` (arguments already checked there).

    Args:
        points: (B, N, D) fp32/bf16/fp16, CUDA (or CPU under TRITON_INTERPRET=1).
        start: (B,) first pick of each clip.
        groups: optional (N,) group of each point: a pick removes its group (the same for every clip).
        parts: programs per clip (default: `default_parts`; 1 under the interpreter).
        stats: optional (B,) int64 tensor; receives the number of rows whose full distance was computed.
    Returns:
        (B, k) int64 picks in the order chosen.
    Raises:
        CooperativeLaunchRefused, LauncherBuildFailed (both FusedKernelUnavailable): the caller falls back.
    """
    if _launcher_failure is not None:
        raise LauncherBuildFailed(str(_launcher_failure), _launcher_failure.cause)
    B, N, D = points.shape
    if parts is not None and not 1 <= parts <= N:
        raise ValueError(f"parts must be in [1, N={N}], got {parts}")
    x = points.contiguous()
    summary = lower_bound_summary(x)
    picks = torch.empty(B, k, dtype=torch.int64, device=x.device)
    picks[:, 0] = start
    min_dist = torch.full((B, N), math.inf, dtype=torch.float32, device=x.device)
    arrivals = torch.zeros(B, dtype=torch.int32, device=x.device)
    full_rows = stats if stats is not None else torch.zeros(B, dtype=torch.int64, device=x.device)
    start32 = start.to(device=x.device, dtype=torch.int32)
    group_of = (groups if groups is not None else start).to(device=x.device, dtype=torch.int32)  # unread if None

    def launch(parts: int, warmup: bool = False):
        """Launches (or only compiles, with `warmup`) the grid of `parts` programs per clip (already rounded)."""
        block_p = triton.next_power_of_2(parts)
        partial_val = torch.empty(B, 2, block_p, dtype=torch.float32, device=x.device)
        partial_idx = torch.empty(B, 2, block_p, dtype=torch.int32, device=x.device)
        args = (x, summary, start32, picks, min_dist, partial_val, partial_idx, arrivals, full_rows, group_of, N,
                D, k, _slice_len(N, parts), parts)
        options = dict(R=summary.shape[-1], BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_P=block_p, SLACK=SLACK,
                       COUNT_ROWS=stats is not None, HAS_GROUPS=groups is not None, num_warps=NUM_WARPS)
        if parts > 1:  # the barrier needs every program of the grid resident at once
            options["launch_cooperative_grid"] = True
        if warmup:
            return _kcenter_kernel.warmup(*args, grid=(B, parts), **options)
        return _kcenter_kernel[(B, parts)](*args, **options)

    try:
        if parts is None:
            parts = default_parts(B, N, x.device, compile_for=lambda p: launch(p, warmup=True))
        parts = triton.cdiv(N, _slice_len(N, parts))  # no program without rows
        launch(parts)
    except _BUILD_ERRORS as e:
        if _build_failure(e):
            raise _launcher_build_failed(e) from e
        refused = parts is not None and parts > 1 and isinstance(e, RuntimeError) and "cooperative" in str(e).lower()
        if refused:
            raise CooperativeLaunchRefused(f"the driver refused the fused K-center kernel's cooperative launch of "
                                           f"{B} x {parts} programs: {e}", cause=str(e)) from e
        raise
    return picks


def _launcher_build_failed(e: BaseException) -> LauncherBuildFailed:
    """The LauncherBuildFailed for `e`, remembered: later calls fall back without running the compiler again."""
    global _launcher_failure
    cause = f"{type(e).__name__}: {e}"
    _launcher_failure = LauncherBuildFailed(f"Triton could not build the fused K-center kernel's launcher ({cause})",
                                            cause=cause)
    return _launcher_failure


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
