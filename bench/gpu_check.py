"""Prove a GPU machine: do the GPU paths work, and how fast are they.

    python bench/gpu_check.py [--out DIR] [--quick]      # every check, in the order of SEQUENCE
    python bench/gpu_check.py --call K --out $OUT          # the checks of call K of the carried sequence
    python bench/gpu_check.py --checks kernel,sampler      # chosen checks
    python bench/gpu_check.py --preflight                  # no GPU needed: would the checks run here?

The checks (STEPS below; bench/gpu/README.md has the sequence of calls and its time budget):
- torch and Triton only: the fused K-center kernel's picks against the float64 greedy sequence on real clip
  patches; sampler speed against the original's approach (bench/bench_sampler.py); a training step of each family,
  K-center against dense, ViT-B/16, micro-batch 8, bf16 (clips/s, time split sampler / forward / backward /
  optimizer, peak memory); the cost of `train.deterministic` and whether two runs are bit-identical; an empty
  batch through the trainer (and through the model, for the record).
- DALI: `pytest -m gpu`; a training batch never touches the host; NVDEC frames against PyAV's; nvJPEG frames
  against PIL's; the GPU loader's clips/s and data-wait fraction in a real `train.py` run; the pipeline against
  its peers (bench/bench_pipeline.py; peers that are not installed are left out).

Every check runs inside its own guard: a crash is a FAIL with the last lines of its error, and the others still run.
After each check the summary (DIR/gpu_check.md, DIR/gpu_check.json) is rewritten, so a run cut short still leaves
what it measured. Test videos are made with PyAV (no ffmpeg binary, no dataset, no network).

`--preflight` checks, without a GPU, what each check needs: every module imports, every GPU-marked test is collected,
every GPU pipeline builds and serialises, the fused kernel compiles for sm_90 (registers, blocks per SM), PyAV
encodes the test videos, the carried shared libraries resolve; its last line is `preflight: ready` or what is
missing. bench/gpu/replica.sh runs it in a replica of the GPU test machine's Python environment.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
PACKAGES = {"torch": "torch", "DALI": "nvidia.dali", "Triton": "triton", "PyAV": "av", "timm": "timm",
            "numpy": "numpy", "numba": "numba", "ffmpeg-python": "ffmpeg"}
VIDEOS = 16  # test videos of 10 s (8 with --quick)


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Context:
    out: Path
    work: Path  # test videos and frame folders, kept between calls while the machine stays up
    quick: bool = False

    def videos(self) -> Path:
        from bench.videos import make_videos
        return make_videos(self.work / "videos", 8 if self.quick else VIDEOS)


@dataclass
class Step:
    name: str  # for --checks
    title: str
    run: Callable[[Context], Check]
    modules: tuple[str, ...]  # what it imports: third-party and this project's
    estimate_s: int  # expected seconds on one H200 (bench/gpu/README.md adds them up)


# ---------------------------------------------------------------------------------------------------------------
# Environment


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


def missing_modules(modules) -> list[str]:
    """Those of `modules` that do not import here, each with its error."""
    out = []
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as e:  # noqa: BLE001 - an extension that aborts its import is missing too
            out.append(f"{module} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return out


def run_check(name: str, fn, *args) -> Check:
    """A check that raises is a FAIL with the last lines of its error, and the others still run."""
    start = time.perf_counter()
    try:
        check = fn(*args)
    except BaseException as e:  # noqa: BLE001 - SystemExit from a script's main, a CUDA error, ... all are a FAIL
        if isinstance(e, KeyboardInterrupt):
            raise
        lines = traceback.format_exception(type(e), e, e.__traceback__)
        tail = "".join(lines[-3:]).strip().splitlines()
        check = Check(name, FAIL, " / ".join(line.strip() for line in tail[-4:])[:600])
    check.seconds = round(time.perf_counter() - start, 1)
    return check


# ---------------------------------------------------------------------------------------------------------------
# Checks that need torch and Triton (and PyAV for real clips)


def real_clips(ctx: Context, count: int, device: str = "cuda"):
    """(count, 3, 32, 224, 224) validation views of the test videos, decoded with PyAV and cropped in torch:
    frames 0, 8, ..., 248, short side resized to 224, centre crop, normalised with mean = std = 0.5."""
    import av
    import numpy as np
    import torch
    import torch.nn.functional as F
    paths = sorted((ctx.videos() / "train").glob("*.mp4"))[:count]
    clips = []
    for path in paths:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i < 256]
        x = torch.from_numpy(np.stack(frames[0:256:8])).to(device).permute(0, 3, 1, 2).float() / 255  # (T, C, H, W)
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(224, int(w * 224 / h)), mode="bilinear", antialias=True, align_corners=False)
        x0 = (x.shape[-1] - 224) // 2
        clips.append(((x[..., x0:x0 + 224] - 0.5) / 0.5).permute(1, 0, 2, 3))  # (C, T, S, S)
    return torch.stack(clips)


def check_kernel(ctx: Context) -> Check:
    """The fused kernel's picks on real clip patches (ViT setting) against the float64 greedy sequence: equal, or a
    pick whose float64 min-distance is within fp32 rounding of the best (a near-tie)."""
    import torch

    from bench.bench_sampler import K, clip_points
    from models.kcenter import kcenter_sample
    from models.kcenter_triton import kcenter_sample_triton
    points = clip_points(real_clips(ctx, 2, "cpu"))  # (B, 5684, 771), as the K-center ViT builds them
    start = torch.tensor([0, 2841])
    fused = kcenter_sample_triton(points.cuda(), K, start.cuda()).cpu()
    cpu = kcenter_sample(points, K, start)  # float64-exact on the CPU
    equal = int((fused == cpu).all(1).sum())
    worst = 0.0
    x = points.double()
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


def run_bench(name: str, args: list[str], timeout: int) -> Check:
    """A benchmark script's own table, kept as it printed it."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return Check(name, PASS if result.returncode == 0 else FAIL,
                 "\n".join(lines[-16:]) if result.returncode == 0 else result.stderr.strip()[-600:],
                 {"command": "python " + " ".join(args)})


