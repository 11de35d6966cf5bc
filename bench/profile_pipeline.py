"""Where the CPU pipeline's time goes, one step at a time on one thread, each against what it replaced (timed in the
same process, on the videos of bench_pipeline.py):

- rgb: converting the 32 kept frames of a clip to RGB: `frame.to_ndarray(format="rgb24")` (a new swscale context
  per frame, FFmpeg's default threads) against one converter per clip on one thread (pipelines.decode.to_rgb);
- threads: CPU time per decoded frame with FFmpeg's default slice threads against one thread;
- skip: pipelines.decode of a random training clip, decoding every frame from the keyframe against letting FFmpeg
  skip the non-reference frames nobody wants;
- graph: the DALI train graph on decoded 340x256 clips (batch 4, one thread): resizing whole frames, cropping,
  normalising and jittering the float crop (the graph before) against resizing the crop's window only, with the
  jitter folded into the normalisation (pipelines.graphs).

    python bench/profile_pipeline.py --videos 32
    python bench/profile_pipeline.py --natural --clips-per-video 8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from nvidia.dali import fn, pipeline_def, types

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.bench_pipeline import make_videos  # noqa: E402
from pipelines import decode, graphs, sampling  # noqa: E402
from pipelines.decode import probe_video  # noqa: E402
from pipelines.sources import ClipSpec  # noqa: E402

SPEC = ClipSpec(mode="train", reader="pyav", device="cpu", num_frames=32, sampling_rate=8, target_fps=30,
                crop_size=224, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), color_jitter=True)


def timed(function, repeat: int = 3) -> float:
    """Best of `repeat` runs, seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def training_clips(paths: list[str], per_video: int, seed: int = 0) -> list[tuple[str, np.ndarray, int]]:
    clips = []
    for index, path in enumerate(paths):
        info = probe_video(path)
        for epoch in range(per_video):
            rng = sampling.sample_rng(seed, epoch, index, sampling.TEMPORAL)
            ids = sampling.clip_frame_indices("train", False, info.num_frames, info.fps, SPEC.num_frames,
                                              SPEC.sampling_rate, SPEC.target_fps, rng=rng)
            clips.append((path, ids, info.num_frames))
    return clips


def profile_rgb(paths: list[str]) -> dict:
    def per_clip(convert) -> float:  # fresh frames each time: a frame keeps the converter it made
        best = float("inf")
        for path in paths[:3]:
            with av.open(path) as container:
                frames = [frame for _, frame in zip(range(32), container.decode(video=0))]
            best = min(best, timed(lambda: [convert(frame) for frame in frames], repeat=1))
        return best
    converter = VideoReformatter()
    before = per_clip(lambda frame: frame.to_ndarray(format="rgb24"))
    now = per_clip(lambda frame: decode.to_rgb(converter, frame))
    return dict(before_ms_per_clip=1000 * before, now_ms_per_clip=1000 * now, speedup=before / now)


def profile_threads(paths: list[str]) -> dict:
    def cpu_per_frame(one_thread: bool) -> float:
        start, count = time.process_time(), 0
        for path in paths:
            with av.open(path) as container:
                stream = container.streams.video[0]
                if one_thread:
                    stream.thread_type, stream.codec_context.thread_count = "NONE", 1
                count += sum(1 for _ in container.decode(stream))
        return (time.process_time() - start) / count
    before = min(cpu_per_frame(False) for _ in range(2))
    now = min(cpu_per_frame(True) for _ in range(2))
    return dict(before_cpu_ms_per_frame=1000 * before, now_cpu_ms_per_frame=1000 * now, cpu_saved=1 - now / before)


def profile_skip(clips: list) -> dict:
    def run(skip: bool):
        for path, ids, _ in clips:
            wanted = sorted({int(i) for i in ids})
            frames = decode._decode_span(path, wanted, wanted[0] > 0, skip=skip)
            if frames is None:
                decode._decode_span(path, wanted, False, skip=skip)
    before, now = timed(lambda: run(False), 2), timed(lambda: run(True), 2)
    return dict(before_ms_per_clip=1000 * before / len(clips), now_ms_per_clip=1000 * now / len(clips),
                speedup=before / now)


# ---------------------------------------------------------------------------------------------------------------
# The train graph before (the baseline) and now


