"""Augmentations of a training micro-batch on its device, between the loader and the model: random erasing of each
clip, then mixup or cutmix across the micro-batch, with soft targets. They are VideoMAE's `--reprob --remode
--recount` and `--mixup --cutmix --mixup_prob --mixup_switch_prob --mixup_mode` (PySlowFast's `AUG.RE_*` and
`MIXUP.*`), in their order: erasing is part of each sample's transform there, mixing works on the collated batch. Both
come before the model, so before K-center sampling: the sampler chooses among the patches of the erased, mixed clips.

Every draw is a function of the run's seed and a position, never of an RNG state. Erasing is a function of (seed,
epoch, video) (`sampling.sample_rng`, stream ERASE), and of the view with data.num_sample > 1 (each augmented view of
a video is erased on its own, as VideoMAE erases in each `_aug_frame`), like the loader's own augmentation: a clip is
erased alike in any batch and on any number of processes. Mixing is a function of (seed, epoch, micro-batch of the
epoch, rank) (`mixing_rng`), over the micro-batch's rows, every view a row: a resumed run restarts at the same
micro-batch of its epoch and mixes as the run it continues. A run resumed on another number of processes (or
micro-batch size) groups other clips into each micro-batch, so its pairs, and so its mixed clips, differ from the run
that wrote the checkpoint; each clip's erasing stays the same.

timm's `Mixup` and `RandomErasing` (timm.data) are not used as they are: they draw from the global RNGs (numpy's and
Python's `random` for the parameters, torch's for the noise). That state belongs to the process and moves with every
other draw there, so a resumed run, or one on other processes, would draw other numbers. Both are also made for
images: `Mixup` pastes its cutmix box into dimensions 2 and 3, which are (T, H) of a (B, C, T, H, W) clip, and
`RandomErasing` erases each image of a 4-D batch on its own, where a clip needs one region in all its frames;
SlowFast's copy of it (`cube=True`, which VideoMAE uses) keeps one region but draws the 'pixel' noise anew for each
frame, and as VideoMAE calls it (num_splits = recount) leaves the first T / recount frames unerased when recount > 1;
here every frame is erased. What is kept is their math, drawn from explicitly seeded generators: mixup's lambda ~
Beta(alpha, alpha); cutmix's box from timm's `rand_bbox`, with lambda corrected to the clipped box's area; row i mixed
with row B - 1 - i (the flipped batch); erasing's area, aspect and count as timm's. timm's `mixup_target`, a pure
function, makes the targets as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import mixup_target
from torch import Tensor

from pipelines.sampling import ERASE, sample_rng

MIXING = 7  # the last word of a micro-batch's key: 5 words long, never equal to a video's 4 (sample_rng)
ERASE_ATTEMPTS = 10  # draws of a region that fits the frame, as timm (SlowFast's cube variant makes 100)
RE_MODES = ("pixel", "rand", "const")
MIXUP_MODES = ("batch", "pair", "elem")


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array on `device`, copied through pinned memory on CUDA: a copy from pageable memory would make the host
    wait until the device has finished the work queued before it (the previous micro-batch's backward)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


# ---------------------------------------------------------------------------------------------------------------
# Random erasing


@dataclass(frozen=True)
class ErasedRegion:
    top: int
    left: int
    height: int
    width: int
    fill: np.ndarray | None  # (C, height, width) for 'pixel', (C, 1, 1) for 'rand'; None: zeros ('const')


def erased_regions(seed: int, epoch: int, index: int, channels: int, height: int, width: int, *, prob: float,
                   mode: str, count: int, area: tuple[float, float], aspect: tuple[float, float],
                   view: int = 0) -> list[ErasedRegion]:
    """The regions random erasing draws for video `index` (its augmented view `view`) in `epoch`, as timm's
    RandomErasing: with probability `prob`, 1 to `count` regions. Each covers a fraction of the frame uniform in
    `area`, divided by the number of regions, with a height / width log-uniform in `aspect`, at a uniform place where
    it fits; a region that does not fit is drawn again, up to ERASE_ATTEMPTS times, and then left out."""
    rng = sample_rng(seed, epoch, index, ERASE, view)
    if not rng.random() < prob:
        return []
    number = int(rng.integers(1, count + 1)) if count > 1 else 1  # drawn only when it can vary, as timm
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    regions = []
    for _ in range(number):
        for _ in range(ERASE_ATTEMPTS):
            target = rng.uniform(*area) * (height * width) / number  # timm's order of the float operations
            ratio = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if h < height and w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                shape = {"pixel": (channels, h, w), "rand": (channels, 1, 1)}.get(mode)
                fill = rng.standard_normal(shape, dtype=np.float32) if shape else None
                regions.append(ErasedRegion(top, left, h, w, fill))
                break
    return regions


def erase_clips(clips: Tensor, index: Tensor, seed: int, epoch: int, *, prob: float, mode: str, count: int,
                area: tuple[float, float], aspect: tuple[float, float], view: Tensor | None = None) -> Tensor:
    """(B, C, T, H, W) clips with each clip's `erased_regions` erased in all T frames: a new tensor, or `clips` itself
    when no clip has a region.

    The fill replaces normalised values: 'const' writes 0, the mean colour. The noise of 'pixel' and 'rand' is drawn
    once per region and is the same in every frame: noise drawn anew per frame would make each erased patch far from
    its neighbours in time, and K-center sampling, which keeps patches far apart, would spend its picks on them.

    Args:
        index: (B,) dataset index of each row (CPU).
        view: (B,) augmented view of each row (CPU; data.num_sample > 1), or None: every row is view 0.
    """
    if not prob or not len(clips):
        return clips
    _, channels, _, height, width = clips.shape
    views = view.tolist() if view is not None else [0] * len(index)
    drawn = [erased_regions(seed, epoch, video, channels, height, width, prob=prob, mode=mode, count=count,
                            area=area, aspect=aspect, view=v) for video, v in zip(index.tolist(), views)]
    if not any(drawn):
        return clips
    out = clips.clone()
    for row, regions in enumerate(drawn):
        for r in regions:
            window = out[row, :, :, r.top:r.top + r.height, r.left:r.left + r.width]  # (C, T, h, w)
            if r.fill is None:
                window.zero_()
            else:
                window.copy_(to_device(r.fill, out.device).unsqueeze(1))  # (C, 1, h, w): broadcast over the frames
    return out


# ---------------------------------------------------------------------------------------------------------------
# Mixup and cutmix


@dataclass(frozen=True)
class Mixing:
    """What mixing does to each row of a micro-batch of B clips; row i is mixed with row B - 1 - i."""
    lam: np.ndarray  # (B,) float64: the weight of the row's own clip and label; 1 = not mixed
    cut: np.ndarray  # (B,) bool: by cutmix (the partner's clip pasted in `box`), else by mixup (a weighted sum)
    box: np.ndarray  # (B, 4) int64 (top, bottom, left, right) of the pasted window, the same in every frame


def mixing_rng(seed: int, epoch: int, batch: int, rank: int) -> np.random.Generator:
    """The generator of the `batch`-th micro-batch (from 0) of `epoch` on `rank`."""
    return np.random.default_rng([seed, epoch, batch, rank, MIXING])


def cutmix_box(rng: np.random.Generator, lam: float, height: int, width: int) -> tuple[np.ndarray, float]:
    """timm's `rand_bbox` and lambda correction: a window of sides sqrt(1 - lam) x the frame's, its centre uniform
    over the frame, clipped to the frame; the corrected lambda is 1 - the clipped window's fraction of the frame.

    Returns ((top, bottom, left, right), corrected lambda)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return np.array([top, bottom, left, right]), 1.0 - (bottom - top) * (right - left) / (height * width)


