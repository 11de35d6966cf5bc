"""The DALI graphs: one per mode (train, val, test), the same for CPU and GPU.

Only `decode_clip` depends on the device: NVDEC (`fn.decoders.video(device="mixed")`) or the frames PyAV decoded
in the source for video files, nvJPEG (`device="mixed"`) or the CPU JPEG decoder for frame folders. Everything
after it runs where its input is. Random parameters are never drawn here: they arrive from the source as
per-sample inputs (see sampling.py), so the output depends only on (seed, epoch, video).

Shapes: a decoded clip is (F, H, W, 3) uint8, F = num_clips * num_frames; outputs are (C, T, S, S) float32
(train, val), (N, C, T, S, S) in training with num_sample N > 1 (N augmented views of the one decoded clip), or
(V, C, T, S, S) with V = num_clips * num_crops, clip-major (test).
"""
from __future__ import annotations

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.auto_aug import augmentations as aug
from nvidia.dali.auto_aug.core import augmentation, signed_bin
from nvidia.dali.auto_aug.core._select import select  # DALI's own op switch (used by its rand_augment)

from pipelines import sampling
from pipelines.sampling import RandAugmentSpec
from pipelines.sources import ClipSource, ClipSpec

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # R, G, B, as the original's grayscale()


# ---------------------------------------------------------------------------------------------------------------
# Steps


def read_sample(source: ClipSource, parallel: bool) -> dict:
    """The source's outputs by name (see ClipSpec.output_names)."""
    names = source.spec.output_names()
    layouts = ["FHWC" if name == "frames" else "" for name in names]
    outputs = fn.external_source(source, num_outputs=len(names), batch=False, parallel=parallel, layout=layouts)
    return dict(zip(names, outputs))


# nvJPEG preallocates, per decoder and per thread, one device buffer and two pinned host buffers of these sizes
# (DALI's defaults: 16 MB and 2 x 8 MB). A clip has one decoder per frame slot (32), so the defaults come to ~2 GB of
# device and ~2 GB of pinned memory per graph at 4 threads. A frame of the SSv2 folders (short side 256) needs well
# under 1 MB; a larger one makes nvJPEG grow its buffer, which is slower but correct.
NVJPEG_DEVICE_PADDING = 1 << 20
NVJPEG_HOST_PADDING = 1 << 19


def decode_clip(sample: dict, spec: ClipSpec):
    """(F, H, W, 3) uint8 frames of the sample, on spec.device."""
    device = "mixed" if spec.device == "gpu" else "cpu"
    if spec.reader == "pyav":  # decoded by the source (CPU only)
        return sample["frames"]
    if spec.reader == "nvdec":
        # edge padding: DALI's frame index can be shorter than the packet count the source clamps to (packets with
        # negative timestamps are skipped); the default (constant) would return black frames there
        return fn.decoders.video(sample["encoded"], device=device, frames=sample["frame_ids"], pad_mode="edge")
    # fancy upsampling: the GPU's chroma upsampling as the CPU decoder's (and PIL's), so both give the same pixels
    frames = [fn.decoders.image(sample[f"jpeg_{i}"], device=device, output_type=types.RGB,
                                jpeg_fancy_upsampling=True, device_memory_padding=NVJPEG_DEVICE_PADDING,
                                host_memory_padding=NVJPEG_HOST_PADDING)
              for i in range(spec.frames_per_sample)]
    return fn.stack(*frames, axis=0, axis_name="F")


def resized_size(clip, scale):
    """(H, W, new H, new W) as float64 nodes: the original's short-side resize (see sampling.short_side_size)."""
    shape = clip.shape(dtype=types.FLOAT64)  # (F, H, W, C)
    h, w = shape[1], shape[2]
    scale = fn.cast(scale, dtype=types.FLOAT64) if isinstance(scale, DataNode) else float(scale)
    new_h, new_w = sampling.short_side_size(h, w, scale, floor=dmath.floor,
                                            to_float=lambda node: fn.cast(node, dtype=types.FLOAT64))
    return h, w, new_h, new_w


def bilinear(clip, **kwargs):
    """torch's interpolate(mode="bilinear", align_corners=False): no antialiasing (checked to float rounding)."""
    return fn.resize(clip, interp_type=types.INTERP_LINEAR, antialias=False, **kwargs)


