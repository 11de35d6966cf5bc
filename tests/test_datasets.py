"""Annotation readers and the sampling protocol (no DALI graph is built here)."""
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")

import videogen
from config import DataConfig
from pipelines import read_dataset
from pipelines import sampling

TEMPLATES = ["Holding [something] next to [something]", "Pushing [something] from left to right"]


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kinetics"))
    videogen.write_kinetics(root, "train", [
        dict(label="b", frames=20), dict(label="a", frames=24, codec="vp9"), dict(label="a", frames=10, subfolder=True),
        dict(label="c", frames=16, fps=15)])
    videogen.write_kinetics(root, "val", [dict(label="c", frames=12), dict(label="b", frames=0)])  # 2nd missing
    return root


def kinetics_cfg(root, **kw):
    return DataConfig(**{**dict(dataset="kinetics", root=root, train_list="train.csv", val_list="val.csv",
                                device="cpu"), **kw})


def test_kinetics_csv_layouts_and_probing(kinetics):
    data = read_dataset(kinetics_cfg(kinetics), "train", show_progress=False)
    assert data.class_names == ["a", "b", "c"]
    assert [v.label for v in data.videos] == [1, 0, 0, 2]
    assert [v.num_frames for v in data.videos] == [20, 24, 10, 16]  # the WebM's frames are counted by demuxing
    assert [v.fps for v in data.videos] == [30, 30, 30, 15]
    assert data.videos[1].path.endswith(".webm") and os.sep + "a" + os.sep in data.videos[2].path
    assert data.videos[0].where.endswith("train.csv:2")


def test_kinetics_manifest_is_used(kinetics):
    train = os.path.join(kinetics, "train")
    name = sorted(f for f in os.listdir(train) if f.endswith(".mp4"))[0]
    manifest = os.path.join(train, "manifest.csv")
    with open(manifest, "w") as f:
        f.write(f"path,frames,fps,width,height\n{name},99,25.0,64,48\n")
    try:
        data = read_dataset(kinetics_cfg(kinetics), "train", show_progress=False)
    finally:
        os.remove(manifest)
    by_name = {os.path.basename(v.path): v for v in data.videos}
    assert (by_name[name].num_frames, by_name[name].fps) == (99, 25.0)  # from the manifest, not probed


def test_missing_videos_error_or_listed(kinetics):
    with pytest.raises(FileNotFoundError, match=r"val\.csv:3"):
        read_dataset(kinetics_cfg(kinetics), "val", show_progress=False)
    data = read_dataset(kinetics_cfg(kinetics, allow_missing=True), "val", show_progress=False)
    assert len(data.videos) == 1 and len(data.missing) == 1
    with open(os.path.join(kinetics, "val.csv.missing.txt")) as f:
        assert "val.csv:3" in f.read()


def test_unknown_label_names_file_and_line(kinetics, tmp_path):
    (tmp_path / "val.csv").write_text("label,youtube_id,time_start,time_end,split\nzebra,x,0,10,val\n")
    cfg = kinetics_cfg(kinetics, val_list=str(tmp_path / "val.csv"))
    with pytest.raises(ValueError, match=r"val\.csv:2: unknown label 'zebra'"):
        read_dataset(cfg, "val", show_progress=False)


def test_video_list(kinetics, tmp_path):
    train = os.path.join(kinetics, "train")
    files = sorted(os.path.relpath(os.path.join(d, f), kinetics) for d, _, fs in os.walk(train) for f in fs)
    (tmp_path / "train.txt").write_text(f"{files[0]} 3\n\n{files[1]} 0\n")
    cfg = DataConfig(dataset="list", root=kinetics, train_list=str(tmp_path / "train.txt"), device="cpu")
    data = read_dataset(cfg, "train", show_progress=False)
    assert data.class_names == ["0", "1", "2", "3"] and [v.label for v in data.videos] == [3, 0]
    (tmp_path / "named.txt").write_text(f"{files[0]} dog\n{files[1]} cat\n")
    data = read_dataset(dataclasses.replace(cfg, train_list=str(tmp_path / "named.txt")), "train", show_progress=False)
    assert data.class_names == ["cat", "dog"] and [v.label for v in data.videos] == [1, 0]
    (tmp_path / "bad.txt").write_text("just_a_path.mp4\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1"):
        read_dataset(dataclasses.replace(cfg, train_list=str(tmp_path / "bad.txt")), "train", show_progress=False)


def ssv2_cfg(root, split_file="train.json", **kw):
    return DataConfig(dataset="ssv2", root=root, train_list=split_file,
                      labels_file="something-something-v2-labels.json", device="cpu", **kw)


