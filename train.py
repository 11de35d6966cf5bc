"""DDP training of the K-center ViT.

    python train.py --config configs/demo.yaml                          # one process
    torchrun --nproc_per_node=8 train.py --config configs/kcenter_vit_kinetics.yaml train.out_dir=runs/k400

Batches come from the DALI loader already on the device; the model's K-center step runs there. Checkpoints are
written atomically to out_dir/last.pt (each epoch, and every train.save_every_steps optimizer steps) and
best.pt; a run restarted with the same out_dir resumes from last.pt and continues exactly as if never stopped,
also on another number of processes (the same optimizer steps over the same clips; see `Trainer`).

Preemption: on SIGTERM or SIGUSR1 (what Slurm sends before it ends or requeues a job) every rank finishes the
optimizer step it is in, last.pt is written there, rank 0 writes out_dir/preempted.json and every rank exits with
PREEMPTED_EXIT (75, EX_TEMPFAIL); see `Preemption` for validation and the points between epochs. The file is the
signal to requeue: torchrun exits 1 whatever its workers exited with. torchrun (torch 2.14) forwards SIGTERM,
SIGINT, SIGHUP and SIGQUIT to each worker's process group and sends SIGKILL 30 s later (--shutdown-timeout or
TORCH_ELASTIC_SHUTDOWN_TIMEOUT; that time must cover a step and a checkpoint); SIGUSR1 only when it is named in
--signals-to-handle (or TORCHELASTIC_SIGNALS_TO_HANDLE): otherwise SIGUSR1 ends torchrun itself at once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from multiprocessing import resource_tracker

from config import Config, load_config

PREEMPTED_EXIT = 75  # EX_TEMPFAIL of sysexits.h: "try again", the exit status of every rank of a preempted run
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_MARKER = "preempted.json"  # in train.out_dir while a preempted run waits to be requeued

# A process started with "spawn" runs this file again as __mp_main__ before it unpickles its work: DALI's source
# workers (py_workers per loader, several loaders per rank). They need nothing below, and importing torch, timm and
# the models would cost each of them seconds and hundreds of MB (bench/RESULTS.md); so the imports are skipped
# there, and the definitions, which import nothing, are never called.
if __name__ != "__mp_main__":
    import numpy as np
    import torch
    import torch.distributed as dist
    from timm.utils import ModelEmaV3
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from models import build_model
    from pipelines import build_loader, read_dataset
    from pipelines.batch_augment import BatchAugment
    from runtime import (TRAIN_STARTS, VAL_STARTS, TrainingLoss, autocast_dtype, init_from_checkpoint,
                         class_recall, count_confusion, kcenter_seeds, load_model_weights, parse_command_line,
                         read_checkpoint, resolve_checkpoint, rng_state, save_checkpoint, set_rng_state,
                         setup_distributed, setup_logging, train_budgets, write_atomic)
    from vis import draw_confusion_matrix, draw_sampled_patches
else:
    # DALI's source workers (the processes above) ignore the preemption signals: Slurm signals every process of a
    # job step and torchrun a worker's whole process group, and a source worker that died of it would fail its
    # rank's pipeline in the middle of the step the rank still finishes. They end with their pipeline, which the
    # rank closes as it exits; SIGKILL, which follows from Slurm and torchrun, still ends them. They start with the
    # signals blocked (pipelines.loader.handled_signals_blocked), so that one sent before this line cannot kill them.
    for _signal in PREEMPTION_SIGNALS:
        signal.signal(_signal, signal.SIG_IGN)

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


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups. With train.layer_decay below 1 each group starts at train.lr x its
    `lr_scale`: `build_schedule` multiplies every group's initial rate by the same factor, so warmup and cosine reach
    each layer in proportion and a layer's floor is train.min_lr x its scale, as in VideoMAE."""
    groups = model.param_groups(cfg.train.weight_decay, cfg.train.layer_decay)
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = cfg.train.lr * group["lr_scale"]
    if cfg.train.layer_decay != 1.0:
        log_layer_decay(groups, cfg.train.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


def log_layer_decay(groups: list[dict], layer_decay: float) -> None:
    """A table of each layer's learning-rate scale and parameter count, logged once at start, so that the run's log
    shows what the decay made of this model (rank 0 logs)."""
    layers = {}
    for group in groups:
        scale, count = layers.get(group["layer_id"], (group["lr_scale"], 0))
        layers[group["layer_id"]] = scale, count + sum(p.numel() for p in group["params"])
    top = max(layers)  # the final norm and the head
    rows = [f"{layer:>5}  {scale:10.6f}  {count:>11,}  "
            f"{'embeddings' if layer == 0 else 'norm, head' if layer == top else f'block {layer - 1}'}"
            for layer, (scale, count) in sorted(layers.items())]
    log.info("layer-wise learning-rate decay %g (train.layer_decay): each layer at train.lr x its scale\n"
             "layer       scale   parameters\n%s", layer_decay, "\n".join(rows))


def build_ema(model: torch.nn.Module, cfg: Config):
    """train.model_ema: timm's ModelEmaV3, a copy of `model` on its device whose weights follow the model's as an
    exponential moving average, updated after each optimizer step; None when off.

    Made from the model itself (not the DDP wrapper), after its weights are set and moved, as timm asks. ModelEmaV3
    averages what the state dict holds, here the parameters only: the K-center sampler's buffers (frame layout,
    patch coordinates) are not persistent, so the copy keeps its own, equal to the model's, and picks the same
    tokens for the same seeds. Every rank keeps one (validation runs on every rank); they stay equal as the models
    do. The average holds float32 weights: bf16/fp16 is only autocast, so no stochastic rounding is involved."""
    if not cfg.train.model_ema:
        return None
    ema = ModelEmaV3(model, decay=cfg.train.model_ema_decay, use_warmup=cfg.train.model_ema_warmup)
    ema.requires_grad_(False)  # moved by the average only
    return ema


def resolve_train_budgets(model: torch.nn.Module, cfg: Config) -> list[int]:
    """model.train_budgets as the budgets the steps draw from ([] when off): a list as given, each one this family
    can run on; a range, the counts in it that it can. An error naming the valid ones otherwise."""
    candidates = cfg.model.train_budget_candidates()
    if isinstance(cfg.model.train_budgets, list):
        for budget in candidates:
            try:
                model.check_budget(budget)
            except ValueError as e:
                raise ValueError(f"model.train_budgets: {e}") from None
        return candidates
    valid = set(model.token_budgets())
    budgets = [b for b in candidates if b in valid]
    if not budgets:
        model.check_budget(candidates[0])  # the error naming the valid ones
    return budgets


def log_train_budgets(budgets: list[int], seed: int, total_steps: int, model: torch.nn.Module) -> None:
    """What budget-elastic training will train on, logged once at start: each budget, its cost and how many of
    the run's optimizer steps draw it."""
    from models.flops import view_gflops
    counts = np.bincount(np.searchsorted(budgets, train_budgets(seed, np.arange(total_steps), budgets)),
                         minlength=len(budgets))
    head = (f"budget-elastic training (model.train_budgets): each optimizer step on one of {len(budgets)} token "
            f"budgets, drawn from (train.seed, step); validation at model.num_tokens")
    if len(budgets) > 16:  # a range: its ends, not a row a budget
        log.info("%s: %d to %d tokens (%.4f to %.4f GFLOPs/view), each drawn by %d to %d of the run's %d steps", head,
                 budgets[0], budgets[-1], view_gflops(model, budgets[0]), view_gflops(model, budgets[-1]),
                 counts.min(), counts.max(), total_steps)
        return
    rows = [f"{b:>7}  {view_gflops(model, b):11.4f}  {n:>6}" for b, n in zip(budgets, counts)]
    log.info("%s\n budget  GFLOPs/view   steps\n%s", head, "\n".join(rows))


def compile_model(model: torch.nn.Module, cfg: Config) -> None:
    """train.compile: torch.compile (inductor) the model's tokens -> logits part, `forward_tokens`, in place.

    The K-center sampler (`select_tokens`, before it) stays eager: k sequential picks whose every step depends on
    the last are no graph to fuse, and its CPU and CUDA paths are already compiled kernels (Numba, Triton). Only the
    bound method is replaced, not the module wrapped, so the state dict keeps its plain keys (no `_orig_mod.`) for
    checkpoints, resumes, eval.py and predict.py. Called after `build_ema`: the average is a copy of the eager
    model (timm deep-copies it) and is validated eagerly."""
    if cfg.train.compile:
        model.forward_tokens = torch.compile(model.forward_tokens)


# What a resumed run must share with the run that wrote last.pt to continue the same training. The number of
# processes and train.micro_batch_size may change: train.batch_size fixes the clips of each optimizer step.
RESUME_KEYS = {"data": ["dataset", "train_list", "num_frames", "sampling_rate", "target_fps", "crop_size",
                        "num_sample"],
               "model": ["arch", "num_tokens", "num_hybrid_frames", "num_segments", "img_size", "patch_size",
                         "embed_dim", "depth", "num_heads", "num_classes", "train_budgets"],
               "train": ["seed", "epochs", "batch_size", "max_steps_per_epoch", "lr", "min_lr", "warmup_epochs",
                         "layer_decay", "model_ema", "model_ema_decay", "model_ema_warmup"]}


def check_resumable(ckpt: dict, cfg: Config, path: str) -> None:
    """An error naming every setting that differs from the run that wrote `path`: a silent resume would not
    continue the same training."""
    saved = ckpt["config"]
    current = cfg.to_dict()
    changed = [f"{section}.{key}: {saved[section][key]!r} -> {current[section][key]!r}"
               for section, keys in RESUME_KEYS.items() for key in keys
               if saved.get(section, {}).get(key, current[section][key]) != current[section][key]]
    if changed:
        raise ValueError(f"{path} was written by a run with other settings, so resuming it would not continue "
                         f"that run: {'; '.join(changed)}. Resume with the same settings, or use a new "
                         f"train.out_dir")


def saved_layout(ckpt: dict) -> tuple[int, int, int]:
    """(processes, micro-batch, accumulation steps) of the run that wrote `ckpt` (one RNG state per process)."""
    world, micro = len(ckpt["rng"]), ckpt["config"]["train"]["micro_batch_size"]
    return world, micro, ckpt["config"]["train"]["batch_size"] // (micro * world)


def saved_step_in_epoch(ckpt: dict, path: str) -> int:
    """The optimizer steps of its epoch the run that wrote `ckpt` had taken: where a resume on any number of
    processes starts, since step s of an epoch trains on the clips at positions [s, s + 1) x train.batch_size of
    the epoch's order whatever the processes and accumulation (sampling.steps_per_epoch). Checkpoints written before
    it was stored give it as batches / accumulation; every checkpoint is written between two optimizer steps, and
    one that is not would have lost the gradients of the step's first micro-batches."""
    if "step_in_epoch" in ckpt:
        return ckpt["step_in_epoch"]
    _, _, accum = saved_layout(ckpt)
    if ckpt["batch_in_epoch"] % accum:
        raise ValueError(f"{path} was written after batch {ckpt['batch_in_epoch']} of epoch {ckpt['epoch']}, inside "
                         f"an optimizer step of {accum} accumulated micro-batches: it cannot be resumed exactly")
    return ckpt["batch_in_epoch"] // accum


def check_epoch_length(ckpt: dict, steps_per_epoch: int, num_videos: int, path: str) -> None:
    """An error when this run's epoch has another number of optimizer steps than the epochs of the run that wrote
    `ckpt`: its schedule and its positions in the epoch would mean other things. Checkpoints that do not store it
    were written when an epoch ended at the last whole optimizer step of unpadded batches (no padding step)."""
    saved = ckpt.get("steps_per_epoch")
    if saved is None:
        world, micro, accum = saved_layout(ckpt)
        saved = max(1, math.ceil(num_videos / (world * micro)) // accum)
        cap = ckpt["config"]["train"].get("max_steps_per_epoch", 0)
        saved = min(saved, cap) if cap else saved
    if saved != steps_per_epoch:
        raise ValueError(f"{path} was written by a run whose epochs were {saved} optimizer steps; this run's are "
                         f"{steps_per_epoch} ({num_videos} training videos, train.batch_size "
                         f"{ckpt['config']['train']['batch_size']}), so resuming it would not continue that run. "
                         f"Resume with the training list and code that wrote it, or use a new train.out_dir")


def warn_of_another_layout(ckpt: dict, cfg: Config, world: int, accum: int, path: str) -> None:
    """A warning when this run splits train.batch_size otherwise than the run that wrote `ckpt` did: what the resume
    keeps, and what is no longer bit-identical to a run that kept its processes."""
    saved_world, saved_micro, saved_accum = saved_layout(ckpt)
    if (saved_world, saved_micro) == (world, cfg.train.micro_batch_size):
        return
    model, streams = cfg.model, ""
    if any((model.drop_rate, model.pos_drop_rate, model.attn_drop_rate, model.drop_path_rate)):
        streams = ("; dropout and drop path draw other numbers (a rank continues the saved stream of its rank where "
                   "that run had one, and starts a new one where it had none)")
    log.warning("%s was written with world size %d (micro-batch %d, accumulation %d); this run has %d (micro-batch "
                "%d, accumulation %d). Every optimizer step trains on the same clips, but the float sums of its "
                "gradient (the all-reduce over processes, the accumulation of micro-batches) may run in another "
                "order: the run is close to, not bit-identical with, one that kept its processes%s", path,
                saved_world, saved_micro, saved_accum, world, cfg.train.micro_batch_size, accum, streams)


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


class Preemption:
    """A stop asked for with SIGTERM or SIGUSR1, and the ranks' agreement on where to make it.

    The handler only notes the signal: Python runs it between two bytecodes of the main thread, wherever that
    thread is, and logging or writing a file there could wait forever on a lock the interrupted code holds. The
    loop asks `requested()` where a stop loses no work, and there the resumed run still equals a run never stopped:
    - after each optimizer step but an epoch's last: last.pt is written at that batch (as a periodic checkpoint) and
      the resumed run goes on with the next one. An epoch's last step goes on to the epoch's end instead;
    - before each validation batch: validation stops, and last.pt holds the end of the epoch marked
      `validation_pending`, so the resumed run validates that epoch first: the same weights and K-center starts
      give the same metrics and the same best.pt;
    - before each epoch, and before the test that follows training (data.test_list): last.pt already holds this
      state, or no training has happened. A signal during the test itself is not acted on (training is complete
      and the test cannot stop half way): the test goes on, and what ends the process ends it.

    Ranks see a signal at different times (torchrun forwards it to one worker after another, nodes get it
    separately), so `requested()` is a collective: the MAX of every rank's flag, and all ranks stop after the same
    step. What it costs: one all_reduce of a single int64 on the CPU, over a gloo group of its own when the
    training runs on NCCL, at each of those points: a round trip between the hosts (microseconds on one node) that
    neither waits for the GPU nor queues work on it. With one process, nothing.
    """

    def __init__(self):
        self.signal = 0  # the last preemption signal this process got; 0: none
        self.agreed = 0  # the answer of the last `requested()`, the same on every rank
        self.world, self.group = 1, None
        # multiprocessing's resource tracker, the process that DALI's source workers register their semaphores with,
        # ignores SIGTERM by itself; started now, with SIGUSR1 ignored, it inherits that too, rather than die of
        # it (Slurm signals every process of a job step) and come back without its record
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        resource_tracker.ensure_running()
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._note)
            signal.siginterrupt(signum, False)  # C++ calls it interrupts (gloo's sockets, DALI) resume, not fail

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def connect(self, world: int) -> None:
        """Collective once the process group exists: every rank makes the same group."""
        self.world = world
        if world > 1:
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def requested(self) -> int:
        """The signal some rank got (the same answer on every rank), or 0. Collective when world > 1."""
        if self.world == 1:
            self.agreed = self.signal
        else:
            flag = torch.tensor([self.signal], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            self.agreed = int(flag)
        return self.agreed

    def finish(self) -> None:
        """After a stop, once rank 0 has written last.pt and the marker: every rank waits for rank 0 here, since a
        rank that exits makes torchrun send SIGTERM to the others and SIGKILL 30 s later, and rank 0 may still be
        writing; then further preemption signals are ignored, so that such a SIGTERM in the teardown (where Python
        no longer runs handlers) cannot end the process with another status than PREEMPTED_EXIT."""
        if self.world > 1:
            dist.barrier(group=self.group)
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


class Preempted(Exception):
    """Raised on every rank once last.pt holds the state to resume from (see `Preemption`)."""

    def __init__(self, signum: int, stage: str, epoch: int, batch_in_epoch: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} ({stage}): last.pt holds epoch {epoch}, batch "
                         f"{batch_in_epoch}, optimizer step {step}")
        self.record = {"signal": signal.Signals(signum).name, "stage": stage, "epoch": epoch,
                       "batch_in_epoch": batch_in_epoch, "step": step}


def write_preempted_marker(out_dir: str, stop: Preempted) -> None:
    """out_dir/preempted.json, atomically: a batch script requeues the job when it finds it after the run."""
    record = {**stop.record, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_atomic(os.path.join(out_dir, PREEMPTED_MARKER), json.dumps(record, indent=1) + "\n")


class Trainer:
    """Holds what one training run needs; the loop itself is `train_one_epoch`.

    A resume on another number of processes (or micro-batch) continues at the same optimizer step of the same
    epoch: every step trains on the same clips, with the same augmentation and K-center starts, since all of those
    are functions of (seed, epoch, video) and the position in the epoch (sampling.steps_per_epoch); the
    accumulation steps follow from train.batch_size. What is no longer bit-identical to a run that kept its
    processes: the order of the float sums of each gradient (the all-reduce over processes, the accumulation of
    micro-batches), and, with dropout or drop path on, their draws: ranks that both runs have continue their saved
    RNG streams, a rank the saved run did not have starts a stream from (seed, rank, step), and the streams of
    ranks this run lacks end; with mixup or cutmix on, the pairs mixed, since a micro-batch holds other clips (each
    clip's random erasing stays: pipelines/batch_augment.py)."""

    ema = None  # train.model_ema: the moving average of the weights (`build_ema`)
    budgets: list[int] = []  # model.train_budgets, resolved (`resolve_train_budgets`); [] when off

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.accum = accumulation_steps(cfg, world)
        self.amp_dtype = autocast_dtype(cfg, device)
        self.last_path = os.path.join(cfg.train.out_dir, "last.pt")
        ckpt = read_checkpoint(self.last_path) if os.path.exists(self.last_path) else {}
        if ckpt:
            check_resumable(ckpt, cfg, self.last_path)
        self.epoch, self.step, self.best_top1 = ckpt.get("epoch", 0), ckpt.get("step", 0), ckpt.get("best_top1", -1.0)
        # this run's batch at the saved optimizer step (another accumulation on another number of processes)
        self.batch_in_epoch = saved_step_in_epoch(ckpt, self.last_path) * self.accum if ckpt else 0
        self.validation_pending = ckpt.get("validation_pending", False)  # stopped in the validation of epoch - 1

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = build_model(cfg.model, pixel_std=float(np.mean(cfg.data.std)),
                                 load_pretrained=not ckpt)  # a resume loads every weight anyway
        if cfg.model.init_from and not ckpt:  # fine-tuning: the weights only; optimizer, schedule, epoch start anew
            init_from_checkpoint(self.model, read_checkpoint(cfg.model.init_from), cfg.model.init_from,
                                 cfg.model.init_skip)
        self.model.to(device)
        self.budgets = sorted(resolve_train_budgets(self.model, cfg))  # model.train_budgets; [] when off
        self.ema = build_ema(self.model, cfg)  # of the weights the run starts from; a resume loads the saved one
        compile_model(self.model, cfg)  # after the average's copy (see there)
        # the loss is the mean over a step's clips: with data.num_sample N, N augmented views of each video
        self.ddp = TrainingLoss(self.model, cfg.train.label_smoothing,
                                cfg.train.micro_batch_size * self.accum * cfg.data.num_sample)
        if world > 1:
            self.ddp = DistributedDataParallel(self.ddp)
            settle_gradient_buckets(self.ddp, self.model, device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.train_loader = self._loader("train", self.epoch, self.batch_in_epoch)
        if len(self.train_loader.class_names) != cfg.model.num_classes:
            raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the training list "
                             f"{cfg.data.train_list} has {len(self.train_loader.class_names)} classes")
        batches = len(self.train_loader) + self.batch_in_epoch  # a whole epoch, also when resuming inside one
        self.steps_per_epoch = batches // self.accum  # ceil(videos / batch_size): the loader pads to whole steps
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        if ckpt:
            check_epoch_length(ckpt, self.steps_per_epoch, self.train_loader.num_videos, self.last_path)
        self.scheduler = build_schedule(self.optimizer, cfg, self.steps_per_epoch)
        if self.budgets and rank == 0:
            log_train_budgets(self.budgets, cfg.train.seed, cfg.train.epochs * self.steps_per_epoch, self.model)
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
                            seed=self.cfg.train.seed, start_epoch=start_epoch, start_batch=start_batch,
                            batches_multiple=self.accum if split == "train" else 1)

    def _restore(self, ckpt: dict) -> None:
        load_model_weights(self.model, ckpt, self.last_path)
        if self.ema is not None:
            if "model_ema" not in ckpt:
                raise ValueError(f"{self.last_path} was written by a run without train.model_ema, so there is no "
                                 f"moving average to continue: resume with train.model_ema=false, or start a new "
                                 f"run from its weights (model.init_from)")
            load_model_weights(self.ema.module, ckpt, self.last_path, weights="ema")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.rank < len(ckpt["rng"]):  # one state per rank of the run that wrote it
            set_rng_state(ckpt["rng"][self.rank])
        else:  # a rank that run did not have: a stream of its own, a function of the run's seed, the rank and step
            torch.manual_seed(int(np.random.SeedSequence([self.cfg.train.seed, self.rank, self.step])
                                  .generate_state(1)[0]))
        log.info("resumed from %s: epoch %d, optimizer step %d (%d of the epoch)%s", self.last_path, self.epoch,
                 self.step, self.batch_in_epoch // self.accum,
                 ", its validation pending" if self.validation_pending else "")
        if self.rank == 0:
            warn_of_another_layout(ckpt, self.cfg, self.world, self.accum, self.last_path)

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(self.cfg.train.out_dir, "tensorboard"))

    def checkpoint_state(self, epoch: int, batch_in_epoch: int, validation_pending: bool = False) -> dict:
        assert batch_in_epoch % self.accum == 0, "checkpoints are written between optimizer steps"
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler and self.scaler.state_dict(),
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step_in_epoch": batch_in_epoch // self.accum,
                "steps_per_epoch": self.steps_per_epoch, "validation_pending": validation_pending,
                "step": self.step, "best_top1": self.best_top1, "rng": gather_rng_states(self.world),
                "config": self.cfg.to_dict(), "class_names": list(self.train_loader.class_names),
                **({"model_ema": self.ema.module.state_dict()} if self.ema is not None else {})}

    def save(self, epoch: int, batch_in_epoch: int, best: bool = False, validation_pending: bool = False) -> None:
        state = self.checkpoint_state(epoch, batch_in_epoch, validation_pending)  # collective: every rank takes part
        if self.rank == 0:
            if best:  # best.pt first: a kill in between must not leave last.pt claiming a best.pt never written
                save_checkpoint(os.path.join(self.cfg.train.out_dir, "best.pt"), state)
            save_checkpoint(self.last_path, state)

    def step_budget(self) -> int | None:
        """The token budget of the optimizer step in progress (model.train_budgets: a function of the seed and the
        step, so the same for all its micro-batches, on every rank and on resume); None: the model's own."""
        return int(train_budgets(self.cfg.train.seed, self.step, self.budgets)) if self.budgets else None

    def forward_loss(self, clips, labels, seeds, num_tokens: int | None = None):
        """(loss, logits) of one micro-batch on `num_tokens` tokens (None: the model's own); (a zero, None) for a
        batch of no clips (see `TrainingLoss`)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            return self.ddp(clips, labels, seeds, num_tokens)

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
        if self.ema is not None:  # the step count drives ModelEmaV3's warmup (its first update copies the weights)
            self.ema.update(self.model, step=self.step)


def train_one_epoch(tr: Trainer, epoch: int, first_batch: int, preemption: Preemption | None = None) -> dict:
    """One epoch from batch `first_batch`; raises `Preempted` once a stop is agreed and saved (see `Preemption`).

    Each micro-batch is erased and mixed (`BatchAugment`; nothing with the defaults) before the model, with draws
    keyed by its position in the epoch on this rank: a resume at `first_batch` mixes as the run it continues."""
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
    augment = BatchAugment.from_config(cfg)  # erasing, mixup, cutmix: a function of (seed, epoch, batch, video)
    batch_index, done_steps, tokens_sum = first_batch, 0, 0
    while done_steps < steps_left:
        t0 = time.perf_counter()
        batch = next(batches, None)
        sums["wait"] += time.perf_counter() - t0
        if batch is None:
            break
        clips, targets = augment(batch.clips, batch.labels, batch.index, epoch=epoch, batch=batch_index, rank=tr.rank,
                                 view=batch.view)
        batch_index += 1
        last_micro = batch_index % tr.accum == 0
        with model.no_sync() if tr.world > 1 and not last_micro else nullcontext():
            seeds = kcenter_seeds(cfg.train.seed, TRAIN_STARTS, epoch, batch.index, batch.view)  # K-center starts
            loss, _ = tr.forward_loss(clips, targets, seeds, tr.step_budget())
            (tr.scaler.scale(loss) if tr.scaler else loss).backward()
        loss_sum += loss.detach()
        sums["clips"] += len(batch.labels)
        if not last_micro:
            continue
        tokens_sum += tr.step_budget() or cfg.model.num_tokens
        tr.optimizer_step()
        done_steps += 1
        bar.update(1)
        if tr.writer and tr.step % cfg.train.log_every_steps == 0:
            elapsed, mean_loss = time.perf_counter() - start, loss_sum.item() / done_steps
            tr.writer.add_scalar("train/loss", mean_loss, tr.step)
            # the full rate (the head's, with train.layer_decay; every group's without)
            tr.writer.add_scalar("train/lr", max(group["lr"] for group in tr.optimizer.param_groups), tr.step)
            tr.writer.add_scalar("train/clips_per_s_per_rank", sums["clips"] / elapsed, tr.step)
            tr.writer.add_scalar("train/data_wait_fraction", sums["wait"] / elapsed, tr.step)
            if tr.budgets:  # the mean token budget of the epoch's steps so far (model.train_budgets)
                tr.writer.add_scalar("train/tokens", tokens_sum / done_steps, tr.step)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
        saved = cfg.train.save_every_steps and tr.step % cfg.train.save_every_steps == 0 and done_steps < steps_left
        if saved:
            tr.save(epoch, batch_index)
        if preemption and done_steps < steps_left and (signum := preemption.requested()):
            if not saved:
                tr.save(epoch, batch_index)
            bar.close()
            raise Preempted(signum, "training", epoch, batch_index, tr.step)
    bar.close()
    if not cfg.train.max_steps_per_epoch:
        for _ in batches:  # the loader's end of the epoch (no batch is left: it pads to whole optimizer steps);
            pass           # ending the epoch cleanly lets it reuse its pipeline (an abandoned epoch costs a rebuild)
    else:
        batches.close()
    if done_steps < steps_left or batch_index % tr.accum:
        raise RuntimeError(f"epoch {epoch}: the loader ended after {batch_index} batches, before "
                           f"{tr.steps_per_epoch} optimizer steps")
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum.item() / max(1, done_steps), "clips_per_s": sums["clips"] / elapsed,
            "data_wait": sums["wait"] / elapsed}


def evaluate(tr: Trainer, loader, stop=None) -> tuple[dict | None, tuple | None]:
    """Single-view validation: top-1/top-5, the mean class accuracy (mean_class_acc, over the classes present) and
    the confusion matrix of the top-1 predictions (confusion: K lists of K counts, rows the true class) over every
    video of the split exactly once (summed over ranks). The K-center starts are a function of (seed, video), the
    same every epoch, and draw nothing from the training RNG. With train.model_ema the moving average is scored too
    (the same keys + _ema), on the same clips with the same K-center starts: each video is decoded once for both.

    Also returns the first clips seen and their seeds, for the picture of sampled patches.

    Args:
        stop: asked before each batch, on every rank (`Preemption.requested`, a collective: every rank has as many
            batches); when it answers non-zero, validation ends there and the metrics are None."""
    tr.ddp.eval()
    ema = getattr(tr, "ema", None)  # a Trainer's attribute, None when off; a stand-in for one may lack it
    models = [tr.model] + ([ema.module] if ema is not None else [])
    # correct@1, correct@5 of each model and its (K, K) confusion matrix, counted on the device; float64 (exact
    # counts) so that one all_reduce sums them all
    correct = torch.zeros(len(models), 2, dtype=torch.float64, device=tr.device)
    K = tr.cfg.model.num_classes
    confusion = torch.zeros(len(models), K, K, dtype=torch.float64, device=tr.device)
    count, first = 0, None
    with torch.no_grad():
        for batch in tqdm(loader, desc="val", disable=tr.rank != 0, dynamic_ncols=True):
            if stop and stop():
                return None, None
            if not len(batch.labels):  # nothing to score, and fused attention kernels reject a batch of 0
                continue
            seeds = kcenter_seeds(tr.cfg.train.seed, VAL_STARTS, 0, batch.index)
            if first is None:
                first = batch.clips[: tr.cfg.train.num_vis_clips], seeds[: tr.cfg.train.num_vis_clips]
            for row, model in enumerate(models):
                with torch.autocast(tr.device.type, dtype=tr.amp_dtype) if tr.amp_dtype else nullcontext():
                    logits = model(batch.clips, seeds=seeds)
                top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                hits = top5 == batch.labels[:, None]
                correct[row] += torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).to(correct)
                count_confusion(confusion[row], batch.labels, top5[:, 0])  # the prediction top-1 counted
            count += len(batch.labels)
    totals = torch.cat([correct.flatten(), confusion.flatten(), correct.new_tensor([count])])
    if tr.world > 1:
        dist.all_reduce(totals)  # every rank, also one whose batches were all empty
    totals = totals.cpu()  # one copy to the host
    sums, count = totals[:correct.numel()].tolist(), int(totals[-1])
    confusion = totals[correct.numel():-1].view(len(models), K, K)
    mean_class = 100 * torch.nan_to_num(class_recall(confusion).nanmean(-1), 0.0)  # (models,); 0 without videos
    metrics = {"top1": 100 * sums[0] / max(count, 1), "top5": 100 * sums[1] / max(count, 1),
               "mean_class_acc": float(mean_class[0]), "confusion": confusion[0].long().tolist(), "videos": count}
    if ema is not None:
        metrics.update(top1_ema=100 * sums[2] / max(count, 1), top5_ema=100 * sums[3] / max(count, 1),
                       mean_class_acc_ema=float(mean_class[1]), confusion_ema=confusion[1].long().tolist())
    return metrics, first


def log_confusion(tr: Trainer, metrics: dict, epoch: int) -> None:
    """TensorBoard images of the validation's confusion matrices (val/confusion, val/confusion_ema), rows normalised
    to each class's recall; the class names on the axes when there are few."""
    names = getattr(tr.val_loader, "class_names", None)  # a stand-in loader (a list of batches) has none
    for key in ("confusion", "confusion_ema"):
        if key in metrics:
            image = draw_confusion_matrix(np.array(metrics[key]), names)
            tr.writer.add_image(f"val/{key}", image, epoch, dataformats="HWC")


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


