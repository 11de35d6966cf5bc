"""Classify videos as they come, with a checkpoint of this project and the multi-view protocol of eval.py.

    python predict.py --checkpoint runs/k400/last.pt clip.mp4 more_clips/ [--json out.json] [--save-patches DIR]
        [--budget N]

Any container, codec, size or frame rate PyAV (FFmpeg) reads; no preprocessing, nothing written next to the inputs.
The checkpoint brings its own config (clip protocol, views, ensemble) and class names, so no annotation file is
needed. Each video gets `eval.num_clips` temporal clips x `eval.num_crops` crops (Kinetics-trained checkpoints;
one clip of uniform segments for SSv2), resized so the short side is the crop size, combined by the model family's
ensemble; printed as a top-5 table. `--weights ema` classifies with the moving average of the weights (a run with
train.model_ema; the default is the checkpoint's eval.weights: `model`, the trained weights, unless its run set it).
`--budget N` runs the model on N tokens instead of the model.num_tokens it was trained with (cheaper or more thorough;
which N a family takes: README, "Token budgets at test time"); the JSON records the budget used. A video that
cannot be read is reported by name, the others are still classified, and the exit status is 1 at the end.

Probabilities are the softmax of the combined view scores: of the mean logit (sum_logits), the mean of the views'
softmax (mean_softmax) or of the largest logit (max); they rank the classes as the ensemble does.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import config_from_dict
from eval import aggregate_views
from models import build_model
from pipelines import sampling
from pipelines.decode import decode_frames, probe_video
from preprocess.common import find_videos
from runtime import load_model_weights, read_checkpoint, view_seeds, write_atomic
from vis import draw_sampled_patches, save_png

log = logging.getLogger("kcenter")


def video_paths(inputs: list[str]) -> list[str]:
    """Files as given; folders searched recursively for video files (sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = find_videos(Path(item))
            if not found:
                log.warning("no video files under %s", item)
            paths += [os.path.join(item, name) for name in found]
        else:
            paths.append(item)
    return paths


def frame_indices(cfg, num_frames: int, fps: float) -> np.ndarray:
    """(clips * T,) frame indices, clip-major, as eval.py's test views take them."""
    return sampling.clip_frame_indices("test", cfg.data.dataset == "ssv2", num_frames, fps, cfg.data.num_frames,
                                       cfg.data.sampling_rate, cfg.data.target_fps, cfg.eval.num_clips)


def test_views(frames: np.ndarray, cfg, device: torch.device) -> torch.Tensor:
    """(clips*T, H, W, 3) uint8 -> (V, C, T, S, S) normalised views, those of eval.py's test graph: short side
    resized to S (bilinear, no antialiasing, as the pipelines), crops at the start, centre and end of the long side
    (or the centre), both as sampling.view_geometry places them."""
    size, T = cfg.data.crop_size, cfg.data.num_frames
    clip = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    resized, offsets = sampling.view_geometry(*clip.shape[-2:], size, cfg.eval.num_crops)
    clip = F.interpolate(clip, size=resized, mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1) * 255
    views = []
    for c in range(len(frames) // T):
        for y, x in offsets:
            crop = (clip[c * T:(c + 1) * T, :, y:y + size, x:x + size] - mean) / std  # (T, 3, S, S)
            views.append(crop.permute(1, 0, 2, 3))
    return torch.stack(views)  # clip-major, like the test pipeline


def combine(logits: torch.Tensor, ensemble: str) -> torch.Tensor:
    """(V, K) view logits -> (K,) class probabilities, ranked as eval.py's `aggregate_views` ranks them."""
    scores = aggregate_views(logits[None], ensemble)[0]
    if ensemble == "mean_softmax":
        return scores
    return (scores / len(logits) if ensemble == "sum_logits" else scores).softmax(-1)  # the mean logit, or the max


@torch.no_grad()
def predict_video(model, cfg, path: str, device: torch.device, ensemble: str, num_tokens: int | None = None):
    """(probabilities (K,), views, seeds) of one video on `num_tokens` tokens (None: the model's); raises with the
    reason when it cannot be read."""
    info = probe_video(path)
    frames = decode_frames(path, frame_indices(cfg, info.num_frames, info.fps), info.num_frames)
    views = test_views(frames, cfg, device)
    seeds = view_seeds(cfg.train.seed, torch.zeros(1, dtype=torch.long), len(views))  # as eval.py's for video 0
    return combine(model(views, seeds=seeds, num_tokens=num_tokens).float(), ensemble).cpu(), views, seeds


def print_table(path: str, probs: torch.Tensor, class_names: list[str], top: int = 5) -> list[dict]:
    values, classes = probs.topk(min(top, len(probs)))
    rows = [{"class": class_names[c], "index": int(c), "probability": float(v)} for v, c in zip(values, classes)]
    width = max(len(r["class"]) for r in rows)
    tqdm.write(f"\n{path}")
    for rank, row in enumerate(rows, 1):
        tqdm.write(f"  {rank}. {row['class']:<{width}}  {100 * row['probability']:6.2f}%")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (last.pt, best.pt)")
    parser.add_argument("videos", nargs="+", help="video files or folders of them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument("--json", metavar="FILE", help="write the top-5 of every video (and the failures) here")
    parser.add_argument("--save-patches", metavar="DIR", help="a PNG of the patches K-center keeps, per video")
    parser.add_argument("--top", type=int, default=5, help="classes listed per video (default 5)")
    parser.add_argument("--budget", type=int, metavar="N", help="tokens per view (default: the model.num_tokens the "
                        "checkpoint was trained with); see README, Token budgets at test time")
    parser.add_argument("--weights", choices=("model", "ema"), help="the trained weights or their moving average "
                        "(train.model_ema); default: the checkpoint's eval.weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    ckpt = read_checkpoint(args.checkpoint)
    cfg = config_from_dict(ckpt["config"], source=args.checkpoint)
    class_names = ckpt.get("class_names")
    if not class_names:
        sys.exit(f"error: {args.checkpoint} holds no class names (written before they were stored); test it with "
                 f"eval.py and the run's config instead")
    device = torch.device(args.device)
    model = build_model(cfg.model, pixel_std=float(np.mean(cfg.data.std)), load_pretrained=False)
    try:
        load_model_weights(model, ckpt, args.checkpoint, args.weights or cfg.eval.weights)
    except ValueError as e:  # no EMA in the checkpoint, or weights that do not fit: the reason, not a traceback
        sys.exit(f"error: {e}")
    budget = cfg.model.num_tokens if args.budget is None else args.budget
    try:
        model.check_budget(budget)
    except ValueError as e:  # a budget this family cannot run on: the valid ones, not a traceback
        sys.exit(f"error: --budget: {e}")
    model.to(device).eval()
    ensemble = cfg.eval.ensemble or model.test_ensemble

    paths = video_paths(args.videos)
    results, failed = {}, {}
    for path in tqdm(paths, desc="predict", unit="video", disable=len(paths) < 2):
        try:
            probs, views, seeds = predict_video(model, cfg, path, device, ensemble, budget)
        except Exception as e:  # any unreadable input: named, and the others still classified
            failed[path] = f"{type(e).__name__}: {e}"
            tqdm.write(f"\n{path}\n  cannot be read: {failed[path]}", file=sys.stderr)
            continue
        results[path] = print_table(path, probs, class_names, args.top)
        if args.save_patches:
            centre = len(views) // cfg.eval.num_clips // 2  # the centre crop of the first clip
            _, t_index, s_index = model.select_tokens(views[centre:centre + 1], seeds=seeds[centre:centre + 1],
                                                      num_tokens=budget)
            image = draw_sampled_patches(views[centre], t_index[0], s_index[0], cfg.model.patch_size, cfg.data.mean,
                                         cfg.data.std, model.token_layout(budget).hybrid_frames.tolist())
            save_png(image, os.path.join(args.save_patches, Path(path).stem + ".png"))
    if args.json:
        write_atomic(args.json, json.dumps({"checkpoint": os.path.abspath(args.checkpoint), "ensemble": ensemble,
                                            "views": {"clips": cfg.eval.num_clips, "crops": cfg.eval.num_crops},
                                            "budget": budget,
                                            "predictions": results, "failed": failed}, indent=2))
    if failed:
        print(f"{len(failed)} of {len(paths)} videos could not be read: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or not paths else 0


if __name__ == "__main__":
    sys.exit(main())
