"""Tiny test videos whose pixels say which frame they are and where they were cropped.

Frame n of a generated video: red = 8 + 4n everywhere (the frame number survives any crop, resize or flip:
`frame_number` reads it back from the mean red), green rises from left to right and blue from top to bottom (so
crop position and flips show in the green/blue ramps, identical in every frame).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from fractions import Fraction

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
# The same streams through PyAV's own FFmpeg, where there is no ffmpeg binary (GPU machines with wheels only):
# codec key -> (encoder, pixel format, encoder options)
PYAV_CODECS = {
    "h264": ("libx264", "yuv420p", {"qp": "4", "g": "8"}),
    "vp9": ("libvpx-vp9", "yuv420p", {"lossless": "1", "g": "8", "deadline": "realtime", "cpu-used": "8"}),
    "h264_444": ("libx264", "yuv420p", {"qp": "0"}),
    "h264_10bit": ("libx264", "yuv420p10le", {}),
    "h264_422": ("libx264", "yuv422p", {}),
    "hevc": ("libx265", "yuv420p", {"x265-params": "log-level=error"}),
    "av1": ("libaom-av1", "yuv420p", {"cpu-used": "8", "crf": "40"}),
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


def encoders() -> set[str]:
    """The video encoders at hand: the ffmpeg binary's, else PyAV's (what `write_video` will use)."""
    if shutil.which("ffmpeg"):
        listing = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
        return {line.split()[1] for line in listing.splitlines() if len(line.split()) > 1 and line.startswith(" V")}
    import av
    found = set()
    for name in av.codecs_available:
        try:
            av.Codec(name, "w")
            found.add(name)
        except Exception:  # a decoder only
            pass
    return found


def write_video(path: str, num_frames: int, width: int = 64, height: int = 48, fps: float = 30,
                codec: str = "h264", texture: bool = False) -> str:
    """Frames 0..num_frames-1 (see make_frame); mp4 files get their index up front (`faststart`), so a truncated
    copy still opens and announces all frames. With the ffmpeg binary where there is one, else with PyAV."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not shutil.which("ffmpeg"):
        return _write_video_pyav(path, num_frames, width, height, fps, codec, texture)
    container = ["-movflags", "+faststart"] if path.endswith(".mp4") else []
    command = ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "-", *CODECS[codec], *container, path]
    frames = b"".join(make_frame(n, width, height, texture).tobytes() for n in range(num_frames))
    subprocess.run(command, input=frames, check=True)
    return path


def _write_video_pyav(path, num_frames, width, height, fps, codec, texture) -> str:
    import av
    encoder, pix_fmt, options = PYAV_CODECS[codec]
    container_options = {"movflags": "+faststart"} if path.endswith(".mp4") else {}
    with av.open(path, mode="w", options=container_options) as container:
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for n in range(num_frames):
            frame = av.VideoFrame.from_ndarray(make_frame(n, width, height, texture), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
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
