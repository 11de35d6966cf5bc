"""Real Kinetics and Something-Something downloads as users have them: the official annotation files in every form
the releases ship, the downloaders' layouts, other tools' frame namings (small videos and frames made here)."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")

import videogen  # noqa: E402
from config import DataConfig  # noqa: E402
from pipelines import read_dataset  # noqa: E402

IDS = ["--nQbRBEz2s", "abc", "x_y-z"]  # YouTube ids as they come: a leading '-', underscores


def write_videos(folder, stems):
    for stem in stems:
        videogen.write_video(os.path.join(folder, stem + ".mp4"), 8)


def stems():
    return [f"{youtube_id}_{10 * i:06d}_{10 * i + 10:06d}" for i, youtube_id in enumerate(IDS)]


def cfg(root, **kw):
    return DataConfig(**{**dict(dataset="kinetics", root=str(root), train_list="train.csv", val_list="train.csv",
                                test_list="train.csv", device="cpu"), **kw})


# every official form of a Kinetics CSV: (header, row of video i)
FORMS = {
    "k400 (ActivityNet, is_cc)": ("label,youtube_id,time_start,time_end,split,is_cc",
                                  lambda i, y: f"class {i % 2},{y},{10 * i},{10 * i + 10},train,0"),
    "k600/k700 (no is_cc)": ("label,youtube_id,time_start,time_end,split",
                             lambda i, y: f"class {i % 2},{y},{10 * i},{10 * i + 10},train"),
    "quoted": ('"label","youtube_id","time_start","time_end","split"',
               lambda i, y: f'"class {i % 2}","{y}",{10 * i}.0,{10 * i + 10}.0,"train"'),
    "no header": (None, lambda i, y: f"class {i % 2},{y},{10 * i},{10 * i + 10},train,0"),
    "columns reordered": ("youtube_id,label,time_start,time_end,split",
                          lambda i, y: f"{y},class {i % 2},{10 * i},{10 * i + 10},validate"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_official_kinetics_csv_form_is_read(tmp_path, form):
    header, row = FORMS[form]
    write_videos(tmp_path / "train", stems())
    lines = ([header] if header else []) + [row(i, y) for i, y in enumerate(IDS)]
    (tmp_path / "train.csv").write_text("\ufeff" * (form == "quoted") + "\n".join(lines) + "\n")
    data = read_dataset(cfg(tmp_path), "train", show_progress=False)
    assert data.labelled and data.class_names == ["class 0", "class 1"]
    assert [v.label for v in data.videos] == [0, 1, 0]
    assert [os.path.basename(v.path) for v in data.videos] == [s + ".mp4" for s in stems()]


def test_the_unlabelled_test_csv_gives_a_test_split_for_predictions_only(tmp_path):
    write_videos(tmp_path / "train", stems())
    write_videos(tmp_path / "test", stems()[:2])
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n" + "".join(
        f"c{i % 2},{y},{10 * i},{10 * i + 10},train\n" for i, y in enumerate(IDS)))
    (tmp_path / "test.csv").write_text("youtube_id,time_start,time_end,split\n" + "".join(
        f"{y},{10 * i},{10 * i + 10},test\n" for i, y in enumerate(IDS[:2])))
    data = read_dataset(cfg(tmp_path, test_list="test.csv"), "test", show_progress=False)
    assert not data.labelled and [v.label for v in data.videos] == [-1, -1] and data.class_names == ["c0", "c1"]
    assert all(os.sep + "test" + os.sep in v.path for v in data.videos)
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=rf"data.{split}_list .*test.csv has no labels"):
            read_dataset(cfg(tmp_path, **{f"{split}_list": "test.csv"}), split,
                         show_progress=False)


@pytest.mark.parametrize("content,message", [
    ("label,youtube_id,time_start,time_end,split\nc,abc,0,10\n", r"train.csv:2: expected 5 columns"),
    ("label,youtube_id,time_start,time_end,split\nc,abc,zero,10,train\n", r"train.csv:2: time_start/time_end"),
    ("label,time_start,time_end,split,youtube\nc,0,10,train,abc\n", r"train.csv:1: .*header"),
    ("c,abc,0,10,train,0,extra\n", r"train.csv:1: expected label,youtube_id"),
    ("label,youtube_id,time_start,time_end,split\n,abc,0,10,train\n", r"train.csv:2: empty label"),
])
def test_a_malformed_kinetics_csv_names_file_and_line(tmp_path, content, message):
    (tmp_path / "train.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_dataset(cfg(tmp_path), "train", show_progress=False)


def write_split(root, folder, csv_name, ids=IDS):
    write_videos(root / folder, stems()[:len(ids)])
    (root / csv_name).parent.mkdir(parents=True, exist_ok=True)
    (root / csv_name).write_text("label,youtube_id,time_start,time_end,split\n" + "".join(
        f"c{i % 2},{y},{10 * i},{10 * i + 10},x\n" for i, y in enumerate(ids)))


def test_cvdf_layout_with_its_names_and_the_recipes_names(tmp_path):
    """CVDF: train/ val/ test/ and annotations/{train,val,test}.csv; the recipes name annotations/validate.csv, and
    a test list that is the validation list reads val/, not test/."""
    write_split(tmp_path, "train", "annotations/train.csv")
    write_split(tmp_path, "val", "annotations/val.csv", IDS[:2])
    write_videos(tmp_path / "test", ["other_000000_000010"])
    c = cfg(tmp_path, train_list="annotations/train.csv", val_list="annotations/validate.csv",
            test_list="annotations/validate.csv")
    for split in ("val", "test"):
        data = read_dataset(c, split, show_progress=False)
        assert data.annotation.endswith("annotations/val.csv") and len(data.videos) == 2
        assert all(os.sep + "val" + os.sep in v.path for v in data.videos), split


def test_mmaction2_layout_and_a_split_folder_setting(tmp_path):
    write_split(tmp_path, "videos_train", "train.csv")
    write_split(tmp_path, "videos_val", "val.csv", IDS[:1])
    shutil.copytree(tmp_path / "videos_train", tmp_path / "raw_copy")  # raw and resized side by side
    c = cfg(tmp_path, val_list="val.csv", test_list="val.csv")
    assert all("videos_train" in v.path for v in read_dataset(c, "train", show_progress=False).videos)
    assert all("videos_val" in v.path for v in read_dataset(c, "val", show_progress=False).videos)
    shutil.move(tmp_path / "videos_train", tmp_path / "resized_train")  # a folder of the user's naming: root has
    with pytest.raises(ValueError, match=r"two videos named .*set data.train_folder"):  # both copies, refused
        read_dataset(c, "train", show_progress=False)
    data = read_dataset(cfg(tmp_path, train_folder="resized_train"), "train", show_progress=False)
    assert all("resized_train" in v.path for v in data.videos) and len(data.videos) == 3
    with pytest.raises(FileNotFoundError, match=r"data.train_folder: .*nowhere is not a folder"):
        read_dataset(cfg(tmp_path, train_folder="nowhere"), "train", show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# SSv2


def write_ssv2(root, naming, start, ids=("5", "6"), frames=7, split="train.json", labelled=True):
    templates = ["Pushing [something]", "Pulling [something]"]
    (root / "something-something-v2-labels.json").write_text(json.dumps(
        {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(templates)}))
    items = [({"id": i, "template": templates[k % 2], "label": "x", "placeholders": []} if labelled else {"id": i})
             for k, i in enumerate(ids)]
    (root / split).write_text(json.dumps(items))
    from PIL import Image
    for video_id in ids:
        (root / video_id).mkdir(parents=True, exist_ok=True)
        for n in range(frames):
            name = naming.replace("{id}", video_id).replace("{n", "{").format(n + start)
            Image.fromarray(videogen.make_frame(n)).save(root / video_id / name, quality=95)


def ssv2_cfg(root, **kw):
    return DataConfig(**{**dict(dataset="ssv2", root=str(root), train_list="train.json", val_list="train.json",
                                test_list="train.json", labels_file="something-something-v2-labels.json",
                                random_flip=False, device="cpu", num_frames=4, crop_size=32,
                                train_jitter_scales=(40, 56), py_workers=0, num_threads=1), **kw})


NAMINGS = [("{id}_{n:06d}.jpeg", 0), ("{id}_{n:06d}.jpg", 1), ("img_{n:05d}.jpg", 1), ("{n}.jpg", 0),
           ("frame{n:04d}.JPEG", 1)]


@pytest.mark.parametrize("naming,start", NAMINGS)
def test_ssv2_frame_namings_are_detected_and_read_in_order(tmp_path, naming, start):
    write_ssv2(tmp_path, naming, start, frames=12)
    data = read_dataset(ssv2_cfg(tmp_path), "train", show_progress=False)
    assert [v.num_frames for v in data.videos] == [12, 12]
    video = data.videos[0]
    assert os.path.basename(video.frame_path(0)) == naming.replace("{id}", "5").replace("{n", "{").format(start)
    assert os.path.isfile(video.frame_path(11)) and not os.path.exists(video.frame_path(12))
    from pipelines import build_loader
    from test_pipelines import frame_numbers
    c = ssv2_cfg(tmp_path)
    batch = next(iter(build_loader(c, "val", batch_size=2)))
    from pipelines import sampling
    assert frame_numbers(batch.clips[0], c) == sampling.ssv2_frame_indices(12, 4, None).tolist()


def test_a_frame_naming_setting_that_does_not_fit_says_what_the_folder_holds(tmp_path):
    write_ssv2(tmp_path, "img_{n:05d}.jpg", 1)
    with pytest.raises(FileNotFoundError, match=r"has no 5_000000\.jpeg .*holds img_00001\.jpg.*"
                                                r"data.frame_naming=auto \(detected: img_\{:05d\}\.jpg from 1\)"):
        read_dataset(ssv2_cfg(tmp_path, frame_naming="{id}_{n:06d}.jpeg"), "train", show_progress=False)
    data = read_dataset(ssv2_cfg(tmp_path, frame_naming="img_{n:05d}.jpg", frame_start=1), "train",
                        show_progress=False)
    assert [v.num_frames for v in data.videos] == [7, 7]
    os.remove(tmp_path / "6" / "img_00004.jpg")
    with pytest.raises(FileNotFoundError, match=r"item 2 \(id 6\): frame .*img_00004\.jpg is missing"):
        read_dataset(ssv2_cfg(tmp_path), "train", show_progress=False)


def test_a_folder_of_other_files_is_not_called_empty(tmp_path):
    write_ssv2(tmp_path, "{id}_{n:06d}.jpeg", 0)
    for name in os.listdir(tmp_path / "6"):
        os.rename(tmp_path / "6" / name, tmp_path / "6" / name.replace(".jpeg", ".png"))
    with pytest.raises(ValueError, match=r"item 2 \(id 6\): .*6 holds 7 files \(6_000000\.png.*data.frame_naming"):
        read_dataset(ssv2_cfg(tmp_path), "train", show_progress=False)
    with pytest.raises(ValueError, match=r"data.frame_naming must be 'auto' or a template"):
        ssv2_cfg(tmp_path, frame_naming="img_%05d.jpg")


def test_the_ssv2_test_json_is_an_unlabelled_test_split(tmp_path):
    write_ssv2(tmp_path, "{id}_{n:06d}.jpeg", 0)
    write_ssv2(tmp_path, "{id}_{n:06d}.jpeg", 0, ids=("8",), split="test.json", labelled=False)
    data = read_dataset(ssv2_cfg(tmp_path, test_list="test.json"), "test", show_progress=False)
    assert not data.labelled and [(v.label, v.num_frames) for v in data.videos] == [(-1, 7)]
    with pytest.raises(ValueError, match=r"data.val_list .*test.json has no labels"):
        read_dataset(ssv2_cfg(tmp_path, val_list="test.json"), "val", show_progress=False)
    assert np.all([v.label >= 0 for v in read_dataset(ssv2_cfg(tmp_path), "train", show_progress=False).videos])
