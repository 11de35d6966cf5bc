"""DDP training of the K-center ViT.

    python train.py --config configs/demo.yaml                          # one process
    torchrun --nproc_per_node=8 train.py --config configs/kcenter_vit_kinetics.yaml train.out_dir=runs/k400

Batches come from the DALI loader already on the device; the model's K-center step runs there. Checkpoints are
written atomically to out_dir/last.pt (each epoch, and every train.save_every_steps optimizer steps) and
best.pt; a run restarted with the same out_dir resumes from last.pt and continues exactly as if never stopped.
"""
from __future__ import annotations

import logging
import math
import os
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
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from models import build_model
    from pipelines import build_loader, read_dataset
    from runtime import (TRAIN_STARTS, VAL_STARTS, TrainingLoss, autocast_dtype, init_from_checkpoint,
                         kcenter_seeds, load_model_weights, parse_command_line, read_checkpoint, resolve_checkpoint,
                         rng_state, save_checkpoint, set_rng_state, setup_distributed, setup_logging)
    from vis import draw_sampled_patches

log = logging.getLogger("kcenter")


def accumulation_steps(cfg: Config, world: int) -> int:
    per_step = cfg.train.micro_batch_size * world
    if cfg.train.batch_size % per_step:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not a multiple of micro_batch_size x world "
                         f"size = {cfg.train.micro_batch_size} x {world}")
    return cfg.train.batch_size // per_step


def build_schedule(optimizer, cfg: Config, steps_per_epoch: int):
    """Linear warmup then cosine from train.lr to train.min_lr, stepped every optimizer step."""
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = round(cfg.train.warmup_epochs * steps_per_epoch)
    floor = cfg.train.min_lr / cfg.train.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# What a resumed run must share with the run that wrote last.pt to continue exactly as if never stopped.
RESUME_KEYS = {"data": ["dataset", "train_list", "num_frames", "sampling_rate", "target_fps", "crop_size"],
               "model": ["arch", "num_tokens", "num_hybrid_frames", "num_segments", "img_size", "patch_size",
                         "embed_dim", "depth", "num_heads", "num_classes"],
               "train": ["seed", "epochs", "batch_size", "micro_batch_size", "max_steps_per_epoch", "lr",
                         "min_lr", "warmup_epochs"]}


def check_resumable(ckpt: dict, cfg: Config, world: int, path: str) -> None:
    """An error naming every setting that differs from the run that wrote `path` (and the world size, which
    decides each rank's share of an epoch): a silent resume would not continue the same training."""
    saved = ckpt["config"]
    current = cfg.to_dict()
    changed = [f"{section}.{key}: {saved[section][key]!r} -> {current[section][key]!r}"
               for section, keys in RESUME_KEYS.items() for key in keys
               if saved.get(section, {}).get(key, current[section][key]) != current[section][key]]
    if len(ckpt["rng"]) != world:
        changed.append(f"world size: {len(ckpt['rng'])} -> {world} processes")
    if changed:
        raise ValueError(f"{path} was written by a run with other settings, so resuming it would not continue "
                         f"that run: {'; '.join(changed)}. Resume with the same settings, or use a new "
                         f"train.out_dir")