def test_ssv2_labels_frames_and_errors(tmp_path):
    root = str(tmp_path)
    videogen.write_ssv2(root, "train.json", [dict(id="7", template=1, frames=5), dict(id="9", template=0, frames=3)],
                        TEMPLATES)
    data = read_dataset(ssv2_cfg(root), "train", show_progress=False)
    assert data.class_names == ["Holding something next to something", "Pushing something from left to right"]
    assert [(os.path.basename(v.path), v.label, v.num_frames) for v in data.videos] == [("7", 1, 5), ("9", 0, 3)]

    os.remove(os.path.join(root, "9", "9_000001.jpeg"))
    with pytest.raises(FileNotFoundError, match=r"9_000001\.jpeg"):
        read_dataset(ssv2_cfg(root), "train", show_progress=False)
    for name in os.listdir(os.path.join(root, "9")):
        os.remove(os.path.join(root, "9", name))
    with pytest.raises(FileNotFoundError, match=r"train\.json:item 2 \(id 9\)"):
        read_dataset(ssv2_cfg(root), "train", show_progress=False)
    assert len(read_dataset(ssv2_cfg(root, allow_missing=True), "train", show_progress=False).videos) == 1

    with open(os.path.join(root, "unknown.json"), "w") as f:
        json.dump([{"id": "7", "template": "Juggling [something]"}], f)
    with pytest.raises(ValueError, match=r"unknown\.json:item 1 \(id 7\).*Juggling something"):
        read_dataset(ssv2_cfg(root, "unknown.json"), "train", show_progress=False)


