"""The video list of a split as one compact file, built once and memory-mapped by every process that reads it.

Reading a Kinetics-sized annotation (240,000 videos: the CSV, the folder listing, the manifest) takes tens of
seconds and leaves a list of Python objects of about a gigabyte in each rank, and DALI pickles the source, list
included, into each of its worker processes. The index holds the same list as numpy columns and string blobs in
one file: a process opens it in milliseconds, its pages sit once in the page cache for every rank and worker on
the machine, and a source pickles as the file's path.

    dataset = cached_dataset(cfg, split, build=lambda: read_uncached(cfg, split), show_progress=True)
    dataset.videos[i]  # a VideoRecord, read from the mapped file

The file is keyed by what the list is read from: the reader's settings, the content of the annotation file, the
class list and the manifest, and the modification times of the video folders (a video added or removed changes its
folder's). A change to any of them builds a new index, with every check of the readers (unknown labels, missing
videos, incomplete frame folders, errors naming the file and line); so does a new version of the format. What the
key does not see: a video changed in place without its manifest (preprocess/ rewrites the manifest), and frames
added to or removed from an SSv2 folder (a missing frame is still an error naming the file when it is read).

One process builds an index while the others wait on a lock next to it (an flock, which also holds across nodes
on NFS v4 and Lustre); they then open what it wrote. The file is written to a temporary name and renamed. The
other indexes of the list (earlier versions, other reader settings) are removed then, each once no process has it
open: every reader holds a shared lock on its file, as a run's DALI workers reopen it by path when they start.

Layout of a file: MAGIC, the header's length (8 bytes, little-endian), the header (JSON: key, class names, flags,
columns), then each column 64-byte aligned. A string column is its strings' common prefix (in the header), a
uint32/uint64 offset array and a UTF-8 blob of the rest of each string.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from pipelines.datasets import VideoDataset, VideoRecord

log = logging.getLogger(__name__)

MAGIC = b"KCVINDEX"
VERSION = 1  # of the format and of what the readers check: a new version builds every index anew
ALIGN = 64
SUFFIX = ".kcindex"
CACHE_FOLDER = ".kcenter-index"  # next to the annotation file, where that folder is writable
NUMBERS = {"label": np.int32, "num_frames": np.int32, "fps": np.float64, "frame_start": np.int32}
STRINGS = ("path", "where", "frame_format", "error")


class VideoIndex(Sequence):
    """The videos of an index file, as VideoRecords made on access. Pickles as its path: a DALI worker that
    unpickles a source maps the same file."""

    def __init__(self, path: str):
        self.path = path
        # A shared flock for as long as this object lives: the process that builds a newer index of the same list
        # removes this file only when it can lock it exclusively (`_remove_unused`), since a run reading it still
        # starts workers that reopen it by path (a second experiment on the same data with other reader settings)
        self._file = open(path, "rb")
        try:
            fcntl.flock(self._file, fcntl.LOCK_SH)
            if os.fstat(self._file.fileno()).st_ino != os.stat(path).st_ino:  # removed or replaced before the lock
                raise FileNotFoundError(errno.ENOENT, "index replaced while it was opened", path)
            try:
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise ValueError(f"{path}: not a video index (empty file)") from None
        except BaseException:
            self._file.close()
            raise
        if self._map[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path}: not a video index (no {MAGIC!r} at its start)")
        size = int.from_bytes(self._map[len(MAGIC): len(MAGIC) + 8], "little")
        start = len(MAGIC) + 8
        self.header = json.loads(self._map[start: start + size].decode())
        self._columns = {name: self._array(spec) for name, spec in self.header["arrays"].items()}
        self.length = self.header["length"]
        for name in NUMBERS:
            setattr(self, name if name != "label" else "labels", self._columns[name])

    def _array(self, spec: dict) -> np.ndarray:
        return np.frombuffer(self._map, dtype=spec["dtype"], count=spec["count"], offset=spec["offset"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.length))]
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"video {i} of an index of {self.length}")
        c = self._columns
        return VideoRecord(self.string("path", i), int(c["label"][i]), int(c["num_frames"][i]), float(c["fps"][i]),
                           self.string("where", i), frame_format=self.string("frame_format", i),
                           frame_start=int(c["frame_start"][i]), error=self.string("error", i))

    def string(self, column: str, i: int) -> str:
        offsets, blob = self._columns[column + ".offsets"], self._columns[column + ".blob"]
        return self.header["prefixes"][column] + bytes(blob[offsets[i]: offsets[i + 1]]).decode()

    def strings(self, column: str) -> list[str]:
        """Every string of a column (e.g. "missing_path")."""
        count = len(self._columns[column + ".offsets"]) - 1
        return [self.string(column, i) for i in range(count)]

    def __reduce__(self):
        return VideoIndex, (self.path,)

    def __repr__(self) -> str:
        return f"VideoIndex({self.path!r}, {self.length} videos)"


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _string_column(values: list[str]) -> tuple[str, np.ndarray, np.ndarray]:
    prefix = os.path.commonprefix(values) if values else ""
    encoded = [v[len(prefix):].encode() for v in values]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
    dtype = np.uint32 if (ends[-1] if len(ends) else 0) < 2**32 else np.uint64
    offsets = np.concatenate([np.zeros(1, np.int64), ends]).astype(dtype)
    return prefix, offsets, np.frombuffer(b"".join(encoded), np.uint8)


def write_index(path: str, dataset: VideoDataset, key: str) -> None:
    """The dataset as an index file at `path`, atomically (temp file in the same folder, then rename)."""
    videos = dataset.videos
    arrays, prefixes = {}, {}
    for name, dtype in NUMBERS.items():
        arrays[name] = np.array([getattr(v, name) for v in videos], dtype=dtype)
    columns = {name: [getattr(v, name) for v in videos] for name in STRINGS}
    columns["missing_path"] = [p for p, _ in dataset.missing]
    columns["missing_where"] = [w for _, w in dataset.missing]
    for name, values in columns.items():
        prefixes[name], arrays[name + ".offsets"], arrays[name + ".blob"] = _string_column(values)
    header = {"version": VERSION, "key": key, "length": len(videos), "class_names": list(dataset.class_names),
              "frames": dataset.frames, "labelled": dataset.labelled, "annotation": dataset.annotation,
              "prefixes": prefixes, "arrays": {}}
    # offsets depend on the header's size, which depends on the offsets: lay out with room for the digits
    body_start = _align(len(MAGIC) + 8 + len(json.dumps(_layout(header, arrays, 0))) + 32 * len(arrays))
    header = _layout(header, arrays, body_start)
    text = json.dumps(header).encode()
    if len(MAGIC) + 8 + len(text) > body_start:
        raise AssertionError("index header outgrew its room")  # cannot happen: offsets only grew by body_start
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + len(text).to_bytes(8, "little") + text)
            for name, array in arrays.items():
                f.seek(header["arrays"][name]["offset"])
                f.write(np.ascontiguousarray(array).tobytes())
            f.truncate(max(f.tell(), body_start))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the other users of a shared dataset out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(header: dict, arrays: dict, start: int) -> dict:
    header = dict(header, arrays={})
    offset = start
    for name, array in arrays.items():
        header["arrays"][name] = {"dtype": array.dtype.str, "count": int(array.size), "offset": offset}
        offset = _align(offset + array.nbytes)
    return header


# ---------------------------------------------------------------------------------------------------------------
# Keys, locations, build-or-open


def index_key(cfg, split: str, files: Sequence[str], folders: Sequence[tuple[str, bool]]) -> str:
    """sha256 of the reader's settings, the content of `files` (annotation, class list, manifest; absent ones
    count as absent) and the modification times of `folders` (folder, with its sub-folders one level down)."""
    digest = hashlib.sha256()
    settings = {name: getattr(cfg, name) for name in (
        "dataset", "root", "labels_file", "train_list", "allow_missing", "frame_naming", "frame_start",
        f"{split}_list", f"{split}_folder")}
    digest.update(json.dumps([VERSION, split, os.path.abspath(cfg.root or "."), settings], sort_keys=True).encode())
    for path in files:
        digest.update(b"\0file " + os.path.abspath(path).encode() + b"\0")
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            digest.update(b"absent")
    for folder, subfolders in folders:
        digest.update(b"\0folder " + os.path.abspath(folder).encode())
        digest.update(repr(_folder_times(folder, subfolders)).encode())
    return digest.hexdigest()


def _folder_times(folder: str, subfolders: bool) -> list:
    """(name, mtime_ns) of a folder and, with `subfolders`, of its sub-folders (not deeper): Kinetics keeps its
    videos in the split folder or in its <label>/ folders. The index's own folder is left out."""
    try:
        times = [("", os.stat(folder).st_mtime_ns)]
        if not subfolders:
            return times
        with os.scandir(folder) as entries:
            times += sorted((e.name, e.stat().st_mtime_ns) for e in entries
                            if e.name != CACHE_FOLDER and e.is_dir(follow_symlinks=True))
        return times
    except FileNotFoundError:
        return ["absent"]