def end_epoch(tr: Trainer, epoch: int, preemption: Preemption) -> dict:
    """Validation when it is due, then last.pt (and best.pt) at the start of the next epoch. Raises `Preempted`,
    last.pt holding the epoch's end with its validation pending, when a stop is agreed during validation."""
    cfg, metrics, best = tr.cfg, {}, False
    if tr.val_loader is not None and ((epoch + 1) % cfg.train.val_every_epochs == 0 or epoch + 1 == cfg.train.epochs):
        metrics, vis = evaluate(tr, tr.val_loader, preemption.requested)
        if metrics is None:
            tr.save(epoch + 1, 0, validation_pending=True)
            raise Preempted(preemption.agreed, "validation", epoch + 1, 0, tr.step)
        best = metrics["top1"] > tr.best_top1  # the trained weights choose best.pt, which holds the EMA's too
        tr.best_top1 = max(tr.best_top1, metrics["top1"])
        ema = (f"; EMA weights: top-1 {metrics['top1_ema']:.2f}%, top-5 {metrics['top5_ema']:.2f}%"
               if "top1_ema" in metrics else "")
        log.info("epoch %d validation: top-1 %.2f%%, top-5 %.2f%%, mean class %.2f%% on %d videos%s", epoch,
                 metrics["top1"], metrics["top5"], metrics["mean_class_acc"], metrics["videos"], ema)
        if tr.writer:
            for key in ("top1", "top5", "mean_class_acc", "top1_ema", "top5_ema", "mean_class_acc_ema"):
                if key in metrics:
                    tr.writer.add_scalar(f"val/{key}", metrics[key], epoch)
            log_confusion(tr, metrics, epoch)
            if vis is not None and cfg.train.num_vis_clips:
                log_sampled_patches(tr, *vis, epoch)
    tr.save(epoch + 1, 0, best=best or tr.val_loader is None)
    return metrics


