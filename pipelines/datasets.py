"""Annotation readers: official Kinetics CSVs, plain "path label" lists and Something-Something v2 JSON.

`read_dataset` reads a split once and keeps it as an index file that every later start, rank and DALI worker maps
instead (pipelines/index.py: what its key covers, where it lives, `data.index_dir`).

Each reader returns a `VideoDataset`: the videos of one split in annotation order with their labels, frame
counts and frame rates, and the class names. Everything that can be checked before training starts is checked
here, with errors that name the annotation file and line: unknown labels, malformed lines, empty or incomplete
frame folders, and missing videos (an error, or with `allow_missing` a warning and a list written next to the
annotation file).

Annotation files, as the official releases ship them:
- Kinetics-400/600/700 CSVs: `label,youtube_id,time_start,time_end,split[,is_cc]` with or without the header,
  quoted or not, and the unlabelled test CSV `youtube_id,time_start,time_end,split` (columns are taken from the
  header where there is one). An unlabelled list can only be a test list: its videos get predictions, no accuracy.
- SSv2: something-something-v2-labels.json, train/validation JSON, and test JSON (ids only: unlabelled).

Layouts on disk:
- Kinetics: `root/<split folder>/{youtube_id}_{start:06d}_{end:06d}.<ext>`, optionally in `<label>/` sub-folders
  (the ActivityNet downloader's layout). The split folder is `data.<split>_folder` when set, else the first of
  SPLIT_FOLDERS that exists (`train/`, `val/` as the CVDF download and `preprocess/` write them, `videos_train/`,
  `videos_val/` as mmaction2's), else `root` itself. `manifest.csv` in it (`path,frames,fps,width,height`, paths
  relative to the manifest's folder) gives frame counts; otherwise each video is probed with PyAV at start-up.
- list: `relative/path.mp4 label` lines, paths relative to `root`; `root/manifest.csv` is used when present.
- SSv2: `root/<id>/` frame folders: `<id>_000000.jpeg ...` as `preprocess/ssv2_to_frames.py` writes them, or
  another tool's naming (`<id>_000001.jpg`, mmaction2's `img_00001.jpg`; `.jpg` or `.jpeg`, numbered from 0 or
  1), detected from each folder or set with `data.frame_naming` / `data.frame_start`; `root/manifest.csv`
  (`path` = id, `frames` = count) when present.
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from tqdm import tqdm

from pipelines.decode import probe_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
SPLIT_FOLDERS = {"train": ("train", "videos_train"), "val": ("val", "validate", "validation", "videos_val"),
                 "test": ("test", "videos_test", "val", "validate", "validation", "videos_val")}
# the split an annotation file's name says; the names of one split are the same file as the releases name it
# (ActivityNet's validate.csv, the CVDF mirror's val.csv)
ANNOTATION_SPLITS = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
OUR_FRAMES = ("{id}_{n:06d}.jpeg", 0)  # preprocess/ssv2_to_frames.py's naming, numbered from 0


@dataclass(frozen=True)
class VideoRecord:
    path: str  # video file, or frame folder for SSv2
    label: int
    num_frames: int  # 0 when the file could not be probed: the source then reports it as bad
    fps: float
    where: str  # "annotation_file:line" that listed it
    frame_format: str = ""  # SSv2: frame i is path/frame_format.format(i + frame_start), e.g. "7_{:06d}.jpeg"
    frame_start: int = 0
    error: str = ""  # why probing failed

    def frame_path(self, i: int) -> str:
        """SSv2: the file of frame i (0-based) of the folder."""
        return os.path.join(self.path, self.frame_format.format(int(i) + self.frame_start))


@dataclass
class VideoDataset:
    videos: Sequence[VideoRecord]  # a list, or the memory-mapped VideoIndex of pipelines/index.py
    class_names: list[str]
    frames: bool = False  # True: folders of JPEG frames (SSv2), False: video files
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, "file:line") left out (allow_missing)
    labelled: bool = True  # False: an unlabelled test list (label -1): predictions only
    annotation: str = ""  # the file it was read from


def read_dataset(cfg, split: str, show_progress: bool = True) -> VideoDataset:
    """The videos of `split` ("train" | "val" | "test") described by a DataConfig."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {list(SPLIT_FOLDERS)}, got {split!r}")
    annotation = getattr(cfg, f"{split}_list")
    if not annotation:
        raise ValueError(f"data.{split}_list is empty: no annotation file for the {split} split")
    from pipelines.index import cached_dataset  # index.py builds on this module's classes

    readers = {"kinetics": read_kinetics, "list": read_video_list, "ssv2": read_ssv2}
    annotation, files, folders = _list_sources(cfg, split)
    dataset = cached_dataset(cfg, split, annotation, files, folders,
                             build=lambda: readers[cfg.dataset](cfg, split, show_progress))
    if not dataset.labelled and split != "test":
        raise ValueError(f"data.{split}_list {dataset.annotation} has no labels (an unlabelled test list): it can "
                         f"only be data.test_list, whose videos then get predictions and no accuracy")
    return dataset


