"""The fused Triton k-center kernel: run on CPU by Triton's interpreter, compiled for Hopper without a GPU, and
run on CUDA where there is one."""
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from models import kcenter, kcenter_triton
from models.kcenter import kcenter_sample, patch_coordinates, patchify
from test_kcenter import reference_kcenter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def interpreted():
    """models/kcenter_triton.py with its kernel run by Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
    on machines without a GPU; where there is one, the GPU tests below run the compiled kernel instead)."""
    if type(kcenter_triton._kcenter_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernel is compiled for the GPU in this session (TRITON_INTERPRET is not set)")
    return kcenter_triton


def greedy_gaps(points, picks):
    """For each pick after the first: (best float64 min-distance available, the pick's own), replaying `picks`."""
    x = points.double()
    min_dist = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    gaps = []
    for prev, pick in zip(picks[:-1].tolist(), picks[1:].tolist()):
        min_dist = torch.minimum(min_dist, ((x - x[prev]) ** 2).sum(-1))
        min_dist[prev] = -1.0
        gaps.append((float(min_dist.max()), float(min_dist[pick])))
    return gaps


def video_like_points(batch, frames=4, grid=3, patch=16, seed=0):
    """Smooth moving gradients + noise, as the token sampler builds them (pixels + scaled positions)."""
    g = torch.Generator().manual_seed(seed)
    size = grid * patch
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    clips = []
    for _ in range(batch):
        freq = torch.rand(3, generator=g) * 0.15
        frames_ = [torch.stack([torch.sin((x + 4 * t) * f + y * f) for f in freq]) for t in range(frames)]
        clip = torch.stack(frames_, 1)  # (3, T, H, W)
        clips.append(clip + 0.02 * torch.randn(clip.shape, generator=g))
    patches = patchify(torch.stack(clips), patch).flatten(1, 3)  # (B, T*grid*grid, 768)
    coords = patch_coordinates(frames, grid, patch, pixel_std=0.5).flatten(0, 2)
    return torch.cat([patches, coords.expand(batch, -1, -1)], -1)


@pytest.mark.parametrize("B,N,D,k,seed", [(2, 150, 24, 40, 0), (1, 100, 771, 12, 1), (3, 70, 5, 70, 2)])
def test_interpreted_kernel_matches_reference(interpreted, B, N, D, k, seed):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(B, N, D, generator=g)
    start = torch.randint(N, (B,), generator=g)
    picks = interpreted.kcenter_sample_triton(points, k, start)
    assert picks.dtype == torch.int64 and picks.shape == (B, k)
    assert torch.equal(picks, reference_kcenter(points, k, start))


def test_interpreted_kernel_is_greedy_up_to_fp32_near_ties(interpreted):
    # This seed has a near-tie (relative gap 4e-8, below fp32 resolution) at step 18 of clip 0: the kernel may
    # take either point, but every pick must be within fp32 rounding of the best available one.
    g = torch.Generator().manual_seed(250)
    points = torch.randn(2, 200, 16, generator=g)
    start = torch.randint(200, (2,), generator=g)
    picks = interpreted.kcenter_sample_triton(points, 50, start)
    for b in range(2):
        assert picks[b, 0] == start[b] and len(set(picks[b].tolist())) == 50
        for best, own in greedy_gaps(points[b], picks[b]):
            assert own >= best * (1 - 1e-6), (best, own)


def test_interpreted_kernel_exact_ties_go_to_lowest_index(interpreted):
    points = torch.randint(0, 3, (2, 90, 6), generator=torch.Generator().manual_seed(0)).float()  # exact fp32
    start = torch.tensor([0, 89])
    assert torch.equal(interpreted.kcenter_sample_triton(points, 90, start), reference_kcenter(points, 90, start))


def test_interpreted_kernel_k_equals_n_with_duplicates_and_k_one(interpreted):
    points = torch.zeros(2, 40, 7)
    picks = interpreted.kcenter_sample_triton(points, 40, torch.tensor([5, 39]))
    assert picks[:, 0].tolist() == [5, 39]
    assert all(sorted(row.tolist()) == list(range(40)) for row in picks)
    one = interpreted.kcenter_sample_triton(torch.randn(3, 20, 4), 1, torch.tensor([1, 2, 3]))
    assert one.tolist() == [[1], [2], [3]]


def test_interpreted_kernel_bf16_accumulates_in_fp32(interpreted):
    points = torch.randn(2, 80, 40, generator=torch.Generator().manual_seed(3)).bfloat16()
    start = torch.tensor([3, 4])
    expected = reference_kcenter(points.float(), 30, start)
    assert torch.equal(interpreted.kcenter_sample_triton(points, 30, start), expected)


def test_interpreted_kernel_skips_rows_on_video_patches_and_stays_exact(interpreted):
    points = video_like_points(2)  # (2, 36, 771)
    start, k = torch.tensor([0, 17]), 20
    rows = torch.zeros(2, dtype=torch.int64)
    picks = interpreted.kcenter_sample_triton(points, k, start, stats=rows)
    assert torch.equal(picks, reference_kcenter(points, k, start))
    scanned = (k - 1) * points.shape[1]  # rows a full scan computes
    assert 0 < rows.max() < 0.5 * scanned, rows.tolist()  # the bound spared more than half the rows
    assert torch.equal(rows, kcenter_triton.count_full_rows(points, picks))  # what the benchmark replays


def test_lower_bound_summary_bounds_every_distance():
    points = video_like_points(1, frames=2) * 3 + torch.randn(1, 18, 771)  # rough data too
    s = kcenter_triton.lower_bound_summary(points)
    assert s.shape == (1, 18, 16)  # 12 groups of 64 pixels + 3 coordinates, padded to 16
    bound = torch.cdist(s[0].double(), s[0].double()) ** 2
    exact = torch.cdist(points[0].double(), points[0].double()) ** 2
    assert (bound <= exact * (1 + 1e-6) + 1e-9).all()
    assert (bound > 0.5 * exact).float().mean() > 0.1  # and it is not trivially 0


COMPILE_FOR_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from models import kcenter_triton as kt

pointers = dict(x_ptr="*fp32", s_ptr="*fp32", start_ptr="*i32", picks_ptr="*i64", min_ptr="*fp32",
                part_val_ptr="*fp32", part_idx_ptr="*i32", arrivals_ptr="*i32", rows_ptr="*i64", groups_ptr="*i32")
scalars = dict.fromkeys(["N", "D", "K", "slice_len", "P"], "i32")
constants = dict(R=16, BLOCK_N=kt.BLOCK_N, BLOCK_D=kt.BLOCK_D, BLOCK_P=16, SLACK=kt.SLACK, COUNT_ROWS=True,
                 HAS_GROUPS=True)
signature = {**pointers, **scalars, **dict.fromkeys(constants, "constexpr")}
source = ASTSource(fn=kt._kcenter_kernel, signature=signature, constexprs=constants)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "launch_cooperative_grid": True})
json.dump({"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"]),
           "cooperative": compiled.metadata.launch_cooperative_grid}, sys.stdout)
