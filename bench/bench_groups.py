"""One pick per place: grouped K-center sampling against the same sampling without groups, in one process.

The setting of the K-center TimeSformer: each 32-frame clip is cut into 8 segments of 4 frames; each segment is
sampled on its own (the segments are a batch of B*8 clips to the sampler), 196 picks out of 4 x 196 = 784 patches
of 768 pixels + 3 coordinates, and with groups each pick removes the other 3 patches of its place. Grouped and
ungrouped runs take the same points and starts; the ratio is grouped / ungrouped time (goal: <= 1.2).

    python bench/bench_groups.py                  # CPU: both CPU paths, synthetic video clips and Gaussian points
    python bench/bench_groups.py --device cuda    # GPU: fused kernel and PyTorch loop

Prints the median of alternating runs (after a warm-up call each) and whether the grouped picks equal a float64
brute force with groups on the first segments.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_sampler import FRAMES, GRID, PATCH, reference64, synthetic_clips  # noqa: E402
from models import kcenter  # noqa: E402
from models.kcenter import kcenter_sample, patch_coordinates, patchify  # noqa: E402

SEGMENTS, PICKS = 8, GRID * GRID  # 8 segments of 4 frames, 196 picks each


def segment_points(clips: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, H, W) -> (B * 8, 784, 771): each segment's patches with their clip coordinates."""
    patches = patchify(clips, PATCH)  # (B, T, h, w, 768)
    coords = patch_coordinates(FRAMES, GRID, PATCH, pixel_std=0.5).expand(len(clips), -1, -1, -1, -1)
    points = torch.cat([patches, coords], -1)  # (B, T, h, w, 771)
    return points.unflatten(1, (SEGMENTS, FRAMES // SEGMENTS)).flatten(2, 4).flatten(0, 1)


def time_pair(points, start, groups, repeats):
    """Median seconds of (ungrouped, grouped), alternating; and the grouped picks."""
    runs = {"ungrouped": None, "grouped": groups}
    for g in runs.values():  # warm-up: compilation, caches
        kcenter_sample(points[:2], PICKS, start[:2], groups=g)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, g in runs.items():
            if points.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            picks = kcenter_sample(points, PICKS, start, groups=g)
            if points.is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return statistics.median(times["ungrouped"]), statistics.median(times["grouped"]), picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="clips (x 8 segments)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    groups = torch.arange(FRAMES // SEGMENTS * PICKS) % PICKS  # the place of each point of a segment
    inputs = {"video": segment_points(synthetic_clips(args.batch, seed=0)),
              "gaussian": torch.randn(args.batch * SEGMENTS, FRAMES // SEGMENTS * PICKS, PATCH * PATCH * 3 + 3,
                                      generator=torch.Generator().manual_seed(0))}
    start = torch.randint(groups.numel(), (args.batch * SEGMENTS,), generator=torch.Generator().manual_seed(1))
    paths = {"cpu": {"compiled loop": None, "PyTorch search": lambda: None},
             "cuda": {"fused kernel": "1", "PyTorch loop": "0"}}[args.device]
    print(f"{args.batch} clips x {SEGMENTS} segments: {PICKS} picks of {groups.numel()} points of 771 values each, "
          f"device {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| input | path | ungrouped | grouped | grouped / ungrouped | grouped picks = float64 reference |")
    print("|---|---|---|---|---|---|")
    original_kernel = kcenter._cpu_kernel
    for kind, points in inputs.items():
        points = points.to(args.device)
        for path, setting in paths.items():
            if args.device == "cpu":
                kcenter._cpu_kernel = original_kernel if setting is None else setting
            else:
                os.environ["KCENTER_TRITON"] = setting
            plain, grouped, picks = time_pair(points, start, groups.to(args.device), args.repeats)
            exact = torch.equal(picks[:4].cpu(), reference64(points[:4].cpu(), PICKS, start[:4], groups))
            print(f"| {kind} | {path} | {plain:.3f} s | {grouped:.3f} s | {grouped / plain:.2f}x | "
                  f"{'4/4' if exact else 'NO'} |")
    kcenter._cpu_kernel = original_kernel


if __name__ == "__main__":
    main()