def gather_rng_states(world: int) -> list:
    """Every rank's RNG state (dropout, drop path), so a resume restores each rank's own stream."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def settle_gradient_buckets(ddp: DistributedDataParallel, model: torch.nn.Module, device: torch.device) -> None:
    """One backward of an empty micro-batch's zero loss through DDP before the first step, so that a resumed run
    reduces its gradients in the bucket layout of the run it continues.

    DDP starts with every gradient in one bucket and, after its first backward, lays the buckets out anew in the
    order the gradients became ready. A run resumed mid-training would take its first step in the first layout where
    the run it continues had the second, and with 3 or more processes the allreduce sums each element in an order
    that depends on its offset in the bucket: the weights would part in their last bits. After this backward every
    run, fresh or resumed, has its layout from the same zero-loss backward before its first step, whether DDP
    rebuilds once (as it does now) or not at all. Constructor options cannot do this: `static_graph` also rebuilds
    (after its second iteration), one large bucket (`bucket_cap_mb`) is still reordered, and `find_unused_parameters`,
    which does skip the rebuild, traverses the graph and allreduces a map of used parameters every step.

    What it costs: one allreduce of zeros at start-up. The zero loss readies the gradients in reverse order of
    definition (the order DDP's own heuristic assumes), which for these models differs from the real backward's only
    within a layer (a norm's weight and bias) and among the embeddings, which are all last; so the buckets keep the
    default sizes, fill in the order the real backward produces them, and their allreduce still overlaps it."""
    loss, _ = ddp(None, torch.zeros(0, dtype=torch.int64, device=device), None)
    loss.backward()
    model.zero_grad(set_to_none=True)  # the first micro-batch starts from no gradient, as in a run without this


class Trainer:
    """Holds what one training run needs; the loop itself is `train_one_epoch`."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.accum = accumulation_steps(cfg, world)
        self.amp_dtype = autocast_dtype(cfg, device)
        self.last_path = os.path.join(cfg.train.out_dir, "last.pt")
        ckpt = read_checkpoint(self.last_path) if os.path.exists(self.last_path) else {}
        if ckpt:
            check_resumable(ckpt, cfg, world, self.last_path)
        self.epoch, self.batch_in_epoch = ckpt.get("epoch", 0), ckpt.get("batch_in_epoch", 0)
        self.step, self.best_top1 = ckpt.get("step", 0), ckpt.get("best_top1", -1.0)

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = build_model(cfg.model, pixel_std=float(np.mean(cfg.data.std)),
                                 load_pretrained=not ckpt)  # a resume loads every weight anyway
        if cfg.model.init_from and not ckpt:  # fine-tuning: the weights only; optimizer, schedule, epoch start anew
            init_from_checkpoint(self.model, read_checkpoint(cfg.model.init_from), cfg.model.init_from,
                                 cfg.model.init_skip)
        self.model.to(device)
        self.ddp = TrainingLoss(self.model, cfg.train.label_smoothing, cfg.train.micro_batch_size * self.accum)
        if world > 1:
            self.ddp = DistributedDataParallel(self.ddp)
            settle_gradient_buckets(self.ddp, self.model, device)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(cfg.train.weight_decay), lr=cfg.train.lr,
                                           betas=cfg.train.betas)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.train_loader = self._loader("train", self.epoch, self.batch_in_epoch)
        if len(self.train_loader.class_names) != cfg.model.num_classes:
            raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the training list "
                             f"{cfg.data.train_list} has {len(self.train_loader.class_names)} classes")
        batches = len(self.train_loader) + self.batch_in_epoch  # a whole epoch, also when resuming inside one
        self.steps_per_epoch = max(1, batches // self.accum)
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        self.scheduler = build_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.val_loader = self._loader("val", 0, 0) if cfg.data.val_list else None
        self.writer = self._tensorboard() if rank == 0 else None

        # per-rank stream for dropout and drop path (the K-center starts are a function of seed, epoch and video)
        torch.manual_seed(cfg.train.seed * 1000 + rank)
        if ckpt:
            self._restore(ckpt)

    def _loader(self, split: str, start_epoch: int, start_batch: int):
        size = self.cfg.train.micro_batch_size
        return build_loader(self.cfg.data, split, batch_size=size, rank=self.rank, world_size=self.world,
                            device_id=self.device.index if self.device.type == "cuda" else None,
                            seed=self.cfg.train.seed, start_epoch=start_epoch, start_batch=start_batch)

    def _restore(self, ckpt: dict) -> None:
        load_model_weights(self.model, ckpt, self.last_path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][self.rank])  # check_resumable: one state per rank
        log.info("resumed from %s: epoch %d, batch %d, optimizer step %d", self.last_path, self.epoch,
                 self.batch_in_epoch, self.step)

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(self.cfg.train.out_dir, "tensorboard"))

    def checkpoint_state(self, epoch: int, batch_in_epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler and self.scaler.state_dict(),
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.step, "best_top1": self.best_top1,
                "rng": gather_rng_states(self.world), "config": self.cfg.to_dict(),
                "class_names": list(self.train_loader.class_names)}

    def save(self, epoch: int, batch_in_epoch: int, best: bool = False) -> None:
        state = self.checkpoint_state(epoch, batch_in_epoch)  # collective: every rank takes part
        if self.rank == 0:
            if best:  # best.pt first: a kill in between must not leave last.pt claiming a best.pt never written
                save_checkpoint(os.path.join(self.cfg.train.out_dir, "best.pt"), state)
            save_checkpoint(self.last_path, state)

    def forward_loss(self, clips, labels, seeds):
        """(loss, logits) of one micro-batch; (a zero, None) for a batch of no clips (see `TrainingLoss`)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            return self.ddp(clips, labels, seeds)

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.train.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1


def train_one_epoch(tr: Trainer, epoch: int, first_batch: int) -> dict:
    cfg, model = tr.cfg, tr.ddp
    model.train()
    steps_left = tr.steps_per_epoch - first_batch // tr.accum
    bar = tqdm(total=steps_left, desc=f"epoch {epoch}", disable=tr.rank != 0, dynamic_ncols=True)
    sums = {"clips": 0, "wait": 0.0}
    # the losses summed on the device, in float64 like the Python floats .item() gave, and read once a log interval:
    # an .item() a micro-batch would wait for each step's kernels to finish before the next could be queued
    loss_sum = torch.zeros((), dtype=torch.float64, device=tr.device)
    start = time.perf_counter()
    batches = iter(tr.train_loader)
    batch_index, done_steps = first_batch, 0
    while done_steps < steps_left:
        t0 = time.perf_counter()
        batch = next(batches, None)
        sums["wait"] += time.perf_counter() - t0
        if batch is None:
            break
        batch_index += 1
        last_micro = batch_index % tr.accum == 0
        with model.no_sync() if tr.world > 1 and not last_micro else nullcontext():
            seeds = kcenter_seeds(cfg.train.seed, TRAIN_STARTS, epoch, batch.index)  # K-center starts
            loss, _ = tr.forward_loss(batch.clips, batch.labels, seeds)
            (tr.scaler.scale(loss) if tr.scaler else loss).backward()
        loss_sum += loss.detach()
        sums["clips"] += len(batch.labels)
        if not last_micro:
            continue
        tr.optimizer_step()
        done_steps += 1
        bar.update(1)
        if tr.writer and tr.step % cfg.train.log_every_steps == 0:
            elapsed, mean_loss = time.perf_counter() - start, loss_sum.item() / done_steps
            tr.writer.add_scalar("train/loss", mean_loss, tr.step)
            tr.writer.add_scalar("train/lr", tr.optimizer.param_groups[0]["lr"], tr.step)
            tr.writer.add_scalar("train/clips_per_s_per_rank", sums["clips"] / elapsed, tr.step)
            tr.writer.add_scalar("train/data_wait_fraction", sums["wait"] / elapsed, tr.step)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
        if cfg.train.save_every_steps and tr.step % cfg.train.save_every_steps == 0 and done_steps < steps_left:
            tr.save(epoch, batch_index)
    bar.close()
    if not cfg.train.max_steps_per_epoch:
        for _ in batches:  # the few batches short of a whole optimizer step: ending the epoch cleanly lets
            pass           # the loader reuse its pipeline (an abandoned epoch costs a rebuild)
    else:
        batches.close()
    if done_steps < steps_left or batch_index % tr.accum:
        raise RuntimeError(f"epoch {epoch}: the loader ended after {batch_index} batches, before "
                           f"{tr.steps_per_epoch} optimizer steps")
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum.item() / max(1, done_steps), "clips_per_s": sums["clips"] / elapsed,
            "data_wait": sums["wait"] / elapsed}


def evaluate(tr: Trainer, loader) -> tuple[dict, tuple | None]:
    """Single-view validation: top-1/top-5 over every video of the split exactly once (summed over ranks). The
    K-center starts are a function of (seed, video), the same every epoch, and draw nothing from the training RNG.

    Also returns the first clips seen and their seeds, for the picture of sampled patches."""
    tr.ddp.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=tr.device)  # correct@1, correct@5, summed on the device
    count, first = 0, None
    with torch.no_grad():
        for batch in tqdm(loader, desc="val", disable=tr.rank != 0, dynamic_ncols=True):
            if not len(batch.labels):  # nothing to score, and fused attention kernels reject a batch of 0
                continue
            seeds = kcenter_seeds(tr.cfg.train.seed, VAL_STARTS, 0, batch.index)
            if first is None:
                first = batch.clips[: tr.cfg.train.num_vis_clips], seeds[: tr.cfg.train.num_vis_clips]
            with torch.autocast(tr.device.type, dtype=tr.amp_dtype) if tr.amp_dtype else nullcontext():
                logits = tr.model(batch.clips, seeds=seeds)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == batch.labels[:, None]
            correct += torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).to(correct)
            count += len(hits)
    totals = torch.cat([correct, correct.new_tensor([count])])
    if tr.world > 1:
        dist.all_reduce(totals)  # every rank, also one whose batches were all empty
    correct1, correct5, count = totals.tolist()
    metrics = {"top1": 100 * correct1 / max(count, 1), "top5": 100 * correct5 / max(count, 1), "videos": int(count)}
    return metrics, first


def log_sampled_patches(tr: Trainer, clips: torch.Tensor, seeds: torch.Tensor, epoch: int) -> None:
    """TensorBoard image of the patches the sampler keeps on a few validation clips (the picks validation used)."""
    _, t_index, s_index = tr.model.select_tokens(clips, seeds=seeds)  # the sampler runs without autograd
    for i in range(len(clips)):
        image = draw_sampled_patches(clips[i], t_index[i], s_index[i], tr.cfg.model.patch_size, tr.cfg.data.mean,
                                     tr.cfg.data.std, tr.model.sampler.hybrid_frames.tolist())
        tr.writer.add_image(f"sampled_patches/{i}", image, epoch, dataformats="HWC")


def prepare_demo_data(cfg: Config, rank: int, world: int) -> None:
    """data.generate_demo: make the synthetic demo dataset at data.root once (rank 0), cached afterwards."""
    if not cfg.data.generate_demo:
        return
    if rank == 0:
        from preprocess.make_demo_data import make_demo_dataset
        make_demo_dataset(cfg.data.root)
    if world > 1:
        dist.barrier()


def check_test_list(cfg: Config, rank: int) -> None:
    """The test list read and checked on every rank before the first step (parse, labels, videos present or listed
    as missing, frame folders whole), so that a run never fails on it after days of training."""
    if not cfg.data.test_list or cfg.data.test_list == cfg.data.val_list:  # the val loader has read it already
        return
    data = read_dataset(cfg.data, "test", show_progress=rank == 0)
    log.info("test list %s: %d videos%s", data.annotation, len(data.videos),
             "" if data.labelled else " without labels (predictions only, no accuracy)")


def run_training(cfg: Config) -> dict:
    rank, world, device = setup_distributed(cfg)
    setup_logging(cfg.train.out_dir, rank)
    if rank == 0:
        cfg.save(os.path.join(cfg.train.out_dir, "config.yaml"))
    if cfg.data.test_list:
        log.info("after training: multi-view test of %s", resolve_checkpoint(cfg))  # warns on test-set selection
    prepare_demo_data(cfg, rank, world)
    tr = Trainer(cfg, rank, world, device)  # reads and checks the train and val lists
    check_test_list(cfg, rank)
    log.info("%d train videos, %d optimizer steps/epoch, accumulation %d, world %d, device %s, autocast %s",
             tr.train_loader.num_videos, tr.steps_per_epoch, tr.accum, world, device, tr.amp_dtype)
    metrics = {}
    first_batch = tr.batch_in_epoch
    for epoch in range(tr.epoch, cfg.train.epochs):
        stats = train_one_epoch(tr, epoch, first_batch)
        first_batch = 0
        log.info("epoch %d: loss %.4f, %.1f clips/s per rank, %.0f%% waiting for data; %s", epoch, stats["loss"],
                 stats["clips_per_s"], 100 * stats["data_wait"], tr.train_loader.last_epoch_summary())
        best = False
        if tr.val_loader is not None and ((epoch + 1) % cfg.train.val_every_epochs == 0 or
                                          epoch + 1 == cfg.train.epochs):
            metrics, vis = evaluate(tr, tr.val_loader)
            best = metrics["top1"] > tr.best_top1
            tr.best_top1 = max(tr.best_top1, metrics["top1"])
            log.info("epoch %d validation: top-1 %.2f%%, top-5 %.2f%% on %d videos", epoch, metrics["top1"],
                     metrics["top5"], metrics["videos"])
            if tr.writer:
                for key in ("top1", "top5"):
                    tr.writer.add_scalar(f"val/{key}", metrics[key], epoch)
                if vis is not None and cfg.train.num_vis_clips:
                    log_sampled_patches(tr, *vis, epoch)
        tr.save(epoch + 1, 0, best=best or tr.val_loader is None)
    if tr.writer:
        tr.writer.close()
    return metrics


def main(argv=None) -> None:
    args = parse_command_line(__doc__, argv)
    cfg = load_config(args.config, args.overrides)
    run_training(cfg)
    if cfg.data.test_list:  # the multi-view test of eval.checkpoint (default: the last epoch), as eval.py runs it
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing the checkpoint
        from eval import run_eval
        run_eval(cfg, resolve_checkpoint(cfg))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