def jitter_on_floats(clip, factors):
    """The colour jitter the graph had before: blends of the normalised (C, T, H, W) floats."""
    b, c, s = factors[0], factors[1], factors[2]
    gray = sum(w * clip[k] for k, w in enumerate(graphs.GRAY_WEIGHTS))
    mean_gray = fn.reductions.mean(gray, axes=[1, 2], keep_dims=True)
    return fn.stack(*[b * (c * (s * clip[k] + (1 - s) * gray) + (1 - c) * mean_gray) for k in range(3)], axis=0)


@pipeline_def
def graph_before(source):
    clip, scale, pos, mirror, factors = fn.external_source(source, num_outputs=5, batch=False,
                                                          layout=["FHWC", "", "", "", ""])
    clip = fn.resize(clip, resize_shorter=scale, interp_type=types.INTERP_LINEAR, antialias=False)
    clip = fn.crop_mirror_normalize(clip, crop=(224, 224), crop_pos_x=fn.cast(pos[0], dtype=types.FLOAT),
                                    crop_pos_y=fn.cast(pos[1], dtype=types.FLOAT), mirror=mirror,
                                    mean=[255 * m for m in SPEC.mean], std=[255 * s for s in SPEC.std],
                                    dtype=types.FLOAT, output_layout="CFHW")
    return jitter_on_floats(clip, factors)


@pipeline_def
def graph_now(source):
    clip, scale, pos, mirror, factors = fn.external_source(source, num_outputs=5, batch=False,
                                                          layout=["FHWC", "", "", "", ""])
    clip = graphs.resized_crop(clip, SPEC.crop_size, scale, pos[0], pos[1], mirror)
    return graphs.normalize(clip, SPEC, factors)


def profile_graph(clips: list, batch_size: int = 4, batches: int = 6) -> dict:
    decoded = [decode.decode_frames(path, ids, n) for path, ids, n in clips[:batch_size]]

    def source(info):
        spatial = sampling.train_spatial(0, 0, info.idx_in_epoch, SPEC.jitter_scales, True, True)
        return (decoded[info.idx_in_batch], np.float32(spatial.scale),
                np.array([spatial.crop_x, spatial.crop_y], np.float64), np.int32(spatial.mirror),
                sampling.color_jitter_factors(0, 0, info.idx_in_epoch))

    def per_clip(graph) -> float:
        pipe = graph(source, batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1,
                     exec_async=False, exec_pipelined=False)
        pipe.build()
        pipe.run()
        return timed(lambda: [pipe.run() for _ in range(batches)]) / (batches * batch_size)
    before, now = per_clip(graph_before), per_clip(graph_now)
    return dict(before_ms_per_clip=1000 * before, now_ms_per_clip=1000 * now, speedup=before / now)


def natural_videos(work: Path) -> list[str]:
    from bench.bench_encode import FPS, make_sources
    from preprocess.resize_kinetics import EncodeSettings, encode_command
    paths = []
    for source in make_sources(work, seconds=10):
        path = source.with_suffix(".mp4")
        if not path.exists():
            subprocess.run(encode_command(source, path, Fraction(FPS), EncodeSettings()), check=True,
                           capture_output=True)
        paths.append(str(path))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--work", default="/tmp/bench_pipeline")
    parser.add_argument("--clips-per-video", type=int, default=2)
    parser.add_argument("--natural", action="store_true",
                        help="instead of bench_pipeline.py's videos, bench_encode.py's three 10 s sources (a camera "
                             "pan over 1/f noise, a Mandelbrot zoom, testsrc2, with sensor noise) encoded as "
                             "preprocess/resize_kinetics.py encodes them (needs the ffmpeg binary)")
    args = parser.parse_args(argv)
    if args.natural:
        paths = natural_videos(Path(args.work) / "natural")
    else:
        paths = sorted(str(p) for p in (make_videos(Path(args.work), args.videos) / "train").glob("*.mp4"))
    clips = training_clips(paths, args.clips_per_video)
    report = dict(rgb=profile_rgb(paths), threads=profile_threads(paths[:8]), skip=profile_skip(clips),
                  graph=profile_graph(clips))
    print(json.dumps({step: {k: round(v, 3) for k, v in figures.items()} for step, figures in report.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
