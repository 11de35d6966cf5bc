"""K-center sampler vs the original code's approach, at the paper's setting, in one process.

Original approach (kami93/kcenter_video `KCenterSampler`, rewritten here as the baseline): a full pairwise
`torch.cdist` matrix per clip, then a Python loop of gather/minimum/argmax steps. Ours: `kcenter_sample`.
Setting: 32 frames of 14x14 patches, 3 hybrid frames -> k-center over 29*196 = 5684 patches of 768 pixels + 3
coordinates, 1568 - 3*196 = 980 picks per clip.

    python bench/bench_sampler.py                  # CPU: synthetic video clips and Gaussian points, B=8
    python bench/bench_sampler.py --batch 2 --repeats 1
    KCENTER_NUMBA=0 python bench/bench_sampler.py  # CPU: the PyTorch search alone (no compiled loop)
    python bench/bench_sampler.py --device cuda    # GPU: original vs PyTorch loop vs fused Triton kernel

Prints the time ratio (baseline / ours, same process, alternating runs after a small warm-up call each, median),
the peak-memory ratio (CPU: extra peak RSS of a fresh process running each method once after the warm-up, so
neither the input nor a compiler is counted; CUDA: peak allocated above the inputs), and whether the picks are
identical to the baseline's and to a float64 brute-force reference. On CPU it also replays the fused kernel's
row-skipping rule on the same picks: the share of rows it reads in full, which sets its memory traffic on a GPU
(the CPU's compiled loop skips by the same rule). On CUDA it times a K-center ViT-B training step at the same
batch (bf16 autocast, AdamW) for the sampler's share of a step.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.kcenter import _kcenter_batched, kcenter_sample, patch_coordinates, patchify  # noqa: E402
from models.kcenter_bound import lower_bound_summary  # noqa: E402
from models.kcenter_triton import count_full_rows, kcenter_sample_triton  # noqa: E402

FRAMES, GRID, PATCH, HYBRID, TOKENS = 32, 14, 16, 3, 1568


def original_kcenter(points: torch.Tensor, k: int, start: torch.Tensor) -> torch.Tensor:
    """The original code's method: N x N cdist per clip, then k steps over its rows."""
    B, N, _ = points.shape
    cdist = torch.cdist(points, points)  # (B, N, N)
    cdist.diagonal(dim1=1, dim2=2)[:] = -1.0
    distance = torch.full((B, N), 5e4, device=points.device)
    rows = torch.arange(B, device=points.device)
    farthest, picks = start, [start]
    for _ in range(1, k):
        distance = torch.minimum(cdist[rows, farthest], distance)
        farthest = distance.argmax(-1)
        picks.append(farthest)
    return torch.stack(picks, -1)


def synthetic_clip_points(batch: int, seed: int) -> torch.Tensor:
    """Points as the model builds them from a video: normalised pixels of the non-hybrid frames + coordinates."""
    return clip_points(synthetic_clips(batch, seed))


def synthetic_clips(batch: int, seed: int) -> torch.Tensor:
    """(B, 3, 32, 224, 224) textured backgrounds with moving squares and sensor noise, pixel values in [-1, 1]
    (mean = std = 0.5, as in the paper's configs)."""
    g = torch.Generator().manual_seed(seed)
    size = GRID * PATCH
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    clips = []
    for _ in range(batch):
        freq = torch.rand(3, generator=g) * 0.1
        frames = []
        for t in range(FRAMES):
            img = torch.stack([torch.sin((x + 3 * t) * f + y * f * 0.5) for f in freq])  # (3, H, W)
            for _square in range(3):
                cx, cy, vx, vy = (torch.rand(4, generator=g) * torch.tensor([size, size, 8, 8])).tolist()
                x0, y0 = int(cx + vx * t) % (size - 40), int(cy + vy * t) % (size - 40)
                img[:, y0:y0 + 40, x0:x0 + 40] = torch.rand(3, 1, 1, generator=g) * 2 - 1
            frames.append(img + 0.05 * torch.randn(img.shape, generator=g))
        clips.append(torch.stack(frames, 1).clamp(-1, 1))  # (3, T, H, W)
    return torch.stack(clips)


def clip_points(clips: torch.Tensor) -> torch.Tensor:
    hybrid = set(torch.linspace(0, FRAMES - 1, HYBRID).long().tolist())
    others = [t for t in range(FRAMES) if t not in hybrid]
    patches = patchify(clips, PATCH)[:, others].flatten(1, 3)  # (B, 5684, 768)
    coords = patch_coordinates(FRAMES, GRID, PATCH, pixel_std=0.5)[others].flatten(0, 2)
    return torch.cat([patches, coords.expand(len(clips), -1, -1)], -1)  # (B, 5684, 771)


def make_inputs(kind: str, batch: int, seed: int = 0):
    points = synthetic_clip_points(batch, seed) if kind == "video" else \
        torch.randn(batch, (FRAMES - HYBRID) * GRID * GRID, PATCH * PATCH * 3 + 3,
                    generator=torch.Generator().manual_seed(seed))
    start = torch.randint(points.shape[1], (batch,), generator=torch.Generator().manual_seed(seed + 1))
    return points, start


