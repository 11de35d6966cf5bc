"""Dataset-sized annotation lists on disk, for measuring what reading them costs (bench/bench_index.py, tests).

    python bench/synthetic_lists.py kinetics 240000 /tmp/k400     # 400 class folders, CSV, manifest
    python bench/synthetic_lists.py ssv2 169000 /tmp/ssv2          # frame folders, JSON, labels, manifest

Kinetics: `ROOT/annotations/train.csv` in the official format (`label,youtube_id,time_start,time_end,split`),
`ROOT/train/<label>/<id>_<start>_<end>.mp4` as empty files (reading the list never opens a video when the manifest
has it) and `ROOT/train/manifest.csv` as `preprocess/resize_kinetics.py` writes it. SSv2: `ROOT/train.json` and
`ROOT/labels.json` in the official format, `ROOT/<id>/` folders holding the first and last frame (empty files: with
a manifest the reader checks those two) and `ROOT/manifest.csv` with each folder's frame count.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

KINETICS_CLASSES = 400
SSV2_CLASSES = 174


def _ids(n: int, seed: int) -> list[str]:
    """n distinct YouTube-like ids (11 characters of [A-Za-z0-9_-])."""
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", np.uint8)
    rng = np.random.default_rng(seed)
    ids = set()
    while len(ids) < n:
        chars = alphabet[rng.integers(0, len(alphabet), size=(n - len(ids), 11))]
        ids.update(bytes(row).decode() for row in chars)
    return sorted(ids)


def make_kinetics(root: str | Path, n: int, seed: int = 0, show_progress: bool = True) -> dict:
    """A Kinetics-400-like training split of n videos under root; returns the data config's fields."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = [f"class {c:03d}" for c in range(KINETICS_CLASSES)]
    ids = _ids(n, seed)
    classes = rng.integers(0, KINETICS_CLASSES, size=n)
    starts = rng.integers(0, 300, size=n)
    frames = rng.integers(240, 301, size=n)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    split = root / "train"
    for label in labels:
        (split / label).mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / "train.csv", "w") as csv_file, open(split / "manifest.csv", "w") as manifest:
        csv_file.write("label,youtube_id,time_start,time_end,split\n")
        manifest.write("path,frames,fps,width,height\n")
        for i in tqdm(range(n), desc="kinetics list", disable=not show_progress, leave=False):
            label, start = labels[classes[i]], int(starts[i])
            stem = f"{ids[i]}_{start:06d}_{start + 10:06d}"
            csv_file.write(f"{label},{ids[i]},{start},{start + 10},train\n")
            relative = f"{label}/{stem}.mp4"
            manifest.write(f"{relative},{frames[i]},30.0,340,256\n")
            open(split / relative, "wb").close()
    return {"dataset": "kinetics", "root": str(root), "train_list": "annotations/train.csv"}


def make_ssv2(root: str | Path, n: int, seed: int = 0, show_progress: bool = True) -> dict:
    """A Something-Something-v2-like training split of n frame folders under root; the data config's fields."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    templates = {f"Pushing something {c} times": str(c) for c in range(SSV2_CLASSES)}
    names = list(templates)
    classes = rng.integers(0, SSV2_CLASSES, size=n)
    frames = rng.integers(24, 61, size=n)
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.json").write_text(json.dumps(templates))
    items = []
    with open(root / "manifest.csv", "w") as manifest:
        manifest.write("path,frames,fps,width,height\n")
        for i in tqdm(range(n), desc="ssv2 folders", disable=not show_progress, leave=False):
            video_id = str(i + 1)
            folder = root / video_id
            folder.mkdir(exist_ok=True)
            for k in (0, int(frames[i]) - 1):
                open(folder / f"{video_id}_{k:06d}.jpeg", "wb").close()
            manifest.write(f"{video_id},{frames[i]},12.0,427,240\n")
            items.append({"id": video_id, "label": names[classes[i]].lower(), "template": names[classes[i]],
                          "placeholders": ["something"]})
    (root / "train.json").write_text(json.dumps(items))
    return {"dataset": "ssv2", "root": str(root), "train_list": "train.json", "labels_file": "labels.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("kinetics", "ssv2"))
    parser.add_argument("n", type=int)
    parser.add_argument("root")
    args = parser.parse_args()
    fields = (make_kinetics if args.dataset == "kinetics" else make_ssv2)(args.root, args.n)
    print(json.dumps(fields))


if __name__ == "__main__":
    main()
