"""Annotation readers: official Kinetics CSVs, plain "path label" lists and Something-Something v2 JSON.

Each reader returns a `VideoDataset`: the videos of one split in annotation order with their labels, frame
counts and frame rates, and the class names. Everything that can be checked before training starts is checked
here, with errors that name the annotation file and line: unknown labels, malformed lines, empty or incomplete
frame folders, and missing videos (an error, or with `allow_missing` a warning and a list written next to the
annotation file).

Layouts on disk (those written by `preprocess/`):
- Kinetics: `root/<split>/{youtube_id}_{start:06d}_{end:06d}.mp4`, optionally in `<label>/` sub-folders, with
  `root/<split>/manifest.csv` (`path,frames,fps,width,height`, paths relative to the manifest's folder) when
  present; otherwise each video is probed with PyAV at start-up.
- list: `relative/path.mp4 label` lines, paths relative to `root`; `root/manifest.csv` is used when present.
- SSv2: `root/<id>/<id>_000000.jpeg ...`, with `root/manifest.csv` (`path` = id, `frames` = count) when present.
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import os
from dataclasses import dataclass, field

from tqdm import tqdm

from pipelines.decode import probe_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validate", "validation"),
                 "test": ("test", "val", "validate", "validation")}


@dataclass(frozen=True)
class VideoRecord:
    path: str  # video file, or frame folder for SSv2
    label: int
    num_frames: int  # 0 when the file could not be probed: the source then reports it as bad
    fps: float
    where: str  # "annotation_file:line" that listed it
    frame_prefix: str = ""  # SSv2: frame files are f"{path}/{frame_prefix}_{i:06d}.jpeg"
    error: str = ""  # why probing failed


@dataclass
class VideoDataset:
    videos: list[VideoRecord]
    class_names: list[str]
    frames: bool = False  # True: folders of JPEG frames (SSv2), False: video files
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, "file:line") left out (allow_missing)


def read_dataset(cfg, split: str, show_progress: bool = True) -> VideoDataset:
    """The videos of `split` ("train" | "val" | "test") described by a DataConfig."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {list(SPLIT_FOLDERS)}, got {split!r}")
    annotation = getattr(cfg, f"{split}_list")
    if not annotation:
        raise ValueError(f"data.{split}_list is empty: no annotation file for the {split} split")
    readers = {"kinetics": read_kinetics, "list": read_video_list, "ssv2": read_ssv2}
    return readers[cfg.dataset](cfg, split, show_progress)


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def _class_names_from_file(path: str) -> list[str]:
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: class names are not unique")
    return names


# ---------------------------------------------------------------------------------------------------------------
# Kinetics


