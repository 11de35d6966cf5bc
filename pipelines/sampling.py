"""Everything random in the data path, as pure functions of (seed, epoch, video index) (and of the augmented view of
a training clip, data.num_sample), and the spatial geometry of the test views (shared by the graphs and predict.py).

The sources call these in worker processes; nothing here depends on DALI's RNG, worker timing or the order in
which samples are produced, so a resumed run (start_epoch, start_batch) gets exactly the batches it would have
got without stopping, whatever the number of ranks or workers.

The clip protocol is that of the paper's code (Park et al., ECCV 2022, built on SlowFast):
- Kinetics: a clip spans `sampling_rate * num_frames / target_fps * fps` source frames; its start is drawn
  uniformly in training, is `i / num_clips` of the slack for test clip i, and the first frame for validation
  (the original's val branch takes clip 0 of 1);
  `num_frames` indices are spread over the span with `linspace` and clamped to the video (edge padding).
- SSv2: `num_frames` segments of `(n - 1) / num_frames` frames; a random frame of each segment in training,
  the middle one otherwise.
- Training space: short side drawn from `train_jitter_scales` (optionally inverse-uniform), random crop,
  flip with p=0.5, colour jitter (brightness/contrast/saturation 0.4, applied with p=0.8), RandAugment
  (timm's "rand-m9-mstd0.5-inc1" syntax).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# Independent random streams per quantity, so that turning one augmentation off leaves the others unchanged. ERASE is
# drawn on the device after the loader (pipelines/batch_augment.py), from the same (seed, epoch, video) keys.
TEMPORAL, SCALE, CROP, FLIP, JITTER, AUGMENT, ERASE = range(7)
# The fifth word of the key of a repeated view (data.num_sample, `sample_rng`): 6 words long, never equal to a video's
# 4 or a micro-batch's 5 (pipelines/batch_augment.py)
VIEW_KEY = 8

COLOR_JITTER_PROB = 0.8  # the original applies the jitter when uniform() >= 0.2
COLOR_JITTER_STRENGTH = 0.4  # brightness, contrast and saturation factors in 1 +- 0.4


def sample_rng(seed: int, epoch: int, index: int, stream: int, view: int = 0) -> np.random.Generator:
    """The generator of one random quantity of one video in one epoch; of its augmented view `view` (data.num_sample
    views of one decoded clip). View 0 has the key a clip had before there were views, so that data.num_sample 1 draws
    what it always drew; view v >= 1 adds (VIEW_KEY, v)."""
    if view:
        return np.random.default_rng([seed, epoch, index, stream, VIEW_KEY, view])
    return np.random.default_rng([seed, epoch, index, stream])


# ---------------------------------------------------------------------------------------------------------------
# Epoch order and sharding


def epoch_order(num_videos: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Dataset indices in the order of one epoch: a permutation from (seed, epoch), or dataset order."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(num_videos)
    return np.arange(num_videos)


def steps_per_epoch(num_videos: int, batch_size: int, world_size: int, batches_multiple: int = 1) -> int:
    """Batches per rank and epoch once the epoch is padded to a multiple of world_size * batch_size *
    batches_multiple.

    Training passes its accumulation steps as `batches_multiple`: an epoch is then ceil(num_videos / global batch)
    whole optimizer steps, a number that does not depend on how the global batch is split into processes and
    micro-batches, and optimizer step s covers the positions [s * global batch, (s + 1) * global batch) of the
    epoch's order (`global_position`) on any number of processes."""
    return batches_multiple * max(1, math.ceil(num_videos / (world_size * batch_size * batches_multiple)))


def global_position(rank_position: int, rank: int, world_size: int) -> int:
    """Position in the padded epoch order of the `rank_position`-th sample of `rank` (strided shards, as
    torch's DistributedSampler). Positions >= num_videos are padding (wrap-around)."""
    return rank_position * world_size + rank


# ---------------------------------------------------------------------------------------------------------------
# Temporal sampling


def kinetics_frame_indices(num_video_frames: int, video_fps: float, num_frames: int, sampling_rate: int,
                           target_fps: float, position: float) -> np.ndarray:
    """Frame indices of one clip, as the original Kinetics decoder chooses them.

    Args:
        num_video_frames: frames in the video.
        video_fps: the video's frame rate; the clip covers `sampling_rate * num_frames` frames at `target_fps`.
        position: where the clip starts within the slack `max(n - clip_size, 0)`, in [0, 1].
    Returns:
        (num_frames,) int64 indices in [0, num_video_frames - 1]; a video shorter than the clip repeats its
        last frame.
    """
    clip_size = sampling_rate * num_frames / target_fps * video_fps
    start = max(num_video_frames - clip_size, 0.0) * position
    # The original decodes from the first frame at or after `start`, then takes linspace over the clip.
    offsets = np.linspace(0.0, clip_size - 1.0, num_frames).astype(np.int64)
    return np.clip(math.ceil(start) + offsets, 0, max(num_video_frames - 1, 0))


