import math

import pytest
import torch

from models import kcenter
from models.kcenter import (KCenterTokenSampler, _kcenter_batched, hybrid_frame_indices, kcenter_sample,
                            patch_coordinates, patchify)


needs_numba = pytest.mark.skipif(kcenter._cpu_kernel() is None, reason="no numba, or KCENTER_NUMBA=0")


@pytest.fixture(params=[pytest.param("compiled", marks=needs_numba), "torch"])
def cpu_path(request, monkeypatch):
    """Runs a test on both CPU implementations: the compiled loop (Numba) and the PyTorch blocked search."""
    if request.param == "torch":
        monkeypatch.setattr(kcenter, "_cpu_kernel", lambda: None)
    return request.param


def reference_kcenter(points, k, start, groups=None):
    """Brute force in float64: distances from each new pick to every point, min, argmax (lowest index on ties);
    with `groups`, every point of a picked point's group is removed."""
    out = []
    for x, s in zip(points.double(), start.tolist()):
        min_dist = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
        picks = [s]
        for _ in range(1, k):
            min_dist = torch.minimum(min_dist, ((x - x[picks[-1]]) ** 2).sum(-1))
            min_dist[picks] = -1.0
            if groups is not None:
                min_dist[torch.isin(groups, groups[picks])] = -1.0
            picks.append(int(min_dist.argmax()))
        out.append(picks)
    return torch.tensor(out)


@pytest.mark.parametrize("B,N,D,k", [(3, 200, 16, 50), (2, 500, 771, 120), (2, 300, 8, 300), (4, 64, 3, 1)])
def test_matches_reference(B, N, D, k, cpu_path):
    g = torch.Generator().manual_seed(B * N + k)
    points = torch.randn(B, N, D, generator=g)
    start = torch.randint(N, (B,), generator=g)
    expected = reference_kcenter(points, k, start)
    assert torch.equal(kcenter_sample(points, k, start), expected)
    assert torch.equal(_kcenter_batched(points, k, start), expected)  # the CUDA fallback's code path


def test_long_run_with_syncs_and_near_ties(cpu_path):
    # k spans many lazy re-syncs; integer-valued points make exact ties that must go to the lowest index
    g = torch.Generator().manual_seed(0)
    points = torch.randint(0, 3, (2, 400, 6), generator=g).float()
    start = torch.tensor([0, 399])
    assert torch.equal(kcenter_sample(points, 400, start), reference_kcenter(points, 400, start))


def test_random_start_and_generator():
    points = torch.randn(5, 100, 4)
    a = kcenter_sample(points, 10, generator=torch.Generator().manual_seed(1))
    b = kcenter_sample(points, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a, reference_kcenter(points, 10, a[:, 0]))
    assert a.dtype == torch.int64 and a.shape == (5, 10)


def test_k_equals_n_is_a_permutation_even_with_duplicates(cpu_path):
    points = torch.zeros(2, 30, 5)  # all points identical
    picks = kcenter_sample(points, 30, torch.tensor([7, 0]))
    for row in picks:
        assert sorted(row.tolist()) == list(range(30))
    assert picks[:, 0].tolist() == [7, 0]


def test_bf16_accumulates_in_fp32(cpu_path):
    points = torch.randn(2, 150, 32).bfloat16()
    start = torch.tensor([3, 4])
    assert torch.equal(kcenter_sample(points, 40, start), reference_kcenter(points.float(), 40, start))


def test_strided_input_that_requires_grad(cpu_path):
    points = torch.randn(2, 7, 60, requires_grad=True).transpose(1, 2)  # (B, N, D) view, not contiguous
    start = torch.tensor([3, 59])
    assert torch.equal(kcenter_sample(points, 20, start), reference_kcenter(points.detach(), 20, start))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_points_rejected_naming_the_clip(bad, cpu_path):
    points = torch.zeros(2, 10, 70)
    points[1, 9, 5] = bad  # inside a summed group of 64 values, not only in the kept tail
    with pytest.raises(ValueError, match=r"points\[1\] must be finite"):
        kcenter_sample(points, 3, torch.tensor([0, 0]))


