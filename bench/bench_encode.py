"""Encoder settings for preprocess/resize_kinetics.py: file size against the cost of reading a random clip.

A training sample is a random clip of 32 frames at stride S: 8 in the paper's Kinetics config (a 249-frame span
at 30 fps), 2 for a short-span model (63 frames), `--stride`. A reader that does not decode
the whole file -- NVDEC through DALI's `fn.decoders.video(frames=...)`, or PyAV in pipelines/decode.py --
seeks to the keyframe at or before the first frame and decodes every frame up to the last, so a long keyframe
interval (GOP) costs up to GOP-1 wasted frames per clip, while a short one makes the file bigger.

For each setting this encodes synthetic 340x256 30 fps videos with textured motion (a camera pan over a 1/f
noise texture, a Mandelbrot zoom, testsrc2 shapes; all with sensor-like noise) with the exact command of the
preprocessing script, then measures: size, encode speed (one thread), PSNR against the source, frames decoded
per clip and the time to open the file, seek and decode a clip with PyAV on one CPU thread (the same clips for
every setting, interleaved so machine load hits all settings alike). "frames/clip" does not depend on the
machine and is what NVDEC time scales with.

    python bench/bench_encode.py [--stride 2] [--clips 40] [--seconds 10] [--sweep all|gop] [--work DIR]
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from preprocess.resize_kinetics import EncodeSettings, encode_command  # noqa: E402

FPS = 30
WIDTH, HEIGHT = 340, 256
CLIP_FRAMES = 32
BASELINE = EncodeSettings(gop=250, preset="medium", crf=23, bframes=3)  # what plain `ffmpeg -c:v libx264` does


def ffmpeg(*args: str) -> str:
    proc = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-y", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ffmpeg {' '.join(args)}:\n{proc.stderr[-2000:]}")
    return proc.stderr


def pink_noise_texture(path: Path, width: int = 1400, height: int = 1000, seed: int = 0) -> None:
    """A color 1/f noise image: natural-image-like texture at every scale."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    channels = []
    for _ in range(3):
        spectrum = np.fft.fft2(rng.standard_normal((height, width))) * falloff
        channel = np.real(np.fft.ifft2(spectrum))
        channels.append((channel - channel.mean()) / channel.std())
    image = np.clip(128 + 40 * np.stack(channels, -1), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path)


def make_sources(work: Path, seconds: int) -> list[Path]:
    """Lossless (FFV1) sources; encoding them is then the only lossy step."""
    work.mkdir(parents=True, exist_ok=True)
    texture = work / "texture.png"
    pink_noise_texture(texture)
    size, noise = f"{WIDTH}x{HEIGHT}", "noise=alls=2:allf=t"
    sources = {
        "pan": ["-loop", "1", "-framerate", str(FPS), "-i", str(texture), "-vf",
                f"crop={WIDTH}:{HEIGHT}:x='500+450*sin(t*0.7)':y='350+300*sin(t*0.45)',{noise}"],
        "zoom": ["-f", "lavfi", "-i", f"mandelbrot=s={size}:r={FPS}", "-vf", noise],
        "shapes": ["-f", "lavfi", "-i", f"testsrc2=s={size}:r={FPS}", "-vf", noise],
    }
    paths = []
    for name, args in sources.items():
        path = work / f"{name}.mkv"
        if not path.exists():
            ffmpeg(*args, "-t", str(seconds), "-pix_fmt", "yuv420p", "-c:v", "ffv1", str(path))
        paths.append(path)
    return paths


@dataclass
class Encoded:
    settings: EncodeSettings
    paths: list[Path]
    bytes: float  # mean file size
    encode_fps: float
    psnr: float  # mean over videos, dB


def encode(settings: EncodeSettings, sources: list[Path], work: Path) -> Encoded:
    paths, sizes, seconds, psnrs = [], [], 0.0, []
    for source in sources:
        s = settings
        out = work / f"{source.stem}_g{s.gop}_{s.preset}_crf{s.crf}_bf{s.bframes}.mp4"
        best = float("inf")
        for _ in range(2):  # the faster of two encodes, to damp noise from other processes
            start = time.perf_counter()
            subprocess.run(encode_command(source, out, Fraction(FPS), settings), check=True, capture_output=True)
            best = min(best, time.perf_counter() - start)
        seconds += best
        psnrs.append(luma_psnr(out, source))
        paths.append(out)
        sizes.append(out.stat().st_size)
    frames = sum(len(frame_timestamps(p)) for p in paths)
    return Encoded(settings, paths, statistics.mean(sizes), frames / seconds, statistics.mean(psnrs))


