"""The benchmarks' test videos: synthetic 340x256 30 fps H.264 clips of 10 s (textured, moving), encoded as
preprocess/resize_kinetics.py encodes (x264 medium, crf 23, a keyframe every 32 frames, B-frames), in its layout,
with an official-format CSV. Made with PyAV's own FFmpeg (no ffmpeg binary: GPU machines may have only wheels),
one process per video, and kept between runs."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT, FPS, SECONDS = 340, 256, 30, 10
# preprocess/resize_kinetics.py's EncodeSettings (its defaults; tests/test_gpu_check.py keeps the two equal: that
# module needs ffmpeg-python, which a GPU machine may lack)
PRESET, CRF, GOP, BFRAMES = "medium", 23, 32, 3
ENCODE = {"preset": PRESET, "crf": str(CRF), "g": str(GOP), "bf": str(BFRAMES)}


def write_video(path: Path, seed: int) -> None:
    """A panning texture with a moving gradient, written to a temporary name, then renamed."""
    rng = np.random.default_rng(0)
    for _ in range(seed + 1):  # video i gets the i-th texture of one stream, as the sequential loop drew them
        texture = rng.integers(0, 256, size=(HEIGHT * 2, WIDTH * 2, 3), dtype=np.uint8)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options=ENCODE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for n in range(FPS * SECONDS):
            dx, dy = (3 * n + 7 * seed) % WIDTH, (2 * n) % HEIGHT
            frame = texture[dy:dy + HEIGHT, dx:dx + WIDTH].astype(np.int16) // 2
            frame += (((x + 4 * n) % 256) // 2).astype(np.int16)[..., None]
            image = av.VideoFrame.from_ndarray(frame.clip(0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    os.replace(tmp, path)


def make_videos(work: Path, count: int, processes: int | None = None) -> Path:
    """`count` videos under work/<settings>/train/ and its train.csv; returns the root (work/<settings>)."""
    root = Path(work) / f"g{GOP}_{PRESET}_crf{CRF}_bf{BFRAMES}"
    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"bench{i:04d}_000000_000010.mp4" for i in range(count)]
    todo = [(path, i) for i, path in enumerate(paths) if not path.exists()]
    if todo:
        with ProcessPoolExecutor(min(len(todo), processes or os.cpu_count() or 1)) as pool:
            list(pool.map(write_video, *zip(*todo)))
    rows = ["label,youtube_id,time_start,time_end,split"]
    rows += [f"class{i % 4},bench{i:04d},0,10,train" for i in range(count)]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root