def _kinetics_rows(path: str) -> list[tuple[int, str, str]]:
    """(line, label, file stem) of each video of an official Kinetics CSV."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Kinetics annotation file not found: {path}")
    rows = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or (line == 1 and row[0].strip() == "label"):
                continue
            if len(row) not in (5, 6):
                raise ValueError(f"{path}:{line}: expected label,youtube_id,time_start,time_end,split[,is_cc], "
                                 f"got {','.join(row)!r}")
            label, youtube_id, start, end = (x.strip() for x in row[:4])
            try:
                stem = f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}"
            except ValueError:
                raise ValueError(f"{path}:{line}: time_start/time_end must be numbers, got {start!r}, {end!r}") \
                    from None
            rows.append((line, label, stem))
    return rows


def read_kinetics(cfg, split: str, show_progress: bool = True) -> VideoDataset:
    annotation = _resolve(cfg.root, getattr(cfg, f"{split}_list"))
    rows = _kinetics_rows(annotation)
    if cfg.labels_file:
        class_names = _class_names_from_file(_resolve(cfg.root, cfg.labels_file))
    elif cfg.train_list:
        train_rows = rows if split == "train" else _kinetics_rows(_resolve(cfg.root, cfg.train_list))
        class_names = sorted({label for _, label, _ in train_rows})
    else:
        raise ValueError("kinetics needs data.train_list or data.labels_file to know the class names")
    labels = _label_indices(annotation, [(line, label) for line, label, _ in rows], class_names)

    folder = _kinetics_split_folder(cfg.root, split)
    files = _index_video_files(folder)
    found, missing = [], []
    for (line, _, stem), label in zip(rows, labels):
        where = f"{annotation}:{line}"
        if stem in files:
            found.append((files[stem], label, where))
        else:
            missing.append((os.path.join(folder, stem + ".mp4"), where))
    _handle_missing(cfg, annotation, missing)
    videos = _with_video_info(found, _read_manifest(os.path.join(folder, "manifest.csv")), show_progress)
    return VideoDataset(videos, class_names, frames=False, missing=missing)


def _kinetics_split_folder(root: str, split: str) -> str:
    for name in SPLIT_FOLDERS[split]:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return root


def _index_video_files(folder: str) -> dict[str, str]:
    """File stem -> path of every video under `folder` (any depth, so `<label>/` sub-folders work too)."""
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS:
                path = os.path.join(directory, name)
                if stem in files:
                    raise ValueError(f"two videos named {stem}: {files[stem]} and {path}")
                files[stem] = path
    return files


# ---------------------------------------------------------------------------------------------------------------
# "relative/path.mp4 label" lists


def read_video_list(cfg, split: str, show_progress: bool = True) -> VideoDataset:
    annotation = _resolve(cfg.root, getattr(cfg, f"{split}_list"))
    rows = _list_rows(annotation)
    if cfg.labels_file:
        class_names = _class_names_from_file(_resolve(cfg.root, cfg.labels_file))
    elif cfg.train_list:
        train_rows = rows if split == "train" else _list_rows(_resolve(cfg.root, cfg.train_list))
        class_names = _list_class_names([label for _, _, label in train_rows])
    else:
        class_names = _list_class_names([label for _, _, label in rows])
    labels = _label_indices(annotation, [(line, label) for line, _, label in rows], class_names)

    found, missing = [], []
    for (line, path, _), label in zip(rows, labels):
        full, where = _resolve(cfg.root, path), f"{annotation}:{line}"
        (found if os.path.isfile(full) else missing).append((full, label, where))
    missing = [(path, where) for path, _, where in missing]
    _handle_missing(cfg, annotation, missing)
    videos = _with_video_info(found, _read_manifest(os.path.join(cfg.root, "manifest.csv")), show_progress)
    return VideoDataset(videos, class_names, frames=False, missing=missing)


def _list_class_names(labels: list[str]) -> list[str]:
    """Integer labels name themselves ("0".."max"); other labels are sorted."""
    if all(label.isdigit() for label in labels):
        return [str(i) for i in range(max(map(int, labels), default=-1) + 1)]
    return sorted(set(labels))


def _list_rows(path: str) -> list[tuple[int, str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video list not found: {path}")
    rows = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(maxsplit=1)  # paths may contain spaces; the label is the last field
            if len(parts) != 2:
                raise ValueError(f"{path}:{line}: expected 'relative/path.mp4 label', got {text!r}")
            rows.append((line, parts[0], parts[1]))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Something-Something v2


def read_ssv2(cfg, split: str, show_progress: bool = True) -> VideoDataset:
    annotation = _resolve(cfg.root, getattr(cfg, f"{split}_list"))
    if not cfg.labels_file:
        raise ValueError("ssv2 needs data.labels_file (something-something-v2-labels.json)")
    labels_path = _resolve(cfg.root, cfg.labels_file)
    template_to_index = {name: int(index) for name, index in _load_json(labels_path).items()}
    class_names = sorted(template_to_index, key=template_to_index.get)
    if sorted(template_to_index.values()) != list(range(len(class_names))):
        raise ValueError(f"{labels_path}: label indices must be 0..{len(class_names) - 1}")

    manifest = _read_manifest(os.path.join(cfg.root, "manifest.csv"))
    items = _load_json(annotation)
    entries = []
    for number, item in enumerate(items, start=1):
        where = f"{annotation}:item {number} (id {item.get('id')})"
        if "id" not in item or "template" not in item:
            raise ValueError(f"{where}: needs 'id' and 'template' (the SSv2 test split has no labels)")
        template = item["template"].replace("[", "").replace("]", "")
        if template not in template_to_index:
            raise ValueError(f"{where}: template {template!r} is not in {labels_path}")
        entries.append((str(item["id"]), template_to_index[template], where))

    def count(entry):
        video_id, _, where = entry
        folder = os.path.join(cfg.root, video_id)
        if video_id in manifest:
            return _check_manifest_frames(folder, video_id, manifest[video_id].num_frames, where)
        return _count_frames(folder, video_id, where)

    counts = _parallel(count, entries, "frame folders", show_progress)
    videos, missing = [], []
    for (video_id, label, where), num_frames in zip(entries, counts):
        folder = os.path.join(cfg.root, video_id)
        if num_frames:
            videos.append(VideoRecord(folder, label, num_frames, 0.0, where, frame_prefix=video_id))
        else:
            missing.append((folder, where))
    _handle_missing(cfg, annotation, missing, what="empty or missing frame folder")
    return VideoDataset(videos, class_names, frames=True, missing=missing)


def _count_frames(folder: str, video_id: str, where: str) -> int:
    """Frames in an SSv2 folder (0 if missing or empty); an error if the numbering has a gap."""
    if not os.path.isdir(folder):
        return 0
    names = {name for name in os.listdir(folder) if name.endswith(".jpeg")}
    for i in range(len(names)):
        if f"{video_id}_{i:06d}.jpeg" not in names:
            raise FileNotFoundError(f"{where}: frame {folder}/{video_id}_{i:06d}.jpeg is missing "
                                    f"({len(names)} frames in the folder)")
    return len(names)


def _check_manifest_frames(folder: str, video_id: str, num_frames: int, where: str) -> int:
    """The manifest's frame count, once the folder is seen to hold its first and last frame (0 if the folder is
    gone). Two stats per video instead of a listing; a gap inside is reported when the frame is read."""
    if num_frames <= 0 or not os.path.isdir(folder):
        return 0
    for i in sorted({0, num_frames - 1}):
        if not os.path.isfile(os.path.join(folder, f"{video_id}_{i:06d}.jpeg")):
            raise FileNotFoundError(f"{where}: frame {folder}/{video_id}_{i:06d}.jpeg is missing (the manifest "
                                    f"{os.path.dirname(folder)}/manifest.csv lists {num_frames} frames)")
    return num_frames


def _load_json(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _label_indices(annotation: str, rows: list[tuple[int, str]], class_names: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(class_names)}
    labels = []
    for line, label in rows:
        if label.isdigit() and label not in index:
            label = str(int(label))  # "007" names class "7"
        if label not in index:
            raise ValueError(f"{annotation}:{line}: unknown label {label!r} (not among the {len(class_names)} "
                             f"classes of the training list / labels file)")
        labels.append(index[label])
    return labels


def _handle_missing(cfg, annotation: str, missing: list[tuple[str, str]], what: str = "missing video") -> None:
    if not missing:
        return
    listing = "\n".join(f"  {where}: {path}" for path, where in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    if not cfg.allow_missing:
        raise FileNotFoundError(f"{len(missing)} {what}(s) listed in {annotation} (set data.allow_missing=true "
                                f"to leave them out):\n{listing}{more}")
    report = annotation + ".missing.txt"
    try:
        with open(report, "w") as f:
            f.writelines(f"{where}\t{path}\n" for path, where in missing)
    except OSError as e:
        report = f"(not written: {e})"
    log.warning("%d %s(s) of %s left out (data.allow_missing); list: %s\n%s%s", len(missing), what, annotation,
                report, listing, more)


def _read_manifest(path: str) -> dict:
    """`path,frames,fps,width,height` rows keyed by path relative to the manifest (and by file stem)."""
    if not os.path.isfile(path):
        return {}
    folder, entries = os.path.dirname(path), {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                info = VideoRecord(os.path.join(folder, row["path"]), -1, int(row["frames"]),
                                   float(row.get("fps") or 0.0), f"{path}:{line}")
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{line}: expected columns path,frames,fps,width,height, got {row}") from None
            entries[row["path"]] = info
            entries[os.path.normpath(info.path)] = info
    return entries


def _with_video_info(found: list[tuple[str, int, str]], manifest: dict, show_progress: bool) -> list[VideoRecord]:
    """Frame count and fps of each video: from the manifest, else probed with PyAV (in parallel)."""
    def info(item):
        path, label, where = item
        entry = manifest.get(os.path.normpath(path))
        if entry is not None and entry.num_frames > 0 and entry.fps > 0:
            return VideoRecord(path, label, entry.num_frames, entry.fps, where)
        try:
            probed = probe_video(path)
        except Exception as e:  # any FFmpeg/PyAV failure: the video stays listed and is reported as bad when used
            return VideoRecord(path, label, 0, 0.0, where, error=f"probe failed: {e}")
        return VideoRecord(path, label, probed.num_frames, probed.fps, where)

    to_probe = sum(1 for path, _, _ in found if os.path.normpath(path) not in manifest)
    return _parallel(info, found, "probing videos", show_progress and to_probe > 0)


def _parallel(function, items: list, description: str, show_progress: bool) -> list:
    workers = min(16, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(function, items, chunksize=64)
        return list(tqdm(results, total=len(items), desc=description, disable=not show_progress, leave=False))