def test_distances_computed_without_n_by_n_matrix(monkeypatch):
    monkeypatch.setattr(kcenter, "_cpu_kernel", lambda: None)  # the PyTorch path, whose fp32 ties are re-ranked
    reranks, rerank = [], kcenter._Rerank.min_dist
    monkeypatch.setattr(kcenter._Rerank, "min_dist", lambda self, c, p: reranks.append(len(c)) or rerank(self, c, p))
    monkeypatch.setattr(torch, "cdist", None)  # the original's N x N matrix: not used
    points = torch.randint(0, 2, (1, 300, 8)).float()  # many exact ties: the float64 re-rank runs
    picks = kcenter_sample(points, 100, torch.tensor([0]))
    assert torch.equal(picks, reference_kcenter(points, 100, torch.tensor([0])))
    assert reranks and max(reranks) < 300  # small re-ranks of near-tied candidates only


def lazy_calls(monkeypatch) -> list[int]:
    """Records how many picks the compiled loop had made each time the PyTorch search took over."""
    calls, lazy = [], kcenter._kcenter_lazy_one
    monkeypatch.setattr(kcenter, "_kcenter_lazy_one", lambda x, k, picks, *a, **kw: calls.append(len(picks)) or
                        lazy(x, k, picks, *a, **kw))
    return calls


@needs_numba
def test_compiled_loop_hands_unprunable_points_to_the_blocked_search(monkeypatch):
    calls = lazy_calls(monkeypatch)
    g = torch.Generator().manual_seed(3)
    points = torch.randn(2, 600, 130, generator=g)  # white noise: the group-sum bound rules out almost nothing
    start = torch.tensor([5, 599])
    assert torch.equal(kcenter_sample(points, 200, start), reference_kcenter(points, 200, start))
    assert calls == [kcenter._PROBE_PICKS + 1] * 2


@needs_numba
def test_compiled_loop_keeps_structured_points(monkeypatch):
    calls = lazy_calls(monkeypatch)
    g = torch.Generator().manual_seed(4)
    # patches of 20 flat colours plus a little noise: the group sums tell most pairs apart
    colours = torch.rand(20, 3, 1, generator=g).expand(-1, -1, 64).flatten(1) * 2 - 1
    points = colours[torch.randint(20, (2, 800), generator=g)] + 0.02 * torch.randn(2, 800, 192, generator=g)
    start = torch.tensor([0, 7])
    assert torch.equal(kcenter_sample(points, 300, start), reference_kcenter(points, 300, start))
    assert calls == []


@pytest.mark.parametrize("bad,match", [
    (dict(points=torch.randn(10, 3)), "shape"),
    (dict(points=torch.ones(1, 5, 2, dtype=torch.int64)), "float"),
    (dict(k=0), "k must be"),
    (dict(k=11), "k must be"),
    (dict(k=2.0), "k must be"),
    (dict(start=torch.tensor([10])), "start indices"),
    (dict(start=torch.tensor([0, 1])), "start must be"),
    (dict(start=torch.tensor([0.0])), "start must be"),
])
def test_bad_arguments(bad, match):
    args = dict(points=torch.randn(1, 10, 3), k=3, start=torch.tensor([0])) | bad
    with pytest.raises(ValueError, match=match):
        kcenter_sample(args["points"], args["k"], args["start"])


def test_patchify_layout():
    clip = torch.arange(2 * 3 * 2 * 8 * 8, dtype=torch.float32).view(2, 3, 2, 8, 8)  # B C T H W
    patches = patchify(clip, 4)
    assert patches.shape == (2, 2, 2, 2, 3 * 16)
    # patch (b=1, t=1, row=0, col=1): channel-major, then p1 rows, then p2 cols
    expected = clip[1, :, 1, 0:4, 4:8].reshape(-1)
    assert torch.equal(patches[1, 1, 0, 1], expected)


def test_patch_coordinates_scale():
    coords = patch_coordinates(num_frames=32, grid=14, patch_size=16, pixel_std=0.5, temporal_coef=2.0)
    assert coords.shape == (32, 14, 14, 3)
    t_extent, s_extent = math.sqrt(16) / 0.5, math.sqrt(8) / 0.5
    assert coords[..., 0].min().item() == pytest.approx(-t_extent)  # coef 2 doubles the half-extent
    assert coords[-1, 0, 0, 0].item() == pytest.approx(t_extent)
    assert coords[0, 0, 0, 1].item() == pytest.approx(-s_extent / 2)
    assert coords[0, 13, 0, 1].item() == pytest.approx(s_extent / 2)
    assert coords[0, 0, 13, 2].item() == pytest.approx(s_extent / 2)
    assert torch.allclose(coords.mean(dim=(0, 1, 2)), torch.zeros(3), atol=1e-5)  # centred


