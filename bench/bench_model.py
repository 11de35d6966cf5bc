"""Each K-center family against the same family run dense, at ViT-B size, in one process.

For each family (ViT, TimeSformer, Motionformer) at the paper's setting (32 frames of 224x224, ViT-B/16):
- K-center: 1568 tokens of the 32 x 196 = 6272 patches (hybrid frames as in the K400 configs: ViT 3, TimeSformer 4,
  Motionformer 1).
- dense, 32 frames: every one of the 6272 patches (the TimeSformer and Motionformer as 32 groups of 196).
- dense, 8 frames (TimeSformer, Motionformer): 8 whole frames, their usual input; as many tokens as K-center, a
  quarter of the frames.

GFLOPs per view are counted by `models/flops.py` (`torch.utils.flop_counter` on meta tensors, attention included) for
the transformer, plus the K-center sampler's distance products (its PyTorch loop, `_kcenter_batched`). Forward
clips/s is measured on real tensors (sampler included, inference mode), alternating the variants of a family, median
of `--repeats`.

    python bench/bench_model.py                      # CPU, batch 1
    python bench/bench_model.py --device cuda --batch 8 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import KCenterMotionformer, KCenterTimeSformer, KCenterViT  # noqa: E402
from models.flops import view_gflops  # noqa: E402

VIT_B = dict(num_classes=400, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
             drop_path_rate=0.0)
FAMILIES = {  # name: (class, hybrid frames of its K400 config)
    "vit": (KCenterViT, 3), "timesformer": (KCenterTimeSformer, 4), "motionformer": (KCenterMotionformer, 1)}


def variants(family: str) -> dict[str, dict]:
    cls, hybrid = FAMILIES[family]
    out = {"k-center 1568": dict(num_frames=32, num_tokens=1568, num_hybrid_frames=hybrid, num_segments=8),
           "dense 32 frames": dict(num_frames=32, num_tokens=6272, num_hybrid_frames=32, num_segments=32)}
    if cls.segmented:
        out["dense 8 frames"] = dict(num_frames=8, num_tokens=1568, num_hybrid_frames=8, num_segments=8)
    return out


def clips_per_second(models: dict, clips: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in models}
    for round_ in range(repeats + 1):  # round 0 warms up (compilation, allocator), not timed
        for name, model in models.items():
            if clips[name].is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                model(clips[name], seeds=torch.arange(len(clips[name])))
            if clips[name].is_cuda:
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: len(clips[name]) / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    device = torch.device(args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    print(f"ViT-B/16, 32 frames of 224x224, batch {args.batch}, device {args.device}"
          f"{' (bf16 autocast)' if amp else f', {torch.get_num_threads()} threads, fp32'}, median of {args.repeats}")
    print("| family | input | tokens | GFLOPs / view | forward clips/s | vs K-center (clips/s) |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for family in args.families:
        cls = FAMILIES[family][0]
        settings = variants(family)
        models = {name: cls(**VIT_B, **s).to(device).eval() for name, s in settings.items()}
        clips = {name: torch.rand(args.batch, 3, s["num_frames"], 224, 224, device=device) * 2 - 1
                 for name, s in settings.items()}
        if amp:
            with amp:
                speed = clips_per_second(models, clips, args.repeats)
        else:
            speed = clips_per_second(models, clips, args.repeats)
        for name, s in settings.items():
            print(f"| {family} | {name} | {s['num_tokens']} | {view_gflops(models[name]):.0f} | {speed[name]:.2f} | "
                  f"{speed[name] / speed['k-center 1568']:.2f}x |", flush=True)
        del models, clips


if __name__ == "__main__":
    main()
