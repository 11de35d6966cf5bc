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
           "cooperative": compiled.metadata.launch_cooperative_grid, "shared": compiled.metadata.shared}, sys.stdout)
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
    assert isinstance(out["shared"], int) and out["shared"] >= 0  # what the launch plan reads (metadata.shared)
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


class LaunchSpy:
    """Stands in for the kernel: records each launch's grid and options, then runs `then(grid, args, kwargs)`."""

    def __init__(self, then):
        self.then, self.launches = then, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.then(grid, args, kwargs)
        return launch


@pytest.fixture
def fresh_fallback_state(monkeypatch):
    """No warning given yet and no launcher failure remembered, in this test only."""
    monkeypatch.setattr(kcenter, "_warned_causes", set())
    monkeypatch.setattr(kcenter_triton, "_launcher_failure", None)


def test_one_program_per_clip_is_a_plain_launch(interpreted, monkeypatch):
    """parts == 1 needs no barrier: launched without the cooperative flag, so the driver takes a grid of any size."""
    real = interpreted._kcenter_kernel
    spy = LaunchSpy(lambda grid, args, kwargs: real[grid](*args, **kwargs))
    monkeypatch.setattr(interpreted, "_kcenter_kernel", spy)
    points = torch.randn(2, 150, 20, generator=torch.Generator().manual_seed(3))
    start = torch.tensor([0, 149])
    assert torch.equal(interpreted.kcenter_sample_triton(points, 30, start), reference_kcenter(points, 30, start))
    [(grid, options)] = spy.launches
    assert grid == (2, 1) and "launch_cooperative_grid" not in options and options["num_warps"] == 4


def test_several_programs_per_clip_are_a_cooperative_launch(interpreted, monkeypatch):
    """parts > 1: the launch asks the driver for co-residency of the whole grid (the barrier needs it). Not run (the
    interpreter runs programs one after another, so the barrier would wait forever): the options are caught at the
    launch and the option's name checked against the CUDA backend's."""
    import dataclasses

    from triton.backends.nvidia.compiler import CUDAOptions

    spy = LaunchSpy(lambda grid, args, kwargs: None)
    monkeypatch.setattr(interpreted, "_kcenter_kernel", spy)
    interpreted.kcenter_sample_triton(torch.randn(2, 150, 20), 30, torch.tensor([0, 149]), parts=3)
    [(grid, options)] = spy.launches
    assert grid == (2, 3) and options["launch_cooperative_grid"] is True
    assert "launch_cooperative_grid" in {f.name for f in dataclasses.fields(CUDAOptions)}


# CUDA's occupancy rules on an H200: 132 SMs, 65536 registers and 2048 threads per SM, 228 KB shared memory per SM
H200 = dict(sms=132, regs_per_sm=65536, threads_per_sm=2048, shared_per_sm=233472)


@pytest.mark.parametrize("regs,shared,per_sm", [(229, 0, 2), (232, 4096, 2), (244, 4096, 2), (255, 0, 2),
                                                (128, 0, 4), (64, 0, 8), (32, 0, 16), (232, 100_000, 2),
                                                (232, 120_000, 1)])
def test_resident_programs_follows_the_occupancy_rules(regs, shared, per_sm):
    # 229-244 registers (the kernel's, by specialisation) round up to 232-248 per thread, 7424-7936 per warp:
    # 8 warps of 65536, two programs of 4 warps per SM. Below 64 registers the 2048 threads per SM bind first.
    got = kcenter_triton.resident_programs(regs_per_thread=regs, num_warps=4, shared_per_block=shared, **H200)
    assert got == 132 * per_sm


def test_plan_fits_the_h200_at_the_batches_that_were_refused():
    """264 programs fit an H200 at once; Motionformer evaluation (eval.num_clips=4, batch 4) asked for 336. A plan
    either fits the programs held at once or has one program per clip (a plain launch, any number of clips)."""
    resident = kcenter_triton.resident_programs(regs_per_thread=244, num_warps=4, shared_per_block=4096, **H200)
    assert resident == 264
    assert kcenter_triton.plan_parts(336, 784, sms=132, resident=resident) == 1  # plain launch of 336 programs
    assert kcenter_triton.plan_parts(8, 5684, sms=132, resident=resident) == 15  # the paper: 8 x 384 rows
    assert kcenter_triton.plan_parts(8, 5684, sms=132, resident=100) == 12  # fewer held (e.g. an SM limit)
    assert kcenter_triton.plan_parts(2, 100, sms=132, resident=resident) == 2  # >= 64 rows a program
    assert kcenter_triton.plan_parts(1, 1000, sms=10) == 8  # slices of 128 rows: 8 programs, none without rows
    for batch in [1, 2, 3, 7, 44, 66, 67, 131, 132, 133, 264, 265, 336, 1000]:
        for n in [1, 64, 65, 784, 5684]:
            parts = kcenter_triton.plan_parts(batch, n, sms=132, resident=resident)
            assert parts == 1 or batch * parts <= 132, (batch, n, parts)
            assert (parts - 1) * kcenter_triton._slice_len(n, parts) < n  # every program has rows