"""


def test_kernel_compiles_for_hopper_with_a_grid_barrier():
    """The real (not interpreted) kernel compiled for sm_90 without a GPU: catches what the interpreter does
    not check (types, layouts, loop-carried values) and shows the barrier's memory ordering in the PTX.
    In a fresh process: this one may have Triton in interpreter mode."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["cubin_bytes"] > 0 and out["cooperative"] is True  # launched as a cooperative grid
    ptx = out["ptx"]
    assert "atom.global.gpu.acq_rel.add" in ptx  # arrival publishes the partials (release)
    assert "ld.global.gpu.acquire" in ptx  # the spin reads the counter with acquire semantics
    assert "ld.volatile.global" in ptx  # partials are read past the (non-coherent) L1


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [None, 1, 3])
def test_cuda_kernel_matches_reference(parts):
    g = torch.Generator().manual_seed(7)
    points = torch.randn(4, 1000, 771, generator=g)
    start = torch.randint(1000, (4,), generator=g)
    picks = kcenter_triton.kcenter_sample_triton(points.cuda(), 200, start.cuda(), parts=parts).cpu()
    for b in range(4):
        for best, own in greedy_gaps(points[b], picks[b]):
            assert own >= best * (1 - 1e-6)
    assert (picks == reference_kcenter(points, 200, start)).all(1).sum() >= 3  # near-ties aside


