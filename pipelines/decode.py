"""Reading video files in Python: probing at start-up, PyAV decoding for the CPU path, checks for the GPU path.

DALI's CPU video decoder reads VP8/VP9/MJPEG only, so with `device: cpu` the sources decode every codec with
PyAV (FFmpeg) here. With `device: gpu` the video is decoded by NVDEC inside the pipeline and the source only
demuxes the file (no decoding) to catch unreadable files before they reach the decoder.
"""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter


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


@dataclass(frozen=True)
class EncodedStream:
    """The first video stream of an in-memory file, as the GPU path sees it before NVDEC does."""
    codec: str  # FFmpeg's name: h264, hevc, vp9, av1, ...
    profile: str | None  # e.g. "High", "High 4:4:4 Predictive", "Main 10", "Profile 0"
    pixel_format: str | None  # e.g. yuv420p, yuv420p10le, yuv444p
    width: int
    height: int
    packets: int


def demux_encoded(data: bytes) -> EncodedStream:
    """Codec, profile, pixel format, size and packet count of an in-memory file (demuxed, not decoded)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        packets = sum(1 for packet in container.demux(stream) if packet.size)
        # the codec's canonical name: FFmpeg may pick another decoder's name (libdav1d for av1)
        return EncodedStream(codec.codec.canonical_name, codec.profile, codec.format.name if codec.format else None,
                             codec.width, codec.height, packets)


# What DALI's NVDEC decoder (`fn.decoders.video`, mixed) decodes on every data-centre GPU this project targets
# (NVIDIA Video Codec SDK support matrix, A100/H100/H200): 8-bit 4:2:0 streams of these codecs and profiles, within
# these sizes (width, height). Anything else would fail its whole batch inside the pipeline.
NVDEC_STREAMS = {
    "h264": dict(profiles={"Baseline", "Constrained Baseline", "Main", "High"}, min_size=(48, 16),
                 max_size=(4096, 4096)),
    "hevc": dict(profiles={"Main"}, min_size=(144, 144), max_size=(8192, 8192)),
    "vp9": dict(profiles={"Profile 0"}, min_size=(128, 128), max_size=(8192, 8192)),
}
NVDEC_PIXEL_FORMATS = {"yuv420p", "yuvj420p"}  # 8-bit 4:2:0 (limited or full range)


def nvdec_unsupported(stream: EncodedStream) -> str | None:
    """Why NVDEC cannot decode `stream` (one line), or None when it can."""
    limits = NVDEC_STREAMS.get(stream.codec)
    if limits is None:
        return (f"codec {stream.codec} is not decoded on the GPU path (it takes {', '.join(NVDEC_STREAMS)}); "
                f"re-encode it with preprocess/resize_kinetics.py")
    if stream.profile not in limits["profiles"]:
        return (f"{stream.codec} profile {stream.profile!r} is not decoded by NVDEC (it takes "
                f"{', '.join(sorted(limits['profiles']))}); re-encode it with preprocess/resize_kinetics.py")
    if stream.pixel_format not in NVDEC_PIXEL_FORMATS:
        return f"pixel format {stream.pixel_format} is not decoded by NVDEC (8-bit 4:2:0 only)"
    (min_w, min_h), (max_w, max_h) = limits["min_size"], limits["max_size"]
    if not (min_w <= stream.width <= max_w and min_h <= stream.height <= max_h):
        return (f"{stream.width}x{stream.height} is outside what NVDEC decodes for {stream.codec} "
                f"({min_w}x{min_h} to {max_w}x{max_h})")
    return None


# Container frame counts can be off by a frame or two; a stream that ends earlier than that is truncated.
FRAME_COUNT_SLACK = 2


def decode_frames(path: str, indices: np.ndarray, num_frames: int) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed) as (len(indices), H, W, 3) uint8 RGB.

    Frame i is the i-th frame in presentation order. Indices past the end of a video get its last frame (edge
    padding, for indices clamped to a slightly wrong frame count). Raises if nothing can be decoded or if the
    stream ends well before the `num_frames` the container announced (a truncated or corrupt file).

    Decoding starts at the keyframe before the first wanted frame and skips the frames nothing refers to (H.264's
    and HEVC's non-reference pictures) unless they are wanted: the same pixels, 22% less decoding on videos from
    preprocess/resize_kinetics.py (x264, B-frames). Streams whose packets do not map one to one onto frames by
    timestamp are decoded frame by frame instead.
    """
    wanted = sorted({int(i) for i in indices})
    frames = None
    for seek in (True, False) if wanted[0] > 0 else (False,):  # from the start when a seek overshoots
        try:
            frames = _decode_span(path, wanted, seek, skip=True)
        except _Unmapped:
            frames = _decode_span(path, wanted, seek, skip=False)
        if frames is not None:
            break
    last = max(frames, default=-1)
    if last < min(wanted[-1], num_frames - 1 - FRAME_COUNT_SLACK):
        raise ValueError(f"the stream ends at frame {last + 1}, the container announces {num_frames}")
    return np.stack([frames[int(i)] if int(i) in frames else frames[last] for i in indices])


class _Unmapped(Exception):
    """The packets of a stream cannot be matched to frame indices by their timestamps."""