def run_training(cfg: Config, preemption: Preemption | None = None) -> dict:
    """Training to cfg.train.epochs, from last.pt when there is one; raises `Preempted` (see `Preemption`)."""
    if cfg.data.test_list and cfg.eval.weights == "ema" and not cfg.train.model_ema:  # now, not after the training
        raise ValueError("eval.weights is 'ema' but train.model_ema is off: the checkpoints will hold no EMA weights "
                         "for the test after training. Set train.model_ema=true, or eval.weights=model")
    preemption = preemption or Preemption()
    rank, world, device = setup_distributed(cfg)
    preemption.connect(world)
    setup_logging(cfg.train.out_dir, rank)
    if rank == 0:
        cfg.save(os.path.join(cfg.train.out_dir, "config.yaml"))
        marker = os.path.join(cfg.train.out_dir, PREEMPTED_MARKER)
        if os.path.exists(marker):  # this is the requeued run: a run that ends now must leave none
            os.remove(marker)
    if cfg.data.test_list:
        log.info("after training: multi-view test of %s", resolve_checkpoint(cfg))  # warns on test-set selection
    prepare_demo_data(cfg, rank, world)
    tr = Trainer(cfg, rank, world, device)  # reads and checks the train and val lists
    check_test_list(cfg, rank)
    for budget in cfg.eval.budgets if cfg.data.test_list else ():  # the test's budgets: now, not after the training
        tr.model.check_budget(budget)
    log.info("%d train videos, %d optimizer steps/epoch, accumulation %d, world %d, device %s, autocast %s",
             tr.train_loader.num_videos, tr.steps_per_epoch, tr.accum, world, device, tr.amp_dtype)
    try:
        return train_epochs(tr, preemption)
    finally:
        if tr.writer:
            tr.writer.close()  # also when preempted: what was logged reaches the event file