def test_ssv2_manifest_still_checks_the_folders(tmp_path):
    # preprocess/ssv2_to_frames.py writes a manifest: frame counts come from it, but a folder that lost frames or
    # was deleted must still fail before training, not in the middle of it. The reader checks both; the index of
    # the list is rebuilt (and the reader run) when a folder is deleted, not when a frame is removed from a folder
    # (169,000 stats per start: the source then stops at that frame, naming it)
    root = str(tmp_path)
    videogen.write_ssv2(root, "train.json", [dict(id="7", template=1, frames=5), dict(id="9", template=0, frames=3)],
                        TEMPLATES)
    with open(os.path.join(root, "manifest.csv"), "w") as f:
        f.write("path,frames,fps,width,height\n7,5,12.0,32,32\n9,3,12.0,32,32\n")
    assert [v.num_frames for v in read_dataset(ssv2_cfg(root), "train", show_progress=False).videos] == [5, 3]

    os.remove(os.path.join(root, "7", "7_000004.jpeg"))  # the last frame the manifest promises
    with pytest.raises(FileNotFoundError, match=r"train\.json:item 1 \(id 7\).*7_000004\.jpeg.*manifest"):
        read_dataset(ssv2_cfg(root, index_dir="off"), "train", show_progress=False)
    shutil.rmtree(os.path.join(root, "7"))
    with pytest.raises(FileNotFoundError, match=r"train\.json:item 1 \(id 7\)"):
        read_dataset(ssv2_cfg(root), "train", show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Sampling protocol against literal re-statements of the original code


def original_kinetics_indices(n, fps, num_frames, sampling_rate, target_fps, start_idx):
    """The original decoder: decode frames with pts >= start (one past the clip end), then linspace over them."""
    clip_size = sampling_rate * num_frames / target_fps * fps
    end_idx = start_idx + clip_size - 1
    decoded = []
    for i in range(n):
        if i < start_idx:
            continue
        decoded.append(i)
        if i > end_idx:
            break
    index = np.clip(np.linspace(0, clip_size - 1, num_frames), 0, len(decoded) - 1).astype(np.int64)
    return np.array(decoded)[index]


@pytest.mark.parametrize("n,fps", [(300, 30), (250, 25), (90, 15), (40, 30), (20, 30)])
def test_kinetics_indices_match_original(n, fps):
    for position in (0.0, 0.25, 0.5, 0.99, 1.0):
        delta = max(n - 8 * 8 / 30 * fps, 0)
        ours = sampling.kinetics_frame_indices(n, fps, 8, 8, 30, position)
        theirs = original_kinetics_indices(n, fps, 8, 8, 30, delta * position)
        if delta * position + 8 * 8 / 30 * fps <= n:  # the clip fits: same frames exactly
            np.testing.assert_array_equal(ours, theirs)
        else:  # short videos: the original repeats its last decoded frame, we repeat the video's last frame
            assert ours.max() == n - 1 and np.all(np.diff(ours) >= 0)


def test_kinetics_test_and_val_positions():
    assert sampling.kinetics_positions("test", None, 4) == [0.0, 0.25, 0.5, 0.75]  # delta * i / num_clips
    assert sampling.kinetics_positions("val", None) == [0.0]  # the original's val branch: clip 0 of 1
    u = sampling.kinetics_positions("train", np.random.default_rng(0))
    assert len(u) == 1 and 0 <= u[0] < 1


@pytest.mark.parametrize("n", [8, 31, 48, 117])
def test_ssv2_indices_match_original(n):
    seg = (n - 1) / 8
    bounds = [(int(np.round(seg * i)), int(np.round(seg * (i + 1)))) for i in range(8)]
    np.testing.assert_array_equal(sampling.ssv2_frame_indices(n, 8, None), [(s + e) // 2 for s, e in bounds])
    for seed in range(5):
        drawn = sampling.ssv2_frame_indices(n, 8, np.random.default_rng(seed))
        assert all(s <= i <= e for i, (s, e) in zip(drawn, bounds))


@pytest.mark.parametrize("num_videos", [7, 12, 13])
def test_shards_cover_every_video_once(num_videos):
    world, batch = 2, 3
    steps = sampling.steps_per_epoch(num_videos, batch, world)
    seen = []
    for rank in range(world):
        positions = [sampling.global_position(p, rank, world) for p in range(steps * batch)]
        order = sampling.epoch_order(num_videos, 0, 5, shuffle=True)
        seen += [int(order[p]) for p in positions if p < num_videos]
    assert sorted(seen) == list(range(num_videos))
    assert steps == math.ceil(num_videos / (world * batch))


def test_random_parameters_are_pure_functions():
    a = sampling.train_spatial(3, 1, 17, (256, 320), True, True)
    assert a == sampling.train_spatial(3, 1, 17, (256, 320), True, True)
    assert a != sampling.train_spatial(3, 2, 17, (256, 320), True, True)
    assert 256 <= a.scale <= 320 and 0 <= a.crop_x < 1
    scales = [sampling.train_spatial(0, 0, i, (256, 320), True, True).scale for i in range(4000)]
    assert abs(np.mean(scales) - 1 / np.mean([1 / 320, 1 / 256])) < 1.5  # inverse-uniform: mean of 1/s fixed
    factors = np.array([sampling.color_jitter_factors(0, 0, i) for i in range(2000)])
    untouched = np.all(factors == 1, axis=1).mean()
    assert 0.15 < untouched < 0.25 and factors.min() >= 0.6 and factors.max() <= 1.4
    np.testing.assert_array_equal(sampling.ssv2_frame_indices(50, 8, sampling.sample_rng(1, 2, 3, 0)),
                                  sampling.ssv2_frame_indices(50, 8, sampling.sample_rng(1, 2, 3, 0)))


def test_each_augmented_view_draws_its_own_parameters_and_view_0_those_without_views():
    spec = sampling.parse_rand_augment("rand-m9-mstd0.5-inc1")
    for index in range(20):
        assert sampling.train_spatial(3, 1, index, (256, 320), True, True, view=0) == \
            sampling.train_spatial(3, 1, index, (256, 320), True, True)
        np.testing.assert_array_equal(sampling.color_jitter_factors(3, 1, index, view=0),
                                      sampling.color_jitter_factors(3, 1, index))
        for a, b in zip(sampling.rand_augment_choices(3, 1, index, spec, 15, 15, view=0),
                        sampling.rand_augment_choices(3, 1, index, spec, 15, 15)):
            np.testing.assert_array_equal(a, b)
    views = [sampling.train_spatial(3, 1, 17, (256, 320), True, True, view=v) for v in range(4)]
    assert len({(v.crop_x, v.crop_y) for v in views}) == 4
    assert views[2] == sampling.train_spatial(3, 1, 17, (256, 320), True, True, view=2)  # a pure function too
    jitter = [sampling.color_jitter_factors(0, 0, i, view=1) for i in range(2000)]
    assert not np.array_equal(np.array(jitter), [sampling.color_jitter_factors(0, 0, i) for i in range(2000)])
    assert 0.15 < np.all(np.array(jitter) == 1, axis=1).mean() < 0.25  # the same distribution in every view
    # view v's key is not another video's, epoch's or stream's
    draws = {sampling.sample_rng(seed, epoch, index, stream, view).uniform()
             for seed in range(2) for epoch in range(2) for index in range(3) for stream in range(7) for view in range(3)}
    assert len(draws) == 2 * 2 * 3 * 7 * 3


def test_parse_rand_augment():
    spec = sampling.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing, spec.prob) == (9, 2, 0.5, True, 0.5)
    assert sampling.parse_rand_augment("") is None
    with pytest.raises(ValueError, match="unknown part"):
        sampling.parse_rand_augment("rand-m9-q3")
    ops, bins, signs = sampling.rand_augment_choices(0, 0, 5, spec, 15, identity=15)
    assert ops.shape == bins.shape == signs.shape == (2,)
    assert np.all((0 <= ops) & (ops <= 15)) and np.all((0 <= bins) & (bins < spec.MAGNITUDE_BINS))