def draw_mixing(rng: np.random.Generator, rows: int, height: int, width: int, *, mixup: float, cutmix: float,
                prob: float, switch_prob: float, mode: str) -> Mixing:
    """The mixing of a micro-batch of `rows` clips of height x width, as timm's Mixup draws it. Each draw (one for
    the micro-batch in mode 'batch', one per pair of rows i and B - 1 - i in 'pair', one per row in 'elem') mixes with
    probability `prob`; by cutmix with probability `switch_prob` when both alphas are > 0, else by the one that is;
    with lambda ~ Beta(alpha, alpha) of that method (`mixup` or `cutmix`, one of them > 0).

    The middle row of an odd micro-batch is its own partner and is left as it is: timm requires an even batch, but
    a micro-batch here may be short of a video the decoder failed on."""
    groups = {"batch": 1, "pair": rows // 2, "elem": rows}[mode]
    applied = rng.random(groups) < prob
    cut = rng.random(groups) < switch_prob if mixup > 0 and cutmix > 0 else np.full(groups, cutmix > 0)
    alpha = np.where(cut, cutmix, mixup)
    lam = np.where(applied, rng.beta(alpha, alpha), 1.0)
    cut &= applied
    box = np.zeros((groups, 4), dtype=np.int64)
    for g in np.flatnonzero(cut):
        box[g], lam[g] = cutmix_box(rng, float(lam[g]), height, width)
    # row -> its draw; the last entry, appended, is "not mixed", for a row that is its own partner
    lam, cut, box = np.append(lam, 1.0), np.append(cut, False), np.vstack([box, np.zeros((1, 4), dtype=np.int64)])
    row = np.arange(rows)
    partner = rows - 1 - row
    group = {"batch": np.zeros(rows, dtype=np.int64), "pair": np.minimum(row, partner), "elem": row}[mode]
    group[row == partner] = groups
    return Mixing(lam[group], cut[group], box[group])


def mix_clips(clips: Tensor, mixing: Mixing) -> Tensor:
    """(B, C, T, H, W) clips mixed with the flipped micro-batch: a new tensor (`clips` is left as it is)."""
    out = clips.clone()
    for row in np.flatnonzero(mixing.lam < 1).tolist():
        other = clips[len(clips) - 1 - row]
        if mixing.cut[row]:
            top, bottom, left, right = mixing.box[row].tolist()
            out[row, :, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]  # one window, every frame
        else:
            lam = float(mixing.lam[row])
            out[row] = clips[row] * lam + other * (1.0 - lam)
    return out


def mixed_targets(labels: Tensor, mixing: Mixing, num_classes: int, smoothing: float) -> Tensor:
    """(B, num_classes) float32 soft targets, timm's `mixup_target`: each row's smoothed one-hot label (1 - smoothing
    + smoothing / num_classes on the label, smoothing / num_classes elsewhere, as cross_entropy's label_smoothing)
    weighted lam, its partner's 1 - lam."""
    lam = to_device(mixing.lam[:, None].astype(np.float32), labels.device)  # (B, 1) float32, as timm per clip
    return mixup_target(labels, num_classes, lam, smoothing)


# ---------------------------------------------------------------------------------------------------------------
# Both, as train.py applies them


@dataclass(frozen=True)
class BatchAugment:
    """Random erasing, then mixup / cutmix, of each training micro-batch; off (clips and labels passed through as
    they are) with the defaults. `from_config` reads data.re_* and train.mixup*."""
    seed: int
    num_classes: int
    label_smoothing: float = 0.0
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    re_area: tuple[float, float] = (0.02, 1 / 3)
    re_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"

    def __post_init__(self):
        if self.re_mode not in RE_MODES or self.mixup_mode not in MIXUP_MODES:
            raise ValueError(f"re_mode must be one of {list(RE_MODES)} and mixup_mode one of {list(MIXUP_MODES)}, got "
                             f"{self.re_mode!r} and {self.mixup_mode!r}")

    @classmethod
    def from_config(cls, cfg) -> "BatchAugment":
        data, train = cfg.data, cfg.train
        return cls(seed=train.seed, num_classes=cfg.model.num_classes, label_smoothing=train.label_smoothing,
                   re_prob=data.re_prob, re_mode=data.re_mode, re_count=data.re_count, re_area=data.re_area,
                   re_aspect=data.re_aspect, mixup=train.mixup, cutmix=train.cutmix, mixup_prob=train.mixup_prob,
                   mixup_switch_prob=train.mixup_switch_prob, mixup_mode=train.mixup_mode)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, clips: Tensor, labels: Tensor, index: Tensor, *, epoch: int, batch: int, rank: int,
                 view: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(clips, targets) of one micro-batch: the targets are the (B,) labels as they are when mixing is off, else
        (B, num_classes) soft targets with the label smoothing in them (`runtime.TrainingLoss` takes both).

        Args:
            index: (B,) dataset index of each row (CPU).
            batch: the micro-batch's position in the epoch on this rank, from 0 (the loader's, also after a resume).
            view: (B,) augmented view of each row (CPU; Batch.view), or None: every row is view 0.
        """
        clips = erase_clips(clips, index, self.seed, epoch, prob=self.re_prob, mode=self.re_mode,
                            count=self.re_count, area=self.re_area, aspect=self.re_aspect, view=view)
        if not self.mixes:
            return clips, labels
        mixing = draw_mixing(mixing_rng(self.seed, epoch, batch, rank), len(labels), *clips.shape[-2:],
                             mixup=self.mixup, cutmix=self.cutmix, prob=self.mixup_prob,
                             switch_prob=self.mixup_switch_prob, mode=self.mixup_mode)
        return mix_clips(clips, mixing), mixed_targets(labels, mixing, self.num_classes, self.label_smoothing)
