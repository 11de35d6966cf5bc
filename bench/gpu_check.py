"""One command that proves a GPU machine: do the GPU paths work, and how fast are they.

    python bench/gpu_check.py [--out DIR] [--quick]

1. Environment: GPU, driver, CUDA, torch, DALI, Triton, PyAV versions, and what is missing. Without CUDA: one line
   and a non-zero exit, nothing else run.
2. Correctness: the GPU-marked tests (`pytest -m gpu`); a training batch of the GPU loader is a CUDA tensor that
   never went through the host (no host-to-device copy of its size in a profiler trace of the step); NVDEC frames
   against PyAV frames of the same indices (max and mean |difference|); the fused K-center kernel's picks against
   the float64 greedy sequence on real clip patches.
3. Speed, in one run: bench/bench_sampler.py --device cuda, bench/bench_pipeline.py --device gpu, and a timed
   K-center ViT-B/16 training run at the paper's shapes (micro-batch 8, bf16, the GPU loader: clips/s, data-wait
   fraction, time split sampler / forward / backward / optimizer, peak memory) against the dense 6272-token model.
4. A Markdown summary (figures, PASS/FAIL per check), printed and written to DIR/gpu_check.md, ready for
   bench/RESULTS.md; the exit status is 1 when a check fails.

It makes its own test videos with PyAV (no ffmpeg binary, no dataset, no network), so it runs where DALI and PyAV
come from wheels on PYTHONPATH (../shared/GPU.md). Under 8 minutes on one H100/H200; --quick under 3.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
PACKAGES = {"torch": "torch", "DALI": "nvidia.dali", "Triton": "triton", "PyAV": "av", "timm": "timm",
            "numpy": "numpy", "numba": "numba"}


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str = ""
    figures: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# 1. Environment


def environment() -> tuple[dict, list[str]]:
    """Versions of what the GPU paths use, and the names of what is missing."""
    info, missing = {"python": sys.version.split()[0]}, []
    for label, module in PACKAGES.items():
        try:
            info[label] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as e:  # ImportError, or a wheel that does not load here
            info[label] = None
            missing.append(f"{label} ({module}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["CUDA (torch build)"] = torch.version.cuda
        info["GPUs"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            info["driver"] = "? (nvidia-smi not found)"
    return info, missing


# ---------------------------------------------------------------------------------------------------------------
# 2. Correctness


def run_check(name: str, fn, *args) -> Check:
    """A check that raises is a FAIL with its error, and the others still run."""
    try:
        return fn(*args)
    except Exception as e:
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return Check(name, FAIL, last[:300])


def check_gpu_tests(quick: bool) -> Check:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return Check("pytest -m gpu", PASS if result.returncode == 0 and counts.get("passed") else FAIL, summary, counts)


def make_videos(work: Path, count: int) -> Path:
    from bench.bench_pipeline import make_videos as make
    return make(work, count)


def data_config(work: Path, **overrides):
    from config import DataConfig
    base = dict(dataset="kinetics", root=str(work), train_list="train.csv", val_list="train.csv",
                test_list="train.csv", num_frames=32, sampling_rate=8, target_fps=30, crop_size=224, device="gpu",
                num_threads=4, py_workers=4)
    return DataConfig(**{**base, **overrides})


def check_loader_on_device(work: Path) -> Check:
    """A training batch is a CUDA tensor, and one step of the loader copies nothing of its size from the host."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipelines import build_loader
    loader = build_loader(data_config(work), "train", batch_size=4, device_id=0, seed=0)
    batches = iter(loader)
    next(batches)  # the pipeline is built and warm
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        batch = next(batches)
        torch.cuda.synchronize()
    trace = work / "loader_trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    host_to_device = sum(int(e.get("args", {}).get("bytes", 0)) for e in events
                         if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""))
    batches.close()
    clip_bytes = batch.clips.numel() * batch.clips.element_size()
    figures = {"clip_bytes": clip_bytes, "host_to_device_bytes": host_to_device, "device": str(batch.clips.device)}
    ok = batch.clips.is_cuda and batch.labels.is_cuda and host_to_device < 0.05 * clip_bytes
    return Check("loader: batches stay on the GPU", PASS if ok else FAIL,
                 f"clips on {batch.clips.device}, {host_to_device} bytes host->device in one step "
                 f"(a batch is {clip_bytes})", figures)