def check_sampler(ctx: Context) -> Check:
    return run_bench("sampler speed", ["bench/bench_sampler.py", "--device", "cuda", "--repeats",
                                       "1" if ctx.quick else "2"], 300)


def step_speed(model, clips, labels, seconds: float, warm_steps: int = 3) -> dict:
    """Training steps (bf16 autocast, AdamW) on clips already on the GPU; phases timed with CUDA events. The first
    steps (compilation, allocator) are not counted."""
    import torch
    import torch.nn.functional as F
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    seeds = torch.arange(len(clips), device=clips.device)
    timing = dict.fromkeys(("sampler", "forward", "backward", "optimizer"), 0.0)
    steps, start = 0, None
    while start is None or time.perf_counter() - start < seconds:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            selected = model.select_tokens(clips, seeds=seeds + steps)
            events[1].record()
            logits = model.forward_tokens(selected[0].to(torch.bfloat16), *selected[1:])
            loss = F.cross_entropy(logits.float(), labels)
        events[2].record()
        loss.backward()
        events[3].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events[4].record()
        torch.cuda.synchronize()
        steps += 1
        if steps == warm_steps:
            start = time.perf_counter()
            torch.cuda.reset_peak_memory_stats()
        elif start is not None:
            for key, (a, b) in zip(timing, zip(events, events[1:])):
                timing[key] += a.elapsed_time(b) / 1000
    elapsed = time.perf_counter() - start
    counted = steps - warm_steps
    return {"clips_per_s": round(counted * len(clips) / elapsed, 2), "steps": counted,
            "share": {k: round(v / elapsed, 3) for k, v in timing.items()},
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}


