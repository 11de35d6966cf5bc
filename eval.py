"""Multi-view testing: N temporal clips x 3 spatial crops per video, combined per video as the original code does.

    python eval.py --config configs/kcenter_vit_kinetics.yaml                 # eval.checkpoint: last (default)
    torchrun --nproc_per_node=8 eval.py --config ... --checkpoint runs/k400/best.pt eval.num_clips=4 \
        [--save-patches DIR]

The checkpoint is `--checkpoint`, else `eval.checkpoint`: last (train.out_dir/last.pt, the paper's protocol),
best, or a path; `eval.weights=ema` tests the moving average of its weights (a run with train.model_ema) instead of
the trained weights. Views are combined by `eval.ensemble` (default: the model family's, as the original: the sum of
the ViT's logits). The K-center starts of each view are a function of (train.seed, video, view), so the results
do not depend on the batch size, the number of processes or the run.

Writes results.json (metrics with the confusion matrix, checkpoint, ensemble, counts, excluded videos, config),
predictions.csv (one row per video) and, for a labelled test list, confusion.png (that matrix as a heat map, each
row normalised to the class's recall) to eval.out_dir (default: train.out_dir). Every video of the test list is
scored exactly once across ranks; a video that cannot be decoded is listed under "excluded", never replaced by
another.

`eval.budgets=[784,1176,1568,2352]` also tests the checkpoint at those token budgets (and at model.num_tokens, which
the metrics and predictions.csv stay at), each video decoded once for all of them, with the same views and K-center
seeds: tokens, GFLOPs per view, clips/s and the metrics of each under "budgets" in results.json, a table in the log,
scalars in out_dir/tensorboard and budgets.png (top-1 against GFLOPs).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import re
import time
from contextlib import nullcontext

from config import Config, load_config

# A process started with "spawn" runs this file again as __mp_main__ before it unpickles its work: DALI's source
# workers (py_workers per loader, several loaders per rank). They need nothing below, and importing torch, timm and
# the models would cost each of them seconds and hundreds of MB (bench/RESULTS.md); so the imports are skipped
# there, and the definitions, which import nothing, are never called.
if __name__ != "__mp_main__":
    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from models import build_model
    from models.flops import view_gflops
    from pipelines import build_loader
    from runtime import (autocast_dtype, class_recall, count_confusion, load_model_weights, parse_command_line,
                         read_checkpoint, resolve_checkpoint, setup_distributed, setup_logging, view_seeds,
                         write_atomic)
    from vis import draw_confusion_matrix, draw_line_plot, draw_sampled_patches, save_png

log = logging.getLogger("kcenter")


def aggregate_views(logits: torch.Tensor, ensemble: str) -> torch.Tensor:
    """(B, V, K) per-view logits -> (B, K) per-video scores.

    sum_logits: the sum of the logits (the original's "sum" on the ViT and TimeSformer, whose outputs are logits);
    mean_softmax: the mean of the softmax scores (the original's "sum" on the Motionformer, whose eval output is a
    softmax; the mean ranks alike); max: the largest logit over the views (the original's "max", which also
    clamps at zero because it starts from zeros: not copied)."""
    if ensemble == "sum_logits":
        return logits.sum(dim=1)
    if ensemble == "mean_softmax":
        return logits.softmax(-1).mean(dim=1)
    if ensemble == "max":
        return logits.amax(dim=1)
    raise ValueError(f"eval.ensemble must be one of sum_logits, mean_softmax, max; got {ensemble!r}")


def compute_metrics(scores: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Top-1/top-5 (%), per-class top-1 (%) and its mean over the classes present, and the confusion matrix of the
    top-1 predictions (rows: true class, columns: prediction, in the order of `class_names`), from (N, K) scores
    and (N,) labels."""
    ranked = np.argsort(-scores, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, :5] == labels[:, None]).any(1)
    confusion = torch.zeros(len(class_names), len(class_names), dtype=torch.int64)
    count_confusion(confusion, torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(ranked[:, 0].copy()))
    recall = class_recall(confusion)
    per_class = {name: 100.0 * r for name, r in zip(class_names, recall.tolist()) if not np.isnan(r)}
    return {"top1": 100.0 * float(top1.mean()), "top5": 100.0 * float(top5.mean()),
            "mean_class_accuracy": float(np.mean(list(per_class.values()))), "per_class_top1": per_class,
            "confusion_matrix": {"classes": list(class_names), "counts": confusion.tolist()},
            "videos": int(len(labels))}


def score_videos(model, loader, device, amp_dtype, rank: int, cfg: Config, ensemble: str,
                 save_patches: str | None = None):
    """{dataset index: (label, combined scores)} for this rank's share of the test videos, on the model's own
    token budget (`score_budgets` with that one budget)."""
    return score_budgets(model, loader, device, amp_dtype, rank, cfg, ensemble, [None], save_patches)[0][None]