def check_nvdec_against_pyav(work: Path, device: str = "gpu") -> Check:
    """Validation clips (short side 256 = the crop: no resize, a centre crop) against PyAV's frames. (`device="cpu"`
    runs the same comparison on the CPU pipeline, which decodes with PyAV itself: a test of this check.)"""
    import av
    import numpy as np

    from pipelines import build_loader, sampling
    cfg = data_config(work, crop_size=256, py_workers=1, device=device)
    loader = build_loader(cfg, "val", batch_size=2, device_id=0 if device == "gpu" else None, seed=0)
    batch = next(iter(loader))
    diffs = []
    for clip, index in zip(batch.clips, batch.index.tolist()):
        video = loader.dataset.videos[index]
        ids = sampling.kinetics_frame_indices(video.num_frames, video.fps, 32, 8, 30, 0.0)
        with av.open(video.path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        expected = np.stack([frames[i] for i in ids]).astype(np.float32)
        x0 = (expected.shape[2] - 256) // 2
        expected = expected[:, :, x0:x0 + 256]
        mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
        ours = clip.permute(1, 2, 3, 0).cpu().numpy() * std + mean
        diffs.append(np.abs(ours - expected))
    diff = np.concatenate([d.ravel() for d in diffs])
    figures = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    return Check("NVDEC frames = PyAV frames", PASS if figures["mean_abs_diff"] < 3 else FAIL,
                 f"mean |diff| {figures['mean_abs_diff']:.2f}, max {figures['max_abs_diff']:.0f} (0..255; chroma "
                 f"upsampling differs: mean under 3 expected)", figures)


def check_kernel_against_reference(work: Path) -> Check:
    """The fused kernel's picks on real clip patches (ViT setting) against the float64 greedy sequence: equal, or a
    pick whose float64 min-distance is within fp32 rounding of the best (a near-tie)."""
    import torch

    from bench.bench_sampler import K, clip_points
    from models.kcenter import kcenter_sample
    from models.kcenter_triton import kcenter_sample_triton
    from pipelines import build_loader
    loader = build_loader(data_config(work, py_workers=1), "val", batch_size=2, device_id=0, seed=0)
    points = clip_points(next(iter(loader)).clips.cpu())  # (B, 5684, 771), as the K-center ViT builds them
    start = torch.tensor([0, 2841])
    fused = kcenter_sample_triton(points.cuda(), K, start.cuda()).cpu()
    cpu = kcenter_sample(points, K, start)  # float64-exact on the CPU
    equal = int((fused == cpu).all(1).sum())
    worst = 0.0
    x = points.double().cpu()
    for b in range(len(x)):  # replay the kernel's picks in float64: how far is each from the best available
        min_dist = torch.full((x.shape[1],), float("inf"), dtype=torch.float64)
        for i in range(1, fused.shape[1]):
            min_dist = torch.minimum(min_dist, ((x[b] - x[b, fused[b, i - 1]]) ** 2).sum(-1))
            min_dist[fused[b, :i]] = -1
            best = float(min_dist.max())
            worst = max(worst, (best - float(min_dist[fused[b, i]])) / best)
    figures = {"clips_equal": equal, "clips": len(x), "worst_relative_gap": worst}
    return Check("fused kernel = float64 greedy", PASS if worst <= 1e-5 else FAIL,
                 f"{equal}/{len(x)} clips identical to the float64 sequence; worst gap of a pick {worst:.1e}", figures)


# ---------------------------------------------------------------------------------------------------------------
# 3. Speed


def run_bench(name: str, args: list[str], timeout: int) -> Check:
    """A benchmark script's own table, kept as it printed it."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return Check(name, PASS if result.returncode == 0 else FAIL,
                 "\n".join(lines[-14:]) if result.returncode == 0 else result.stderr.strip()[-500:],
                 {"command": "python " + " ".join(args)})


def training_speed(work: Path, dense: bool, seconds: float, warm_steps: int = 3) -> dict:
    """Micro-batches of 8 through a ViT-B/16 (K-center 1568 tokens, or dense 6272), bf16, AdamW, the GPU loader;
    the GPU phases timed with CUDA events, waiting for data on the host clock. The first steps (compilation,
    allocator) are not counted."""
    import torch
    import torch.nn.functional as F

    from models import KCenterViT
    from pipelines import build_loader
    tokens = dict(num_tokens=6272, num_hybrid_frames=32) if dense else dict(num_tokens=1568, num_hybrid_frames=3)
    model = KCenterViT(num_classes=4, **tokens).cuda()
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    loader = build_loader(data_config(work), "train", batch_size=8, device_id=0, seed=0)

    def forever():
        while True:
            yield from loader

    batches = forever()
    timing = dict.fromkeys(("wait", "sampler", "forward", "backward", "optimizer"), 0.0)
    clips, steps, start = 0, 0, None
    while start is None or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            selected = model.select_tokens(batch.clips, seeds=batch.index)
            events[1].record()
            logits = model.forward_tokens(selected[0].to(torch.bfloat16), *selected[1:])
            loss = F.cross_entropy(logits.float(), batch.labels)
        events[2].record()
        loss.backward()
        events[3].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        steps += 1
        if steps == warm_steps:
            start = time.perf_counter()
            torch.cuda.reset_peak_memory_stats()
            continue
        if start is None:
            continue
        gpu = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(3)]
        timing["wait"] += t1 - t0
        timing["sampler"], timing["forward"], timing["backward"] = (
            timing["sampler"] + gpu[0], timing["forward"] + gpu[1], timing["backward"] + gpu[2])
        timing["optimizer"] += max(0.0, (t2 - t1) - sum(gpu))
        clips += len(batch.labels)
    batches.close()
    elapsed = time.perf_counter() - start
    return {"clips_per_s": clips / elapsed, "data_wait_fraction": timing["wait"] / elapsed,
            "share": {k: v / elapsed for k, v in timing.items()},
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30, "steps": steps}


def check_training(work: Path, seconds: float) -> Check:
    kcenter = training_speed(work, dense=False, seconds=seconds)
    dense = training_speed(work, dense=True, seconds=seconds)
    detail = (f"K-center {kcenter['clips_per_s']:.1f} clips/s, dense {dense['clips_per_s']:.1f} clips/s "
              f"({kcenter['clips_per_s'] / max(dense['clips_per_s'], 1e-9):.2f}x); K-center step: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in kcenter["share"].items())
              + f"; peak memory {kcenter['peak_memory_gb']:.1f} GB (dense {dense['peak_memory_gb']:.1f} GB)")
    return Check("ViT-B/16 training, micro-batch 8, bf16", PASS, detail, {"kcenter": kcenter, "dense": dense})


# ---------------------------------------------------------------------------------------------------------------
# 4. Summary


def render_summary(env: dict, missing: list[str], checks: list[Check], command: str) -> str:
    """Markdown: environment, then one row per check (PASS/FAIL and its figures), ready for bench/RESULTS.md."""
    lines = ["## GPU check", "", f"    {command}", ""]
    lines += [f"- {key}: {', '.join(value) if isinstance(value, list) else value}" for key, value in env.items()]
    if missing:
        lines.append(f"- missing: {'; '.join(missing)}")
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    for check in checks:
        first = check.detail.splitlines()[0] if check.detail else ""
        lines.append(f"| {check.name} | {check.status} | {first.replace('|', '/')} |")
    for check in checks:  # the benchmark tables as printed
        if "\n" in check.detail:
            lines += ["", f"### {check.name}", "", check.detail]
    failed = [c.name for c in checks if c.status == FAIL]
    lines += ["", f"{len(checks) - len(failed)} of {len(checks)} checks passed"
              + (f"; failed: {', '.join(failed)}" if failed else "")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.md and .json")
    parser.add_argument("--quick", action="store_true", help="shorter timings (under 3 minutes)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder: {args.out} is a file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env, missing = environment()
    if not env.get("GPUs"):
        print(f"gpu_check: no CUDA GPU on this machine (torch {env.get('torch')}); nothing was run")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = make_videos(args.out / "videos", 8 if args.quick else 16)
    seconds = 15 if args.quick else 60
    checks = [run_check("pytest -m gpu", check_gpu_tests, args.quick),
              run_check("loader: batches stay on the GPU", check_loader_on_device, work),
              run_check("NVDEC frames = PyAV frames", check_nvdec_against_pyav, work),
              run_check("fused kernel = float64 greedy", check_kernel_against_reference, work),
              run_check("sampler speed", run_bench, "sampler speed",
                        ["bench/bench_sampler.py", "--device", "cuda", "--repeats", "1" if args.quick else "3"], 600),
              run_check("pipeline speed", run_bench, "pipeline speed",
                        ["bench/bench_pipeline.py", "--device", "gpu", "--work", str(args.out / "pipeline"),
                         "--videos", "8" if args.quick else "16", "--rounds", "1" if args.quick else "3",
                         "--workers", "4", "--threads", "4", "--batch-size", "8"], 900),
              run_check("ViT-B/16 training, micro-batch 8, bf16", check_training, work, seconds)]
    summary = render_summary(env, missing, checks, "python bench/gpu_check.py" + (" --quick" if args.quick else ""))
    print(summary)
    (args.out / "gpu_check.md").write_text(summary)
    (args.out / "gpu_check.json").write_text(json.dumps({"environment": env, "missing": missing,
                                                         "checks": [asdict(c) for c in checks]}, indent=2))
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