def resized_crop(clip, size, scale, pos_x, pos_y, mirror=None, rounding=dmath.floor):
    """(F, size, size, 3) float32 in 0..255: the window at (pos_x, pos_y) (see sampling.crop_offsets) of the frames
    resized to short side `scale` (see resized_size), flipped left-right where `mirror` is 1. One resampling of the
    window only (a region of interest of the source frames): the same values as resizing whole frames, cropping and
    flipping, at a fraction of the work; unrounded, as the original resizes floats."""
    h, w, new_h, new_w = resized_size(clip, scale)
    top, left = sampling.crop_offsets(new_h, new_w, size, pos_x, pos_y, rounding)
    y0, y1 = top * (h / new_h), (top + size) * (h / new_h)
    x0, x1 = left * (w / new_w), (left + size) * (w / new_w)
    if mirror is not None:  # a region that ends left of where it starts is read flipped
        flip = fn.cast(mirror, dtype=types.FLOAT64) * (x1 - x0)
        x0, x1 = x0 + flip, x1 - flip
    start = fn.cast(fn.stack(y0, x0), dtype=types.FLOAT)
    end = fn.cast(fn.stack(y1, x1), dtype=types.FLOAT)
    return bilinear(clip, size=[size, size], roi_start=start, roi_end=end, roi_relative=False, dtype=types.FLOAT)


def short_side_resize(clip, scale):
    """Whole frames resized to short side `scale` (see resized_size), as float32 in 0..255 (unrounded, as the
    original's): for several crops of one resize."""
    _, _, new_h, new_w = resized_size(clip, scale)
    return bilinear(clip, size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT), dtype=types.FLOAT)


def crop(clip, size, pos_x, pos_y, rounding):
    """(F, size, size, 3): the window at (pos_x, pos_y) of already resized frames (see sampling.crop_offsets)."""
    shape = clip.shape(dtype=types.FLOAT64)
    top, left = sampling.crop_offsets(shape[1], shape[2], size, pos_x, pos_y, rounding)
    return fn.slice(clip, start=fn.cast(fn.stack(top, left), dtype=types.INT32), shape=[size, size], axis_names="HW")


def normalize(clip, spec: ClipSpec, jitter=None):
    """(F, S, S, 3) 0..255 -> (C, F, S, S) float32: (x / 255 - mean) / std, then the colour jitter when `jitter`
    holds the clip's (brightness, contrast, saturation) factors.

    The jitter acts on the normalised values, as the original's: y = b * (c * (s * x + (1 - s) * gray) + (1 - c) *
    mean_gray), gray = 0.299 R + 0.587 G + 0.114 B of x and mean_gray its mean over each frame. It is linear in the
    pixels, so it costs one pass more than the normalisation: y = (b c s) * x + k, where the normalisation's std is
    divided by b c s and k = b c (1 - s) * gray + b (1 - c) * mean_gray is the same for the three channels; gray comes
    straight from the pixels (one weighted channel sum, normalisation folded in).
    """
    mean, std = [255 * m for m in spec.mean], [255 * s for s in spec.std]
    if jitter is None:
        return fn.crop_mirror_normalize(clip, mean=mean, std=std, dtype=types.FLOAT, output_layout="CFHW")
    b, c, s = jitter[0], jitter[1], jitter[2]  # per-sample scalars, on the CPU
    x = fn.crop_mirror_normalize(clip, mean=mean, std=fn.stack(*[sd / (b * c * s) for sd in std]),
                                 dtype=types.FLOAT, output_layout="CFHW")
    weights = [w / sd for w, sd in zip(GRAY_WEIGHTS, std)]
    gray = fn.coord_transform(clip, M=weights, T=[-sum(w * m for w, m in zip(weights, mean))], dtype=types.FLOAT)
    mean_gray = fn.reductions.mean(gray, axes=[1, 2], keep_dims=True)  # (F, 1, 1, 1)
    gray_weight, mean_weight = b * c * (1 - s), b * (1 - c)
    if clip.device == "gpu":
        gray_weight, mean_weight = gray_weight.gpu(), mean_weight.gpu()
    k = fn.transpose(gray_weight * gray + mean_weight * mean_gray, perm=[3, 0, 1, 2])  # (1, F, S, S)
    return x + k


@augmentation
def equalize(data, _):
    """Histogram equalisation per channel and frame (DALI's own auto_aug version calls a deprecated alias)."""
    return fn.equalize(data)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=aug.sharpness_kernel, param_device="auto")
def sharpness(data, kernel):
    """PIL-like sharpness (as DALI's auto_aug version, which calls a deprecated alias)."""
    return fn.filter(data, kernel)


def rand_augment_suite(spec: RandAugmentSpec) -> list:
    """timm's RandAugment ops with timm's ranges at magnitude 10 (inc1: "increasing" variants, else the
    original ones), built from DALI's auto_aug ops. The identity (for skipped layers) is appended last."""
    if spec.increasing:
        tone = [aug.posterize.augmentation((4, 0), False, aug.poster_mask_uint8),
                aug.solarize.augmentation((256, 0)),
                *(op.augmentation((0, 0.9), True, aug.shift_enhance_range)
                  for op in (aug.color, aug.contrast, aug.brightness)),
                sharpness]
    else:
        tone = [aug.posterize.augmentation((0, 4), False, aug.poster_mask_uint8),
                aug.solarize.augmentation((0, 256)),
                *(op.augmentation((0.1, 1.9), False, None) for op in (aug.color, aug.contrast, aug.brightness)),
                sharpness.augmentation((0.1, 1.9), False, aug.sharpness_kernel_shifted)]
    return [aug.auto_contrast, equalize, aug.invert, aug.rotate.augmentation((0, 30), True),
            aug.solarize_add.augmentation((0, 110)), *tone,
            aug.shear_x.augmentation((0, 0.3), True), aug.shear_y.augmentation((0, 0.3), True),
            aug.translate_x.augmentation((0, 0.45), True), aug.translate_y.augmentation((0, 0.45), True),
            aug.identity]


