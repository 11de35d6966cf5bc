"""Tiny test videos whose pixels say which frame they are and where they were cropped.

Frame n of a generated video: red = 8 + 4n everywhere (the frame number survives any crop, resize or flip:
`frame_number` reads it back from the mean red), green rises from left to right and blue from top to bottom (so
crop position and flips show in the green/blue ramps, identical in every frame).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess

import numpy as np
from PIL import Image

CODECS = {
    # Near-lossless (qp 4: the frame number's red level survives): High profile, 4:2:0, which NVDEC decodes. qp 0
    # would make x264 write the High 4:4:4 Predictive profile, which NVDEC does not decode.
    "h264": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-qp", "4", "-g", "8"],
    "vp9": ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-lossless", "1", "-g", "8", "-deadline", "realtime",
            "-cpu-used", "8"],
    # streams NVDEC does not decode (tests of the GPU path's check)
    "h264_444": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-qp", "0"],  # x264 writes High 4:4:4 Predictive
    "h264_10bit": ["-c:v", "libx264", "-pix_fmt", "yuv420p10le"],
    "h264_422": ["-c:v", "libx264", "-pix_fmt", "yuv422p"],
    "hevc": ["-c:v", "libx265", "-pix_fmt", "yuv420p", "-x265-params", "log-level=error"],
    "av1": ["-c:v", "libaom-av1", "-pix_fmt", "yuv420p", "-cpu-used", "8", "-crf", "40"],
}
EXTENSIONS = {"vp9": ".webm"}  # the rest go in mp4
MAX_FRAMES = 61  # red = 8 + 4n must stay below 256


def make_frame(n: int, width: int = 64, height: int = 48, texture: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 frame number n; `texture`: noise in green and blue instead of the ramps (the same in every
    frame), where a resampling off by a fraction of a pixel shows."""
    assert 0 <= n < MAX_FRAMES
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = 8 + 4 * n
    if texture:
        frame[..., 1:] = np.random.default_rng([width, height]).integers(16, 240, (height, width, 2))
        return frame
    frame[..., 1] = np.linspace(16, 240, width).round().astype(np.uint8)[None, :]
    frame[..., 2] = np.linspace(16, 240, height).round().astype(np.uint8)[:, None]
    return frame


def frame_number(red: np.ndarray) -> int:
    """The frame number from the red channel of a (cropped, resized, flipped) frame in 0..255."""
    return int(round((float(np.mean(red)) - 8) / 4))


def write_video(path: str, num_frames: int, width: int = 64, height: int = 48, fps: float = 30,
                codec: str = "h264", texture: bool = False) -> str:
    """Frames 0..num_frames-1 (see make_frame); mp4 files get their index up front (`faststart`), so a truncated
    copy still opens and announces all frames."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    container = ["-movflags", "+faststart"] if path.endswith(".mp4") else []
    command = ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "-", *CODECS[codec], *container, path]
    frames = b"".join(make_frame(n, width, height, texture).tobytes() for n in range(num_frames))
    subprocess.run(command, input=frames, check=True)
    return path


def write_frame_folder(root: str, video_id: str, num_frames: int, width: int = 64, height: int = 48,
                       static: bool = False) -> str:
    """SSv2 layout: root/<id>/<id>_000000.jpeg ...; `static` repeats frame 0 (for augmentation tests)."""
    folder = os.path.join(root, video_id)
    os.makedirs(folder, exist_ok=True)
    for n in range(num_frames):
        image = Image.fromarray(make_frame(0 if static else n, width, height))
        image.save(os.path.join(folder, f"{video_id}_{n:06d}.jpeg"), quality=95)
    return folder


def write_kinetics(root: str, split: str, videos: list[dict], csv_name: str | None = None) -> str:
    """Videos under root/<split>/ named as Kinetics clips, and the official CSV. Each dict: label, frames,
    and optionally fps, codec (a key of CODECS), width, height, texture (see make_frame), subfolder (put the file in
    root/<split>/<label>/)."""
    os.makedirs(root, exist_ok=True)
    csv_path = os.path.join(root, csv_name or f"{split}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split", "is_cc"])
        for i, video in enumerate(videos):
            youtube_id = video.get("youtube_id", f"vid{split}{i:03d}")
            writer.writerow([video["label"], youtube_id, 10 * i, 10 * i + 10, split, 0])
            if video.get("frames", 0) == 0:  # listed but not on disk
                continue
            ext = EXTENSIONS.get(video.get("codec"), ".mp4")
            folder = os.path.join(root, split, video["label"] if video.get("subfolder") else "")
            write_video(os.path.join(folder, f"{youtube_id}_{10 * i:06d}_{10 * i + 10:06d}{ext}"), video["frames"],
                        video.get("width", 64), video.get("height", 48), video.get("fps", 30),
                        video.get("codec", "h264"), video.get("texture", False))
    return csv_path


def write_ssv2(root: str, split_file: str, videos: list[dict], templates: list[str]) -> tuple[str, str]:
    """Frame folders, something-something-v2-labels.json and one split JSON. Each dict: id, template (index
    into `templates`), frames, optionally static."""
    os.makedirs(root, exist_ok=True)
    labels_path = os.path.join(root, "something-something-v2-labels.json")
    with open(labels_path, "w") as f:
        json.dump({t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(templates)}, f)
    items = []
    for video in videos:
        template = templates[video["template"]]
        items.append({"id": video["id"], "label": template.lower().replace("[", "").replace("]", ""),
                      "template": template, "placeholders": ["thing"]})
        if video.get("frames", 0):
            write_frame_folder(root, video["id"], video["frames"], static=video.get("static", False))
    split_path = os.path.join(root, split_file)
    with open(split_path, "w") as f:
        json.dump(items, f, indent=1)
    return labels_path, split_path