def test_hybrid_frame_positions():
    assert hybrid_frame_indices(32, 3).tolist() == [0, 15, 31]
    assert hybrid_frame_indices(8, 1).tolist() == [0]


def make_sampler(**kw):
    args = dict(num_frames=8, img_size=32, patch_size=8, num_tokens=40, num_hybrid_frames=2, pixel_std=0.5)
    return KCenterTokenSampler(**(args | kw))


def test_token_selection_hybrid_then_kcenter():
    sampler = make_sampler()
    clip = torch.randn(3, 3, 8, 32, 32)
    tokens, t_index, s_index = sampler(clip, start=torch.tensor([0, 5, 9]))
    assert tokens.shape == (3, 40, 3 * 64) and t_index.shape == s_index.shape == (3, 40)
    # 2 hybrid frames of 16 patches at frames 0 and 7, in raster order
    assert t_index[:, :32].tolist() == [[0] * 16 + [7] * 16] * 3
    assert s_index[:, :32].tolist() == [list(range(16)) * 2] * 3
    # the rest: k-center over frames 1..6 with positions appended, in pick order
    assert set(t_index[:, 32:].flatten().tolist()) <= set(range(1, 7))
    patches = patchify(clip, 8)
    for b in range(3):
        for j in range(40):
            assert torch.equal(tokens[b, j], patches[b, t_index[b, j], s_index[b, j] // 4, s_index[b, j] % 4])
    # same picks as sampling the (pixels, coords) points directly
    coords = patch_coordinates(8, 4, 8, 0.5)[1:7].flatten(0, 2)
    points = torch.cat([patches[:, 1:7].flatten(1, 3), coords.expand(3, -1, -1)], -1)
    picks = reference_kcenter(points, 8, torch.tensor([0, 5, 9]))
    assert torch.equal(t_index[:, 32:], 1 + picks // 16) and torch.equal(s_index[:, 32:], picks % 16)


def test_token_selection_without_hybrid_and_all_hybrid():
    clip = torch.randn(2, 3, 8, 32, 32)
    tokens, t_index, _ = make_sampler(num_hybrid_frames=0, num_tokens=20)(clip)
    assert tokens.shape == (2, 20, 192) and len(set(t_index[0].tolist())) > 1
    tokens, t_index, _ = make_sampler(num_hybrid_frames=2, num_tokens=32)(clip)
    assert tokens.shape == (2, 32, 192) and set(t_index.flatten().tolist()) == {0, 7}


def test_coordinates_spread_picks_in_time():
    # identical frames: without coordinates k-center could not tell them apart; with them it spreads over time
    clip = torch.randn(1, 3, 1, 32, 32).expand(-1, -1, 8, -1, -1)
    _, t_index, _ = make_sampler(num_hybrid_frames=0, num_tokens=8, temporal_coef=50.0)(clip)
    assert sorted(t_index[0].tolist()) == list(range(8))


def test_token_budget_validated():
    with pytest.raises(ValueError, match="num_tokens"):
        make_sampler(num_tokens=20)  # less than 2 hybrid frames of 16 patches


@pytest.mark.parametrize("path", ["cpu", "batched"])
def test_distances_stay_fp32_under_bf16_autocast(path, cpu_path, monkeypatch):
    # the CUDA fallback loop (`_kcenter_batched`) runs bmm, which autocast would run in bf16; here it runs on CPU
    # tensors in place of the CPU path, under CPU autocast, where bmm is also a bf16 op
    if path == "batched":
        monkeypatch.setattr(kcenter, "_kcenter_cpu", _kcenter_batched)
    g = torch.Generator().manual_seed(7)
    points = torch.randn(3, 400, 771, generator=g) * 4 + 10  # far from 0: bf16 rounds the distances coarsely
    start = torch.tensor([0, 17, 399])
    expected = reference_kcenter(points, 120, start)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = points[:1]
        assert torch.bmm(x, x.transpose(1, 2)).dtype == torch.bfloat16  # autocast is on for this op
        assert not torch.equal(_kcenter_batched(points, 120, start), expected)  # unguarded: other picks
        assert torch.equal(kcenter_sample(points, 120, start), expected)


def test_seeded_starts_are_a_function_of_the_seeds():
    sampler = make_sampler()
    clip = torch.randn(3, 3, 8, 32, 32)
    seeds = torch.tensor([11, -5, 2**62])
    _, t_index, s_index = sampler(clip, seeds=seeds)
    first = (t_index[:, 32] - 1) * 16 + s_index[:, 32]  # the first k-center pick among frames 1..6
    assert torch.equal(first, kcenter.seeded_starts(seeds, 6 * 16))
    assert torch.equal(s_index, sampler(clip, seeds=seeds)[2])
    assert torch.equal(s_index[1:2], sampler(clip[1:2], seeds=seeds[1:2])[2])  # whatever else is in the batch
    starts = kcenter.seeded_starts(torch.arange(2000), 48)
    assert starts.min() >= 0 and starts.max() < 48 and len(starts.unique()) == 48  # every point is a start


# (B, frames, places, D, k): one pick per place of a 4-frame segment (the TimeSformer's), fewer picks than places,
# and white noise at the paper's width (the compiled loop hands over to the PyTorch search mid-run)
GROUPED = [(3, 4, 49, 24, 49), (2, 4, 36, 771, 20), (2, 4, 196, 771, 196)]


@pytest.mark.parametrize("B,T,P,D,k", GROUPED)
def test_groups_one_pick_per_place_matches_reference(B, T, P, D, k, cpu_path, monkeypatch):
    calls = lazy_calls(monkeypatch)
    g = torch.Generator().manual_seed(T * P + D)
    points = torch.randn(B, T * P, D, generator=g)
    groups = torch.arange(T * P) % P  # the place of each point, frame-major
    start = torch.randint(T * P, (B,), generator=g)
    expected = reference_kcenter(points, k, start, groups)
    picks = kcenter_sample(points, k, start, groups=groups)
    assert torch.equal(picks, expected)
    assert torch.equal(_kcenter_batched(points, k, start, groups), expected)  # the CUDA fallback's code path
    for row in picks:  # at most one point of a place, and exactly one of each when k is the number of places
        assert len(set(groups[row].tolist())) == k
    if D == 771 and k == P and cpu_path == "compiled":
        assert calls, "white noise should have reached the PyTorch search with its groups"


def test_groups_with_exact_ties_go_to_the_lowest_index(cpu_path):
    g = torch.Generator().manual_seed(5)
    points = torch.randint(0, 2, (2, 120, 5), generator=g).float()  # many exact ties
    groups = torch.arange(120) % 30
    start = torch.tensor([0, 119])
    assert torch.equal(kcenter_sample(points, 30, start, groups=groups), reference_kcenter(points, 30, start, groups))


def test_groups_validated():
    points = torch.randn(1, 8, 3)
    with pytest.raises(ValueError, match="k=5 picks cannot come from 4 groups"):
        kcenter_sample(points, 5, torch.tensor([0]), groups=torch.arange(8) % 4)
    with pytest.raises(ValueError, match="groups must be an integer tensor of shape"):
        kcenter_sample(points, 2, torch.tensor([0]), groups=torch.arange(7))


def test_group_count_given_is_not_counted_again(monkeypatch):
    """`num_groups` stands for the count, which on the GPU would wait for torch.unique; the check still holds."""
    def no_count(*args, **kwargs):
        raise AssertionError("groups counted although num_groups was given")

    monkeypatch.setattr(torch, "unique", no_count)
    points = torch.randn(1, 8, 3)
    groups = torch.arange(8) % 4
    with pytest.raises(ValueError, match="k=5 picks cannot come from 4 groups"):
        kcenter_sample(points, 5, torch.tensor([0]), groups=groups, num_groups=4)
    assert torch.equal(kcenter_sample(points, 4, torch.tensor([0]), groups=groups, num_groups=4),
                       reference_kcenter(points, 4, torch.tensor([0]), groups))


def test_token_sampler_passes_its_group_count(monkeypatch):
    """One pick per place: the sampler knows there are grid*grid places and says so, so no call counts them."""
    def no_count(*args, **kwargs):
        raise AssertionError("the sampler's groups were counted")

    monkeypatch.setattr(torch, "unique", no_count)
    sampler = make_sampler(num_hybrid_frames=0, num_tokens=64, num_segments=4, one_per_place=True)  # 4 runs x 16
    clip = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(9))
    _, t_index, s_index = sampler(clip, start=torch.arange(8) * 3)
    for run in s_index.view(2, 4, 16):  # every place once in each run
        assert all(sorted(places) == list(range(16)) for places in run.tolist())
