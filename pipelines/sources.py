"""The per-sample Python source that feeds the DALI graphs.

`ClipSource(info)` is called by DALI (in worker processes when `py_workers > 0`) with the sample's position in
the epoch and returns the data of one clip: the video's bytes and frame indices (GPU decoding), its decoded
frames (CPU decoding with PyAV) or its JPEG frames (SSv2), plus every random augmentation parameter of the clip
(in training with `num_sample` N > 1, N sets of them: one per augmented view of the one decoded clip), the label,
the dataset index and a status. It is picklable and never changes after the pipeline is built: the
epoch comes from `info.epoch_idx` (+ start_epoch) and the position from `info.idx_in_epoch` (+ the skipped
batches of a resumed first epoch).

Rows that are not real samples are kept in the batch (DALI batches have a fixed size) but marked by `status`:
PADDING rows make every rank's epoch the same length; BAD rows are videos that could not be read, carried with
a placeholder clip and an error message. The loader drops both.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from pipelines import sampling
from pipelines.datasets import VideoRecord
from pipelines.decode import FRAME_COUNT_SLACK, decode_frames, demux_encoded, nvdec_unsupported, placeholder_video

OK, PADDING, BAD = 1, 0, 2
MESSAGE_BYTES = 256  # error messages travel as fixed-size byte rows so that the batch stays dense


@dataclass(frozen=True)
class ClipSpec:
    """What the source produces; the graphs read the same spec to consume it."""
    mode: str  # train | val | test
    reader: str  # pyav: decoded frames (CPU) | nvdec: encoded video for fn.decoders.video (NVDEC on device gpu;
    # on device cpu DALI's CPU decoder, VP8/VP9/MJPEG only, which the tests use) | jpeg: frame files
    device: str  # cpu | gpu: where the graph decodes JPEGs and augments
    num_frames: int
    sampling_rate: int
    target_fps: float
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_clips: int = 1  # temporal clips per video (test)
    num_crops: int = 1  # spatial crops per clip (test)
    jitter_scales: tuple[int, int] = (256, 320)
    inverse_uniform: bool = True
    random_flip: bool = True
    color_jitter: bool = False
    rand_augment: sampling.RandAugmentSpec | None = None
    rand_augment_suite_size: int = 0  # ops the source may draw; the identity op follows them in the graph
    num_sample: int = 1  # train: augmented views of each decoded clip (data.num_sample), each with its own parameters

    @property
    def frames_per_sample(self) -> int:
        return self.num_clips * self.num_frames

    def train_param_names(self) -> list[str]:
        """The random parameters of one augmented view of a training clip, as the source sends view 0's."""
        names = ["scale", "crop_pos", "mirror"]
        if self.color_jitter:
            names.append("jitter")
        if self.rand_augment:
            names += ["augment_ops", "augment_bins", "augment_signs"]
        return names

    @staticmethod
    def view_name(name: str, view: int) -> str:
        """The output name of parameter `name` of view `view`: view 0's is the name itself (num_sample 1 as before)."""
        return f"{name}_{view}" if view else name

    def output_names(self) -> list[str]:
        if self.reader == "jpeg":
            names = [f"jpeg_{i}" for i in range(self.frames_per_sample)]
        elif self.reader == "nvdec":
            names = ["encoded", "frame_ids"]
        else:
            names = ["frames"]
        names += ["label", "index", "status", "message"]
        if self.mode == "train":  # view-major: every parameter of view 0, then of view 1, ...
            names += [self.view_name(name, view) for view in range(self.num_sample)
                      for name in self.train_param_names()]
        return names