def test_default_parts_checks_the_plan_against_the_compiled_kernel(monkeypatch):
    """On CUDA the plan is bounded by what the compiled kernel's registers and shared memory let the GPU hold; one
    program per clip needs no compile to plan (read off a stand-in device and kernel: no GPU here)."""
    from types import SimpleNamespace

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    props = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                            max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472, warp_size=32)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda", 0)

    def compiled(regs, shared):
        compiles = []
        kernel = SimpleNamespace(n_regs=regs, n_spills=0, metadata=SimpleNamespace(shared=shared))
        return compiles, lambda parts: compiles.append(parts) or kernel

    compiles, compile_for = compiled(244, 4096)
    assert kcenter_triton.default_parts(336, 784, cuda, compile_for) == 1 and compiles == []
    assert kcenter_triton.default_parts(8, 5684, cuda, compile_for) == 15 and compiles == [15]
    compiles, compile_for = compiled(244, 240_000)  # more shared memory than an SM has: none held at once
    assert kcenter_triton.default_parts(8, 5684, cuda, compile_for) == 1 and compiles == [15]


def test_refused_cooperative_launch_falls_back_for_that_call_only(interpreted, monkeypatch, caplog,
                                                                 fresh_fallback_state):
    """The driver refuses a cooperative grid it cannot hold ("too many blocks in cooperative launch", e.g. under MPS
    with an SM limit): that call takes the PyTorch loop with the same picks and a warning (once for this cause),
    and the next call tries the kernel again."""
    def refuse(grid, args, kwargs):
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    spy = LaunchSpy(refuse)
    monkeypatch.setattr(interpreted, "_kcenter_kernel", spy)
    monkeypatch.setattr(interpreted, "default_parts", lambda *args, **kwargs: 2)  # a grid that needs the barrier
    points = torch.randn(2, 150, 20, generator=torch.Generator().manual_seed(4))
    start = torch.tensor([3, 7])
    with caplog.at_level(logging.WARNING):
        for calls in [1, 2]:
            assert torch.equal(kcenter._kcenter_cuda(points, 30, start), reference_kcenter(points, 30, start))
            assert len(spy.launches) == calls  # every call tries the kernel
    assert caplog.text.count("cooperative launch of 2 x 2 programs") == 1
    assert "too many blocks in cooperative launch" in caplog.text and "next call tries the kernel again" in caplog.text
    with pytest.raises(interpreted.CooperativeLaunchRefused, match="too many blocks"):  # raised by the wrapper
        interpreted.kcenter_sample_triton(points, 30, start)


@pytest.fixture
def cc_lookup_reset():
    """Triton caches its C compiler lookup; a test that changes what the lookup finds resets it before and after."""
    from triton.runtime import build

    build._find_compiler.cache_clear()
    yield
    build._find_compiler.cache_clear()


def build_a_launcher(grid, args, kwargs):
    """What the first launch does on a fresh machine: Triton builds a C module with the C compiler and Python.h."""
    from triton.runtime import build

    build.compile_module_from_src(src='#include <Python.h>\n#include "kcenter_test_missing.h"\n',
                                  name="kcenter_test_launcher")


@pytest.mark.parametrize("setup,cause", [
    (dict(CC="/no/such/compiler"), "FileNotFoundError"),  # CC names no program
    (dict(CC=None, which=None), "Failed to find C compiler"),  # no gcc, no clang
    (dict(CC=None), "CalledProcessError"),  # the compiler fails, as it does without Python.h
])
def test_launcher_build_failure_falls_back_naming_the_cause(interpreted, monkeypatch, caplog, tmp_path, setup, cause,
                                                           cc_lookup_reset, fresh_fallback_state):
    """Triton's own build step raising (no C compiler, no Python.h) does not stop training: the PyTorch loop serves
    the call with the same picks, the warning names the cause, and later calls do not run the compiler again."""
    import shutil

    if setup["CC"] is None:
        monkeypatch.delenv("CC", raising=False)
        if shutil.which("gcc") is None and shutil.which("clang") is None and "which" not in setup:
            pytest.skip("no C compiler here to fail on a missing header")
    else:
        monkeypatch.setenv("CC", setup["CC"])
    if "which" in setup:
        monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    spy = LaunchSpy(build_a_launcher)
    monkeypatch.setattr(interpreted, "_kcenter_kernel", spy)
    points = torch.randn(2, 150, 20, generator=torch.Generator().manual_seed(5))
    start = torch.tensor([1, 2])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert torch.equal(kcenter._kcenter_cuda(points, 30, start), reference_kcenter(points, 30, start))
    assert len(spy.launches) == 1  # remembered: the second call went straight to the loop
    assert caplog.text.count("could not build the fused K-center kernel's launcher") == 1 and cause in caplog.text


