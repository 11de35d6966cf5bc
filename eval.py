"""Multi-view testing: N temporal clips x 3 spatial crops per video, softmax scores averaged per video.

    python eval.py --config configs/kcenter_vit_kinetics.yaml --checkpoint runs/k400/best.pt
    torchrun --nproc_per_node=8 eval.py --config ... --checkpoint ... eval.num_clips=4 [--save-patches DIR]

Writes results.json (metrics, config, checkpoint, counts, excluded videos) and predictions.csv (one row per
video) to eval.out_dir (default: train.out_dir). Every video of the test list is scored exactly once across
ranks; a video that cannot be decoded is listed under "excluded", never replaced by another.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import tempfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from config import Config, load_config
from models import build_model
from pipelines import build_loader
from train import autocast_dtype, setup_distributed, setup_logging
from vis import draw_sampled_patches, save_png

log = logging.getLogger("kcenter")


def aggregate_views(probs: torch.Tensor) -> torch.Tensor:
    """(B, V, K) per-view softmax scores -> (B, K) per-video scores (the mean over views)."""
    return probs.mean(dim=1)


def compute_metrics(scores: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Top-1/top-5 (%), per-class top-1 (%) and its mean over the classes present, from (N, K) scores."""
    ranked = np.argsort(-scores, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, :5] == labels[:, None]).any(1)
    per_class = {name: 100.0 * float(top1[labels == c].mean()) for c, name in enumerate(class_names)
                 if (labels == c).any()}
    return {"top1": 100.0 * float(top1.mean()), "top5": 100.0 * float(top5.mean()),
            "mean_class_accuracy": float(np.mean(list(per_class.values()))), "per_class_top1": per_class,
            "videos": int(len(labels))}


@torch.no_grad()
def score_videos(model, loader, device, amp_dtype, rank: int, save_patches: str | None = None, cfg=None):
    """{dataset index: (label, averaged scores)} for this rank's share of the test videos."""
    model.eval()
    results, drawn = {}, 0
    for batch in tqdm(loader, desc="test", disable=rank != 0, dynamic_ncols=True):
        B, V = batch.clips.shape[:2]
        if B == 0:
            continue
        views = batch.clips.flatten(0, 1)  # (B*V, C, T, H, W)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = model(views)
        scores = aggregate_views(logits.float().softmax(-1).view(B, V, -1)).cpu().numpy()
        for i, index in enumerate(batch.index.tolist()):
            results[index] = (int(batch.labels[i]), scores[i])
        if save_patches and drawn < 8:
            drawn += draw_first_views(model, batch, save_patches, cfg, limit=8 - drawn)
    return results


def draw_first_views(model, batch, out_dir: str, cfg: Config, limit: int) -> int:
    """PNG of the sampled patches on the centre crop of each video's first clip."""
    V = batch.clips.shape[1]
    centre = 1 if cfg.eval.num_crops == 3 else 0
    clips = batch.clips[:limit, centre if V > 1 else 0]
    _, t_index, s_index = model.select_tokens(clips)
    for i in range(len(clips)):
        image = draw_sampled_patches(clips[i], t_index[i], s_index[i], cfg.model.patch_size, cfg.data.mean,
                                     cfg.data.std, model.sampler.hybrid_frames.tolist())
        save_png(image, os.path.join(out_dir, f"video{int(batch.index[i]):06d}.png"))
    return len(clips)


def gather_results(results: dict, world: int) -> dict:
    if world == 1:
        return results
    parts = [None] * world
    dist.all_gather_object(parts, results)
    merged = {}
    for part in parts:
        overlap = set(part) & set(merged)
        if overlap:  # the loader drops padding rows; a video scored twice would be a sharding bug
            raise RuntimeError(f"videos scored on two ranks: {sorted(overlap)[:10]}")
        merged.update(part)
    return merged


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir: str, cfg: Config, checkpoint: str, results: dict, loader) -> dict:
    indices = sorted(results)
    labels = np.array([results[i][0] for i in indices])
    scores = np.stack([results[i][1] for i in indices]) if indices else np.zeros((0, cfg.model.num_classes))
    metrics = compute_metrics(scores, labels, loader.class_names) if indices else {"videos": 0}
    excluded = [{"path": path, "error": error} for path, error in loader.bad_videos]
    missing = [{"path": path, "listed_at": where} for path, where in loader.missing_videos]  # data.allow_missing
    summary = {"metrics": metrics, "checkpoint": os.path.abspath(checkpoint), "split_videos": loader.num_videos,
               "scored_videos": len(indices), "excluded": excluded, "missing": missing,
               "views": {"clips": cfg.eval.num_clips, "crops": cfg.eval.num_crops}, "config": cfg.to_dict()}
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=2))
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["path", "label", "prediction", "score", "top5"])
    for i, index in enumerate(indices):
        top5 = np.argsort(-scores[i], kind="stable")[:5]
        writer.writerow([loader.videos[index][0], loader.class_names[labels[i]], loader.class_names[top5[0]],
                         f"{scores[i, top5[0]]:.4f}", " ".join(str(c) for c in top5)])
    write_atomic(os.path.join(out_dir, "predictions.csv"), rows.getvalue())
    return summary


def run_eval(cfg: Config, checkpoint: str, save_patches: str | None = None) -> dict:
    rank, world, device = setup_distributed(cfg)
    out_dir = cfg.eval.out_dir or cfg.train.out_dir
    setup_logging(out_dir, rank)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model = build_model(cfg.model, pixel_std=float(np.mean(cfg.data.std)), load_pretrained=False)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    model.to(device)
    loader = build_loader(cfg.data, "test", batch_size=cfg.eval.batch_size, rank=rank, world_size=world,
                          device_id=device.index if device.type == "cuda" else None, seed=cfg.train.seed,
                          num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops)
    results = score_videos(model, loader, device, autocast_dtype(cfg, device), rank, save_patches, cfg)
    results = gather_results(results, world)
    bad = gather_results({path: err for path, err in loader.bad_videos}, world) if world > 1 else None
    if bad is not None:
        loader.bad_videos[:] = sorted(bad.items())
    if rank != 0:
        return {}
    summary = write_results(out_dir, cfg, checkpoint, results, loader)
    m = summary["metrics"]
    log.info("test: %d/%d videos scored (%d excluded), %d clips x %d crops: top-1 %.2f%%, top-5 %.2f%%",
             summary["scored_videos"], loader.num_videos, len(summary["excluded"]), cfg.eval.num_clips,
             cfg.eval.num_crops, m.get("top1", float("nan")), m.get("top5", float("nan")))
    log.info("wrote %s", os.path.join(out_dir, "results.json"))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", help="default: eval.checkpoint, else train.out_dir/best.pt")
    parser.add_argument("--save-patches", metavar="DIR", help="PNGs of the patches K-center picks on a few videos")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.num_clips=4")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or cfg.eval.checkpoint or os.path.join(cfg.train.out_dir, "best.pt")
    run_eval(cfg, checkpoint, args.save_patches)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