@pytest.mark.gpu
def test_cuda_dispatch_uses_the_kernel_at_the_paper_setting():
    points = video_like_points(2, frames=29, grid=14).cuda()  # (2, 5684, 771)
    start = torch.tensor([0, 100])
    rows = torch.zeros(2, dtype=torch.int64, device="cuda")
    fused = kcenter_triton.kcenter_sample_triton(points, 980, start, stats=rows)
    assert torch.equal(kcenter_sample(points, 980, start), fused)
    assert torch.equal(fused.cpu(), kcenter_sample(points.cpu(), 980, start))  # the CPU path agrees


def test_kernel_is_launched_as_a_cooperative_grid(interpreted, monkeypatch):
    """The launch asks the driver for co-residency of the whole grid (the barrier needs it). The interpreter ignores
    launch options, so the option is caught at the launch and checked against the CUDA backend's option names."""
    import dataclasses

    from triton.backends.nvidia.compiler import CUDAOptions

    kt = interpreted
    real, seen = kt._kcenter_kernel, {}

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(kwargs)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kt, "_kcenter_kernel", Spy())
    points = torch.randn(2, 150, 20, generator=torch.Generator().manual_seed(3))
    start = torch.tensor([0, 149])
    assert torch.equal(kt.kcenter_sample_triton(points, 30, start), reference_kcenter(points, 30, start))
    assert seen["launch_cooperative_grid"] is True
    assert "launch_cooperative_grid" in {f.name for f in dataclasses.fields(CUDAOptions)}


def test_refused_cooperative_launch_falls_back_to_the_loop(interpreted, monkeypatch, caplog):
    """Under MPS with an SM limit the driver refuses the grid ("too many blocks in cooperative launch"): the sampler
    warns once and takes its PyTorch loop, with the same picks."""
    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
            return launch

    kt = interpreted
    monkeypatch.setattr(kt, "_kcenter_kernel", Refuses())
    monkeypatch.setattr(kcenter, "_fused_kernel_refused", False)
    points = torch.randn(2, 150, 20, generator=torch.Generator().manual_seed(4))
    start = torch.tensor([3, 7])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert torch.equal(kcenter._kcenter_cuda(points, 30, start), reference_kcenter(points, 30, start))
    assert caplog.text.count("cooperative launch of 2 x 1 programs") == 1 and kcenter._fused_kernel_refused
    with pytest.raises(kt.CooperativeLaunchRefused, match="too many blocks"):  # raised by the kernel's wrapper
        kt.kcenter_sample_triton(points, 30, start)


@pytest.mark.parametrize("B,T,P,D,k", [(2, 4, 49, 24, 49), (2, 4, 36, 100, 20)])
def test_interpreted_kernel_with_groups_matches_reference(interpreted, B, T, P, D, k):
    g = torch.Generator().manual_seed(P + D)
    points = torch.randn(B, T * P, D, generator=g)
    groups = torch.arange(T * P) % P
    start = torch.randint(T * P, (B,), generator=g)
    picks = interpreted.kcenter_sample_triton(points, k, start, groups=groups)
    assert torch.equal(picks, reference_kcenter(points, k, start, groups))


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [None, 1, 3])
def test_cuda_kernel_with_groups_one_pick_per_place(parts):
    points = video_like_points(16, frames=4, grid=14).cuda()  # 16 segments of 4 x 196 patches
    groups = torch.arange(4 * 196, device="cuda") % 196
    start = torch.arange(16, device="cuda") * 37
    fused = kcenter_triton.kcenter_sample_triton(points, 196, start, parts=parts, groups=groups)
    assert all(len(set(row)) == 196 for row in groups[fused].tolist())  # every place exactly once
    assert torch.equal(fused.cpu(), kcenter_sample(points.cpu(), 196, start.cpu(), groups=groups.cpu()))
