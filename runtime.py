"""What train.py and eval.py share: the command line, processes and devices, determinism, checkpoints, the confusion
matrix; and the module DDP wraps in training (a module class needs torch where it is defined, which train.py does
not import in DALI's spawned workers).

Checkpoints hold tensors and plain Python values only (RNG states as tensors, the config as a dict), so every
load uses `torch.load(..., weights_only=True)`: a file that would need to run code to load is refused, never
executed. `read_checkpoint` names the file and what is wrong with anything that is not a checkpoint of this
project.
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import pickle
import random
import re
import sys
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import Config
from models.kcenter import mix_keys

log = logging.getLogger("kcenter")

CHECKPOINT_FORMAT = "kcenter-video checkpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_command_line(description: str, argv=None, add_options=None) -> argparse.Namespace:
    """`--config FILE`, the script's own options (`add_options(parser)`), and `section.key=value` overrides
    anywhere on the line, before, between or after the options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    if add_options:
        add_options(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    return parser.parse_intermixed_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Processes, devices, precision


def setup_distributed(cfg: Config):
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE (1 process without them); NCCL on GPU, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.data.device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("data.device is 'gpu' but CUDA is not available; run with data.device=cpu")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    configure_determinism(cfg.train.deterministic, device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """train.deterministic: deterministic kernels on the GPU (cuBLAS with a fixed workspace, no atomics-based
    reductions, no cuDNN attention; an op without a deterministic kernel raises instead of running).

    The CPU code of this project is deterministic without it (tests/test_train.py), so on the CPU the flag changes
    nothing. cuBLAS reads CUBLAS_WORKSPACE_CONFIG when its handle is created: this runs before any CUDA work."""
    if not deterministic or device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def setup_logging(out_dir: str, rank: int) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(out_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")


def autocast_dtype(cfg: Config, device: torch.device):
    """bf16/fp16 autocast on GPU; CPU runs fp32 whatever the config says (CPU half precision is slow)."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return None
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16


# ---------------------------------------------------------------------------------------------------------------
# The training step's module


def empty_batch_loss(model: torch.nn.Module) -> torch.Tensor:
    """The loss of a micro-batch of no clips, without the model: a zero that depends on every trained parameter, so
    that backward gives each one a gradient of zeros."""
    return sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)


class TrainingLoss(torch.nn.Module):
    """The model and the loss of one micro-batch, as one module: the module DDP wraps.

    A micro-batch without clips (a rank whose shard is a video short, or whose videos were all bad) never reaches the
    model: fused attention kernels on the GPU reject a batch of 0. Its loss is a zero that depends on every
    parameter, so backward still gives each one a (zero) gradient and DDP's allreduce runs on this rank as on the
    others. The zero is made here, inside the wrapped module's forward, because DDP only reduces the gradients of a
    backward that followed a forward through it.

    The targets are (B,) class indices, smoothed here with `label_smoothing`, or (B, classes) probabilities (the soft
    targets of mixup and cutmix, pipelines/batch_augment.py), which already hold their smoothing and are not smoothed
    again; validation and testing score hard labels and never come here.

    Args:
        rows_per_step: clips of one optimizer step on this rank (micro-batch size x accumulation steps x
            data.num_sample: every augmented view is a clip).
    """

    def __init__(self, model: torch.nn.Module, label_smoothing: float, rows_per_step: int):
        super().__init__()
        self.model, self.label_smoothing, self.rows_per_step = model, label_smoothing, rows_per_step

    def forward(self, clips, labels, seeds, num_tokens: int | None = None):
        if not len(labels):
            return empty_batch_loss(self.model), None
        logits = self.model(clips, seeds=seeds, num_tokens=num_tokens)  # None: the model's own budget
        # sum over the rows present / nominal rows per optimizer step on this rank: the accumulated gradient is the
        # mean over the step's clips (DDP averages the ranks), and a batch that lost a bad video, or all of them,
        # still counts its samples at the same weight
        smoothing = 0.0 if labels.is_floating_point() else self.label_smoothing
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction="sum") / self.rows_per_step
        return loss, logits


# ---------------------------------------------------------------------------------------------------------------
# Confusion matrix: validation (train.py) and testing (eval.py) count the same way


def count_confusion(confusion: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor) -> None:
    """Adds each (true class, top-1 prediction) pair to `confusion` (K, K), in place: rows are the true class,
    columns the prediction. One index_add_ on the flattened matrix, on the matrix's device (deterministic also
    under torch.use_deterministic_algorithms, and exact in float64 up to 2**53 videos).

    Args:
        labels, predictions: (B,) int64 class indices, on the device of `confusion`.
    """
    K = confusion.shape[-1]
    confusion.view(-1).index_add_(0, labels * K + predictions, torch.ones_like(labels, dtype=confusion.dtype))


def class_recall(confusion: torch.Tensor) -> torch.Tensor:
    """(..., K) float64 top-1 accuracy of each true class of (..., K, K) confusion matrices (the diagonal over the
    row sum); NaN for a class without videos, so that `.nanmean(-1)` is the mean class accuracy over the classes
    present."""
    counts = confusion.double()
    return counts.diagonal(dim1=-2, dim2=-1) / counts.sum(-1)  # 0 / 0 = NaN where a row is empty


# ---------------------------------------------------------------------------------------------------------------
# Seeds of the K-center starts


# What a clip's K-center start depends on besides the run's seed and the video: the epoch in training, nothing in
# validation, the view in testing. Disjoint streams, so that no two of them share starts by construction; the
# token budget of a training step (model.train_budgets) has a stream of its own.
TRAIN_STARTS, VAL_STARTS, TEST_STARTS, TRAIN_BUDGETS = range(4)


def kcenter_seeds(seed: int, stream: int, step, index: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) int64 clip seeds from (seed, stream, step, video index), and the augmented view of a training row with
    data.num_sample > 1: the K-center starts of a clip are a function of these only, not of the batch it came in, the
    process that ran it or the RNG state.

    Args:
        step: the epoch (training), 0 (validation), or the view of each row (testing; an int or a (B,) array).
        index: (B,) dataset index of each clip (CPU).
        view: (B,) augmented view of each training row (Batch.view), or None. View 0 keeps the seed of a clip
            without views (num_sample 1 starts where it always did); a view v >= 1 adds v to the key.
    """
    step = step.cpu().numpy() if isinstance(step, torch.Tensor) else step
    index = index.cpu().numpy()
    seeds = mix_keys(seed, stream, step, index)
    if view is not None and bool((view > 0).any()):
        view = view.cpu().numpy()
        seeds = np.where(view > 0, mix_keys(seed, stream, step, index, view), seeds)
    return torch.from_numpy(seeds.view(np.int64))


def train_budgets(seed: int, steps, budgets: list[int]) -> np.ndarray:
    """The token budget of each optimizer step in `steps` (an int or an array of step numbers, counted from 0 over
    the whole run) with model.train_budgets: one of `budgets`, uniformly, a fixed function of (seed, step), so every
    rank, rerun and resume draws the same."""
    draws = mix_keys(seed, TRAIN_BUDGETS, steps) % np.uint64(len(budgets))
    return np.asarray(budgets, dtype=np.int64)[draws.astype(np.int64)]


def view_seeds(seed: int, index: torch.Tensor, num_views: int) -> torch.Tensor:
    """(B * V,) K-center seeds of the test views of videos `index` (B,), video-major like the flattened views."""
    views = torch.arange(num_views).repeat(len(index))
    return kcenter_seeds(seed, TEST_STARTS, views, index.repeat_interleave(num_views))


# ---------------------------------------------------------------------------------------------------------------
# RNG state, as tensors and plain values (loadable with weights_only=True)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: no context on the other GPUs
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints


@contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """A temp file in the folder of `path`, renamed onto it when the block ends: a kill leaves the old file or the
    new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save of `state` with this project's format marker, atomically."""
    with atomic_file(path) as f:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, f)


# what every checkpoint of this project holds, and of what type
_CHECKPOINT_KEYS = {"model": dict, "config": dict, "epoch": int, "step": int}


def read_checkpoint(path: str) -> dict:
    """A checkpoint written by train.py, read with weights_only=True; anything else is one clear error naming the
    file and what is wrong with it, and nothing in the file runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        code = re.search(r"Unsupported global: (GLOBAL [\w.]+)", message)
        if isinstance(e, pickle.UnpicklingError) and code:  # the weights-only unpickler met a global to import
            raise ValueError(f"{path}: refused to load: it holds Python objects that loading would have to run "
                             f"code to rebuild ({code.group(1).strip()}). Checkpoints of this project hold tensors "
                             f"and plain values only; this file was written by something else, or by this project "
                             f"before checkpoint format {CHECKPOINT_VERSION}") from None
        detail = re.search(r"WeightsUnpickler error: \s*([^\n]+)", message)
        detail = (detail.group(1) if detail else (message.strip().splitlines() or [""])[0]).split(". ")[0]
        raise ValueError(f"{path} is not a readable checkpoint (not a file written by torch.save, or truncated): "
                         f"{type(e).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        what = (f"a state dict of {len(ckpt)} entries such as {list(ckpt)[:3]}" if isinstance(ckpt, dict)
                else f"a {type(ckpt).__name__}")
        raise ValueError(f"{path} is not a checkpoint of this project: it is {what}, without the "
                         f"'format': {CHECKPOINT_FORMAT!r} entry that train.py writes. For 2-D ImageNet weights "
                         f"use model.pretrained")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {ckpt.get('version')!r}, this code reads version "
                         f"{CHECKPOINT_VERSION}")
    wrong = [f"{key} (expected {kind.__name__})" for key, kind in _CHECKPOINT_KEYS.items()
             if not isinstance(ckpt.get(key), kind)]
    if wrong:
        raise ValueError(f"{path}: checkpoint lacks or has the wrong type of {', '.join(wrong)}")
    return ckpt


def _misfits(own: dict, theirs: dict, leave: set[str] = frozenset()) -> list[str]:
    """Every tensor that does not fit between a model's state dict and a checkpoint's, except the names `leave`."""
    problems = [f"{k}: not in the checkpoint" for k in own if k not in leave and k not in theirs]
    problems += [f"{k}: in the checkpoint, not in the model" for k in theirs if k not in leave and k not in own]
    problems += [f"{k}: {tuple(theirs[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
                 for k, v in own.items() if k not in leave and k in theirs
                 and (not isinstance(theirs[k], torch.Tensor) or theirs[k].shape != v.shape)]
    return problems


def _listed(problems: list[str], most: int) -> str:
    return "; ".join(problems[:most]) + (" ..." if len(problems) > most else "")


# eval.weights -> the checkpoint entry holding them: the trained weights, or their moving average (train.model_ema)
CHECKPOINT_WEIGHTS = {"model": "model", "ema": "model_ema"}


def load_model_weights(model: torch.nn.Module, ckpt: dict, path: str, weights: str = "model") -> None:
    """The checkpoint's weights (`weights`: model | ema) into `model`, or an error naming the file and every tensor
    that does not fit, or saying that the run that wrote it kept no moving average."""
    if weights == "ema" and not isinstance(ckpt.get("model_ema"), dict):
        raise ValueError(f"{path} holds no EMA weights ('model_ema'): the run that wrote it trained without "
                         f"train.model_ema. Test its trained weights (eval.weights=model; predict.py --weights model)")
    state = ckpt[CHECKPOINT_WEIGHTS[weights]]
    problems = _misfits(model.state_dict(), state)
    if problems:
        raise ValueError(f"{path}: its {'EMA ' if weights == 'ema' else ''}weights do not fit the model of this "
                         f"config ({len(problems)} problems: {_listed(problems, 8)})")
    model.load_state_dict(state)


def init_from_checkpoint(model: torch.nn.Module, ckpt: dict, path: str, skip: list[str]) -> tuple[list, list]:
    """Fine-tuning: the weights of a checkpoint of this project into `model`, except the parameters `skip` names
    (a name, a dotted prefix or an fnmatch pattern) and the head when the class count differs. Every other tensor on
    either side must fit: a missing, unexpected or differently shaped one is an error naming each.

    Returns (loaded names, skipped names)."""
    own, theirs = model.state_dict(), ckpt["model"]
    head_differs = "head.weight" in own and "head.weight" in theirs and own["head.weight"].shape != \
        theirs["head.weight"].shape
    leave = {k for k in own.keys() | theirs.keys()
             if any(k == s or k.startswith(s + ".") or fnmatch.fnmatchcase(k, s) for s in skip)
             or (head_differs and k.startswith("head."))}
    problems = _misfits(own, theirs, leave)
    if problems:
        raise ValueError(f"model.init_from {path}: {len(problems)} tensors do not fit this model (leave them at their "
                         f"initialisation with model.init_skip): {_listed(problems, 10)}")
    loaded = [k for k in own if k not in leave]
    left = sorted(k for k in own if k in leave)
    model.load_state_dict({k: theirs[k] for k in loaded}, strict=False)
    log.info("initialised from %s (epoch %d, step %d): %d tensors loaded, %d left at initialisation%s: %s", path,
             ckpt["epoch"], ckpt["step"], len(loaded), len(left),
             " (the head: the class count differs)" if head_differs else "", left[:10])
    return loaded, left


def resolve_checkpoint(cfg: Config, choice: str | None = None) -> str:
    """The file `eval.checkpoint` (or `choice`) names: `last` -> out_dir/last.pt (the paper reports the last
    epoch), `best` -> out_dir/best.pt, anything else is a path. Testing `best` chosen on the test list itself is
    selection on the test set: a warning says so."""
    choice = choice or cfg.eval.checkpoint
    if choice in ("last", "best"):
        if choice == "best" and cfg.data.val_list and cfg.data.val_list == cfg.data.test_list:
            log.warning("eval.checkpoint is 'best' and data.val_list is the test list (%s): best.pt was chosen on "
                        "the test set, so its test accuracy is optimistic. The paper reports the last epoch "
                        "(eval.checkpoint=last)", cfg.data.test_list)
        return os.path.join(cfg.train.out_dir, f"{choice}.pt")
    return choice