def _list_sources(cfg, split: str) -> tuple[str, list[str], list[tuple[str, bool]]]:
    """What the list of `split` is read from, for the key of its index (pipelines/index.py): the annotation file,
    the files read with it (class list, manifest) and the folders whose listing decides which videos are found
    (with their sub-folders one level down, or not)."""
    annotation = getattr(cfg, f"{split}_list")
    labels = [_resolve(cfg.root, cfg.labels_file)] if cfg.labels_file else []
    if cfg.dataset == "kinetics":
        annotation = _resolve_annotation(cfg.root, annotation)
        train = [_resolve_annotation(cfg.root, cfg.train_list)] if cfg.train_list and not labels else []
        folder = _kinetics_split_folder(cfg, split, annotation)
        return annotation, [annotation, *labels, *train, os.path.join(folder, "manifest.csv")], [(folder, True)]
    annotation = _resolve(cfg.root, annotation)
    manifest = [os.path.join(cfg.root, "manifest.csv")]
    if cfg.dataset == "ssv2":
        # without a manifest each folder is listed, so each folder's time counts; with one (frame counts given) the
        # root's: 169,000 stats per rank and start against a shared file system are what the index is there to save
        return annotation, [annotation, *labels, *manifest], [(cfg.root, not os.path.isfile(manifest[0]))]
    train = [_resolve(cfg.root, cfg.train_list)] if cfg.train_list and not labels else []
    parents = sorted({os.path.dirname(_resolve(cfg.root, path)) for _, path, _ in _list_rows(annotation)})
    return annotation, [annotation, *labels, *train, *manifest], [(parent, False) for parent in parents]


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def _resolve_annotation(root: str, path: str) -> str:
    """`path` from `root`; where it does not exist, the same file under another official name (val.csv for
    validate.csv and back), if exactly that one exists."""
    full = _resolve(root, path)
    if os.path.exists(full):
        return full
    folder, name = os.path.split(full)
    stem, ext = os.path.splitext(name)
    split = ANNOTATION_SPLITS.get(stem)
    found = [os.path.join(folder, other + ext) for other, of in ANNOTATION_SPLITS.items()
             if split and of == split and other != stem and os.path.isfile(os.path.join(folder, other + ext))]
    if len(found) == 1:
        log.info("%s not found: reading %s (the same split under the other official name)", full, found[0])
        return found[0]
    return full


def _class_names_from_file(path: str) -> list[str]:
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: class names are not unique")
    return names


# ---------------------------------------------------------------------------------------------------------------
# Kinetics


KINETICS_COLUMNS = {  # columns of the official CSVs without a header, by count
    6: ("label", "youtube_id", "time_start", "time_end", "split", "is_cc"),  # Kinetics-400
    5: ("label", "youtube_id", "time_start", "time_end", "split"),  # Kinetics-600/700
    4: ("youtube_id", "time_start", "time_end", "split"),  # the unlabelled test lists
}


