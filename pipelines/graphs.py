"""The DALI graphs: one per mode (train, val, test), the same for CPU and GPU.

Only `decode_clip` depends on the device: NVDEC (`fn.decoders.video(device="mixed")`) or the frames PyAV decoded
in the source for video files, nvJPEG (`device="mixed"`) or the CPU JPEG decoder for frame folders. Everything
after it runs where its input is. Random parameters are never drawn here: they arrive from the source as
per-sample inputs (see sampling.py), so the output depends only on (seed, epoch, video).

Shapes: a decoded clip is (F, H, W, 3) uint8, F = num_clips * num_frames; outputs are (C, T, S, S) float32
(train, val) or (V, C, T, S, S) with V = num_clips * num_crops, clip-major (test).
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import augmentations as aug
from nvidia.dali.auto_aug.core import augmentation, signed_bin
from nvidia.dali.auto_aug.core._select import select  # DALI's own op switch (used by its rand_augment)

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


def resize_short_side(clip, size):
    """Bilinear, no antialiasing, as the original's short_side_scale_jitter (torch interpolate)."""
    return fn.resize(clip, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=False)


def crop_flip_normalize(clip, spec: ClipSpec, crop_x=0.5, crop_y=0.5, mirror=0, layout="CFHW"):
    """The same crop window and flip on every frame; (x / 255 - mean) / std as float32."""
    return fn.crop_mirror_normalize(
        clip, crop=(spec.crop_size, spec.crop_size), crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=mirror,
        mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std], dtype=types.FLOAT,
        output_layout=layout, out_of_bounds_policy="pad")


def color_jitter(clip, factors):
    """Brightness, contrast and saturation of a normalised (C, T, H, W) clip by per-clip factors (3,).

    As in the original, the jitter acts on the normalised values: brightness scales them (around the mean
    colour), contrast blends each frame with its mean gray level, saturation blends with the per-pixel gray.
    """
    brightness, contrast, saturation = factors[0], factors[1], factors[2]
    gray = sum(w * clip[c] for c, w in enumerate(GRAY_WEIGHTS))  # (T, H, W)
    mean_gray = fn.reductions.mean(gray, axes=[1, 2], keep_dims=True)  # (T, 1, 1)
    channels = [brightness * (contrast * (saturation * clip[c] + (1 - saturation) * gray) + (1 - contrast) * mean_gray)
                for c in range(3)]
    return fn.stack(*channels, axis=0)


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


def rand_augment(clip, sample: dict, spec: ClipSpec):
    """Apply the clip's RandAugment layers (ops, bins, signs drawn by the source) to every frame alike."""
    suite = rand_augment_suite(spec.rand_augment)
    fill = round(255 * spec.mean[0])  # timm fills with the mean colour
    shape = clip.shape(dtype=types.FLOAT)[1:3]  # (H, W) of the frames, for relative translations
    for layer in range(spec.rand_augment.num_ops):
        magnitude = signed_bin(sample["augment_bins"][layer], random_sign=sample["augment_signs"][layer])
        clip = select(suite, sample["augment_ops"][layer], data=clip, magnitude_bin=magnitude,
                      num_magnitude_bins=RandAugmentSpec.MAGNITUDE_BINS, fill_value=fill, shape=shape)
    return clip


def uniform_crops(clip, spec: ClipSpec):
    """(V, C, T, S, S) views of a clip resized to short side S: for each temporal clip, crops at the start,
    centre and end of the long side (or the centre only), clip-major."""
    positions = (0.0, 0.5, 1.0) if spec.num_crops == 3 else (0.5,)
    views = [crop_flip_normalize(clip, spec, p, p) for p in positions]  # each (C, N*T, S, S)
    size, n, t, k = spec.crop_size, spec.num_clips, spec.num_frames, len(positions)
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
    clip = resize_short_side(decode_clip(sample, spec), sample["scale"])
    if spec.rand_augment:
        clip = rand_augment(clip, sample, spec)
    crop = sample["crop_pos"]
    clip = crop_flip_normalize(clip, spec, crop[0], crop[1], sample["mirror"])  # (C, T, S, S)
    if spec.color_jitter:
        clip = color_jitter(clip, sample["jitter"].gpu() if spec.device == "gpu" else sample["jitter"])
    return outputs(clip, sample, spec)


@pipeline_def(py_start_method="spawn")
def val_pipeline(source: ClipSource, parallel: bool):
    spec = source.spec
    sample = read_sample(source, parallel)
    clip = resize_short_side(decode_clip(sample, spec), spec.crop_size)
    return outputs(crop_flip_normalize(clip, spec), sample, spec)  # centre crop, (C, T, S, S)


@pipeline_def(py_start_method="spawn")
def test_pipeline(source: ClipSource, parallel: bool):
    spec = source.spec
    sample = read_sample(source, parallel)
    clip = resize_short_side(decode_clip(sample, spec), spec.crop_size)
    return outputs(uniform_crops(clip, spec), sample, spec)


GRAPHS = {"train": train_pipeline, "val": val_pipeline, "test": test_pipeline}
