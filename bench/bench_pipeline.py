"""Training clips per second: the DALI pipeline (pipelines.build_loader) against the loaders a user would pick
instead, on the same videos and clip spec, side by side in one run:
- pyav_dataloader: the original code's approach, PyAV decoding (and converting) every frame of the clip's span in
  DataLoader workers, augmentation in torch;
- torchcodec_dataloader, decord_dataloader: the exact frames of the clip by index, as those libraries' docs show,
  the same torch augmentation; torchcodec_cuda (`--device gpu`): its NVDEC decoder, the augmentation on the GPU;
- torchcodec_tuned: torchcodec with the augmentation as a torch expert writes it (resize in uint8, crop, then the
  float work on the crop only): the strongest peer on the CPU, the same protocol;
- decode_floor: decoding alone of the frames a clip needs (from the keyframe at or before its first frame to its
  last; no conversion, no augmentation): how close each loader comes to what decoding allows.

All load the Kinetics training protocol: a random clip of `--num-frames` frames at `--sampling-rate`, inverse-
uniform short-side jitter in [256, 320], random 224 crop, flip, colour jitter, normalisation, batches of
`--batch-size`, with `--workers` decoding processes each. In each of `--rounds` alternating rounds a fresh
loader is timed from batch `--warmup` (start-up, worker spawn and prefetched batches are not counted) until
`--batches` more have reached the device (`--device gpu`: the baseline's batches are copied to the GPU from pinned
memory, the pipeline's are decoded there); the median round is reported.

Videos: `--videos N` synthetic 340x256 30 fps H.264 clips of 10 s (textured, moving; made once under `--work`),
encoded as preprocess/resize_kinetics.py encodes (x264 medium, crf 23, a keyframe every 32 frames, B-frames), in
its layout, with an official-format CSV.

Repeated augmentation (`--num-sample N`, data.num_sample): the DALI pipeline alone, with num_sample 1 and N side by
side in the same rounds; each decoded clip gives N augmented clips, so augmented clips/s should approach N times those
of num_sample 1 as far as decoding dominates. The ratio is against num_sample 1 (the peers have no such mode).

    python bench/bench_pipeline.py                      # CPU
    python bench/bench_pipeline.py --device gpu         # a GPU node: NVDEC + GPU augmentation
    python bench/bench_pipeline.py --num-sample 2       # augmented clips/s with 2 views of each decoded clip
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from config import DataConfig  # noqa: E402
from pipelines import build_loader  # noqa: E402
from bench.videos import ENCODE, FPS, HEIGHT, SECONDS, WIDTH, make_videos  # noqa: E402


def augment(frames: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, S, S) float: normalise, inverse-uniform short-side jitter, random crop, flip,
    colour jitter (on the normalised values, as the original)."""
    x = normalize(frames.permute(0, 3, 1, 2), cfg)  # (T, C, H, W)
    return color_jitter(resize_crop_flip(x, cfg)).permute(1, 0, 2, 3).contiguous()  # (C, T, S, S)