def kinetics_positions(mode: str, rng: np.random.Generator | None, num_clips: int = 1) -> list[float]:
    """Clip start positions: one uniform draw (train), the start of the video (val, as the original), or
    i / num_clips (test)."""
    if mode == "train":
        return [float(rng.uniform())]
    if mode == "val":
        return [0.0]
    return [i / num_clips for i in range(num_clips)]


def clip_frame_indices(mode: str, segments: bool, num_video_frames: int, fps: float, num_frames: int,
                       sampling_rate: int, target_fps: float, num_clips: int = 1,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """(num_clips * num_frames,) frame indices of a sample, clip-major: one frame per segment (`segments`, the SSv2
    protocol), or the Kinetics clips of `mode` (`rng` draws the training clip's start and frames)."""
    if segments:
        return ssv2_frame_indices(num_video_frames, num_frames, rng)
    return np.concatenate([kinetics_frame_indices(num_video_frames, fps, num_frames, sampling_rate, target_fps, p)
                           for p in kinetics_positions(mode, rng, num_clips)])


def ssv2_frame_indices(num_video_frames: int, num_frames: int, rng: np.random.Generator | None) -> np.ndarray:
    """One frame per segment: random within the segment if `rng` is given (training), else the middle one."""
    seg_size = (num_video_frames - 1) / num_frames
    bounds = np.round(seg_size * np.arange(num_frames + 1)).astype(np.int64)  # np.round, as the original
    start, end = bounds[:-1], bounds[1:]
    if rng is None:
        return (start + end) // 2
    return rng.integers(start, end + 1)


# ---------------------------------------------------------------------------------------------------------------
# Spatial and colour augmentation parameters


@dataclass(frozen=True)
class TrainSpatial:
    scale: float  # short side after resizing
    crop_x: float  # crop position in [0, 1] along the free width / height
    crop_y: float
    mirror: int  # 1 = horizontal flip


def train_spatial(seed: int, epoch: int, index: int, jitter_scales: tuple[int, int], inverse_uniform: bool,
                  random_flip: bool, view: int = 0) -> TrainSpatial:
    """The short side, crop position and flip of augmented view `view` of video `index` (see sample_rng)."""
    lo, hi = jitter_scales
    u = sample_rng(seed, epoch, index, SCALE, view).uniform()
    if inverse_uniform:
        scale = round(1.0 / (1.0 / hi + u * (1.0 / lo - 1.0 / hi)))
    else:
        scale = round(lo + u * (hi - lo))
    crop_x, crop_y = sample_rng(seed, epoch, index, CROP, view).uniform(size=2)
    mirror = int(random_flip and sample_rng(seed, epoch, index, FLIP, view).uniform() < 0.5)
    return TrainSpatial(float(scale), float(crop_x), float(crop_y), mirror)


def color_jitter_factors(seed: int, epoch: int, index: int, view: int = 0) -> np.ndarray:
    """(brightness, contrast, saturation) factors of augmented view `view` of video `index` (see sample_rng);
    (1, 1, 1) when the jitter is not applied (p = 0.2).

    The original applies the three in a random order, but on unclipped floats they commute (each is a blend with
    a quantity the others scale alike), so the order is not drawn.
    """
    rng = sample_rng(seed, epoch, index, JITTER, view)
    apply = rng.uniform() >= 1.0 - COLOR_JITTER_PROB
    factors = 1.0 + rng.uniform(-COLOR_JITTER_STRENGTH, COLOR_JITTER_STRENGTH, size=3)
    return (factors if apply else np.ones(3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# RandAugment (timm's policy strings)


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's "rand-m9-n2-mstd0.5-inc1": `num_ops` ops per clip, each applied with `prob`, magnitude drawn from
    N(magnitude, magnitude_std) clipped to [0, magnitude_max] (on timm's 0..10 scale)."""
    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False
    prob: float = 0.5

    # Magnitudes are quantised to 1/3 on timm's 0..10 scale (DALI's default bin count): each bin costs graph
    # construction time (about 3 s per 100 bins, for DALI's autograph), and 1/3 is well below mstd0.5.
    MAGNITUDE_BINS = 31


def parse_rand_augment(policy: str) -> RandAugmentSpec | None:
    """Parse a timm RandAugment string ("rand-m9-mstd0.5-inc1"); empty means off."""
    if not policy:
        return None
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"data.rand_augment must look like 'rand-m9-mstd0.5-inc1', got {policy!r}")
    keys = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "increasing",
            "p": "prob"}
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+|inf)", part)
        if not match or match.group(1) not in keys:
            raise ValueError(f"data.rand_augment {policy!r}: unknown part {part!r} (known: {', '.join(keys)})")
        key, value = keys[match.group(1)], float(match.group(2))
        values[key] = int(value) if key == "num_ops" else bool(value) if key == "increasing" else value
    spec = RandAugmentSpec(**values)
    if not 0 <= spec.magnitude_max <= 10 or not 0 <= spec.prob <= 1 or spec.num_ops < 1:
        raise ValueError(f"data.rand_augment {policy!r}: need n >= 1, 0 <= mmax <= 10 and 0 <= p <= 1")
    return spec


def rand_augment_choices(seed: int, epoch: int, index: int, spec: RandAugmentSpec, num_ops_in_suite: int,
                         identity: int, view: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ops, magnitude bins and signs of the `spec.num_ops` RandAugment layers of one clip (as timm draws them), or of
    its augmented view `view` (see sample_rng).

    Returns:
        op (n,) int32 index into the suite (`identity` where the layer is skipped), magnitude bin (n,) int32 in
        [0, MAGNITUDE_BINS - 1] (the last bin = timm magnitude 10), sign (n,) int32, 1 = negate.
    """
    rng = sample_rng(seed, epoch, index, AUGMENT, view)
    n = spec.num_ops
    ops = rng.integers(0, num_ops_in_suite, size=n)  # with replacement, as timm without choice weights
    applied = rng.uniform(size=n) < spec.prob
    if math.isinf(spec.magnitude_std):
        magnitudes = rng.uniform(0.0, spec.magnitude, size=n)
    elif spec.magnitude_std > 0:
        magnitudes = rng.normal(spec.magnitude, spec.magnitude_std, size=n)
    else:
        magnitudes = np.full(n, spec.magnitude)
    magnitudes = np.clip(magnitudes, 0.0, spec.magnitude_max)
    bins = np.round(magnitudes / 10.0 * (RandAugmentSpec.MAGNITUDE_BINS - 1))
    signs = rng.uniform(size=n) < 0.5
    return (np.where(applied, ops, identity).astype(np.int32), bins.astype(np.int32), signs.astype(np.int32))


# ---------------------------------------------------------------------------------------------------------------
# Spatial geometry of the views
#
# Written once for two callers: the DALI graphs (graphs.py), where a frame's size is only known once it is decoded, so
# these run on per-sample nodes, and predict.py, which builds the test views in torch from Python ints. `floor`,
# `ceil` and `to_float` are math's and float, or nvidia.dali.math's and a cast to float64; a choice between two
# values is a blend with a 0/1 factor, which DALI's arithmetic can express.

TEST_CROP_POSITIONS = {1: (0.5,), 3: (0.0, 0.5, 1.0)}  # along the free space: the centre, or start, centre and end


def short_side_size(height, width, scale, floor=math.floor, to_float=float):
    """(new H, new W) as floats (float64 nodes for nodes): the original's short-side resize
    (transform.short_side_scale_jitter) takes the short side to `scale` and the long one to
    floor(long / short * scale), computed in float64 as Python does (DALI's own `resize_shorter` rounds it instead),
    and leaves a frame whose short side already is `scale` as it is (where floating point would otherwise put
    long / short * short just below the long side: short side 224 and long side 230, 237, ...)."""
    portrait = to_float(width < height)
    keep = to_float(portrait * width + (1 - portrait) * height == scale)
    new_h = portrait * floor(height / width * scale) + (1 - portrait) * scale
    new_w = (1 - portrait) * floor(width / height * scale) + portrait * scale
    return keep * height + (1 - keep) * new_h, keep * width + (1 - keep) * new_w


def crop_offsets(new_h, new_w, size, pos_x, pos_y, rounding):
    """(top, left) of a size x size window at relative position (pos_x, pos_y) of the free space of a new_h x new_w
    frame: `floor` with positions drawn uniformly in [0, 1) gives the original's randint(0, free) (random_crop);
    `ceil` with 0, 0.5 and 1 its start, centre (ceil(free / 2)) and end crops (uniform_crop)."""
    return rounding(pos_y * (new_h - size)), rounding(pos_x * (new_w - size))


def view_geometry(height: int, width: int, size: int, num_crops: int) -> tuple[tuple[int, int], list]:
    """The test views of a height x width frame, as the test graph takes them: the resized (H, W) (short side to
    `size`) and the (top, left) of each of its `num_crops` size x size crops (TEST_CROP_POSITIONS, along both sides:
    the short one has no free space)."""
    new_h, new_w = short_side_size(height, width, size)
    offsets = [crop_offsets(new_h, new_w, size, p, p, math.ceil) for p in TEST_CROP_POSITIONS[num_crops]]
    return (int(new_h), int(new_w)), [(int(top), int(left)) for top, left in offsets]