def family_speeds(ctx: Context, family: str, seconds: float) -> Check:
    """A family's K-center model against the same family dense (bench/bench_model.py's variants), micro-batch 8."""
    import torch

    from bench.bench_model import FAMILIES, VIT_B, variants
    clips32 = real_clips(ctx, 8)
    labels = torch.arange(8, device="cuda") % 4
    results = {}
    for name, settings in variants(family).items():
        torch.manual_seed(0)
        model = FAMILIES[family][0](**{**VIT_B, "num_classes": 4}, **settings).cuda()
        clips = clips32 if settings["num_frames"] == 32 else clips32[:, :, 2::4].contiguous()
        results[name] = step_speed(model, clips, labels, seconds)
        del model
        torch.cuda.empty_cache()
    base = results["k-center 1568"]
    detail = "; ".join(f"{name}: {r['clips_per_s']} clips/s ({r['clips_per_s'] / base['clips_per_s']:.2f}x), "
                       f"peak {r['peak_memory_gb']} GB" for name, r in results.items())
    detail += "; K-center step: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in base["share"].items())
    return Check(f"{family} training step, micro-batch 8, bf16", PASS, detail, results)


def check_train_vit(ctx: Context) -> Check:
    return family_speeds(ctx, "vit", 4 if ctx.quick else 10)


def check_train_timesformer(ctx: Context) -> Check:
    return family_speeds(ctx, "timesformer", 3 if ctx.quick else 6)


def check_train_motionformer(ctx: Context) -> Check:
    return family_speeds(ctx, "motionformer", 3 if ctx.quick else 6)


def weights_after(steps: int, deterministic: bool, clips, labels) -> tuple[dict, float]:
    """A K-center ViT-B/16 trained `steps` steps from seed 0 (drop path on): its weights and seconds per step."""
    import torch
    import torch.nn.functional as F

    from models import KCenterViT
    from runtime import configure_determinism
    torch.use_deterministic_algorithms(False)
    configure_determinism(deterministic, torch.device("cuda"))
    torch.manual_seed(0)
    torch.cuda.manual_seed(0)
    model = KCenterViT(num_classes=4, drop_path_rate=0.1).cuda()
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    seeds = torch.arange(len(clips), device="cuda")
    for step in range(steps + 1):
        if step == 1:  # the first step compiles; not timed
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(clips, seeds=seeds + step).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    torch.use_deterministic_algorithms(False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, per_step


def check_deterministic(ctx: Context) -> Check:
    """`train.deterministic`: its cost per step, and whether two runs end bit-identical with and without it."""
    import torch
    clips, labels = real_clips(ctx, 8), torch.arange(8, device="cuda") % 4
    steps = 3 if ctx.quick else 6
    runs = {flag: [weights_after(steps, flag, clips, labels) for _ in range(2)] for flag in (False, True)}
    same = {flag: all(torch.equal(a, b) for a, b in zip(r[0][0].values(), r[1][0].values()))
            for flag, r in runs.items()}
    cost = min(t for _, t in runs[True]) / min(t for _, t in runs[False])
    figures = {"step_s": {str(f): [round(t, 4) for _, t in r] for f, r in runs.items()}, "cost": round(cost, 3),
               "bit_identical": {str(f): s for f, s in same.items()}}
    return Check("train.deterministic on CUDA", PASS if same[True] else FAIL,
                 f"two runs of {steps} steps bit-identical with the flag: {same[True]}, without: {same[False]}; "
                 f"a step costs {cost:.2f}x with it", figures)


def check_empty_batch(ctx: Context) -> Check:
    """A batch of 0 clips: the trainer's step (never through the model), and the model itself, for the record."""
    import torch
    import torch.nn.functional as F

    from models import KCenterViT
    from runtime import empty_batch_loss
    model = KCenterViT(num_classes=4).cuda()
    empty = torch.zeros(0, 3, 32, 224, 224, device="cuda")
    labels = torch.zeros(0, dtype=torch.long, device="cuda")
    loss = empty_batch_loss(model)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    trainer_ok = all(g is not None and not g.any() for g in grads) and float(loss) == 0.0
    model.zero_grad(set_to_none=True)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            F.cross_entropy(model(empty, seeds=labels).float(), labels, reduction="sum").backward()
        model_note = "the model itself also takes 0 clips here"
    except Exception as e:  # noqa: BLE001 - recorded: this is why the trainer keeps such a step from the model
        model_note = f"the model itself refuses 0 clips here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return Check("empty batch", PASS if trainer_ok else FAIL,
                 f"trainer step on 0 clips: loss 0, {len(grads)} zero gradients: {trainer_ok}; {model_note}",
                 {"trainer_ok": trainer_ok, "model": model_note})