def score_views(model, views, seeds, shape: tuple[int, int], device, amp_dtype, ensemble: str,
                num_tokens: int | None = None) -> np.ndarray:
    """(B*V, C, T, H, W) views -> (B, K) combined scores on the host, on `num_tokens` tokens (None: the model's)."""
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
        logits = model(views, seeds=seeds, num_tokens=num_tokens)
    # one copy to the host a batch for the scores and one for the labels (an int() a video would be one each)
    return aggregate_views(logits.float().view(*shape, -1), ensemble).cpu().numpy()


def score_budgets(model, loader, device, amp_dtype, rank: int, cfg: Config, ensemble: str, budgets: list[int],
                  save_patches: str | None = None):
    """The scores of this rank's test videos at each token budget (None: the model's own):
    ({budget: {dataset index: (label, scores)}}, {budget: [views, seconds]}).

    Each batch is decoded once and scored at every budget in turn, with the same views and K-center seeds. The
    seconds are those of the forward passes (sampler included, up to the scores on the host) after the first batch,
    which pays each budget's warm-up (compilation, allocator); with one batch only, that one is timed."""
    model.eval()
    results, timing, drawn, batches = {b: {} for b in budgets}, {b: [0, 0.0] for b in budgets}, 0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="test", disable=rank != 0, dynamic_ncols=True):
            B, V = batch.clips.shape[:2]
            if B == 0:  # nothing to score, and fused attention kernels reject a batch of 0
                continue
            views = batch.clips.flatten(0, 1)  # (B*V, C, T, H, W)
            seeds = view_seeds(cfg.train.seed, batch.index, V)
            indices, labels = batch.index.tolist(), batch.labels.tolist()
            batches += 1
            for budget in budgets:
                start = time.perf_counter()
                scores = score_views(model, views, seeds, (B, V), device, amp_dtype, ensemble, budget)
                if batches == 2:  # the first batch was warm-up: the timing starts again here
                    timing[budget] = [0, 0.0]
                timing[budget][0] += B * V
                timing[budget][1] += time.perf_counter() - start
                results[budget].update((i, (label, s)) for i, label, s in zip(indices, labels, scores))
            if save_patches and drawn < 8:
                drawn += draw_first_views(model, batch, seeds.view(B, V), save_patches, cfg, limit=8 - drawn)
    return results, timing


def gather_timing(timing: dict, world: int) -> dict:
    """{budget: [views, seconds]} summed over the ranks."""
    if world == 1:
        return timing
    parts = [None] * world
    dist.all_gather_object(parts, timing)
    return {b: [sum(p[b][0] for p in parts), sum(p[b][1] for p in parts)] for b in timing}


def budget_entries(model, cfg: Config, results: dict, timing: dict, loader) -> list[dict]:
    """One results.json entry per budget, fewest tokens first: its layout, GFLOPs per view, clips/s per process (the
    views scored over the seconds their forward passes took, both summed over the ranks) and metrics."""
    entries = []
    for budget in sorted(results):
        indices = sorted(results[budget])
        labels = np.array([results[budget][i][0] for i in indices])
        scores = np.stack([results[budget][i][1] for i in indices]) if indices else None
        labelled = loader.dataset.labelled and bool(indices)
        layout = model.token_layout(budget)
        views, seconds = timing[budget]
        entries.append({
            "budget": budget, "trained": budget == cfg.model.num_tokens, "segments": layout.num_segments,
            "hybrid_tokens": layout.num_hybrid_tokens, "kcenter_tokens": layout.num_kcenter_tokens,
            "gflops_per_view": float(f"{view_gflops(model, budget):.4g}"),
            "clips_per_s": round(views / seconds, 3) if seconds else None, "timed_views": views,
            "metrics": compute_metrics(scores, labels, loader.class_names) if labelled else {"videos": len(indices)}})
    return entries