class ClipSource:
    """Per-sample source of one rank's share of each epoch (see the module docstring)."""

    def __init__(self, videos: list[VideoRecord], spec: ClipSpec, *, seed: int, rank: int, world_size: int,
                 batch_size: int, start_epoch: int = 0, start_batch: int = 0, batches_multiple: int = 1):
        self.videos, self.spec, self.seed = videos, spec, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.steps = sampling.steps_per_epoch(len(videos), batch_size, world_size, batches_multiple)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._placeholder_cache = None

    def __call__(self, info):
        skipped = self.start_batch * self.batch_size if info.epoch_idx == 0 else 0
        return self.sample(self.start_epoch + info.epoch_idx, skipped + info.idx_in_epoch)

    def sample(self, epoch: int, rank_position: int) -> tuple:
        """The row of this rank's `rank_position`-th sample of `epoch` (StopIteration past the epoch's end)."""
        if rank_position >= self.steps * self.batch_size:
            raise StopIteration
        position = sampling.global_position(rank_position, self.rank, self.world_size)
        index = int(self._order(epoch)[position % len(self.videos)])
        if position >= len(self.videos):
            return self._row(self._placeholder(), index, PADDING, "padding", epoch)
        video = self.videos[index]
        try:
            data = self._read(video, epoch, index)
        except _BadVideo as e:
            return self._row(self._placeholder(), index, BAD, str(e), epoch)
        return self._row(data, index, OK, "", epoch)

    # -- reading ------------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = sampling.epoch_order(len(self.videos), self.seed, epoch, shuffle=self.spec.mode == "train")
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def frame_indices(self, video: VideoRecord, epoch: int, index: int) -> np.ndarray:
        """(num_clips * num_frames,) frame indices of the sample, clip-major."""
        spec = self.spec
        train_rng = sampling.sample_rng(self.seed, epoch, index, sampling.TEMPORAL) if spec.mode == "train" else None
        return sampling.clip_frame_indices(spec.mode, spec.reader == "jpeg", video.num_frames, video.fps,
                                           spec.num_frames, spec.sampling_rate, spec.target_fps, spec.num_clips,
                                           train_rng)

    def _read(self, video: VideoRecord, epoch: int, index: int):
        if video.error or video.num_frames <= 0:
            raise _BadVideo(video.error or "no frames")
        ids = self.frame_indices(video, epoch, index)
        if self.spec.reader == "jpeg":
            return self._read_jpegs(video, ids)
        if self.spec.reader == "pyav":
            try:
                return (decode_frames(video.path, ids, video.num_frames),)
            except Exception as e:  # FFmpeg reports corrupt data in many exception types
                raise _BadVideo(f"decoding failed: {type(e).__name__}: {e}") from None
        try:
            data = np.fromfile(video.path, dtype=np.uint8)
            stream = demux_encoded(data.tobytes())
        except Exception as e:
            raise _BadVideo(f"demuxing failed: {type(e).__name__}: {e}") from None
        # a stream NVDEC cannot decode would fail its whole batch in the pipeline: a bad video here instead
        unsupported = nvdec_unsupported(stream) if self.spec.device == "gpu" else None
        if unsupported:
            raise _BadVideo(unsupported)
        packets = stream.packets
        if packets == 0 or packets < min(int(ids.max()) + 1, video.num_frames - FRAME_COUNT_SLACK):
            raise _BadVideo(f"the stream has {packets} packets, the container announces {video.num_frames} frames")
        # NVDEC fails the whole batch on an index past the end: trust the packets over the metadata.
        return data, np.minimum(ids, packets - 1).astype(np.int32)

    def _read_jpegs(self, video: VideoRecord, ids: np.ndarray) -> tuple:
        frames = []
        for i in ids:
            path = video.frame_path(i)
            if not os.path.isfile(path):
                # A gap in a frame folder is a broken dataset, not a bad video: stop, naming the file.
                raise FileNotFoundError(f"missing frame {path} (listed at {video.where})")
            data = np.fromfile(path, dtype=np.uint8)
            if data.size < 4 or data[0] != 0xFF or data[1] != 0xD8:
                raise _BadVideo(f"not a JPEG file: {path}")
            if b"\xff\xd9" not in data[-32:].tobytes():
                # a truncated JPEG would fail the decoder's whole batch; its end-of-image marker is missing
                raise _BadVideo(f"truncated JPEG file (no end-of-image marker): {path}")
            frames.append(data)
        return tuple(frames)

    def _placeholder(self) -> tuple:
        """Data that the graph can decode and augment in place of a padding or bad row (built once per worker)."""
        if self._placeholder_cache is None:
            n = self.spec.frames_per_sample
            if self.spec.reader == "jpeg":
                self._placeholder_cache = (_tiny_jpeg(),) * n
            elif self.spec.reader == "nvdec":
                codec = "h264" if self.spec.device == "gpu" else "vp9"  # what the decoder of the device reads
                self._placeholder_cache = (np.frombuffer(placeholder_video(codec=codec), np.uint8),
                                           np.zeros(n, np.int32))
            else:
                self._placeholder_cache = (np.full((n, 16, 16, 3), 128, np.uint8),)
        return self._placeholder_cache

    # -- one output row -----------------------------------------------------------------------------------------

    def _row(self, data: tuple, index: int, status: int, message: str, epoch: int) -> tuple:
        video = self.videos[index]
        message_row = np.frombuffer(message.encode()[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0"), np.uint8)
        row = [*data, np.array(video.label, np.int64), np.array(index, np.int64), np.array(status, np.int32),
               message_row]
        if self.spec.mode == "train":
            for view in range(self.spec.num_sample):  # every view of the one decoded clip, as output_names orders them
                row += self._train_params(epoch, index, view)
        return tuple(row)

    def _train_params(self, epoch: int, index: int, view: int = 0) -> list[np.ndarray]:
        """The random parameters of augmented view `view` of video `index` (ClipSpec.train_param_names)."""
        spec = self.spec
        spatial = sampling.train_spatial(self.seed, epoch, index, spec.jitter_scales, spec.inverse_uniform,
                                         spec.random_flip, view)
        # crop positions in float64: a draw just below 1 stays below 1 (in float32 it can round up to 1, one past
        # the original's randint range)
        params = [np.array(spatial.scale, np.float32), np.array([spatial.crop_x, spatial.crop_y], np.float64),
                  np.array(spatial.mirror, np.int32)]
        if spec.color_jitter:
            params.append(sampling.color_jitter_factors(self.seed, epoch, index, view))
        if spec.rand_augment:
            params += sampling.rand_augment_choices(self.seed, epoch, index, spec.rand_augment,
                                                    spec.rand_augment_suite_size,
                                                    identity=spec.rand_augment_suite_size, view=view)
        return params


def message_text(row: np.ndarray) -> str:
    """A row's `message` output (fixed-size bytes, see MESSAGE_BYTES) back to text."""
    return bytes(row).rstrip(b"\0").decode(errors="replace")


class _BadVideo(Exception):
    """A video that cannot be read: its row is marked BAD and carries this message."""


def _tiny_jpeg() -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, format="JPEG")
    return np.frombuffer(buffer.getvalue(), np.uint8)
