"""`build_loader`: a dataset split as an iterator of augmented clips on the device.

The loader wraps one DALI pipeline (see graphs.py) and DALI's PyTorch iterator, which hands the outputs to torch
through DLPack: with `device: gpu` the clips and labels stay on the rank's GPU. It drops the rows the source
marked as padding or bad, keeps the record of bad videos, and enforces `max_bad_fraction` in training. With
`data.num_sample` N > 1 each training video comes as N rows, its augmented views (see Batch).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
from dataclasses import dataclass
from multiprocessing import resource_tracker

import torch
import torch.distributed as dist
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipelines import sampling
from pipelines.datasets import VideoDataset, read_dataset
from pipelines.graphs import GRAPHS, OUTPUT_NAMES, rand_augment_suite
from pipelines.sources import BAD, OK, PADDING, ClipSource, ClipSpec, message_text

log = logging.getLogger(__name__)


@contextlib.contextmanager
def handled_signals_blocked(signals=(signal.SIGTERM, signal.SIGUSR1)):
    """Blocks, in this thread, those of `signals` this process handles in Python (train.py's preemption), while
    DALI starts a pipeline's source workers, and restores the mask after.

    A worker is spawned (fork, then exec of a new interpreter), and until it has run the code of its own that ignores
    these signals (train.py, as __mp_main__) a signal gets their default action: it dies, and its rank's pipeline
    fails, so a preemption (Slurm signals every process of a job step) that comes while a pipeline starts (at each
    validation, and each epoch that starts a pipeline anew) would end the run with an error instead of a stop.
    The signal mask survives fork and exec: the worker starts with them blocked, and keeps them blocked (its parent
    ends it by closing the pipeline; SIGKILL still ends it). A signal sent to this process meanwhile waits, or goes
    to another thread, and reaches its handler once the pipeline is built; a process that leaves the signals at
    their defaults (eval.py, a script) is not changed. The same as multiprocessing does for its resource tracker
    (bpo-33613), which is started first, since its own start unblocks SIGTERM."""
    handled = {s for s in signals if callable(signal.getsignal(s))}
    if handled:  # started now if not yet: launching it in the window would unblock SIGTERM (bpo-33613's own mask)
        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, handled) if handled else None
    try:
        yield
    finally:
        if handled:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class Batch:
    """One batch of a split. Training with data.num_sample N > 1: a batch of B videos holds B * N rows, the N views of
    a video adjacent (row r is view r % N of the video r // N of the batch, as VideoMAE's multiple_samples_collate
    lays them out), each with the video's label and index and its own `view`."""
    clips: torch.Tensor  # (B, C, T, H, W) float32, or (B, V, C, T, H, W) for the test split
    labels: torch.Tensor  # (B,) int64, on the device of `clips`
    index: torch.Tensor  # (B,) int64 dataset index of each row (CPU): loader.dataset.videos[i]
    view: torch.Tensor | None = None  # (B,) int64 augmented view of each row (CPU), training with data.num_sample > 1;
    # None: every row is view 0 (the only one)


def build_loader(cfg, split: str, batch_size: int, rank: int = 0, world_size: int = 1, device_id: int | None = None,
                 seed: int = 0, num_clips: int = 1, num_crops: int = 1, start_epoch: int = 0,
                 start_batch: int = 0, batches_multiple: int = 1) -> "ClipLoader":
    """A loader of `split` ("train" | "val" | "test") for one rank.

    Args:
        cfg: DataConfig.
        batch_size: videos per rank and step: as many clips (val), each video's data.num_sample views (train), its
            num_clips x num_crops views (test).
        device_id: CUDA device of this rank when cfg.device == "gpu".
        seed: everything random is a function of (seed, epoch, video), independent of ranks and workers.
        num_clips, num_crops: test split only: temporal clips x spatial crops (1 or 3) per video.
        start_epoch, start_batch: resume: the first `for` yields batches start_batch.. of epoch start_epoch.
        batches_multiple: each epoch is padded to a multiple of this many batches (training: the accumulation
            steps, so that an epoch is whole optimizer steps, as many on any number of processes; see
            sampling.steps_per_epoch).
    """
    if cfg.device == "gpu" and device_id is None:
        raise ValueError("data.device is 'gpu' but no device_id was given (use data.device=cpu without a GPU)")
    if split != "test" and (num_clips, num_crops) != (1, 1):
        raise ValueError(f"num_clips/num_crops are for the test split, got {num_clips}/{num_crops} for {split}")
    if num_crops not in (1, 3) or num_clips < 1:
        raise ValueError(f"num_crops must be 1 or 3 and num_clips >= 1, got {num_crops} and {num_clips}")
    if cfg.dataset == "ssv2" and num_clips != 1:
        raise ValueError(f"ssv2 is tested with one temporal clip (all frames are covered), got num_clips={num_clips}")
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1, got {rank}, {world_size}, {batch_size}")
    dataset = read_dataset(cfg, split, show_progress=rank == 0)
    if cfg.device == "gpu" and not dataset.frames:
        check_nvdec_library()
    if not dataset.videos:
        raise ValueError(f"no videos in the {split} split ({getattr(cfg, split + '_list')})")
    spec = clip_spec(cfg, split, dataset, num_clips, num_crops)
    return ClipLoader(dataset, spec, split=split, batch_size=batch_size, rank=rank, world_size=world_size,
                      device_id=device_id, seed=seed, start_epoch=start_epoch, start_batch=start_batch,
                      batches_multiple=batches_multiple,
                      num_threads=cfg.num_threads, py_workers=cfg.py_workers, max_bad_fraction=cfg.max_bad_fraction)


NVDEC_LIBRARY = "libnvcuvid.so.1"


def check_nvdec_library(name: str = NVDEC_LIBRARY) -> None:
    """NVDEC's user-space library is mounted into a container only when NVIDIA_DRIVER_CAPABILITIES includes `video`;
    without it every video batch would fail deep inside DALI. Say so at start-up, in one line."""
    try:
        ctypes.CDLL(name)
    except OSError as e:
        raise RuntimeError(
            f"data.device is 'gpu' but NVDEC's library {name} cannot be loaded ({e}). In a container, start it with "
            f"NVIDIA_DRIVER_CAPABILITIES including 'video' (e.g. compute,utility,video or all); or decode on the "
            f"CPU with data.device=cpu") from None


def clip_spec(cfg, split: str, dataset: VideoDataset, num_clips: int = 1, num_crops: int = 1) -> ClipSpec:
    """What the source produces and the graph does for `split`, from the DataConfig."""
    train = split == "train"
    if train and dataset.frames and cfg.random_flip:
        raise ValueError("data.random_flip must be false for ssv2: its classes name left and right")
    augment = sampling.parse_rand_augment(cfg.rand_augment) if train else None
    reader = "jpeg" if dataset.frames else "nvdec" if cfg.device == "gpu" else "pyav"
    return ClipSpec(
        mode=split, reader=reader, device=cfg.device, num_frames=cfg.num_frames, sampling_rate=cfg.sampling_rate,
        target_fps=cfg.target_fps, crop_size=cfg.crop_size, mean=tuple(cfg.mean), std=tuple(cfg.std),
        num_clips=num_clips, num_crops=num_crops, jitter_scales=tuple(cfg.train_jitter_scales),
        inverse_uniform=cfg.inverse_uniform, random_flip=cfg.random_flip, color_jitter=train and cfg.color_jitter,
        rand_augment=augment, rand_augment_suite_size=len(rand_augment_suite(augment)) - 1 if augment else 0,
        num_sample=cfg.num_sample if train else 1)


def make_pipeline(source: ClipSource, batch_size: int, num_threads: int, py_workers: int, device_id: int | None,
                  seed: int = 0):
    """The graph of the source's mode (not yet built). `py_workers` 0 runs the source in this process.
    With `device_id=None` a GPU graph can still be serialized (a cheap check of it on machines without a GPU)."""
    return GRAPHS[source.spec.mode](
        source, parallel=py_workers > 0, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
        py_num_workers=max(1, py_workers), seed=seed % 2**31,  # DALI's own RNG is not used by the graphs
        enable_conditionals=source.spec.rand_augment is not None)  # RandAugment's op switch is a DALI `if`


PIPELINE_ERROR = "Critical error in pipeline"  # how DALI reports an operator that failed on a batch


def _dali_error_reason(error: RuntimeError) -> str:
    """The operator's own message out of DALI's "Critical error in pipeline" text (one line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0] if lines else ""
    return reason[:200]


class _OneRow:
    """A source of one given row (a batch of 1 for one iteration), with the spec the graphs read."""

    def __init__(self, spec: ClipSpec, row: tuple):
        self.spec, self.row = spec, row

    def __call__(self, info):
        if info.idx_in_epoch > 0:
            raise StopIteration
        return self.row


class ClipLoader:
    """One `for` = one epoch of len(loader) batches on every rank. Rows that are padding or failed to decode are
    removed from their batch, so a batch may be smaller than batch_size, even empty (it is still yielded, to keep
    the ranks in step); `bad_videos` and `last_epoch_summary()` keep the record."""

    def __init__(self, dataset: VideoDataset, spec: ClipSpec, *, split: str, batch_size: int, rank: int,
                 world_size: int, device_id: int | None, seed: int, start_epoch: int, start_batch: int,
                 num_threads: int, py_workers: int, max_bad_fraction: float, batches_multiple: int = 1):
        self.dataset, self.spec, self.split = dataset, spec, split
        self.batch_size, self.rank, self.world_size, self.device_id = batch_size, rank, world_size, device_id
        self.seed, self.num_threads, self.py_workers = seed, num_threads, py_workers
        self.max_bad_fraction = max_bad_fraction
        self.batches_multiple = batches_multiple
        self.steps = sampling.steps_per_epoch(len(dataset.videos), batch_size, world_size, batches_multiple)
        if not 0 <= start_batch <= self.steps:
            raise ValueError(f"start_batch must be in [0, {self.steps}], got {start_batch}")
        if start_batch == self.steps:  # resuming after the last batch of an epoch = the start of the next
            start_epoch, start_batch = start_epoch + 1, 0
        self.epoch = start_epoch
        self._skip = start_batch  # batches skipped at the start of the upcoming epoch (resume)
        self._iterator = None  # (DALI iterator, pipeline), built by the first `for` of a run of epochs
        self._started = False
        self.bad_videos: list[tuple[str, str]] = []  # (path, error) of each video that failed, all epochs
        self._bad_paths: set[str] = set()
        self._summary: dict = {}

    # -- public API ---------------------------------------------------------------------------------------------

    @property
    def num_videos(self) -> int:
        return len(self.dataset.videos)

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    @property
    def missing_videos(self) -> list[tuple[str, str]]:
        """(path, "annotation:line") of annotated videos left out because they are missing (allow_missing)."""
        return list(self.dataset.missing)

    def last_epoch_summary(self) -> dict:
        return dict(self._summary)

    def __len__(self) -> int:
        return self.steps - self._skip

    def __iter__(self):
        if self._started:
            self.epoch += 1
        self._started = True
        counts = dict(seen=0, bad=0, padded=0)
        batch_number, finished = self._skip, False
        try:
            while batch_number < self.steps:
                if self._iterator is None:
                    self._iterator = self._build(self.epoch, batch_number)
                try:
                    outputs = next(self._iterator[0])
                except RuntimeError as error:
                    if PIPELINE_ERROR not in str(error):
                        raise
                    self._iterator = None  # a pipeline that failed is not run again; the next batch gets a new one
                    batch = self._decode_one_by_one(batch_number, counts, error)
                else:
                    batch = self._filter(outputs[0], counts)
                batch_number += 1
                yield batch  # empty batches too: every rank must take len(loader) steps
            if self._iterator is not None:  # the source has ended the epoch: collect its end, rewind for the next
                iterator = self._iterator[0]
                if next(iterator, None) is not None:
                    raise RuntimeError(f"the {self.split} pipeline gave more than {self.steps} batches an epoch")
                iterator.reset()
            finished = True
        finally:
            self._skip = 0
            if not finished:  # DALI cannot reset mid-epoch: the next `for` gets a new pipeline, starting at its epoch
                self._iterator = None
        self._end_epoch(counts)

    # -- internals ----------------------------------------------------------------------------------------------

    def _build(self, epoch: int, start_batch: int):
        source = ClipSource(self.dataset.videos, self.spec, seed=self.seed, rank=self.rank,
                            world_size=self.world_size, batch_size=self.batch_size, start_epoch=epoch,
                            start_batch=start_batch, batches_multiple=self.batches_multiple)
        with handled_signals_blocked():  # the iterator builds the pipeline, which starts its source workers
            pipe = make_pipeline(source, self.batch_size, num_threads=self.num_threads, py_workers=self.py_workers,
                                 device_id=self.device_id if self.spec.device == "gpu" else None,
                                 seed=self.seed + self.rank)
            iterator = DALIGenericIterator(pipe, OUTPUT_NAMES, size=-1, auto_reset=False, prepare_first_batch=False)
        return iterator, pipe

    def _decode_one_by_one(self, batch_number: int, counts: dict, error: RuntimeError) -> Batch:
        """The rows of a batch the pipeline failed on, each in a pipeline of its own: a sample the decoder cannot
        decode stops DALI's whole batch, and only that video may be dropped (recorded as bad, like the others)."""
        log.warning("%s batch %d of epoch %d (rank %d) failed to decode (%s): decoding its videos one by one",
                    self.split, batch_number, self.epoch, self.rank, _dali_error_reason(error))
        source = ClipSource(self.dataset.videos, self.spec, seed=self.seed, rank=self.rank,
                            world_size=self.world_size, batch_size=self.batch_size,
                            batches_multiple=self.batches_multiple)  # the padded batches are in its epoch too
        names = self.spec.output_names()
        rows = []
        for j in range(self.batch_size):
            row = dict(zip(names, source.sample(self.epoch, batch_number * self.batch_size + j)))  # data errors raise
            status, index = int(row["status"]), int(row["index"])
            counts["seen" if status != PADDING else "padded"] += 1
            if status == BAD:
                counts["bad"] += 1
                self._record_bad(index, message_text(row["message"]))
            if status != OK:
                continue
            pipe = make_pipeline(_OneRow(self.spec, tuple(row.values())), 1, num_threads=self.num_threads,
                                 py_workers=0, device_id=self.device_id if self.spec.device == "gpu" else None,
                                 seed=self.seed)
            try:
                out = next(iter(DALIGenericIterator(pipe, OUTPUT_NAMES, size=-1, auto_reset=False,
                                                    prepare_first_batch=False)))[0]
            except RuntimeError as e:
                if PIPELINE_ERROR not in str(e):
                    raise
                counts["bad"] += 1
                self._record_bad(index, f"the decoder failed on it: {_dali_error_reason(e)}")
                continue
            rows.append((out["clips"], out["labels"].reshape(-1).to(torch.int64), index))
        if not rows:  # every row failed: an empty batch of the usual layout, on the usual device
            spec = self.spec
            views = ((spec.num_clips * spec.num_crops,) if self.split == "test" else
                     (spec.num_sample,) if spec.num_sample > 1 else ())  # as the graph's outputs
            device = torch.device("cuda", self.device_id) if spec.device == "gpu" else torch.device("cpu")
            clips = torch.empty(0, *views, 3, spec.num_frames, spec.crop_size, spec.crop_size, device=device)
            return self._batch(clips, torch.empty(0, dtype=torch.int64, device=device),
                               torch.empty(0, dtype=torch.int64))
        return self._batch(torch.cat([clips for clips, _, _ in rows]), torch.cat([labels for _, labels, _ in rows]),
                           torch.tensor([index for _, _, index in rows], dtype=torch.int64))

    def _filter(self, out: dict, counts: dict) -> Batch:
        status = out["status"].cpu().reshape(-1)
        index = out["index"].cpu().reshape(-1).to(torch.int64)
        counts["seen"] += int((status != PADDING).sum())
        counts["padded"] += int((status == PADDING).sum())
        for row in (status == BAD).nonzero().reshape(-1).tolist():
            counts["bad"] += 1
            self._record_bad(int(index[row]), message_text(out["message"][row].cpu().numpy()))
        clips, labels = out["clips"], out["labels"].reshape(-1).to(torch.int64)
        keep = status == OK
        if not bool(keep.all()):
            rows = keep.nonzero().reshape(-1)
            clips, labels, index = clips[rows.to(clips.device)], labels[rows.to(labels.device)], index[rows]
        return self._batch(clips, labels, index)

    def _batch(self, clips: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> Batch:
        """The Batch of the kept videos. Training with num_sample N > 1: their (B, N, C, T, S, S) views as B * N
        rows, the views of a video adjacent, with its label and index repeated and each row's view (see Batch)."""
        n = self.spec.num_sample
        if n == 1:
            return Batch(clips, labels, index)
        return Batch(clips.flatten(0, 1), labels.repeat_interleave(n), index.repeat_interleave(n),
                     torch.arange(n).repeat(len(index)))

    def _record_bad(self, index: int, message: str) -> None:
        path = self.dataset.videos[index].path
        if path not in self._bad_paths:
            self._bad_paths.add(path)
            self.bad_videos.append((path, message))
            log.warning("cannot decode %s (%s): skipped%s", path, message,
                        "" if self.split == "train" else "; it is excluded from the evaluation")

    def _end_epoch(self, counts: dict) -> None:
        self._summary = dict(epoch=self.epoch, **counts)
        if counts["bad"]:
            log.warning("epoch %d (%s, rank %d): %d of %d videos could not be decoded", self.epoch, self.split,
                        self.rank, counts["bad"], counts["seen"])
        if self.split != "train":
            return
        seen, bad = self._count_over_ranks(counts["seen"], counts["bad"])
        if seen and bad / seen > self.max_bad_fraction:
            raise RuntimeError(
                f"{bad} of {seen} training videos failed to decode in epoch {self.epoch} (more than "
                f"data.max_bad_fraction={self.max_bad_fraction}); first on rank {self.rank}: {self.bad_videos[:3]}")

    def _count_over_ranks(self, seen: int, bad: int) -> tuple[int, int]:
        """Epoch totals over all ranks, so that every rank takes the same decision: a rank raising alone would
        leave the others waiting in their next collective. Every rank ends its epoch after the same batch."""
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return seen, bad
        device = torch.device("cuda", self.device_id) if self.spec.device == "gpu" else torch.device("cpu")
        totals = torch.tensor([seen, bad], dtype=torch.int64, device=device)
        dist.all_reduce(totals)
        return tuple(totals.tolist())