def report_budgets(out_dir: str, entries: list[dict]) -> None:
    """The budgets as a table in the log, scalars in out_dir/tensorboard (step: the budget's tokens) and
    out_dir/budgets.png, top-1 against GFLOPs per view (with labels)."""
    log.info("token budgets (* the model's own; clips/s per process, sampler included):")
    log.info("| tokens | segments | GFLOPs / view | clips/s | top-1 | top-5 |")
    log.info("|---|---|---|---|---|---|")
    for e in entries:
        m = e["metrics"]
        log.info("| %d%s | %d | %.4g | %s | %s | %s |", e["budget"], " *" if e["trained"] else "", e["segments"],
                 e["gflops_per_view"], "-" if e["clips_per_s"] is None else f"{e['clips_per_s']:.2f}",
                 *(f"{m[k]:.2f}%" if k in m else "-" for k in ("top1", "top5")))
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
    for e in entries:
        values = {"gflops_per_view": e["gflops_per_view"], "clips_per_s": e["clips_per_s"],
                  "top1": e["metrics"].get("top1"), "top5": e["metrics"].get("top5")}
        for name, value in values.items():
            if value is not None:
                writer.add_scalar(f"budget/{name}", value, global_step=e["budget"])
    labelled = [e for e in entries if "top1" in e["metrics"]]
    if labelled:
        image = draw_line_plot([e["gflops_per_view"] for e in labelled], [e["metrics"]["top1"] for e in labelled],
                               [f"{e['budget']}{' *' if e['trained'] else ''}" for e in labelled],
                               x_label="GFLOPs per view", y_label="top-1 (%)",
                               title="top-1 against cost, by token budget (* the model's own)")
        save_png(image, os.path.join(out_dir, "budgets.png"))
        writer.add_image("budget/top1_vs_gflops", image, dataformats="HWC")
        log.info("wrote %s", os.path.join(out_dir, "budgets.png"))
    writer.close()


def draw_first_views(model, batch, seeds: torch.Tensor, out_dir: str, cfg: Config, limit: int) -> int:
    """PNG of the sampled patches on the centre crop of each video's first clip, as that view was scored."""
    V = batch.clips.shape[1]
    centre = 1 if cfg.eval.num_crops == 3 and V > 1 else 0
    clips = batch.clips[:limit, centre]
    _, t_index, s_index = model.select_tokens(clips, seeds=seeds[:limit, centre])
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


def write_results(out_dir: str, cfg: Config, checkpoint: dict, ensemble: str, results: dict, loader,
                  budgets: list[dict] | None = None) -> dict:
    indices = sorted(results)
    labels = np.array([results[i][0] for i in indices])
    scores = np.stack([results[i][1] for i in indices]) if indices else np.zeros((0, cfg.model.num_classes))
    labelled = loader.dataset.labelled  # an unlabelled test list (the official test CSV): predictions only
    metrics = compute_metrics(scores, labels, loader.class_names) if indices and labelled else {"videos": len(indices)}
    excluded = [{"path": path, "error": error} for path, error in loader.bad_videos]
    missing = [{"path": path, "listed_at": where} for path, where in loader.missing_videos]  # data.allow_missing
    summary = {"metrics": metrics, "labelled": labelled, "checkpoint": checkpoint, "split_videos": loader.num_videos,
               "scored_videos": len(indices), "excluded": excluded, "missing": missing,
               "views": {"clips": cfg.eval.num_clips, "crops": cfg.eval.num_crops, "ensemble": ensemble},
               "budget": cfg.model.num_tokens, **({"budgets": budgets} if budgets else {}),
               "config": cfg.to_dict()}
    write_atomic(os.path.join(out_dir, "results.json"), results_text(summary))
    if "confusion_matrix" in metrics:
        save_png(draw_confusion_matrix(np.array(metrics["confusion_matrix"]["counts"]), loader.class_names),
                 os.path.join(out_dir, "confusion.png"))
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["path", "label", "prediction", "score", "top5", "top5_classes", "budget"])
    for i, index in enumerate(indices):
        top5 = np.argsort(-scores[i], kind="stable")[:5]
        writer.writerow([loader.dataset.videos[index].path, loader.class_names[labels[i]] if labelled else "",
                         loader.class_names[top5[0]], f"{scores[i, top5[0]]:.4f}", " ".join(str(c) for c in top5),
                         "|".join(loader.class_names[c] for c in top5), cfg.model.num_tokens])
    write_atomic(os.path.join(out_dir, "predictions.csv"), rows.getvalue())
    return summary


_NUMBER = r"-?(?:\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|NaN|Infinity)"
_NUMBER_LIST = re.compile(rf"\[\s+({_NUMBER}(?:,\s+{_NUMBER})*)\s+\]")


def results_text(summary: dict) -> str:
    """results.json's text: indented, with each list of numbers on one line (a confusion matrix a row a line: at 400
    classes 400 lines, not 160,000, for the test and for each token budget)."""
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", json.dumps(summary, indent=2))


# model settings that do not change the function a trained model computes at test time
_EVAL_IRRELEVANT = {"pretrained", "init_from", "init_skip", "drop_rate", "pos_drop_rate", "attn_drop_rate",
                    "drop_path_rate", "grad_checkpointing", "train_budgets"}