def _decode_span(path: str, wanted: list[int], seek: bool, skip: bool) -> dict[int, np.ndarray] | None:
    """The wanted frames (sorted indices) as a dict, plus the last frame if the stream ends before them; None when
    a seek overshot the first wanted frame. Raises _Unmapped when `skip` and the packets do not map onto frames.

    The first frame's index comes from its timestamp (after a seek) or is 0; the frames after it are counted.
    With `skip`, each packet's index is its timestamp's rank among the packets from the keyframe on (known after
    demuxing, before decoding), and FFmpeg skips the non-reference packets whose frame is not wanted.
    """
    first, last = wanted[0], wanted[-1]
    rgb = VideoReformatter()  # one swscale context for the clip: `frame.to_ndarray(format=...)` makes one per frame
    with av.open(path) as container:
        stream = container.streams.video[0]
        # one thread: the sources run a decoder per worker process, on every core (FFmpeg's default, a slice
        # thread per core, costs 13% more CPU time per frame on H.264)
        stream.thread_type, stream.codec_context.thread_count = "NONE", 1
        fps = Fraction(stream.average_rate or stream.guessed_rate)
        time_base = stream.time_base
        start_pts = stream.start_time or 0
        if seek:
            container.seek(start_pts + int(first / fps / time_base), stream=stream, backward=True, any_frame=False)

        def index_of(pts):  # the first frame's index, from its timestamp (0 without a seek)
            return round((pts - start_pts) * time_base * fps) if seek else 0

        if skip:
            return _decode_skipping(container, stream, wanted, index_of, rgb)
        out, previous, index = {}, None, None
        for frame in container.decode(stream):
            if index is None:
                if seek and frame.pts is None:
                    return None
                index = index_of(frame.pts)
                if index > first:
                    return None
            if index in wanted:
                out[index] = to_rgb(rgb, frame)  # RGB conversion only for the frames kept
            if index >= last:
                break
            previous = (index, frame)
            index += 1
        else:  # the stream ended early: keep its last frame for the edge padding
            if previous is not None and previous[0] not in out:
                out[previous[0]] = to_rgb(rgb, previous[1])
    return out


# Containers whose packets carry presentation timestamps (checked against a full decode, B-frames included). AVI
# numbers its packets in decode order instead: its frames would come out in the wrong order.
PRESENTATION_TIMESTAMPS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts", "flv"}


def _decode_skipping(container, stream, wanted: list[int], index_of, rgb) -> dict[int, np.ndarray] | None:
    """_decode_span with `skip` (see there), in the open container."""
    if container.format.name not in PRESENTATION_TIMESTAMPS:
        raise _Unmapped
    first, last = wanted[0], wanted[-1]
    packets, times = [], []  # packets in decode order from the keyframe; sorted timestamps of its frames
    key_pts = base = None
    for packet in container.demux(stream):
        if not packet.size:
            continue
        # no timestamp, or a packet the decoder drops (an edit list's pre-roll): the frame count is not the packets'
        if packet.pts is None or packet.is_discard:
            raise _Unmapped
        if key_pts is None:
            key_pts, base = packet.pts, index_of(packet.pts)
            if base > first:
                return None
        decode_ts = packet.dts if packet.dts is not None else packet.pts
        # a later packet has a timestamp >= this one's decode timestamp: past the last wanted frame, stop
        if len(times) > last - base and decode_ts > times[last - base]:
            break
        packets.append(packet)
        if packet.pts >= key_pts:  # frames before the keyframe (an open GOP's leading pictures) are not counted
            bisect.insort(times, packet.pts)
    index = {pts: base + rank for rank, pts in enumerate(times)}
    if not times or len(index) < len(times):  # nothing after the seek, or two packets with one timestamp
        raise _Unmapped
    keep = set(wanted) & set(index.values())
    if not keep or max(keep) < last:  # the stream ends before the last wanted frame: its last frame pads
        keep.add(base + len(times) - 1)
    context, out, shown = stream.codec_context, {}, []
    for packet in [*packets, None]:  # None: the frames the decoder still holds for reordering
        context.skip_frame = "DEFAULT" if packet is None or index.get(packet.pts) in keep else "NONREF"
        for frame in context.decode(packet):
            shown.append(frame.pts)
            if index.get(frame.pts) in keep:
                out[index[frame.pts]] = to_rgb(rgb, frame)
        if len(out) == len(keep):
            break
    # frames come out in presentation order: their timestamps must rise, and each kept one must have come out
    if len(out) < len(keep) or any(b <= a for a, b in zip(shown, shown[1:])):
        raise _Unmapped
    return out


def to_rgb(converter: VideoReformatter, frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame: the pixels of `frame.to_ndarray(format="rgb24")` (what the original
    code's `to_rgb()` gives), on one thread, with a converter kept for the clip (a new one per frame costs about
    0.7 ms, 7x the conversion of a 340 x 256 frame)."""
    return converter.reformat(frame, format="rgb24", threads=1).to_ndarray()


def placeholder_video(num_frames: int = 4, size: int = 64, codec: str = "h264") -> bytes:
    """A tiny valid H.264 mp4 (or VP9 webm, for DALI's CPU decoder) kept in memory: what the video decoder decodes
    in place of a file that cannot be read (the row is marked bad and dropped; the decoder still needs a decodable
    stream for the batch to go through)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4" if codec == "h264" else "webm") as container:
        stream = container.add_stream("libx264" if codec == "h264" else "libvpx-vp9", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 128, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
