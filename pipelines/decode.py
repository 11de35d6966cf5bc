"""Reading video files in Python: probing at start-up, PyAV decoding for the CPU path, checks for the GPU path.

DALI's CPU video decoder reads VP8/VP9/MJPEG only, so with `device: cpu` the sources decode every codec with
PyAV (FFmpeg) here. With `device: gpu` the video is decoded by NVDEC inside the pipeline and the source only
demuxes the file (no decoding) to catch unreadable files before they reach the decoder.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def probe_video(path: str) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream (demuxes the file when the container does
    not store a frame count, as WebM does)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if not num_frames or not fps:
            raise ValueError(f"{path}: no frames or no frame rate in the video stream")
        return VideoInfo(num_frames, fps, stream.codec_context.width, stream.codec_context.height)


def count_packets(data: bytes) -> int:
    """Video packets in an in-memory file: a cheap check that NVDEC will get a readable stream."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


# Container frame counts can be off by a frame or two; a stream that ends earlier than that is truncated.
FRAME_COUNT_SLACK = 2


def decode_frames(path: str, indices: np.ndarray, num_frames: int) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed) as (len(indices), H, W, 3) uint8 RGB.

    Frame i is the i-th frame in presentation order. Indices past the end of a video get its last frame (edge
    padding, for indices clamped to a slightly wrong frame count). Raises if nothing can be decoded or if the
    stream ends well before the `num_frames` the container announced (a truncated or corrupt file).
    """
    wanted = sorted({int(i) for i in indices})
    frames = _decode_range(path, wanted, seek=wanted[0] > 0)
    if frames is None:  # seeking landed after the first wanted frame (e.g. a bad index): decode from the start
        frames = _decode_range(path, wanted, seek=False)
    last = max(frames, default=-1)
    if last < min(wanted[-1], num_frames - 1 - FRAME_COUNT_SLACK):
        raise ValueError(f"the stream ends at frame {last + 1}, the container announces {num_frames}")
    return np.stack([frames[int(i)] if int(i) in frames else frames[last] for i in indices])


def _decode_range(path: str, wanted: list[int], seek: bool) -> dict[int, np.ndarray] | None:
    """The wanted frames (sorted indices) as a dict, and the last frame decoded if the stream ends before them;
    None when a seek overshot the first wanted frame."""
    first, last, wanted_set = wanted[0], wanted[-1], set(wanted)
    out, previous = {}, None
    with av.open(path) as container:
        stream = container.streams.video[0]  # single-threaded: the sources run one decoder per worker process
        fps = Fraction(stream.average_rate or stream.guessed_rate)
        time_base = stream.time_base
        start_pts = stream.start_time or 0
        index = 0
        if seek:
            container.seek(start_pts + int(first / fps / time_base), stream=stream, backward=True, any_frame=False)
            index = None
        for frame in container.decode(stream):
            if index is None:  # after a seek, the first frame's index comes from its timestamp
                if frame.pts is None:
                    return None
                index = round((frame.pts - start_pts) * time_base * fps)
                if index > first:
                    return None
            if index in wanted_set:
                out[index] = frame.to_ndarray(format="rgb24")  # RGB conversion only for the frames kept
            if index >= last:
                break
            previous = (index, frame)
            index += 1
        else:  # the stream ended early: keep its last frame for the edge padding
            if previous is not None and previous[0] not in out:
                out[previous[0]] = previous[1].to_ndarray(format="rgb24")
    return out


def placeholder_video(num_frames: int = 4, size: int = 64) -> bytes:
    """A tiny valid H.264 mp4 kept in memory: what NVDEC decodes in place of a file that cannot be read (the row
    is marked bad and dropped; NVDEC still needs a decodable stream for the batch to go through)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 128, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