@pytest.mark.parametrize("error", [
    ValueError("an argument check of ours"),
    RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
    RuntimeError("too many blocks in cooperative launch"),  # from a plain launch (parts == 1): not a refusal
    FileNotFoundError("a missing file outside Triton's build"),
])
def test_errors_that_are_not_a_refusal_or_a_build_failure_are_raised(interpreted, monkeypatch, error,
                                                                     fresh_fallback_state):
    def fail(grid, args, kwargs):
        raise error

    monkeypatch.setattr(interpreted, "_kcenter_kernel", LaunchSpy(fail))
    with pytest.raises(type(error)) as raised:
        kcenter._kcenter_cuda(torch.randn(2, 150, 20), 30, torch.tensor([1, 2]))
    assert raised.value is error
    assert kcenter_triton._launcher_failure is None and not kcenter._warned_causes


def test_build_failure_is_recognised_by_where_it_was_raised():
    from triton.runtime import build

    try:
        build._language_from_filename("x.unknown")  # a ValueError inside build.py: not a build failure's type
    except ValueError as e:
        assert not kcenter_triton._build_failure(e)
    try:
        raise RuntimeError("Failed to find C compiler")  # the message alone, raised here: not Triton's build
    except RuntimeError as e:
        assert not kcenter_triton._build_failure(e)


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


@pytest.mark.gpu
def test_cuda_batch_beyond_co_residency_is_one_plain_launch(monkeypatch):
    """336 clips (more programs than an H200 holds at once, as Motionformer evaluation at eval.num_clips=4 asked for):
    one program per clip, a plain launch, the kernel's picks (no fallback)."""
    real = kcenter_triton._kcenter_kernel
    spy = LaunchSpy(lambda grid, args, kwargs: real[grid](*args, **kwargs))
    monkeypatch.setattr(kcenter_triton, "_kcenter_kernel", spy)
    g = torch.Generator().manual_seed(11)
    points = torch.randn(336, 196, 24, generator=g)
    start = torch.randint(196, (336,), generator=g)
    picks = kcenter_triton.kcenter_sample_triton(points.cuda(), 40, start.cuda()).cpu()
    [(grid, options)] = spy.launches
    assert grid == (336, 1) and "launch_cooperative_grid" not in options
    for b in range(336):
        for best, own in greedy_gaps(points[b], picks[b]):
            assert own >= best * (1 - 1e-6)
    assert (picks == reference_kcenter(points, 40, start)).all(1).sum() >= 330  # near-ties aside


@pytest.mark.gpu
def test_cuda_plan_reads_the_compiled_kernels_registers(monkeypatch):
    """The plan's bound comes from the compiled kernel (n_regs, metadata.shared) on this Triton version."""
    seen = []
    real = kcenter_triton._resident_programs_of
    monkeypatch.setattr(kcenter_triton, "_resident_programs_of",
                        lambda kernel, device: seen.append((kernel, real(kernel, device))) or seen[-1][1])
    points = video_like_points(2, frames=8, grid=14).cuda()  # (2, 1568, 771): several programs per clip
    start = torch.tensor([0, 100])
    picks = kcenter_triton.kcenter_sample_triton(points, 100, start)
    assert seen, "a plan of several programs per clip is checked against the compiled kernel"
    kernel, resident = seen[-1]
    sms = torch.cuda.get_device_properties(points.device).multi_processor_count
    assert 0 < kernel.n_regs <= 255 and resident >= sms, (kernel.n_regs, kernel.n_spills, resident)
    assert torch.equal(picks.cpu(), kcenter_sample(points.cpu(), 100, start))


@pytest.mark.gpu
def test_cuda_sampling_does_not_wait_for_the_gpu():
    """No host synchronisation in a sampler call: start from the CPU (pinned copy) or on the GPU (checked there),
    groups on the GPU with their count given; CUDA's sync debug mode turns any synchronising call into an error."""
    points = video_like_points(4, frames=4, grid=14).cuda()  # 4 runs of 4 x 196 patches
    groups = torch.arange(4 * 196, device="cuda") % 196
    start = torch.tensor([0, 7, 100, 783])
    calls = [dict(start=start, groups=groups, num_groups=196), dict(start=start.cuda(), groups=groups, num_groups=196),
             dict(start=start)]
    expected = [kcenter_sample(points, 196 if "groups" in c else 50, **c) for c in calls]  # compiled, pinned pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [kcenter_sample(points, 196 if "groups" in c else 50, **c) for c in calls]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