def check_checkpoint_fits(ckpt: dict, cfg: Config, path: str, class_names: list[str]) -> None:
    """An error naming each model setting in which the config differs from the run that wrote `path`, or a test
    list whose classes are not the ones the model was trained on (the accuracy would be silently wrong)."""
    saved, current = ckpt["config"].get("model", {}), cfg.to_dict()["model"]
    changed = [f"model.{key}: {saved[key]!r} in the checkpoint, {value!r} in the config"
               for key, value in current.items()
               if key not in _EVAL_IRRELEVANT and key in saved and saved[key] != value]
    if changed:
        raise ValueError(f"{path} was trained with other model settings than this config: {'; '.join(changed)}. "
                         f"Test with the config of the run that wrote it (its out_dir/config.yaml)")
    trained = ckpt.get("class_names")
    if trained is not None and list(trained) != list(class_names):
        first = next(i for i, pair in enumerate(itertools.zip_longest(trained, class_names)) if pair[0] != pair[1])
        at = [names[first] if first < len(names) else None for names in (trained, class_names)]
        raise ValueError(f"{path}: the model's {len(trained)} classes are not the data's {len(class_names)} "
                         f"(class {first} is {at[0]!r} in the checkpoint and {at[1]!r} in the data)")


def run_eval(cfg: Config, checkpoint: str, save_patches: str | None = None) -> dict:
    rank, world, device = setup_distributed(cfg)
    out_dir = cfg.eval.out_dir or cfg.train.out_dir
    setup_logging(out_dir, rank)
    ckpt = read_checkpoint(checkpoint)
    model = build_model(cfg.model, pixel_std=float(np.mean(cfg.data.std)), load_pretrained=False)
    budgets = sorted(set(cfg.eval.budgets) | {cfg.model.num_tokens}) if cfg.eval.budgets else []
    for budget in budgets:  # before any video is read: an error naming the budgets this family can run on
        model.check_budget(budget)
    loader = build_loader(cfg.data, "test", batch_size=cfg.eval.batch_size, rank=rank, world_size=world,
                          device_id=device.index if device.type == "cuda" else None, seed=cfg.train.seed,
                          num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops)
    check_checkpoint_fits(ckpt, cfg, checkpoint, loader.class_names)
    load_model_weights(model, ckpt, checkpoint, cfg.eval.weights)
    model.to(device)
    ensemble = cfg.eval.ensemble or model.test_ensemble
    log.info("testing %s (epoch %d, step %d, %s weights): %d clips x %d crops, views combined by %s", checkpoint,
             ckpt["epoch"], ckpt["step"], "EMA" if cfg.eval.weights == "ema" else "trained", cfg.eval.num_clips,
             cfg.eval.num_crops, ensemble)
    if budgets:
        by_budget, timing = score_budgets(model, loader, device, autocast_dtype(cfg, device), rank, cfg, ensemble,
                                          budgets, save_patches)
        by_budget = {b: gather_results(r, world) for b, r in by_budget.items()}
        results, timing = by_budget[cfg.model.num_tokens], gather_timing(timing, world)
    else:
        results = score_videos(model, loader, device, autocast_dtype(cfg, device), rank, cfg, ensemble, save_patches)
        results = gather_results(results, world)
    bad = gather_results({path: err for path, err in loader.bad_videos}, world) if world > 1 else None
    if bad is not None:
        loader.bad_videos[:] = sorted(bad.items())
    if rank != 0:
        return {}
    info = {"path": os.path.abspath(checkpoint), "epoch": ckpt["epoch"], "step": ckpt["step"],
            "weights": cfg.eval.weights}
    entries = budget_entries(model, cfg, by_budget, timing, loader) if budgets else None
    summary = write_results(out_dir, cfg, info, ensemble, results, loader, entries)
    m = summary["metrics"]
    outcome = (f"top-1 {m.get('top1', float('nan')):.2f}%, top-5 {m.get('top5', float('nan')):.2f}%"
               if summary["labelled"] else f"the test list {loader.dataset.annotation} has no labels, so predictions "
               f"only (top-5 of each video in predictions.csv), no accuracy")
    log.info("test: %d/%d videos scored (%d excluded), %d clips x %d crops: %s", summary["scored_videos"],
             loader.num_videos, len(summary["excluded"]), cfg.eval.num_clips, cfg.eval.num_crops, outcome)
    if entries:
        report_budgets(out_dir, entries)
    log.info("wrote %s", os.path.join(out_dir, "results.json"))
    return summary


def add_options(parser) -> None:
    parser.add_argument("--checkpoint", help="a checkpoint file; default: eval.checkpoint (last, best or a path)")
    parser.add_argument("--save-patches", metavar="DIR", help="PNGs of the patches K-center picks on a few videos")


def main(argv=None) -> None:
    args = parse_command_line(__doc__, argv, add_options)
    cfg = load_config(args.config, args.overrides)
    run_eval(cfg, resolve_checkpoint(cfg, args.checkpoint), args.save_patches)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