# ---------------------------------------------------------------------------------------------------------------
# Checks that need DALI


def data_config(root: Path, **overrides):
    from config import DataConfig
    base = dict(dataset="kinetics", root=str(root), train_list="train.csv", val_list="train.csv",
                test_list="train.csv", num_frames=32, sampling_rate=8, target_fps=30, crop_size=224, device="gpu",
                num_threads=4, py_workers=4)
    return DataConfig(**{**base, **overrides})


def check_gpu_tests(ctx: Context) -> Check:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                            cwd=REPO, capture_output=True, text=True, timeout=420)
    lines = result.stdout.strip().splitlines() or [""]
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1])}
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    ok = result.returncode == 0 and counts.get("passed", 0) > 0
    return Check("pytest -m gpu", PASS if ok else FAIL, "\n".join([lines[-1], *failures[:10]]), counts)


def check_loader_on_device(ctx: Context) -> Check:
    """A training batch is a CUDA tensor, and one step of the loader copies nothing of its size from the host."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipelines import build_loader
    loader = build_loader(data_config(ctx.videos()), "train", batch_size=4, device_id=0, seed=0)
    batches = iter(loader)
    next(batches)  # the pipeline is built and warm
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        batch = next(batches)
        torch.cuda.synchronize()
    trace = ctx.work / "loader_trace.json"
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


def compare_with_pyav(root: Path, device: str = "gpu") -> Check:
    """Validation clips (short side 256 = the crop: no resize, a centre crop) against PyAV's frames. (`device="cpu"`
    runs the same comparison on the CPU pipeline, which decodes with PyAV itself: a test of this check.)"""
    import av
    import numpy as np

    from pipelines import build_loader, sampling
    cfg = data_config(root, crop_size=256, py_workers=1, device=device)
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


def check_nvdec(ctx: Context) -> Check:
    return compare_with_pyav(ctx.videos())


def make_frame_folders(root: Path, count: int = 4, frames: int = 24, size: int = 224) -> Path:
    """SSv2-style frame folders (<id>/<id>_000000.jpeg), frame n with red = 8 + 4n, and their label files."""
    import numpy as np
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    items = []
    ramp = np.linspace(16, 240, size).round().astype(np.uint8)
    for v in range(count):
        video_id = str(100 + v)
        folder = root / video_id
        folder.mkdir(exist_ok=True)
        for n in range(frames):
            image = np.empty((size, size, 3), np.uint8)
            image[..., 0], image[..., 1], image[..., 2] = 8 + 4 * n, ramp[None, :], ramp[:, None]
            Image.fromarray(image).save(folder / f"{video_id}_{n:06d}.jpeg", quality=95)
        items.append({"id": video_id, "template": f"Doing thing {v % 2}", "label": f"doing thing {v % 2}",
                      "placeholders": []})
    (root / "something-something-v2-labels.json").write_text(json.dumps({"Doing thing 0": "0", "Doing thing 1": "1"}))
    (root / "train.json").write_text(json.dumps(items))
    return root


def check_nvjpeg(ctx: Context, device: str = "gpu") -> Check:
    """SSv2 validation clips decoded by nvJPEG against the same JPEGs decoded by PIL, at the sampled frames.
    (`device="cpu"`: the same comparison on the CPU pipeline's libjpeg-turbo decoder, a test of this check.)"""
    import numpy as np
    from PIL import Image

    from config import DataConfig
    from pipelines import build_loader, sampling
    root = make_frame_folders(ctx.work / "frames")
    cfg = DataConfig(dataset="ssv2", root=str(root), train_list="train.json", val_list="train.json",
                     test_list="train.json", labels_file="something-something-v2-labels.json", num_frames=16,
                     crop_size=224, random_flip=False, device=device, num_threads=4, py_workers=1)
    loader = build_loader(cfg, "val", batch_size=2, device_id=0 if device == "gpu" else None, seed=0)
    batch = next(iter(loader))
    diffs = []
    for clip, index in zip(batch.clips, batch.index.tolist()):
        video = loader.dataset.videos[index]
        ids = sampling.ssv2_frame_indices(video.num_frames, 16, None)
        expected = np.stack([np.asarray(Image.open(video.frame_path(i)).convert("RGB"))
                             for i in ids]).astype(np.float32)
        mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
        diffs.append(np.abs(clip.permute(1, 2, 3, 0).cpu().numpy() * std + mean - expected))
    diff = np.concatenate([d.ravel() for d in diffs])
    figures = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    return Check("nvJPEG frames = PIL frames", PASS if figures["mean_abs_diff"] < 2 else FAIL,
                 f"mean |diff| {figures['mean_abs_diff']:.2f}, max {figures['max_abs_diff']:.0f} (0..255; IDCTs "
                 f"differ: mean under 2 expected)", figures)


TRAIN_RUN_CONFIG = "configs/kcenter_vit_kinetics.yaml"


def train_run_overrides(root: Path, out: Path, epochs: int) -> list[str]:
    """The K400 ViT recipe on the test videos: from scratch, 4 classes, micro-batch 8, the test list = the train
    list, one crop at test."""
    return [f"data.root={root}", "data.train_list=train.csv", "data.val_list=train.csv", "data.test_list=train.csv",
            "data.allow_missing=false", "model.pretrained=", "model.num_classes=4", f"train.out_dir={out}",
            f"train.epochs={epochs}", "train.batch_size=8", "train.micro_batch_size=8", "eval.num_crops=1"]


def check_train_run(ctx: Context) -> Check:
    """The user's own command: train.py with the K400 ViT recipe on the test videos (ViT-B/16 from scratch,
    micro-batch 8, bf16, the GPU loader), a few epochs; clips/s and data-wait fraction as it logs them."""
    out = ctx.work / "train_run"
    command = [sys.executable, "train.py", "--config", TRAIN_RUN_CONFIG,
               *train_run_overrides(ctx.videos(), out, 2 if ctx.quick else 3)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = (out / "train.log").read_text() if (out / "train.log").exists() else result.stderr
    epochs_seen = re.findall(r"epoch (\d+): loss [\d.na]+, ([\d.]+) clips/s per rank, (\d+)% waiting for data", log)
    figures = {"command": " ".join(["python", *command[1:]]),
               "epochs": [{"epoch": int(e), "clips_per_s": float(c), "data_wait_percent": int(w)}
                          for e, c, w in epochs_seen]}
    if result.returncode != 0 or not epochs_seen:
        return Check("train.py on the GPU loader", FAIL, (result.stderr or log).strip()[-600:], figures)
    last = figures["epochs"][-1]
    return Check("train.py on the GPU loader", PASS,
                 f"{len(epochs_seen)} epochs; last: {last['clips_per_s']} clips/s per GPU, {last['data_wait_percent']}% "
                 f"of the time waiting for data (ViT-B/16 K-center, micro-batch 8, bf16)", figures)


def check_pipeline_speed(ctx: Context) -> Check:
    return run_bench("pipeline speed", ["bench/bench_pipeline.py", "--device", "gpu", "--work", str(ctx.work / "pipeline"),
                                        "--videos", "8", "--rounds", "1",
                                        "--workers", "4", "--threads", "4", "--batch-size", "8"], 300)


TORCH = ("torch", "triton", "models", "models.kcenter_triton", "bench.bench_sampler", "bench.bench_model")
DALI = ("nvidia.dali", "av", "pipelines.loader", "pipelines.graphs", "config")
STEPS = [
    Step("kernel", "fused kernel = float64 greedy", check_kernel, (*TORCH, "av", "bench.videos"), 30),
    Step("sampler", "sampler speed", check_sampler, TORCH, 45),
    Step("train_vit", "vit training step", check_train_vit, (*TORCH, "av", "bench.videos"), 35),
    Step("train_timesformer", "timesformer training step", check_train_timesformer, TORCH, 35),
    Step("train_motionformer", "motionformer training step", check_train_motionformer, TORCH, 35),
    Step("deterministic", "train.deterministic on CUDA", check_deterministic, (*TORCH, "runtime"), 35),
    Step("empty_batch", "empty batch", check_empty_batch, (*TORCH, "runtime"), 10),
    Step("pytest_gpu", "pytest -m gpu", check_gpu_tests, ("pytest", *DALI), 60),
    Step("loader_on_device", "loader: batches stay on the GPU", check_loader_on_device, DALI, 15),
    Step("nvdec", "NVDEC frames = PyAV frames", check_nvdec, DALI, 10),
    Step("nvjpeg", "nvJPEG frames = PIL frames", check_nvjpeg, (*DALI, "PIL"), 10),
    Step("train_run", "train.py on the GPU loader", check_train_run, (*DALI, "train"), 60),
    Step("pipeline_speed", "pipeline speed", check_pipeline_speed, (*DALI, "bench.bench_pipeline"), 40),
]
# One call per carried part (bench/gpu_kit.py): the torch-only checks while the parts arrive, DALI's in the last.
SEQUENCE = {1: ["kernel", "sampler"], 2: ["train_vit", "train_timesformer"],
            3: ["train_motionformer", "deterministic", "empty_batch"],
            4: ["pytest_gpu", "loader_on_device", "nvdec", "nvjpeg", "train_run", "pipeline_speed"]}


def run_steps(steps: list[Step], ctx: Context, env: dict, missing: list[str], command: str) -> list[Check]:
    """Each step in its guard; the summary rewritten after each, so that a run cut short keeps what it got."""
    checks = []
    for step in steps:
        print(f"gpu_check: {step.name} ...", flush=True)
        lacking = missing_modules(step.modules)
        if lacking:
            check = Check(step.title, FAIL, "cannot run: " + "; ".join(lacking))
        else:
            check = run_check(step.title, step.run, ctx)
        checks.append(check)
        print(f"gpu_check: {step.name}: {check.status} in {check.seconds:.0f} s: {check.detail.splitlines()[0][:200]}"
              if check.detail else f"gpu_check: {step.name}: {check.status}", flush=True)
        write_summary(ctx.out, env, missing, checks, command)
    return checks


def write_summary(out: Path, env: dict, missing: list[str], checks: list[Check], command: str) -> str:
    summary = render_summary(env, missing, checks, command)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.md", summary), ("gpu_check.json", json.dumps(
            {"command": command, "environment": env, "missing": missing, "checks": [asdict(c) for c in checks]},
            indent=1))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return summary