def _kinetics_rows(path: str) -> list[tuple[int, str | None, str]]:
    """(line, label or None, file stem) of each video of an official Kinetics CSV."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Kinetics annotation file not found: {path}")
    rows, columns = [], None
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if columns is None:
                if "youtube_id" in cells:  # a header: columns by name, in any order
                    columns = {name: i for i, name in enumerate(cells)}
                    lacking = [c for c in ("youtube_id", "time_start", "time_end") if c not in columns]
                    if lacking:
                        raise ValueError(f"{path}:{line}: the header {','.join(row)!r} lacks {', '.join(lacking)}")
                    width = len(cells)
                    continue
                if {"label", "time_start", "time_end", "split"} & set(cells):
                    raise ValueError(f"{path}:{line}: the header {','.join(row)!r} lacks youtube_id")
                if len(cells) not in KINETICS_COLUMNS:
                    raise ValueError(f"{path}:{line}: expected label,youtube_id,time_start,time_end,split[,is_cc] "
                                     f"or youtube_id,time_start,time_end,split, got {','.join(row)!r}")
                width = len(cells)
                columns = {name: i for i, name in enumerate(KINETICS_COLUMNS[width])}
            if len(cells) != width:
                raise ValueError(f"{path}:{line}: expected {width} columns as in {', '.join(columns)}, got "
                                 f"{len(cells)}: {','.join(row)!r}")
            youtube_id, start, end = (cells[columns[c]] for c in ("youtube_id", "time_start", "time_end"))
            label = cells[columns["label"]] if "label" in columns else None
            if not youtube_id or label == "":
                raise ValueError(f"{path}:{line}: empty {'youtube_id' if not youtube_id else 'label'}: "
                                 f"{','.join(row)!r}")
            try:
                stem = f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}"
            except ValueError:
                raise ValueError(f"{path}:{line}: time_start/time_end must be numbers, got {start!r}, {end!r}") \
                    from None
            rows.append((line, label, stem))
    return rows


def read_kinetics(cfg, split: str, show_progress: bool = True) -> VideoDataset:
    annotation = _resolve_annotation(cfg.root, getattr(cfg, f"{split}_list"))
    rows = _kinetics_rows(annotation)
    labelled = all(label is not None for _, label, _ in rows)  # a file's columns are the same on every row
    if cfg.labels_file:
        class_names = _class_names_from_file(_resolve(cfg.root, cfg.labels_file))
    elif cfg.train_list:
        train_file = _resolve_annotation(cfg.root, cfg.train_list)
        train_rows = rows if train_file == annotation else _kinetics_rows(train_file)
        if any(label is None for _, label, _ in train_rows):
            raise ValueError(f"data.train_list {train_file} has no labels: the class names come from the training "
                             f"list (or data.labels_file)")
        class_names = sorted({label for _, label, _ in train_rows})
    else:
        raise ValueError("kinetics needs data.train_list or data.labels_file to know the class names")
    labels = (_label_indices(annotation, [(line, label) for line, label, _ in rows], class_names) if labelled
              else [-1] * len(rows))

    folder = _kinetics_split_folder(cfg, split, annotation)
    files = _index_video_files(folder, split)
    found, missing = [], []
    for (line, _, stem), label in zip(rows, labels):
        where = f"{annotation}:{line}"
        if stem in files:
            found.append((files[stem], label, where))
        else:
            missing.append((os.path.join(folder, stem + ".mp4"), where))
    _handle_missing(cfg, annotation, missing)
    videos = _with_video_info(found, _read_manifest(os.path.join(folder, "manifest.csv")), show_progress)
    return VideoDataset(videos, class_names, frames=False, missing=missing, labelled=labelled, annotation=annotation)


def _kinetics_split_folder(cfg, split: str, annotation: str) -> str:
    """data.<split>_folder when set (relative to root), else the first known folder of the annotation's split under
    root (a test list named validate.csv reads val/, not test/), else root."""
    chosen = getattr(cfg, f"{split}_folder", "")
    if chosen:
        folder = _resolve(cfg.root, chosen)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data.{split}_folder: {folder} is not a folder")
        return folder
    stem = os.path.splitext(os.path.basename(annotation))[0].lower()
    named = ANNOTATION_SPLITS.get(stem, split)
    for name in SPLIT_FOLDERS[named]:
        if os.path.isdir(os.path.join(cfg.root, name)):
            return os.path.join(cfg.root, name)
    return cfg.root


def _index_video_files(folder: str, split: str = "train") -> dict[str, str]:
    """File stem -> path of every video under `folder` (any depth, so `<label>/` sub-folders work too)."""
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS:
                path = os.path.join(directory, name)
                if stem in files:
                    raise ValueError(f"two videos named {stem}: {files[stem]} and {path} (raw and resized copies "
                                     f"side by side? set data.{split}_folder to the folder to read)")
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
    return VideoDataset(videos, class_names, frames=False, missing=missing, annotation=annotation)


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
    labelled = not items or any("template" in item for item in items if isinstance(item, dict))
    entries = []
    for number, item in enumerate(items, start=1):
        ident = item.get("id") if isinstance(item, dict) else repr(item)
        where = f"{annotation}:item {number} (id {ident})"
        if not isinstance(item, dict) or "id" not in item or (labelled and "template" not in item):
            raise ValueError(f"{where}: needs 'id' and 'template'" + ("" if labelled else " (or 'id' alone, as "
                             "the unlabelled test split)"))
        if not labelled:
            entries.append((str(item["id"]), -1, where))
            continue
        template = item["template"].replace("[", "").replace("]", "")
        if template not in template_to_index:
            raise ValueError(f"{where}: template {template!r} is not in {labels_path}")
        entries.append((str(item["id"]), template_to_index[template], where))
    naming = _frame_naming_setting(cfg)

    def count(entry):
        video_id, _, where = entry
        folder = os.path.join(cfg.root, video_id)
        if video_id in manifest:
            fmt, start = _frame_format(naming or OUR_FRAMES, video_id)
            return fmt, start, _check_manifest_frames(folder, fmt, start, manifest[video_id].num_frames, where)
        return _count_frames(folder, video_id, where, naming)

    counts = _parallel(count, entries, "frame folders", show_progress)
    videos, missing = [], []
    for (video_id, label, where), (fmt, start, num_frames) in zip(entries, counts):
        folder = os.path.join(cfg.root, video_id)
        if num_frames:
            videos.append(VideoRecord(folder, label, num_frames, 0.0, where, frame_format=fmt, frame_start=start))
        else:
            missing.append((folder, where))
    _handle_missing(cfg, annotation, missing, what="empty or missing frame folder")
    return VideoDataset(videos, class_names, frames=True, missing=missing, labelled=labelled, annotation=annotation)


FRAME_FILE = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)\.(?P<ext>jpe?g)$", re.IGNORECASE)


def _frame_naming_setting(cfg) -> tuple[str, int] | None:
    """(template, first number) from data.frame_naming / data.frame_start, None for "auto" (detected per folder)."""
    return None if cfg.frame_naming == "auto" else (cfg.frame_naming, cfg.frame_start)


def _frame_format(naming: tuple[str, int], video_id: str) -> tuple[str, int]:
    """A naming template ("{id}_{n:06d}.jpeg") for one folder: the str.format pattern of its frame numbers."""
    template, start = naming
    return template.replace("{id}", video_id.replace("{", "{{").replace("}", "}}")).replace("{n", "{"), start


def _detect_naming(names: list[str], folder: str, where: str) -> tuple[str, int]:
    """The naming of the frames in a folder: one prefix, one zero-padded width, one extension, numbered from 0 or
    1; anything else is an error saying what was found."""
    forms = {}
    for name in names:
        match = FRAME_FILE.match(name)
        if match:
            forms.setdefault((match["prefix"], match["ext"]), []).append(match["number"])
    if len(forms) != 1:
        sample = ", ".join(sorted(names)[:3])
        raise ValueError(f"{where}: {folder} holds {len(names)} files ({sample}, ...) but no one frame naming "
                         f"(<prefix><number>.jpg|.jpeg): set data.frame_naming (e.g. '{{id}}_{{n:06d}}.jpeg', "
                         f"'img_{{n:05d}}.jpg') and data.frame_start")
    (prefix, ext), numbers = next(iter(forms.items()))
    padded = {len(d) for d in numbers if d.startswith("0") and len(d) > 1}
    width = max(len(d) for d in numbers) if padded else 0
    first = min(int(d) for d in numbers)
    name = prefix.replace("{", "{{").replace("}", "}}") + ("{:0%dd}" % width if width else "{:d}") + "." + ext
    if first not in (0, 1):
        raise ValueError(f"{where}: the frames of {folder} are numbered from {first} ({name.format(first)}): set "
                         f"data.frame_naming and data.frame_start={first}")
    return name, first


def _count_frames(folder: str, video_id: str, where: str, naming: tuple[str, int] | None) -> tuple[str, int, int]:
    """(frame format, first number, frame count) of an SSv2 folder; count 0 if missing or empty. An error if the
    numbering has a gap or the folder's files are not frames named as set or detected."""
    if not os.path.isdir(folder):
        return "", 0, 0
    names = [name for name in os.listdir(folder) if not name.startswith(".")]
    if not names:
        return "", 0, 0
    fmt, start = _frame_format(naming, video_id) if naming else _detect_naming(names, folder, where)
    present = set(names)
    count = sum(1 for name in names if FRAME_FILE.match(name))
    if fmt.format(start) not in present:
        found = ", ".join(sorted(names)[:3])
        detected = _detect_naming(names, folder, where)
        raise FileNotFoundError(f"{where}: {folder} has no {fmt.format(start)} (data.frame_naming "
                                f"{naming[0]!r}, frame_start {naming[1]}); it holds {found}, ...: read with "
                                f"data.frame_naming=auto (detected: {detected[0]} from {detected[1]})")
    for i in range(count):
        if fmt.format(i + start) not in present:
            raise FileNotFoundError(f"{where}: frame {folder}/{fmt.format(i + start)} is missing "
                                    f"({count} frames in the folder)")
    return fmt, start, count