def luma_psnr(path: Path, reference: Path) -> float:
    """Mean over frames of the luma PSNR, frames paired by index (ffmpeg's psnr filter pairs them by
    timestamp, which the MP4 edit list for B-frames shifts)."""
    with av.open(str(path)) as a, av.open(str(reference)) as b:
        pairs = zip(a.decode(video=0), b.decode(video=0), strict=True)
        errors = [np.mean((x.to_ndarray(format="gray").astype(np.float64) - y.to_ndarray(format="gray")) ** 2)
                  for x, y in pairs]
    return statistics.mean(10 * np.log10(255 ** 2 / max(e, 1e-10)) for e in errors)


def frame_timestamps(path: Path) -> list[int]:
    """pts of every frame in presentation order."""
    with av.open(str(path)) as container:
        return sorted(frame.pts for frame in container.decode(video=0))


def read_clip(path: Path, first_pts: int, last_pts: int) -> int:
    """Open, seek to the keyframe at or before `first_pts`, decode through `last_pts`; frames decoded."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        container.seek(first_pts, stream=stream, backward=True, any_frame=False)
        decoded = 0
        for frame in container.decode(stream):
            assert decoded or frame.pts <= first_pts, "seek landed after the clip"
            decoded += 1
            if frame.pts >= last_pts:
                return decoded
    raise RuntimeError(f"{path}: clip ends after the last frame")


def measure_clips(encoded: list[Encoded], clips: int, span: int, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Mean (seconds, frames decoded) per clip for each setting, indexed like `encoded`. Each clip is read
    twice per setting and the faster read kept, to damp noise from other processes."""
    rng = random.Random(seed)
    videos = len(encoded[0].paths)
    timestamps = [[frame_timestamps(path) for path in e.paths] for e in encoded]
    starts = [(v, rng.randrange(len(timestamps[0][v]) - span + 1)) for v in range(videos) for _ in range(clips)]
    times = {i: [] for i in range(len(encoded))}
    frames = {i: [] for i in range(len(encoded))}
    for video, start in starts:
        for i, e in enumerate(encoded):  # interleaved: each clip is read under every setting back to back
            pts = timestamps[i][video]
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                decoded = read_clip(e.paths[video], pts[start], pts[start + span - 1])
                best = min(best, time.perf_counter() - t0)
            times[i].append(best)
            frames[i].append(decoded)
    return {i: (statistics.mean(times[i]), statistics.mean(frames[i])) for i in times}


def table(encoded: list[Encoded], costs: dict[int, tuple[float, float]]) -> str:
    base = next(i for i, e in enumerate(encoded) if e.settings == BASELINE)
    base_bytes, (base_time, _) = encoded[base].bytes, costs[base]
    lines = ["| gop | preset | crf | bf | size KB | size vs g250 | PSNR dB | encode fps | frames/clip "
             "| ms/clip | clip time vs g250 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, e in enumerate(encoded):
        s, (seconds, frames) = e.settings, costs[i]
        lines.append(f"| {s.gop} | {s.preset} | {s.crf} | {s.bframes} | {e.bytes / 1024:.0f} "
                     f"| {e.bytes / base_bytes:.2f} | {e.psnr:.1f} | {e.encode_fps:.0f} | {frames:.1f} "
                     f"| {seconds * 1e3:.1f} | {seconds / base_time:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40, help="random clips per video and setting")
    parser.add_argument("--seconds", type=int, default=10, help="length of each synthetic video")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_encode"))
    parser.add_argument("--sweep-gop", type=int, default=32, help="GOP of the preset/crf sweep")
    parser.add_argument("--stride", type=int, default=2, help="clip stride in frames (32 frames a clip)")
    parser.add_argument("--sweep", choices=["all", "gop"], default="all", help="gop: skip the preset/crf sweep")
    args = parser.parse_args(argv)
    span = (CLIP_FRAMES - 1) * args.stride + 1  # frames from the first to the last of a clip
    sources = make_sources(args.work, args.seconds)
    gop_sweep = [EncodeSettings(gop=g, preset="medium", crf=23, bframes=bf) for g in (8, 16, 32, 64, 250)
                 for bf in (3, 0)]
    preset_sweep = [EncodeSettings(gop=args.sweep_gop, preset=p, crf=c, bframes=3)
                    for p in ("veryfast", "fast", "medium", "slow") for c in (18, 23, 28)]
    settings = gop_sweep + [s for s in preset_sweep if s not in gop_sweep and args.sweep == "all"]
    encoded = [encode(s, sources, args.work) for s in settings]
    costs = measure_clips(encoded, args.clips, span)
    print(f"{len(sources)} videos x {args.clips} clips of {CLIP_FRAMES} frames at stride {args.stride}, "
          f"{WIDTH}x{HEIGHT} {FPS} fps {args.seconds} s; PyAV {av.__version__}, 1 decoder thread\n")
    print(table(encoded, costs))
    print("\nexample command:", " ".join(encode_command(Path("SRC.mp4"), Path("OUT.mp4.tmp-PID"), Fraction(FPS),
                                                         EncodeSettings())))


if __name__ == "__main__":
    main()