def render_summary(env: dict, missing: list[str], checks: list[Check], command: str) -> str:
    """Markdown: environment, then one row per check (PASS/FAIL and its figures), ready for bench/RESULTS.md."""
    lines = ["## GPU check", "", f"    {command}", ""]
    lines += [f"- {key}: {', '.join(value) if isinstance(value, list) else value}" for key, value in env.items()]
    if missing:
        lines.append(f"- missing: {'; '.join(missing)}")
    lines += ["", "| check | result | s | detail |", "|---|---|---|---|"]
    for check in checks:
        first = check.detail.splitlines()[0] if check.detail else ""
        lines.append(f"| {check.name} | {check.status} | {check.seconds:.0f} | {first.replace('|', '/')} |")
    for check in checks:  # the benchmark tables as printed
        if "\n" in check.detail:
            lines += ["", f"### {check.name}", "", check.detail]
    failed = [c.name for c in checks if c.status == FAIL]
    lines += ["", f"{len(checks) - len(failed)} of {len(checks)} checks passed"
              + (f"; failed: {', '.join(failed)}" if failed else "")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Preflight: what the checks need, checked without a GPU


KERNEL_POINTERS = {"x_ptr": "*fp32", "s_ptr": "*fp32", "start_ptr": "*i32", "picks_ptr": "*i64", "min_ptr": "*fp32",
                   "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "arrivals_ptr": "*i32", "rows_ptr": "*i64",
                   "groups_ptr": "*i32"}
DRIVER_LIBRARIES = ("libcuda.so", "libnvcuvid.so", "libnvidia-")  # the GPU machine's driver brings these


def compile_kernel_sm90() -> dict:
    """The fused kernel compiled for sm_90 (H100/H200) by this Triton, no GPU needed: registers and shared memory
    per program (cuobjdump), hence programs resident per SM."""
    import triton
    import triton.backends.nvidia as nvidia_backend
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models.kcenter_bound import SLACK
    from models.kcenter_triton import BLOCK_D, BLOCK_N, _kcenter_kernel as kernel
    constants = dict(R=16, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_P=16, SLACK=SLACK, COUNT_ROWS=False,
                     HAS_GROUPS=True)
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            if param.name not in KERNEL_POINTERS:
                raise KeyError(f"kernel pointer {param.name} has no type in gpu_check.KERNEL_POINTERS")
            signature[param.name] = KERNEL_POINTERS[param.name]
        else:
            signature[param.name] = "i32"
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items() if k in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spilled = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    # H100/H200: 65536 registers per SM, allocated per warp in units of 256 (8 per thread)
    per_block = -(-registers // 8) * 8 * 32 * 4
    return {"triton": triton.__version__, "registers": registers, "local_bytes": spilled,
            "blocks_per_sm": 65536 // per_block, "shared_bytes": compiled.metadata.shared}


def unresolved_libraries(site: Path) -> dict[str, list[str]]:
    """Shared libraries under `site` whose dependencies `ldd` cannot find (the driver's own excepted)."""
    out = {}
    for library in sorted(site.rglob("*.so*")):
        if not library.is_file() or ".so" not in library.name:
            continue
        result = subprocess.run(["ldd", str(library)], capture_output=True, text=True)
        lost = [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]
        lost = [name for name in lost if not name.startswith(DRIVER_LIBRARIES)]
        if lost:
            out[str(library.relative_to(site))] = lost
    return out


def collected_gpu_tests(output: str) -> tuple[int, list[str]]:
    """From `pytest --collect-only -q -m gpu`: the number of GPU tests collected, and the collection errors."""
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", output)
    errors = re.findall(r"^ERROR (\S+)", output, re.MULTILINE)
    return (int(match.group(1)) if match else 0), errors


def preflight_items(ctx: Context) -> list[tuple[str, Callable[[], str]]]:
    """(what, check) pairs: a check returns its figures as text or raises with what is missing."""

    def imports():
        lacking = sorted({m for step in STEPS for m in missing_modules(step.modules)})
        if lacking:
            raise RuntimeError("does not import: " + "; ".join(lacking))
        return f"every module of the {len(STEPS)} checks imports"

    def gpu_tests():
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                                 "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        count, errors = collected_gpu_tests(result.stdout)
        if errors or result.returncode not in (0,) or not count:
            tail = result.stdout.strip().splitlines()[-5:]
            raise RuntimeError(f"{count} GPU tests collected; errors in {errors or tail}")
        return f"{count} GPU-marked tests collected, no collection error"

    def encoders():
        import av
        lacking = [c for c in ("libx264", "libvpx-vp9") if c not in av.codecs_available]
        if lacking:
            raise RuntimeError(f"PyAV {av.__version__} lacks encoders {lacking}")
        from bench.videos import write_video
        path = ctx.work / "preflight.mp4"
        ctx.work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_video(path, 0)
        return f"PyAV {av.__version__} encodes h264 and vp9 (a 10 s test video in {time.perf_counter() - start:.1f} s)"

    def graphs():
        from pipelines import read_dataset
        from pipelines.loader import clip_spec, make_pipeline
        from pipelines.sources import ClipSource
        root = Path(tempfile.mkdtemp(prefix="preflight-", dir=ctx.work))
        from bench.videos import make_videos
        videos = make_videos(root / "videos", 2)
        frames = make_frame_folders(root / "frames", count=2, frames=8, size=64)
        built = []
        for dataset, split in (("kinetics", "train"), ("kinetics", "val"), ("kinetics", "test"), ("ssv2", "train"),
                               ("ssv2", "val"), ("ssv2", "test")):
            if dataset == "kinetics":
                cfg = data_config(videos, color_jitter=True, py_workers=1)
            else:
                from config import DataConfig
                cfg = DataConfig(dataset="ssv2", root=str(frames), train_list="train.json", val_list="train.json",
                                 test_list="train.json", labels_file="something-something-v2-labels.json",
                                 num_frames=8, crop_size=32, train_jitter_scales=(40, 56), random_flip=False,
                                 rand_augment="rand-m9-mstd0.5-inc1", device="gpu", py_workers=1)
            data = read_dataset(cfg, split, show_progress=False)
            spec = clip_spec(cfg, split, data, *((1, 3) if split == "test" else (1, 1)))
            source = ClipSource(data.videos, spec, seed=0, rank=0, world_size=1, batch_size=2)
            graph = make_pipeline(source, batch_size=2, num_threads=2, py_workers=1, device_id=None).serialize()
            if b"mixed" not in graph:
                raise RuntimeError(f"the {dataset} {split} graph has no GPU decoder")
            built.append(f"{dataset} {split}")
        return f"{len(built)} GPU graphs build and serialise ({', '.join(built)})"

    def kernel():
        info = compile_kernel_sm90()
        if info["local_bytes"]:
            raise RuntimeError(f"the kernel spills {info['local_bytes']} bytes per thread on sm_90: {info}")
        return (f"the fused kernel compiles for sm_90 with Triton {info['triton']}: {info['registers']} registers, "
                f"{info['blocks_per_sm']} programs per SM ({132 * info['blocks_per_sm']} at once on an H200)")

    def libraries():
        import nvidia.dali
        site = Path(nvidia.dali.__file__).parents[2]
        lost = unresolved_libraries(site / "nvidia")
        if lost:
            raise RuntimeError(f"unresolved shared libraries under {site}: "
                               + "; ".join(f"{k}: {v}" for k, v in list(lost.items())[:6]))
        return f"every shared library under {site / 'nvidia'} resolves (but the driver's)"

    return [("imports", imports), ("GPU tests", gpu_tests), ("PyAV encoders", encoders), ("GPU graphs", graphs),
            ("fused kernel", kernel), ("shared libraries", libraries)]


def preflight(ctx: Context) -> int:
    problems = []
    for what, item in preflight_items(ctx):
        try:
            print(f"preflight: {what}: {item()}", flush=True)
        except Exception as e:  # noqa: BLE001 - each item says what is missing; the others still run
            problems.append(f"{what}: {type(e).__name__}: {str(e)[:500]}")
            print(f"preflight: {what}: MISSING: {problems[-1]}", flush=True)
    calls = ", ".join(f"call {k}: {'+'.join(v)}" for k, v in SEQUENCE.items())
    print(f"preflight: ready ({len(STEPS)} checks in {len(SEQUENCE)} calls; {calls})" if not problems
          else f"preflight: NOT READY: {' | '.join(problems)}")
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.md and .json")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kcv-gpu" / "work",
                        help="test videos and frames (kept between calls)")
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--call", type=int, choices=sorted(SEQUENCE), help="the checks of call K of the sequence")
    group.add_argument("--checks", type=lambda s: s.split(","), help="comma-separated check names: "
                       + ",".join(s.name for s in STEPS))
    group.add_argument("--preflight", action="store_true", help="no GPU: would the checks run here?")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder: {args.out} is a file")
    unknown = [n for n in args.checks or [] if n not in {s.name for s in STEPS}]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {[s.name for s in STEPS]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = Context(out=args.out, work=args.work, quick=args.quick)
    if args.preflight:
        return preflight(ctx)
    env, missing = environment()
    if not env.get("GPUs"):
        print(f"gpu_check: no CUDA GPU on this machine (torch {env.get('torch')}); nothing was run")
        return 2
    names = SEQUENCE[args.call] if args.call else args.checks or [n for call in SEQUENCE.values() for n in call]
    steps = [next(s for s in STEPS if s.name == name) for name in names]
    command = "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    checks = run_steps(steps, ctx, env, missing, command.strip())
    print(render_summary(env, missing, checks, command.strip()))
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