def augment_tuned(frames: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """`augment` as a torch expert writes it: resize the uint8 frames (torch's fast path), crop, and only then the
    float work (normalisation, flip, colour jitter), on the crop alone. The same random draws in the same order."""
    x = resize_crop_flip(frames.permute(0, 3, 1, 2), cfg)  # (T, C, S, S) uint8, channels-last in memory
    return color_jitter(normalize(x, cfg)).permute(1, 0, 2, 3).contiguous()  # (C, T, S, S)


def normalize(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(T, C, H, W) uint8 -> (x / 255 - mean) / std."""
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (cfg.mean, cfg.std))
    return (x.float() / 255 - mean) / std


def resize_crop_flip(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(T, C, H, W) -> (T, C, S, S): inverse-uniform short-side jitter (bilinear), random crop, flip with p=0.5."""
    lo, hi = cfg.train_jitter_scales
    size = round(1.0 / random.uniform(1.0 / hi, 1.0 / lo))
    h, w = x.shape[-2:]
    new_h, new_w = (size, math.floor(w / h * size)) if h <= w else (math.floor(h / w * size), size)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = random.randint(0, new_h - cfg.crop_size), random.randint(0, new_w - cfg.crop_size)
    x = x[..., top:top + cfg.crop_size, left:left + cfg.crop_size]
    return x.flip(-1) if random.random() < 0.5 else x


def color_jitter(x: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation 0.4 with p=0.8 on normalised (T, C, H, W), as the original."""
    if random.random() < 0.2:
        return x
    b, c, s = (1 + random.uniform(-0.4, 0.4) for _ in range(3))
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    return b * (c * (s * x + (1 - s) * gray) + (1 - c) * gray.mean(dim=(1, 2, 3), keepdim=True))


class TorchClips(torch.utils.data.Dataset):
    """A clip of each video, augmented in torch as the original code does; subclasses decode."""
    augmentation = staticmethod(augment)

    def __init__(self, paths: list[str], cfg: DataConfig):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.augmentation(self.decode(self.paths[index]), self.cfg), index

    def decode(self, path: str) -> torch.Tensor:
        """(T, H, W, C) uint8 frames of a random clip."""
        raise NotImplementedError

    def clip_indices(self, num_frames: int, fps: float) -> np.ndarray:
        """The original's temporal sampling: a random start, T indices over the span, clamped to the video."""
        cfg = self.cfg
        clip_size = cfg.sampling_rate * cfg.num_frames / cfg.target_fps * fps
        start = random.uniform(0, max(num_frames - clip_size, 0))
        return np.clip(np.linspace(start, start + clip_size - 1, cfg.num_frames), 0, num_frames - 1).astype(np.int64)


class PyAVClips(TorchClips):
    """The original code's approach: PyAV decodes (and converts to RGB) every frame of the clip's span."""

    def decode(self, path):
        cfg = self.cfg
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps, n = float(stream.average_rate), stream.frames
            clip_size = cfg.sampling_rate * cfg.num_frames / cfg.target_fps * fps
            start = random.uniform(0, max(n - clip_size, 0))
            pts_per_frame = stream.duration / n
            start_pts, end_pts = int(start * pts_per_frame), int((start + clip_size - 1) * pts_per_frame)
            container.seek(max(start_pts - 1024, 0), any_frame=False, backward=True, stream=stream)
            frames = []
            for frame in container.decode(stream):
                if frame.pts < start_pts:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if frame.pts > end_pts:
                    break
        index = np.clip(np.linspace(0, clip_size - 1, cfg.num_frames), 0, len(frames) - 1).astype(np.int64)
        return torch.from_numpy(np.stack([frames[i] for i in index]))


class TorchCodecClips(TorchClips):
    """torchcodec as its docs show it: the exact frames of the clip, decoded by index."""

    def decode(self, path):
        from torchcodec.decoders import VideoDecoder
        decoder = VideoDecoder(path, num_ffmpeg_threads=1)
        meta = decoder.metadata
        indices = self.clip_indices(meta.num_frames, meta.average_fps)
        return decoder.get_frames_at(indices.tolist()).data.permute(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)


class TorchCodecTuned(TorchCodecClips):
    """torchcodec with augment_tuned."""
    augmentation = staticmethod(augment_tuned)


class DecordClips(TorchClips):
    """decord's reader (the maintained eva-decord build): the exact frames, as a batch."""

    def decode(self, path):
        import decord
        reader = decord.VideoReader(path, num_threads=1)
        indices = self.clip_indices(len(reader), reader.get_avg_fps())
        return torch.from_numpy(reader.get_batch(indices.tolist()).asnumpy())


class DecodeOnly(TorchClips):
    """The floor: decoding alone of the frames a clip needs (from the keyframe at or before its first frame to its
    last), no RGB conversion, no augmentation (FFmpeg through PyAV, one thread per process: with every core busy,
    FFmpeg's default slice threads cost CPU time instead of saving it)."""

    def __getitem__(self, index):
        return torch.zeros(1), self.decode(self.paths[index])

    def decode(self, path):
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type, stream.codec_context.thread_count = "NONE", 1
            n, fps = stream.frames, float(stream.average_rate)
            indices = self.clip_indices(n, fps)
            per_frame = stream.duration / n
            first, last = int(indices[0] * per_frame), int(indices[-1] * per_frame)
            container.seek(first, any_frame=False, backward=True, stream=stream)
            decoded = 0
            for frame in container.decode(stream):
                decoded += 1
                if frame.pts >= last:
                    break
        return decoded


def dataloader_batches(dataset, batch_size, workers, device):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True,
                                         pin_memory=device.type == "cuda")
    while True:
        for clips, _ in loader:
            yield clips.to(device, non_blocking=True)


def torchcodec_cuda_batches(paths, cfg, batch_size, device):
    """torchcodec's CUDA decoder (NVDEC) in the main process, the same augmentation in torch on the GPU."""
    from torchcodec.decoders import VideoDecoder
    dataset = TorchClips(paths, cfg)
    while True:
        clips = []
        for path in random.sample(paths, batch_size):
            decoder = VideoDecoder(path, device=str(device))
            indices = dataset.clip_indices(decoder.metadata.num_frames, decoder.metadata.average_fps)
            frames = decoder.get_frames_at(indices.tolist()).data.permute(0, 2, 3, 1)
            clips.append(augment(frames, cfg))
        yield torch.stack(clips)


def pipeline_batches(cfg, batch_size, device):
    device_id = device.index if device.type == "cuda" else None
    loader = build_loader(cfg, "train", batch_size=batch_size, device_id=device_id)
    while True:
        for batch in loader:
            yield batch.clips


def clips_per_second(batches, warmup: int, count: int, device) -> float:
    for _ in range(warmup):
        next(batches)
    start, clips = time.perf_counter(), 0
    for _ in range(count):
        clips += len(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clips / (time.perf_counter() - start)


def ratios(median: dict[str, float]) -> dict[str, float]:
    """DALI's clips/s against the original approach, the best peer that ran, and the decode floor."""
    dali = median["dali_pipeline"]
    peers = [v for k, v in median.items() if k not in ("dali_pipeline", "decode_floor")]
    out = {"speedup": round(dali / median["pyav_dataloader"], 2)} if "pyav_dataloader" in median else {}
    if peers:
        out["vs_best_peer"] = round(dali / max(peers), 2)
    if "decode_floor" in median:
        out["vs_decode_floor"] = round(dali / median["decode_floor"], 2)
    return out


def repeat_ratios(rates: dict[str, list[float]], num_sample: int) -> dict:
    """Augmented clips/s with `num_sample` views of each decoded clip against num_sample 1: the ratio of the medians,
    and the median of each round's ratio (the two loaders of a round ran one after the other, so under a load that
    changes from round to round the paired ratio is the steadier one); videos/s are clips/s / num_sample."""
    repeated, single = rates[f"dali_num_sample_{num_sample}"], rates["dali_pipeline"]
    paired = [r / s for r, s in zip(repeated, single)]
    return {"clips_ratio_vs_num_sample_1": round(statistics.median(repeated) / statistics.median(single), 2),
            "clips_ratio_per_round": [round(r, 2) for r in paired],
            "clips_ratio_median_of_rounds": round(statistics.median(paired), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--work", default="/tmp/bench_pipeline")
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--sampling-rate", type=int, default=8)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of each loader")
    parser.add_argument("--threads", type=int, default=2,
                        help="DALI CPU threads (2 cores, 2 workers: 2 threads gave 4%% more clips/s than 1)")
    parser.add_argument("--batches", type=int, default=12, help="batches timed per round")
    parser.add_argument("--warmup", type=int, default=3, help="batches before the clock starts, per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    parser.add_argument("--num-sample", type=int, default=1,
                        help="> 1: the DALI pipeline alone, with data.num_sample 1 and this many augmented views of "
                             "each decoded clip (clips/s count every view)")
    args = parser.parse_args(argv)

    root = make_videos(Path(args.work), args.videos)
    cfg = DataConfig(dataset="kinetics", root=str(root), train_list="train.csv", num_frames=args.num_frames,
                     sampling_rate=args.sampling_rate, crop_size=args.crop, device=args.device,
                     num_threads=args.threads, py_workers=args.workers)
    device = torch.device("cuda", 0) if args.device == "gpu" else torch.device("cpu")
    paths = sorted(str(p) for p in (root / "train").glob("*.mp4"))
    def torch_loader(cls):
        return lambda: dataloader_batches(cls(paths, cfg), args.batch_size, args.workers, device)

    # DALI first, then the peers: a peer that cannot run here (torchcodec or decord not installed, torchcodec
    # without the system's FFmpeg libraries) is left out with its reason instead of ending the benchmark
    loaders = {"dali_pipeline": lambda: pipeline_batches(cfg, args.batch_size, device),
               "pyav_dataloader": torch_loader(PyAVClips), "torchcodec_dataloader": torch_loader(TorchCodecClips),
               "torchcodec_tuned": torch_loader(TorchCodecTuned), "decord_dataloader": torch_loader(DecordClips),
               "decode_floor": torch_loader(DecodeOnly)}
    if device.type == "cuda":
        loaders["torchcodec_cuda"] = lambda: torchcodec_cuda_batches(paths, cfg, args.batch_size, device)
    if args.num_sample > 1:  # batch_size counts videos: a batch holds batch_size x num_sample augmented clips
        repeated = dataclasses.replace(cfg, num_sample=args.num_sample)
        loaders = {"dali_pipeline": loaders["dali_pipeline"],
                   f"dali_num_sample_{args.num_sample}": lambda: pipeline_batches(repeated, args.batch_size, device)}
    rates, left_out = {name: [] for name in loaders}, {}
    for _ in range(args.rounds):  # alternate, so that load from other processes hits both alike
        for name, make in loaders.items():
            if name in left_out:
                continue
            try:
                batches = make()
                rates[name].append(clips_per_second(batches, args.warmup, args.batches, device))
                batches.close()  # stops the loader's worker processes before the next one is timed
            except Exception as e:
                if name == "dali_pipeline":
                    raise
                left_out[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                print(f"{name:16s} left out: {left_out[name]}", flush=True)
                continue
            print(f"{name:16s} {rates[name][-1]:7.2f} clips/s", flush=True)
    rates = {name: values for name, values in rates.items() if name not in left_out}
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(json.dumps(dict(
        device=args.device, clip=f"{args.num_frames}x{args.crop}x{args.crop} rate {args.sampling_rate}",
        videos=f"{args.videos} x {WIDTH}x{HEIGHT} {FPS} fps {SECONDS} s H.264 {ENCODE}", batch_size=args.batch_size,
        workers=args.workers, threads=args.threads, cpus=os.cpu_count(), num_sample=args.num_sample,
        **{name: round(value, 2) for name, value in median.items()},
        **(repeat_ratios(rates, args.num_sample) if args.num_sample > 1 else ratios(median)), left_out=left_out,
        rounds={name: [round(v, 2) for v in values] for name, values in rates.items()})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