def rand_augment(clip, params: dict, spec: ClipSpec):
    """Apply the clip's RandAugment layers (ops, bins, signs drawn by the source: `params`, see view_params) to every
    frame alike."""
    suite = rand_augment_suite(spec.rand_augment)
    fill = round(255 * spec.mean[0])  # timm fills with the mean colour
    shape = clip.shape(dtype=types.FLOAT)[1:3]  # (H, W) of the frames, for relative translations
    for layer in range(spec.rand_augment.num_ops):
        magnitude = signed_bin(params["augment_bins"][layer], random_sign=params["augment_signs"][layer])
        clip = select(suite, params["augment_ops"][layer], data=clip, magnitude_bin=magnitude,
                      num_magnitude_bins=RandAugmentSpec.MAGNITUDE_BINS, fill_value=fill, shape=shape)
    return clip


def view_params(sample: dict, spec: ClipSpec, view: int) -> dict:
    """The source's random parameters of augmented view `view`, by their names (ClipSpec.train_param_names)."""
    return {name: sample[spec.view_name(name, view)] for name in spec.train_param_names()}


def augment_view(clip, params: dict, spec: ClipSpec):
    """(C, T, S, S) float32: one augmented view of the decoded (F, H, W, 3) clip, from its parameters `params`:
    RandAugment on the decoded frames (before the resize, as the original: its translations are relative), the
    jittered window, flip, normalisation and colour jitter."""
    if spec.rand_augment:
        clip = rand_augment(clip, params, spec)
    crop_pos = params["crop_pos"]
    clip = resized_crop(clip, spec.crop_size, params["scale"], crop_pos[0], crop_pos[1], params["mirror"])
    return normalize(clip, spec, params["jitter"] if spec.color_jitter else None)


def uniform_crops(clip, spec: ClipSpec):
    """(V, C, T, S, S) views of a clip resized to short side S: for each temporal clip, crops at the start,
    centre and end of the long side (or the centre only), clip-major."""
    size = spec.crop_size
    positions = sampling.TEST_CROP_POSITIONS[spec.num_crops]  # as predict.py's (sampling.view_geometry)
    views = [normalize(crop(clip, size, p, p, dmath.ceil), spec) for p in positions]  # each (C, N*T, S, S)
    n, t, k = spec.num_clips, spec.num_frames, len(positions)
    views = fn.reshape(fn.stack(*views), shape=[k, 3, n, t, size, size])
    views = fn.transpose(views, perm=[2, 0, 1, 3, 4, 5])  # (N, K, C, T, S, S)
    return fn.reshape(views, shape=[n * k, 3, t, size, size], layout="")


def outputs(clip, sample: dict, spec: ClipSpec) -> tuple:
    label = sample["label"].gpu() if spec.device == "gpu" else sample["label"]
    return clip, label, sample["index"], sample["status"], sample["message"]


OUTPUT_NAMES = ["clips", "labels", "index", "status", "message"]


# ---------------------------------------------------------------------------------------------------------------
# Graphs


@pipeline_def(py_start_method="spawn")
def train_pipeline(source: ClipSource, parallel: bool):
    spec = source.spec
    sample = read_sample(source, parallel)
    clip = decode_clip(sample, spec)  # once, whatever the number of views: each view augments the same frames
    views = [augment_view(clip, view_params(sample, spec, view), spec) for view in range(spec.num_sample)]
    # (C, T, S, S), or (N, C, T, S, S) for data.num_sample N > 1 (the loader makes them N rows of its batch)
    return outputs(views[0] if len(views) == 1 else fn.stack(*views), sample, spec)


@pipeline_def(py_start_method="spawn")
def val_pipeline(source: ClipSource, parallel: bool):
    spec = source.spec
    sample = read_sample(source, parallel)
    clip = resized_crop(decode_clip(sample, spec), spec.crop_size, spec.crop_size, 0.5, 0.5, rounding=dmath.ceil)
    return outputs(normalize(clip, spec), sample, spec)  # centre crop, (C, T, S, S)


@pipeline_def(py_start_method="spawn")
def test_pipeline(source: ClipSource, parallel: bool):
    spec = source.spec
    sample = read_sample(source, parallel)
    clip = short_side_resize(decode_clip(sample, spec), spec.crop_size)
    return outputs(uniform_crops(clip, spec), sample, spec)


GRAPHS = {"train": train_pipeline, "val": val_pipeline, "test": test_pipeline}