def reference64(points: torch.Tensor, k: int, start: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 brute force; with `groups`, a pick removes every point of its group."""
    out = []
    for x, s in zip(points.double(), start.tolist()):
        min_dist, picks = torch.full((x.shape[0],), math.inf, dtype=torch.float64), [s]
        for _ in range(1, k):
            min_dist = torch.minimum(min_dist, ((x - x[picks[-1]]) ** 2).sum(-1))
            min_dist[picks if groups is None else torch.isin(groups, groups[picks])] = -1.0
            picks.append(int(min_dist.argmax()))
        out.append(picks)
    return torch.tensor(out)


METHODS = {"original": original_kcenter, "ours": kcenter_sample}
CUDA_METHODS = {"original": original_kcenter, "torch loop": _kcenter_batched, "triton": kcenter_sample_triton}
K = TOKENS - HYBRID * GRID * GRID


def peak_extra_mb(method: str, kind: str, batch: int) -> float:
    """Run one method once in a fresh process; its peak RSS minus the RSS once the inputs exist."""
    out = subprocess.run([sys.executable, __file__, "--child", method, "--inputs", kind, "--batch", str(batch)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def warm_up(method: str) -> None:
    """One tiny call first: Numba compiles (or loads its cache), libraries load; none of it is the method's cost."""
    METHODS[method](torch.randn(2, 64, 8), 4, torch.tensor([0, 1]))


def child(method: str, kind: str, batch: int) -> None:
    points, start = make_inputs(kind, batch)
    warm_up(method)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS: only the method's own memory counts
    before = _vm_hwm_kb()
    METHODS[method](points, K, start)
    print((_vm_hwm_kb() - before) / 1024)


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def cuda_time_and_memory(fn, *args, repeats: int) -> tuple[float, float, torch.Tensor]:
    """Median seconds over `repeats` runs after a warm-up, and the peak MB allocated above what was allocated
    before (the inputs)."""
    out = fn(*args)  # warm-up: Triton compiles, cuBLAS picks its kernels
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20, out


def vit_b_step_seconds(batch: int, repeats: int) -> float:
    """One K-center ViT-B/16 training step (32 frames, 1568 tokens, bf16 autocast, AdamW), median seconds."""
    from models.vit import KCenterViT
    model = KCenterViT(num_classes=400).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    clips = torch.randn(batch, 3, FRAMES, GRID * PATCH, GRID * PATCH, device="cuda")
    labels = torch.randint(400, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(clips).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return cuda_time_and_memory(step, repeats=repeats)[0]


def main_cuda(args) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={args.batch}, "
          f"N={(FRAMES - HYBRID) * 196}, D=771, k={K}")
    for kind in (["video", "gaussian"] if args.inputs == "both" else [args.inputs]):
        points, start = make_inputs(kind, args.batch)
        points, start = points.cuda(), start.cuda()
        results = {name: cuda_time_and_memory(fn, points, K, start, repeats=args.repeats)
                   for name, fn in CUDA_METHODS.items()}
        t_orig = results["original"][0]
        ref = reference64(points.cpu(), K, start.cpu())
        for name, (seconds, mb, picks) in results.items():
            same = int((picks.cpu() == ref).all(1).sum())
            print(f"[{kind}] {name:10s} {seconds * 1e3:8.2f} ms ({t_orig / seconds:6.1f}x the original), "
                  f"peak extra memory {mb:8.1f} MB, picks equal to the float64 reference: {same}/{args.batch}")
    step = vit_b_step_seconds(args.batch, args.repeats)
    print(f"K-center ViT-B training step at B={args.batch}: {step * 1e3:.1f} ms (sampler included); the fused "
          f"kernel's share is its time above / this")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inputs", choices=["video", "gaussian", "both"], default="both")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--child", choices=list(METHODS))
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.inputs, args.batch)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA GPU")
        return main_cuda(args)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch}, N={(FRAMES - HYBRID) * 196}, "
          f"D=771, k={K}")
    for kind in (["video", "gaussian"] if args.inputs == "both" else [args.inputs]):
        points, start = make_inputs(kind, args.batch)
        times = {name: [] for name in METHODS}
        picks = {}
        for name in METHODS:
            warm_up(name)
        for _ in range(args.repeats):
            for name, fn in METHODS.items():
                t0 = time.perf_counter()
                picks[name] = fn(points, K, start)
                times[name].append(time.perf_counter() - t0)
        t_orig, t_ours = statistics.median(times["original"]), statistics.median(times["ours"])
        mem = {name: peak_extra_mb(name, kind, args.batch) for name in METHODS}
        ref = reference64(points, K, start)
        same_orig = (picks["ours"] == picks["original"]).all(1)
        print(f"[{kind}] original {t_orig:.3f} s, ours {t_ours:.3f} s -> {t_orig / t_ours:.2f}x faster; "
              f"peak extra memory original {mem['original']:.0f} MB, ours {mem['ours']:.0f} MB -> "
              f"{mem['original'] / max(mem['ours'], 1e-3):.1f}x less")
        print(f"[{kind}] picks identical to the original's: {int(same_orig.sum())}/{args.batch} clips; "
              f"to the float64 reference: ours {int((picks['ours'] == ref).all(1).sum())}/{args.batch}, "
              f"original {int((picks['original'] == ref).all(1).sum())}/{args.batch}")
        rows = count_full_rows(points, picks["ours"]).sum().item() / (args.batch * (K - 1) * points.shape[1])
        print(f"[{kind}] fused CUDA kernel on these picks (replayed): reads {100 * rows:.1f}% of the rows of a "
              f"full scan in full, plus a {lower_bound_summary(points[:1, :1]).shape[-1]}-value summary of every row, "
              f"per pick")


if __name__ == "__main__":
    main()