def index_folder(cfg, annotation: str) -> str | None:
    """Where the index of `annotation` lives: data.index_dir, or with "auto" a .kcenter-index folder next to the
    annotation file where that is writable, else ~/.cache/kcenter-video/index; None with "off"."""
    choice = cfg.index_dir
    if choice == "off":
        return None
    if choice != "auto":
        folder = choice if os.path.isabs(choice) or not cfg.root else os.path.join(cfg.root, choice)
        os.makedirs(folder, exist_ok=True)
        return folder
    beside = os.path.join(os.path.dirname(os.path.abspath(annotation)), CACHE_FOLDER)
    try:
        os.makedirs(beside, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kcenter-video", "index")
    os.makedirs(home, exist_ok=True)
    return home


@contextlib.contextmanager
def _locked(path: str, what: str):
    """An exclusive flock on `path`; says so when another process holds it."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            log.info("waiting for another process to build %s (lock %s)", what, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_dataset(cfg, split: str, annotation: str, files: Sequence[str], folders: Sequence[tuple[str, bool]],
                   build: Callable[[], VideoDataset]) -> VideoDataset:
    """The dataset of `split` from its index file, building the index with `build()` if there is none for the
    current key (see the module docstring). `files`: what the list is read from; `folders`: where its videos are."""
    folder = index_folder(cfg, annotation)
    if folder is None:
        return build()
    key = index_key(cfg, split, files, folders)
    stem = f"{os.path.basename(annotation)}.{split}"
    path = os.path.join(folder, f"{stem}.{key[:24]}{SUFFIX}")
    dataset = _open(path, key)
    if dataset is not None:
        return dataset
    with _locked(os.path.join(folder, stem + ".lock"), f"the index of {annotation}"):
        dataset = _open(path, key)  # another process may have built it while this one waited
        if dataset is not None:
            return dataset
        start = time.perf_counter()
        built = build()
        if index_key(cfg, split, files, folders) != key:  # something changed while it was read: do not keep it
            log.info("%s changed while it was read: not indexed this time", annotation)
            return built
        write_index(path, built, key)
        for old in os.listdir(folder):  # indexes of earlier versions of this list, or of other reader settings
            if old.startswith(stem + ".") and old.endswith(SUFFIX) and old != os.path.basename(path):
                _remove_unused(os.path.join(folder, old))
        log.info("indexed %d videos of %s in %.1f s: %s", len(built.videos), annotation,
                 time.perf_counter() - start, path)
    return _open(path, key, announce=False)  # the reader has said what is missing


def _remove_unused(path: str) -> None:
    """Remove an index file no process has open (each `VideoIndex` holds a shared lock on its file); one that a run
    still reads stays, for a later build to remove."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.remove(path)


def _open(path: str, key: str, announce: bool = True) -> VideoDataset | None:
    """The dataset of an index file, or None if there is none with this key (or it is unreadable: rebuilt)."""
    try:
        index = VideoIndex(path)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("%s is not a readable index (%s): building it again", path, e)
        return None
    header = index.header
    if header.get("version") != VERSION or header.get("key") != key:
        return None
    missing = list(zip(index.strings("missing_path"), index.strings("missing_where")))
    if missing and announce:
        log.warning("%d listed video(s) of %s are missing and left out (data.allow_missing; the list was written "
                    "beside it as %s.missing.txt when the index was built)", len(missing), header["annotation"],
                    os.path.basename(header["annotation"]))
    return VideoDataset(index, header["class_names"], frames=header["frames"], missing=missing,
                        labelled=header["labelled"], annotation=header["annotation"])