def train_epochs(tr: Trainer, preemption: Preemption) -> dict:
    """The epochs from where last.pt left off; the last validation's metrics. Raises `Preempted`."""
    cfg, metrics, first_batch = tr.cfg, {}, tr.batch_in_epoch
    if tr.validation_pending:  # the run that wrote last.pt stopped in this validation
        metrics = end_epoch(tr, tr.epoch - 1, preemption)
    for epoch in range(tr.epoch, cfg.train.epochs):
        if signum := preemption.requested():  # last.pt holds this state, or there is nothing to resume yet
            raise Preempted(signum, "between epochs", epoch, first_batch, tr.step)
        stats = train_one_epoch(tr, epoch, first_batch, preemption)
        first_batch = 0
        log.info("epoch %d: loss %.4f, %.1f clips/s per rank, %.0f%% waiting for data; %s", epoch, stats["loss"],
                 stats["clips_per_s"], 100 * stats["data_wait"], tr.train_loader.last_epoch_summary())
        metrics = end_epoch(tr, epoch, preemption)
    if cfg.data.test_list and (signum := preemption.requested()):  # the requeued run only tests
        raise Preempted(signum, "before the test", cfg.train.epochs, 0, tr.step)
    return metrics


def main(argv=None) -> None:
    preemption = Preemption()  # first: a signal during start-up is noted, and acted on at the first check
    args = parse_command_line(__doc__, argv)
    cfg = load_config(args.config, args.overrides)
    try:
        run_training(cfg, preemption)
    except Preempted as stop:
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_preempted_marker(cfg.train.out_dir, stop)
            log.warning("%s; exiting with status %d, to be requeued", stop, PREEMPTED_EXIT)
        preemption.finish()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(PREEMPTED_EXIT)
    if cfg.data.test_list:  # the multi-view test of eval.checkpoint (default: the last epoch), as eval.py runs it
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing the checkpoint
        from eval import run_eval
        run_eval(cfg, resolve_checkpoint(cfg))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
