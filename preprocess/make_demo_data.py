"""Synthetic demo dataset in the Kinetics layout, made once and cached.

    python preprocess/make_demo_data.py data/demo        # train.py calls this when data.generate_demo is set

Four classes that no single frame can tell apart: a bright square over a textured background stays put, or moves
horizontally, vertically or diagonally (either way along its axis), starting anywhere. (Telling left from right
as well is within reach of the tiny model only with far more steps than a CPU demo has: in 20 epochs it learned
the axis of motion, not its sign.) The raw clips (varied sizes, 15 fps, H.264) go through
preprocess/resize_kinetics.py like real Kinetics videos, and the annotations are written in the official
Kinetics CSV format, so the demo exercises the same preprocessing, pipeline, model and training code.

Layout under ROOT (= data.root of configs/demo.yaml): raw/{train,val}/*.mp4 (sources), {train,val}/*.mp4 with
{train,val}/manifest.csv (from resize_kinetics), annotations/{train,val}.csv, and a `.complete` marker last.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

CLASSES = ("moving diagonally", "moving horizontally", "moving vertically", "static")
AXES = {"moving diagonally": (1, 1), "moving horizontally": (1, 0), "moving vertically": (0, 1), "static": (0, 0)}
SIZES = ((96, 72), (72, 96), (80, 80), (112, 72))  # (width, height): landscape, portrait, square, wide
FPS, FRAMES = 15, 40


def demo_frames(label: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(FRAMES, H, W, 3) uint8: a bright square moving over a dim textured background along the class's axis.

    The direction along the axis is drawn, and the start so that the square stays inside the frame for the whole
    video: a single frame shows a square anywhere, whatever the class."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    f = rng.uniform(0.05, 0.2, size=(3, 2))
    phase = rng.uniform(0, 6.3, size=3)
    background = np.stack([np.sin(x * f[c, 0] + y * f[c, 1] + phase[c]) for c in range(3)], -1) * 20 + 60
    side = max(8, min(width, height) // 4)
    colour = rng.uniform(180, 255, size=3)
    axis_x, axis_y = AXES[label]
    dx, dy = axis_x * rng.choice((-1, 1)), axis_y * rng.choice((-1, 1))
    span_x, span_y = width - side, height - side
    spans = [span for span, moving in ((span_x, dx), (span_y, dy)) if moving]
    speed = min(spans) / (FRAMES - 1) * rng.uniform(0.6, 1.0) if spans else 0.0
    travel = speed * (FRAMES - 1)
    x0 = rng.uniform(0, span_x - travel) if dx else rng.uniform(0, span_x)
    y0 = rng.uniform(0, span_y - travel) if dy else rng.uniform(0, span_y)
    x0, y0 = (x0 + travel if dx < 0 else x0), (y0 + travel if dy < 0 else y0)
    frames = np.empty((FRAMES, height, width, 3), np.uint8)
    for t in range(FRAMES):
        img = background.copy()
        px, py = int(round(x0 + dx * speed * t)), int(round(y0 + dy * speed * t))
        img[py:py + side, px:px + side] = colour
        frames[t] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255)
    return frames


def encode_h264(path: str, frames: np.ndarray) -> None:
    height, width = frames.shape[1:3]
    cmd = ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
           "-r", str(FPS), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18",
           str(Path(path).absolute())]  # never read as an option or a protocol: see common.ffmpeg_path
    subprocess.run(cmd, input=frames.tobytes(), check=True)


def make_demo_dataset(root: str, videos_per_class: dict | None = None, seed: int = 0) -> None:
    """Write the demo dataset under `root` unless `root/.complete` exists."""
    if os.path.exists(os.path.join(root, ".complete")):
        return
    videos_per_class = videos_per_class or {"train": 64, "val": 16}
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split_number, (split, count) in enumerate(videos_per_class.items()):
        raw = os.path.join(root, "raw", split)
        shutil.rmtree(raw, ignore_errors=True)
        os.makedirs(raw)
        videos = [(CLASSES[i % len(CLASSES)], f"demo{split[0]}{i:05d}") for i in range(count * len(CLASSES))]

        def write_raw(i: int) -> None:  # one generator per video: the dataset does not depend on thread timing
            rng = np.random.default_rng([seed, split_number, i])
            width, height = SIZES[rng.integers(len(SIZES))]
            label, video_id = videos[i]
            encode_h264(os.path.join(raw, f"{video_id}_000000_000003.mp4"), demo_frames(label, rng, width, height))

        with ThreadPoolExecutor(os.cpu_count()) as pool:  # ffmpeg runs in its own process: threads suffice
            list(tqdm(pool.map(write_raw, range(len(videos))), total=len(videos), desc=f"demo {split} videos"))
        rows = ["label,youtube_id,time_start,time_end,split"] + [f"{label},{video_id},0,3,{split}"
                                                                 for label, video_id in videos]
        with open(os.path.join(root, "annotations", f"{split}.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")
        resize = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resize_kinetics.py")
        subprocess.run([sys.executable, resize, raw, os.path.join(root, split), "--short-side", "64"], check=True)
    with open(os.path.join(root, ".complete"), "w") as f:
        f.write("ok\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--val-per-class", type=int, default=16)
    args = parser.parse_args(argv)
    make_demo_dataset(args.root, {"train": args.train_per_class, "val": args.val_per_class})
    return 0


if __name__ == "__main__":
    sys.exit(main())