def _check_manifest_frames(folder: str, fmt: str, start: int, num_frames: int, where: str) -> int:
    """The manifest's frame count, once the folder is seen to hold its first and last frame (0 if the folder is
    gone). Two stats per video instead of a listing (a third, of the folder, only when a frame is not there); a gap
    inside is reported when the frame is read."""
    if num_frames <= 0:
        return 0
    for i in sorted({0, num_frames - 1}):
        if not os.path.isfile(os.path.join(folder, fmt.format(i + start))):
            if not os.path.isdir(folder):
                return 0
            raise FileNotFoundError(f"{where}: frame {folder}/{fmt.format(i + start)} is missing (the manifest "
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


class ManifestEntry(NamedTuple):
    num_frames: int
    fps: float


def _read_manifest(path: str) -> dict[str, ManifestEntry]:
    """`path,frames,fps,width,height` rows keyed by path relative to the manifest (SSv2: the folder's id) and by
    the normalised full path."""
    if not os.path.isfile(path):
        return {}
    folder, entries = os.path.normpath(os.path.dirname(path)), {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if "path" not in header or "frames" not in header:
            raise ValueError(f"{path}:1: expected columns path,frames,fps,width,height, got {','.join(header)!r}")
        p, n, r = header.index("path"), header.index("frames"), header.index("fps") if "fps" in header else None
        for line, row in enumerate(reader, start=2):
            try:
                entry = ManifestEntry(int(row[n]), float(row[r] or 0.0) if r is not None else 0.0)
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{line}: expected columns path,frames,fps,width,height, got "
                                 f"{','.join(row)!r}") from None
            relative = row[p]
            entries[relative] = entry
            full = folder + os.sep + relative
            # normpath only where it changes something: a clean relative path joined to a normal folder is normal
            entries[full if _clean(relative) else os.path.normpath(os.path.join(folder, relative))] = entry
    return entries


def _clean(relative: str) -> bool:
    return not (relative.startswith((".", os.sep)) or "//" in relative or "/." in relative)


def _with_video_info(found: list[tuple[str, int, str]], manifest: dict, show_progress: bool) -> list[VideoRecord]:
    """Frame count and fps of each video: from the manifest, else probed with PyAV (in parallel)."""
    videos, to_probe = [], []
    for item in found:
        path, label, where = item
        entry = manifest.get(os.path.normpath(path))
        if entry is not None and entry.num_frames > 0 and entry.fps > 0:
            videos.append(VideoRecord(path, label, entry.num_frames, entry.fps, where))
        else:
            videos.append(None)
            to_probe.append(len(videos) - 1)

    def probe(i):
        path, label, where = found[i]
        try:
            probed = probe_video(path)
        except Exception as e:  # any FFmpeg/PyAV failure: the video stays listed and is reported as bad when used
            return VideoRecord(path, label, 0, 0.0, where, error=f"probe failed: {e}")
        return VideoRecord(path, label, probed.num_frames, probed.fps, where)

    for i, video in zip(to_probe, _parallel(probe, to_probe, "probing videos", show_progress)):
        videos[i] = video
    return videos


def _parallel(function, items: list, description: str, show_progress: bool, chunk: int = 256) -> list:
    """[function(item) for item in items] on threads (file system calls and probes wait on I/O), a chunk of items a
    task: a task per item would cost more than the work it does for a list of 200,000."""
    if not items:
        return []
    workers = min(16, (os.cpu_count() or 1) * 2)
    chunks = [items[i: i + chunk] for i in range(0, len(items), chunk)]
    results = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(items), desc=description, disable=not show_progress, leave=False) as bar:
        for part in pool.map(lambda part: [function(item) for item in part], chunks):
            results += part
            bar.update(len(part))
    return results
