"""The DALI loaders on CPU, against frames decoded independently (PyAV, PIL), plus the GPU graphs serialised.

Test videos (tests/videogen.py) carry their frame number in the red channel and position ramps in green (left to
right) and blue (top to bottom), so a delivered clip tells which frames it holds, where it was cropped and whether
it was flipped. Tolerances: PyAV decodes the video in the CPU path, so its pixels match to float rounding; DALI's
CPU JPEG decoder and PIL agree within 2 levels; NVDEC vs PyAV (GPU test) within a mean of 3 levels (DALI
upsamples chroma bilinearly, PyAV's rgb24 by nearest neighbour).
"""
import dataclasses
import io
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

av = pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import torch
import torch.nn.functional as F
from PIL import Image

import videogen
from config import DataConfig
from pipelines import build_loader, read_dataset, sampling
from pipelines.loader import clip_spec, make_pipeline
from pipelines import decode
from pipelines.decode import demux_encoded, nvdec_unsupported
from pipelines.sources import BAD, OK, PADDING, ClipSource, ClipSpec

TEMPLATES = ["Holding [something] next to [something]", "Pushing [something] from left to right",
             "Dropping [something]"]


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kinetics"))
    videogen.write_kinetics(root, "train", [
        dict(label="a", frames=40), dict(label="b", frames=44, codec="vp9"), dict(label="a", frames=24, subfolder=True),
        dict(label="c", frames=36, fps=15), dict(label="b", frames=10)])  # the last is shorter than a clip
    videogen.write_kinetics(root, "val", [dict(label="c", frames=30), dict(label="a", frames=40, codec="vp9"),
                                          dict(label="b", frames=20)])
    return root


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ssv2"))
    videos = [dict(id="11", template=0, frames=20), dict(id="12", template=1, frames=33),
              dict(id="13", template=2, frames=12), dict(id="14", template=1, frames=41)]
    videogen.write_ssv2(root, "train.json", videos, TEMPLATES)
    videogen.write_ssv2(root, "static.json", [dict(v, id=f"s{v['id']}", static=True) for v in videos], TEMPLATES)
    return root


def kinetics_cfg(root, **kw):
    base = dict(dataset="kinetics", root=root, train_list="train.csv", val_list="val.csv", test_list="val.csv",
                num_frames=8, sampling_rate=2, target_fps=30, crop_size=32, train_jitter_scales=(40, 56),
                color_jitter=False, device="cpu", num_threads=2, py_workers=0)
    return DataConfig(**{**base, **kw})


def ssv2_cfg(root, **kw):
    base = dict(dataset="ssv2", root=root, train_list="train.json", val_list="train.json", test_list="train.json",
                labels_file="something-something-v2-labels.json", num_frames=8, crop_size=32,
                train_jitter_scales=(40, 56), random_flip=False, color_jitter=False, device="cpu", num_threads=2,
                py_workers=0)
    return DataConfig(**{**base, **kw})


def pixels(clip, cfg):
    """(C, T, H, W) normalised -> (T, H, W, C) in 0..255."""
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1, 1), torch.tensor(cfg.std).view(3, 1, 1, 1)
    return ((clip.cpu() * std + mean) * 255).permute(1, 2, 3, 0).numpy()


def frame_numbers(clip, cfg):
    return [videogen.frame_number(frame[..., 0]) for frame in pixels(clip, cfg)]


def expected_indices(loader, index, epoch, seed):
    source = ClipSource(loader.dataset.videos, loader.spec, seed=seed, rank=0, world_size=1, batch_size=1)
    return source.frame_indices(loader.dataset.videos[index], epoch, index).tolist()


def pyav_frames(path, indices):
    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([frames[i] for i in indices]).astype(np.float32)


def run_epoch(loader):
    return [(b.index.tolist(), b.clips.clone(), b.labels.clone()) for b in loader]


# ---------------------------------------------------------------------------------------------------------------
# Kinetics


def test_train_clips_follow_the_protocol(kinetics):
    cfg, seed = kinetics_cfg(kinetics), 3
    loader = build_loader(cfg, "train", batch_size=2, seed=seed)
    assert (len(loader), loader.num_videos, loader.class_names) == (3, 5, ["a", "b", "c"])
    orders = []
    for epoch in range(2):
        order = []
        for batch in loader:
            assert loader.epoch == epoch
            assert batch.clips.shape[1:] == (3, 8, 32, 32) and batch.clips.dtype == torch.float32
            assert batch.labels.dtype == torch.int64 and batch.index.dtype == torch.int64
            for clip, label, index in zip(batch.clips, batch.labels.tolist(), batch.index.tolist()):
                assert label == loader.dataset.videos[index].label
                assert frame_numbers(clip, cfg) == expected_indices(loader, index, epoch, seed)
                ramps = pixels(clip, cfg)[..., 1:]  # green and blue: where the crop is
                assert np.abs(ramps - ramps[:1]).mean() < 1.5, "every frame must have the same crop"
                green = ramps[..., 0].mean(axis=(0, 1))  # per column
                mirror = sampling.train_spatial(seed, epoch, index, cfg.train_jitter_scales, True, True).mirror
                assert (green[-1] < green[0]) == bool(mirror)
            order += batch.index.tolist()
        assert sorted(order) == list(range(5)) and loader.last_epoch_summary()["padded"] == 1
        orders.append(order)
    assert orders[0] != orders[1], "each epoch is reshuffled"


def test_val_pixels_match_pyav_h264_and_vp9(kinetics):
    # crop = short side of the 64x48 videos: no resize, the centre crop is columns 8..55.
    cfg = kinetics_cfg(kinetics, crop_size=48, train_jitter_scales=(48, 56), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    loader = build_loader(cfg, "val", batch_size=2)
    (first, second) = list(loader)
    assert [len(first.index), len(second.index)] == [2, 1]
    for batch in (first, second):
        for clip, index in zip(batch.clips, batch.index.tolist()):
            path = loader.dataset.videos[index].path
            video = loader.dataset.videos[index]
            ids = sampling.kinetics_frame_indices(video.num_frames, 30, 8, 2, 30, 0.0)  # first clip
            expected = pyav_frames(path, ids)[:, :, 8:56]
            normalised = (expected / 255 - np.array(cfg.mean)) / np.array(cfg.std)
            np.testing.assert_allclose(clip.permute(1, 2, 3, 0).numpy(), normalised, atol=1e-4)
    assert any(loader.dataset.videos[i].path.endswith(".webm") for i in first.index.tolist() + second.index.tolist())


@pytest.mark.parametrize("skipping", [True, False])
def test_decoded_frames_are_those_of_a_full_decode(tmp_path, monkeypatch, skipping):
    """The CPU path decodes from the keyframe before the first wanted frame and lets FFmpeg skip the non-reference
    frames nobody wants (or, where packets do not map onto frames, decodes frame by frame): either way its frames
    must be those of a plain decode of every frame, for any indices, past the end included (edge padding)."""
    h264 = videogen.write_video(str(tmp_path / "b.mp4"), 40, texture=True)
    vp9 = videogen.write_video(str(tmp_path / "v.webm"), 30, texture=True, codec="vp9")
    with av.open(h264) as container:  # x264's B-frames: frames FFmpeg may skip
        container.streams.video[0].codec_context.skip_frame = "NONREF"
        assert sum(1 for _ in container.decode(video=0)) < 30
    calls, decode_span = [], decode._decode_span
    monkeypatch.setattr(decode, "_decode_span", lambda *args, skip: calls.append(skip) or decode_span(*args, skip=skip))
    if not skipping:
        def unmapped(*args):
            raise decode._Unmapped
        monkeypatch.setattr(decode, "_decode_skipping", unmapped)
    for path, n in ((h264, 40), (vp9, 30)):
        everything = pyav_frames(path, range(n)).astype(np.uint8)
        for indices in ([0], [5, 13, 21], list(range(17, n, 3)), [n - 1, 0, n - 1, 12], [n - 3, n, n + 1]):
            np.testing.assert_array_equal(decode.decode_frames(path, np.array(indices), n),
                                          everything[np.minimum(indices, n - 1)], err_msg=f"{path} {indices}")
    assert (False in calls) != skipping, "well-formed files decode without the frame-by-frame fallback"


def test_streams_without_a_frame_per_timestamp_decode_frame_by_frame(tmp_path, monkeypatch):
    """Where packets do not map one to one onto frames by timestamp, the skipping decoder must notice it and give what
    the frame-by-frame decoder gives: an mp4 cut without re-encoding from an open-GOP stream (an edit list whose
    pre-roll packets the decoder drops) and H.264 with B-frames in AVI (packet timestamps in decode order)."""
    def encode(path, *args):  # 110 frames of a texture moving right: x264 makes B-frames
        texture = np.random.default_rng(0).integers(16, 240, (48, 64, 2), np.uint8)
        frames = np.empty((110, 48, 64, 3), np.uint8)
        frames[..., 0] = (8 + 2 * np.arange(110))[:, None, None]
        frames[..., 1:] = [np.roll(texture, n, axis=1) for n in range(110)]
        subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x48",
                        "-r", "30", "-i", "-", "-c:v", "libx264", "-qp", "10", "-pix_fmt", "yuv420p", *args, path],
                       input=frames.tobytes(), check=True)
        return path
    source = encode(str(tmp_path / "open.mp4"), "-x264-params", "open-gop=1:keyint=8:min-keyint=8:scenecut=0")
    cut = str(tmp_path / "cut.mp4")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-ss", "0.4", "-i", source, "-c", "copy", cut], check=True)
    avi = encode(str(tmp_path / "b.avi"), "-g", "24")
    unmapped, skipping = [], decode._decode_skipping

    def spy(*args):
        try:
            return skipping(*args)
        except decode._Unmapped:
            unmapped.append(args[0].name)
            raise
    monkeypatch.setattr(decode, "_decode_skipping", spy)

    def frames(path, indices, n, by_frame=False):
        with monkeypatch.context() as patch:
            if by_frame:
                patch.setattr(decode, "_decode_skipping", lambda *args: (_ for _ in ()).throw(decode._Unmapped))
            try:
                return decode.decode_frames(path, np.array(indices), n)
            except ValueError as e:
                return str(e)
    rng = np.random.default_rng(0)
    for path in (cut, avi):
        n = decode.probe_video(path).num_frames
        sets = [[i] for i in range(n + 2)] + [sorted(rng.choice(n, 4, replace=False)) for _ in range(10)]
        for indices in sets:
            expected = frames(path, indices, n, by_frame=True)
            if not isinstance(expected, str):  # where the frame-by-frame decoder gives frames, the same ones
                np.testing.assert_array_equal(frames(path, indices, n), expected, err_msg=f"{path} {indices}")
        assert path in unmapped, f"{path}: the skipping decoder must have noticed"


def test_test_views_shapes_and_order(kinetics):
    cfg = kinetics_cfg(kinetics)
    loader = build_loader(cfg, "test", batch_size=2, num_clips=2, num_crops=3)
    batches = list(loader)
    assert [tuple(b.clips.shape) for b in batches] == [(2, 6, 3, 8, 32, 32), (1, 6, 3, 8, 32, 32)]
    for batch in batches:
        for views, index in zip(batch.clips, batch.index.tolist()):
            video = loader.dataset.videos[index]
            for v, view in enumerate(views):  # clip-major: clip v // 3, crop v % 3
                ids = sampling.kinetics_frame_indices(video.num_frames, 30, 8, 2, 30, (v // 3) / 2)
                assert frame_numbers(view, cfg) == ids.tolist()
            green = [pixels(view, cfg)[..., 1].mean() for view in views[:3]]
            assert green[0] < green[1] < green[2], "left, centre, right crops of the landscape frames"


def test_color_jitter_matches_reference(kinetics):
    seed = 5
    plain = run_epoch(build_loader(kinetics_cfg(kinetics), "train", batch_size=2, seed=seed))
    jittered = run_epoch(build_loader(kinetics_cfg(kinetics, color_jitter=True), "train", batch_size=2, seed=seed))
    applied = 0
    for (index, clips, _), (index_j, clips_j, _) in zip(plain, jittered):
        assert index == index_j
        for x, y, i in zip(clips, clips_j, index):
            b, c, s = sampling.color_jitter_factors(seed, 0, i)
            gray = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
            mean_gray = gray.mean(dim=(1, 2), keepdim=True)
            expected = b * (c * (s * x + (1 - s) * gray) + (1 - c) * mean_gray)
            torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
            applied += (b, c, s) != (1, 1, 1)
    assert applied > 0


def original_resize(x, size):
    """The original's short_side_scale_jitter on (T, C, H, W) floats: short side to `size`, long side floored."""
    h, w = x.shape[-2:]
    if (w <= h and w == size) or (h <= w and h == size):
        return x
    new_h, new_w = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


def original_normalize(frames, cfg):
    """(T, H, W, 3) 0..255 -> normalised (T, C, H, W), as the original does before its spatial steps."""
    return ((torch.from_numpy(frames) / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)).permute(0, 3, 1, 2)


def window(x, size, top, left):
    return x[..., top:top + size, left:left + size]


def original_resized(loader, index, epoch, seed, cfg, scale):
    """The original's normalised and resized frames of a loader's sample, from an independent PyAV decode."""
    frames = pyav_frames(loader.dataset.videos[index].path, expected_indices(loader, index, epoch, seed))
    return original_resize(original_normalize(frames, cfg), scale)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Noise-textured videos, landscape and portrait, whose long sides make floor and round differ."""
    root = str(tmp_path_factory.mktemp("textured"))
    for split in ("train", "val"):
        videogen.write_kinetics(root, split, [dict(label="a", frames=20, width=90, height=64, texture=True),
                                              dict(label="b", frames=20, width=52, height=74, texture=True),
                                              dict(label="a", frames=20, width=66, height=48, texture=True)])
    return root


def test_train_val_test_pixels_follow_the_original(textured):
    """Every view equals the original's transforms (transform.py: short-side resize with the long side floored,
    bilinear; random_crop's randint offsets or uniform_crop's; flip; colour jitter on normalised values) applied
    to independently decoded frames, to float32 rounding: the graph resizes unrounded floats, as the original."""
    cfg, seed, size = kinetics_cfg(textured, crop_size=32, train_jitter_scales=(32, 80), color_jitter=True), 7, 32
    atol = 1e-4  # float32 rounding; a uint8 rounding of the resized pixels would give 4e-3, a pixel's shift 0.1-1
    checked = dict(train=0, val=0, test=0, mirrored=0, jittered=0)
    for epoch in range(3):
        loader = build_loader(cfg, "train", batch_size=3, seed=seed, start_epoch=epoch)
        for batch in loader:
            for clip, index in zip(batch.clips, batch.index.tolist()):
                spatial = sampling.train_spatial(seed, epoch, index, cfg.train_jitter_scales, True, True)
                x = original_resized(loader, index, epoch, seed, cfg, int(spatial.scale))
                h, w = x.shape[-2:]
                x = window(x, size, math.floor(spatial.crop_y * (h - size)), math.floor(spatial.crop_x * (w - size)))
                x = x.flip(-1) if spatial.mirror else x  # random_crop draws randint(0, free): floor(u * free)
                b, c, s = (float(f) for f in sampling.color_jitter_factors(seed, epoch, index))
                gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
                x = b * (c * (s * x + (1 - s) * gray) + (1 - c) * gray.mean(dim=(1, 2, 3), keepdim=True))
                torch.testing.assert_close(clip, x.permute(1, 0, 2, 3), atol=atol, rtol=0)
                checked["train"] += 1
                checked["mirrored"] += spatial.mirror
                checked["jittered"] += (b, c, s) != (1, 1, 1)
            break  # one batch per epoch: each epoch draws other scales, crops and flips
    loader = build_loader(cfg, "val", batch_size=3)
    batch = next(iter(loader))
    for clip, index in zip(batch.clips, batch.index.tolist()):
        x = original_resized(loader, index, 0, 0, cfg, size)
        h, w = x.shape[-2:]
        x = window(x, size, math.ceil((h - size) / 2), math.ceil((w - size) / 2))  # uniform_crop, centre
        torch.testing.assert_close(clip, x.permute(1, 0, 2, 3), atol=atol, rtol=0)
        checked["val"] += 1
    loader = build_loader(cfg, "test", batch_size=3, num_clips=1, num_crops=3)
    batch = next(iter(loader))
    for views, index in zip(batch.clips, batch.index.tolist()):
        x = original_resized(loader, index, 0, 0, cfg, size)
        h, w = x.shape[-2:]
        for spatial_idx, view in enumerate(views):  # uniform_crop: start, centre, end of the long side
            free = (h - size, w - size)
            top, left = [(0, math.ceil(f / 2), f)[spatial_idx] if f == max(free) else math.ceil(f / 2) for f in free]
            torch.testing.assert_close(view, window(x, size, top, left).permute(1, 0, 2, 3), atol=atol, rtol=0)
        checked["test"] += 1
    assert checked["train"] == 9 and checked["val"] == checked["test"] == 3
    assert 0 < checked["mirrored"] < 9 and checked["jittered"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Something-Something v2


def test_ssv2_frames_match_pil(ssv2):
    cfg = ssv2_cfg(ssv2, crop_size=48, train_jitter_scales=(48, 56))
    loader = build_loader(cfg, "val", batch_size=3)
    for batch in loader:
        for clip, index in zip(batch.clips, batch.index.tolist()):
            video = loader.dataset.videos[index]
            ids = sampling.ssv2_frame_indices(video.num_frames, 8, None)
            expected = np.stack([np.asarray(Image.open(video.frame_path(i)))
                                 for i in ids])[:, :, 8:56]
            assert np.abs(pixels(clip, cfg) - expected).max() <= 2.01
            assert frame_numbers(clip, cfg) == ids.tolist()
    views = [b.clips for b in build_loader(cfg, "test", batch_size=3, num_crops=3)]
    assert [tuple(v.shape) for v in views] == [(3, 3, 3, 8, 48, 48), (1, 3, 3, 8, 48, 48)]


def test_ssv2_train_segments(ssv2):
    cfg, seed = ssv2_cfg(ssv2), 7
    loader = build_loader(cfg, "train", batch_size=4, seed=seed)
    (batch,) = list(loader)
    assert sorted(batch.index.tolist()) == [0, 1, 2, 3]
    for clip, index in zip(batch.clips, batch.index.tolist()):
        assert frame_numbers(clip, cfg) == expected_indices(loader, index, 0, seed)


def test_rand_augment_one_policy_per_clip(ssv2):
    # Static videos: every frame is the same image, so frames must stay identical after augmentation.
    cfg = ssv2_cfg(ssv2, train_list="static.json", rand_augment="rand-m9-mstd0.5-inc1")
    loader = build_loader(cfg, "train", batch_size=4, seed=1)
    (first,) = list(loader)
    for clip in first.clips:
        assert torch.equal(clip, clip[:, :1].expand_as(clip))
    (again,) = list(build_loader(cfg, "train", batch_size=4, seed=1))
    assert torch.equal(first.clips, again.clips), "RandAugment is a function of (seed, epoch, video)"
    (plain,) = list(build_loader(dataclasses.replace(cfg, rand_augment=""), "train", batch_size=4, seed=1))
    assert not torch.equal(first.clips, plain.clips)


# ---------------------------------------------------------------------------------------------------------------
# Repeated augmentation (data.num_sample)


def assert_views_of_one_decode(single: list, repeated: list, n: int) -> None:
    """Batches of the same epoch with num_sample 1 and n: each video's n rows adjacent, with its label and index;
    view 0 is the clip of num_sample 1 bit for bit, every other view a clip of its own."""
    assert len(single) == len(repeated)
    for one, views in zip(single, repeated):
        b = len(one.index)
        assert views.clips.shape == (b * n, *one.clips.shape[1:])
        assert torch.equal(views.index, one.index.repeat_interleave(n))
        assert torch.equal(views.labels, one.labels.repeat_interleave(n))
        assert views.view.tolist() == list(range(n)) * b
        grouped = views.clips.reshape(b, n, *one.clips.shape[1:])
        assert torch.equal(grouped[:, 0], one.clips), "view 0 must be the clip of num_sample 1, bit for bit"
        for video in range(b):
            for v in range(1, n):
                assert not torch.equal(grouped[video, v], grouped[video, 0]), (video, v)


def cloned(loader) -> list:
    """An epoch's batches, with clips copied out of DALI's buffers (reused by the next batch)."""
    return [dataclasses.replace(b, clips=b.clips.clone()) for b in loader]


def test_num_sample_views_augment_one_decoded_clip(kinetics):
    cfg, seed = kinetics_cfg(kinetics), 3  # no colour jitter: the red channel tells the frame
    single = build_loader(cfg, "train", batch_size=2, seed=seed)
    repeated = build_loader(dataclasses.replace(cfg, num_sample=3), "train", batch_size=2, seed=seed)
    assert len(repeated) == len(single) == 3, "an epoch counts videos, whatever the views"
    for epoch in range(2):
        one, views = cloned(single), cloned(repeated)
        assert repeated.epoch == epoch
        assert_views_of_one_decode(one, views, 3)
        for batch in views:
            for clip, index, view in zip(batch.clips, batch.index.tolist(), batch.view.tolist()):
                # the same frames in every view; each view's own crop and flip (view 0's as num_sample 1 draws them)
                assert frame_numbers(clip, cfg) == expected_indices(repeated, index, epoch, seed)
                green = pixels(clip, cfg)[..., 1].mean(axis=(0, 1))
                mirror = sampling.train_spatial(seed, epoch, index, cfg.train_jitter_scales, True, True, view).mirror
                assert (green[-1] < green[0]) == bool(mirror)
    resumed = build_loader(dataclasses.replace(cfg, num_sample=3), "train", batch_size=2, seed=seed, start_epoch=1,
                           start_batch=1)  # the position counts videos
    for batch, expected in zip(cloned(resumed), views[1:], strict=True):
        assert torch.equal(batch.clips, expected.clips) and torch.equal(batch.index, expected.index)
    # validation is left as it is
    val = [b.clips for b in build_loader(dataclasses.replace(cfg, num_sample=3), "val", batch_size=2)]
    assert [tuple(v.shape) for v in val] == [(2, 3, 8, 32, 32), (1, 3, 8, 32, 32)]


def test_num_sample_views_of_frame_folders_with_rand_augment(ssv2):
    """JPEG frames decoded in the graph once, RandAugment drawn per view (DALI's op switch in each branch)."""
    cfg = ssv2_cfg(ssv2, rand_augment="rand-m9-mstd0.5-inc1")
    single = cloned(build_loader(cfg, "train", batch_size=3, seed=1))
    repeated = cloned(build_loader(dataclasses.replace(cfg, num_sample=2), "train", batch_size=3, seed=1))
    assert_views_of_one_decode(single, repeated, 2)


def test_num_sample_drops_every_view_of_a_bad_video(broken):
    cfg = kinetics_cfg(broken, max_bad_fraction=1.0)
    single = build_loader(cfg, "train", batch_size=4)
    repeated = build_loader(dataclasses.replace(cfg, num_sample=2), "train", batch_size=4)
    assert_views_of_one_decode(cloned(single), cloned(repeated), 2)
    assert repeated.last_epoch_summary() == single.last_epoch_summary()
    assert [path for path, _ in repeated.bad_videos] == [path for path, _ in single.bad_videos] != []


# ---------------------------------------------------------------------------------------------------------------
# Sharding, determinism, resume


def test_two_ranks_cover_every_video_once(kinetics):
    cfg = kinetics_cfg(kinetics)
    loaders = [build_loader(cfg, "train", batch_size=2, rank=r, world_size=2, seed=9) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 2
    seen = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == 2
        seen += [i for b in batches for i in b.index.tolist()]
    assert sorted(seen) == list(range(5))
    assert sum(loader.last_epoch_summary()["padded"] for loader in loaders) == 3


def test_an_optimizer_step_gets_the_same_clips_on_any_number_of_processes(kinetics):
    """With the epoch padded to whole optimizer steps, step s covers the positions [s, s + 1) x B of the epoch's
    order for every split of the global batch B into processes x micro-batch x accumulation, and an epoch is
    ceil(videos / B) steps: a run resumed on another number of processes trains each step on the same clips."""
    cfg = kinetics_cfg(kinetics)
    data = read_dataset(cfg, "train", show_progress=False)
    spec = clip_spec(cfg, "train", data)

    def clips_of_each_step(world, micro, accum):  # world x micro x accum = 4 clips an optimizer step
        steps = {}
        for rank in range(world):
            source = ClipSource(data.videos, spec, seed=3, rank=rank, world_size=world, batch_size=micro,
                                batches_multiple=accum)
            for position in range(source.steps * micro):
                row = dict(zip(spec.output_names(), source.sample(2, position)))
                steps.setdefault(position // (micro * accum), []).append(
                    (int(row["index"]), int(row["status"]), float(row["scale"]), int(row["mirror"])))
        return {step: sorted(rows) for step, rows in steps.items()}

    reference = clips_of_each_step(2, 2, 1)
    assert len(reference) == 2  # ceil(5 / 4)
    for layout in ((1, 2, 2), (1, 1, 4), (4, 1, 1), (2, 1, 2)):
        assert clips_of_each_step(*layout) == reference, layout
    assert sorted(index for rows in reference.values() for index, status, *_ in rows if status != PADDING) == \
        list(range(5))

    # the loader: 3 batches of 2 an epoch, padded to 4 for 2 micro-batches a step (the last one all padding)
    assert len(build_loader(cfg, "train", batch_size=2, seed=3)) == 3
    padded = build_loader(cfg, "train", batch_size=2, seed=3, start_epoch=2, batches_multiple=2)
    batches = run_epoch(padded)
    assert len(padded) == len(batches) == 4 and batches[3][0] == []
    assert [sorted(a + b) for (a, *_), (b, *_) in zip(batches[::2], batches[1::2])] == \
        [[index for index, status, *_ in reference[step] if status != PADDING] for step in (0, 1)]


def test_same_seed_same_batches_and_resume(kinetics):
    reference = build_loader(kinetics_cfg(kinetics, py_workers=2), "train", batch_size=2, seed=1)
    epochs = [run_epoch(reference) for _ in range(2)]

    def assert_same(batches, expected):
        assert len(batches) == len(expected)
        for (index, clips, labels), (index_e, clips_e, labels_e) in zip(batches, expected):
            assert index == index_e and torch.equal(clips, clips_e) and torch.equal(labels, labels_e)

    cfg = kinetics_cfg(kinetics)  # in-process source: results do not depend on the workers
    resumed = build_loader(cfg, "train", batch_size=2, seed=1, start_epoch=1, start_batch=1)
    assert len(resumed) == 2 and resumed.epoch == 1
    assert_same(run_epoch(resumed), epochs[1][1:])
    assert len(resumed) == 3

    interrupted = build_loader(cfg, "train", batch_size=2, seed=1)
    for _ in interrupted:
        break  # a short epoch (max_steps_per_epoch): the next `for` is the next epoch, from its start
    assert_same(run_epoch(interrupted), epochs[1])
    assert interrupted.epoch == 1

    other_seed = run_epoch(build_loader(cfg, "train", batch_size=2, seed=2))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(other_seed, epochs[0]))


# ---------------------------------------------------------------------------------------------------------------
# Bad data


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Three good videos, one that is not a video and one truncated after its first frames."""
    root = str(tmp_path_factory.mktemp("broken"))
    videogen.write_kinetics(root, "train", [dict(label="a", frames=12), dict(label="b", frames=40),
                                            dict(label="a", frames=12), dict(label="b", frames=12)])
    videogen.write_kinetics(root, "val", [dict(label="a", frames=40), dict(label="b", frames=12)])
    names = sorted(os.listdir(os.path.join(root, "train")))
    with open(os.path.join(root, "train", names[0]), "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))
    val_name = sorted(os.listdir(os.path.join(root, "val")))[0]
    path = os.path.join(root, "val", val_name)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])
    return root


def test_bad_videos_skipped_counted_and_reported(broken, caplog):
    cfg = kinetics_cfg(broken, max_bad_fraction=0.5)
    loader = build_loader(cfg, "train", batch_size=2)
    corrupt = loader.dataset.videos[0].path
    for _ in range(2):
        indices = [i for b in loader for i in b.index.tolist()]
        assert sorted(indices) == [1, 2, 3], "the bad video is dropped, never replaced"
        assert loader.last_epoch_summary() == dict(epoch=loader.epoch, seen=4, bad=1, padded=0)
    assert [path for path, _ in loader.bad_videos] == [corrupt]
    assert corrupt in caplog.text

    strict = build_loader(dataclasses.replace(cfg, max_bad_fraction=0.01), "train", batch_size=2)
    with pytest.raises(RuntimeError, match="1 of 4 training videos failed"):
        list(strict)

    evaluation = build_loader(cfg, "val", batch_size=2)  # the truncated video announces 40 frames, has ~13
    (batch,) = list(evaluation)
    assert batch.index.tolist() == [1]
    (path, message), = evaluation.bad_videos
    assert path == evaluation.dataset.videos[0].path and message  # FFmpeg error or "the stream ends at frame ..."
    assert evaluation.last_epoch_summary()["bad"] == 1


def test_ssv2_truncated_jpeg_is_skipped_and_missing_frame_stops(tmp_path):
    root = str(tmp_path)
    videogen.write_ssv2(root, "train.json", [dict(id="21", template=0, frames=16), dict(id="22", template=1, frames=16),
                                             dict(id="23", template=2, frames=16)], TEMPLATES)
    frame = os.path.join(root, "22", "22_000007.jpeg")
    data = open(frame, "rb").read()
    with open(frame, "wb") as f:  # cut mid-scan: the decoder would fail the whole batch
        f.write(data[: len(data) // 2])
    cfg = ssv2_cfg(root, max_bad_fraction=0.5)
    loader = build_loader(cfg, "val", batch_size=3)  # the middle frame of segment 3 of 8 is frame 7
    (batch,) = list(loader)
    assert sorted(batch.index.tolist()) == [0, 2], "the video with the truncated frame is dropped, not replaced"
    (path, message), = loader.bad_videos
    assert path.endswith("22") and "22_000007.jpeg" in message and "truncated" in message

    os.remove(frame)  # a gap in a frame folder is a broken dataset: stop and name the frame
    with pytest.raises(FileNotFoundError, match=r"22_000007\.jpeg"):
        list(build_loader(cfg, "val", batch_size=3))


BAD_FRACTION_ON_TWO_RANKS = """
import sys
import torch.distributed as dist
import torch.multiprocessing as mp
sys.path[:0] = [{repo!r}, {tests!r}]


def worker(rank, root, out):
    from test_pipelines import kinetics_cfg
    from pipelines import build_loader
    dist.init_process_group("gloo", init_method="file://" + out + "/store", rank=rank, world_size=2)
    loader = build_loader(kinetics_cfg(root, max_bad_fraction=0.3), "train", batch_size=1, rank=rank, world_size=2)
    try:
        outcome = f"{{len(list(loader))}} batches, no error"
    except RuntimeError as e:
        outcome = str(e)
    with open(f"{{out}}/rank{{rank}}.txt", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_bad_fraction_is_decided_over_all_ranks(broken, tmp_path):
    # 1 bad video of 4: on its own rank that is 1 of 2 (over 0.3), overall 1 of 4 (under). Both ranks must see the
    # same totals, or one raises while the other waits for it in the next collective.
    script = tmp_path / "two_ranks.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(BAD_FRACTION_ON_TWO_RANKS.format(repo=os.path.dirname(tests), tests=tests))
    result = subprocess.run([sys.executable, str(script), broken, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert outcomes == ["2 batches, no error"] * 2, outcomes


def test_argument_errors(kinetics, ssv2):
    with pytest.raises(ValueError, match="device_id"):
        build_loader(kinetics_cfg(kinetics, device="gpu"), "train", batch_size=2)
    with pytest.raises(ValueError, match="num_clips"):
        build_loader(ssv2_cfg(ssv2), "test", batch_size=2, num_clips=2)
    with pytest.raises(ValueError, match="random_flip"):
        build_loader(ssv2_cfg(ssv2, random_flip=True), "train", batch_size=2)
    with pytest.raises(ValueError, match="test split"):
        build_loader(kinetics_cfg(kinetics), "val", batch_size=2, num_crops=3)


# ---------------------------------------------------------------------------------------------------------------
# GPU graphs


@pytest.mark.parametrize("dataset,split", [("kinetics", "train"), ("kinetics", "val"), ("kinetics", "test"),
                                           ("ssv2", "train"), ("ssv2", "test")])
def test_gpu_graphs_serialize(kinetics, ssv2, dataset, split):
    """Built with device_id=None, the GPU variants cannot run here, but serialising them checks every operator's
    arguments and CPU/GPU placement (NVDEC and nvJPEG `mixed` decoders, GPU augmentation)."""
    if dataset == "kinetics":
        cfg = kinetics_cfg(kinetics, device="gpu", color_jitter=True)
    else:
        cfg = ssv2_cfg(ssv2, device="gpu", rand_augment="rand-m9-mstd0.5-inc1")
    data = read_dataset(cfg, split, show_progress=False)
    views = (2 if dataset == "kinetics" else 1, 3) if split == "test" else (1, 1)
    spec = clip_spec(cfg, split, data, *views)
    source = ClipSource(data.videos, spec, seed=0, rank=0, world_size=1, batch_size=2)
    serialized = make_pipeline(source, batch_size=2, num_threads=2, py_workers=1, device_id=None).serialize()
    assert (b"decoders__Video" if dataset == "kinetics" else b"decoders__Image") in serialized
    assert b"mixed" in serialized


@pytest.mark.parametrize("dataset", ["kinetics", "ssv2"])
def test_gpu_train_graphs_with_repeated_views_serialize(kinetics, ssv2, dataset):
    """data.num_sample 2 on the GPU: one decoder, each view's augmentation (colour jitter, RandAugment's op switch)
    on the device, stacked there."""
    if dataset == "kinetics":
        cfg = kinetics_cfg(kinetics, device="gpu", color_jitter=True, num_sample=2)
    else:
        cfg = ssv2_cfg(ssv2, device="gpu", rand_augment="rand-m9-mstd0.5-inc1", num_sample=2)
    data = read_dataset(cfg, "train", show_progress=False)
    source = ClipSource(data.videos, clip_spec(cfg, "train", data), seed=0, rank=0, world_size=1, batch_size=2)
    serialized = make_pipeline(source, batch_size=2, num_threads=2, py_workers=1, device_id=None).serialize()
    decoder = b"decoders__Video" if dataset == "kinetics" else b"decoders__Image"
    frames = 1 if dataset == "kinetics" else 8  # one image decoder per frame of the clip
    assert serialized.count(decoder) == frames, "the clip is decoded once for both views"
    assert b"Stack" in serialized and b"mixed" in serialized


def test_gpu_source_sends_encoded_video_and_marks_bad_files(broken):
    """The GPU-mode source (run here without the graph): encoded bytes + frame indices for NVDEC, a decodable
    placeholder and a message for a file that does not demux."""
    cfg = kinetics_cfg(broken, device="gpu")
    data = read_dataset(cfg, "train", show_progress=False)
    source = ClipSource(data.videos, clip_spec(cfg, "train", data), seed=0, rank=0, world_size=1, batch_size=4)
    rows = {}
    for position in range(4):
        row = dict(zip(source.spec.output_names(), source(SimpleNamespace(epoch_idx=0, idx_in_epoch=position))))
        rows[int(row["index"])] = row
    good, bad = rows[1], rows[0]
    assert int(good["status"]) == OK and good["encoded"].tobytes() == open(data.videos[1].path, "rb").read()
    assert good["frame_ids"].tolist() == source.frame_indices(data.videos[1], 0, 1).tolist()
    assert int(bad["status"]) == BAD and bytes(bad["message"]).rstrip(b"\0")
    with av.open(io.BytesIO(bad["encoded"].tobytes())) as placeholder:
        assert placeholder.streams.video[0].frames > 0


@pytest.fixture(scope="module")
def kinetics_gpu(tmp_path_factory):
    """Videos NVDEC decodes: H.264 High 4:2:0 and VP9 profile 0 of at least 128 x 128 (NVDEC's VP9 minimum)."""
    root = str(tmp_path_factory.mktemp("kinetics_gpu"))
    size = dict(width=160, height=128)
    videogen.write_kinetics(root, "train", [
        dict(label="a", frames=40, **size), dict(label="b", frames=44, codec="vp9", **size),
        dict(label="a", frames=24, **size), dict(label="c", frames=36, fps=15, **size),
        dict(label="b", frames=10, **size)])
    videogen.write_kinetics(root, "val", [dict(label="c", frames=30, **size),
                                          dict(label="a", frames=40, codec="vp9", **size),
                                          dict(label="b", frames=20, **size)])
    return root


def test_gpu_fixtures_are_streams_nvdec_decodes(kinetics_gpu):
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(kinetics_gpu) for name in names
             if name.endswith((".mp4", ".webm"))]
    streams = [demux_encoded(open(path, "rb").read()) for path in paths]
    assert {(s.codec, s.profile) for s in streams} == {("h264", "High"), ("vp9", "Profile 0")}
    assert all(nvdec_unsupported(s) is None for s in streams), [nvdec_unsupported(s) for s in streams]


@pytest.mark.gpu
def test_gpu_loader_matches_pyav(kinetics_gpu):
    # crop = the short side: no resize, centre columns
    cfg = kinetics_cfg(kinetics_gpu, device="gpu", crop_size=128, train_jitter_scales=(128, 160))
    loader = build_loader(cfg, "val", batch_size=3, device_id=0)
    (batch,) = list(loader)
    assert batch.clips.is_cuda and batch.labels.is_cuda
    for clip, index in zip(batch.clips, batch.index.tolist()):
        video = loader.dataset.videos[index]
        ids = sampling.kinetics_frame_indices(video.num_frames, 30, 8, 2, 30, 0.0)  # the first clip
        expected = pyav_frames(video.path, ids)[:, :, 16:144]
        assert np.abs(pixels(clip, cfg) - expected).mean() < 3
        assert frame_numbers(clip, cfg) == ids.tolist()


def augmented_on(device: str, frames: list, params: list, spec) -> list:
    """The train graph's steps after decoding (window resize, flip, normalisation and colour jitter) on `device`,
    applied to given frames and parameters: (C, T, S, S) arrays."""
    from nvidia.dali import fn, pipeline_def

    from pipelines import graphs

    @pipeline_def(batch_size=len(frames), num_threads=1, device_id=0 if device == "gpu" else None)
    def steps():
        clip, scale, crop, mirror, jitter = fn.external_source(
            lambda: ([*frames], *[list(p) for p in zip(*params)]), num_outputs=5, layout=["FHWC", "", "", "", ""])
        clip = clip.gpu() if device == "gpu" else clip
        clip = graphs.resized_crop(clip, spec.crop_size, scale, crop[0], crop[1], mirror)
        return graphs.normalize(clip, spec, jitter)
    pipe = steps()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(t) for t in (out.as_cpu() if device == "gpu" else out)]


@pytest.mark.gpu
def test_gpu_augmentation_equals_the_cpu_one():
    """The same frames and parameters through the GPU and the CPU versions of the train steps (a region-of-interest
    resize with a flip, the jitter folded into the normalisation): the same values to float rounding."""
    rng = np.random.default_rng(0)
    spec = ClipSpec(mode="train", reader="pyav", device="gpu", num_frames=4, sampling_rate=1, target_fps=30,
                    crop_size=48, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), color_jitter=True)
    frames = [rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8) for h, w in ((48, 64), (70, 52), (50, 50))]
    params = [(np.float32(s), np.array([x, y]), np.int32(m), np.array(j, np.float32))
              for s, x, y, m, j in ((48, 0.3, 0.9, 1, (1.2, 0.7, 1.3)), (60, 0.99, 0.0, 0, (1, 1, 1)),
                                    (55, 0.5, 0.5, 1, (0.6, 1.4, 0.8)))]
    for gpu, cpu in zip(augmented_on("gpu", frames, params, spec), augmented_on("cpu", frames, params, spec)):
        np.testing.assert_allclose(gpu, cpu, atol=1e-3)


@pytest.mark.gpu
def test_gpu_train_and_ssv2(kinetics_gpu, ssv2):
    train = build_loader(kinetics_cfg(kinetics_gpu, device="gpu", color_jitter=True), "train", batch_size=2,
                         device_id=0)
    assert sum(len(b.index) for b in train) == 5
    cfg = ssv2_cfg(ssv2, device="gpu", train_list="static.json", rand_augment="rand-m9-mstd0.5-inc1")
    (batch,) = list(build_loader(cfg, "train", batch_size=4, device_id=0))
    assert batch.clips.is_cuda
    for clip in batch.clips:
        assert torch.equal(clip, clip[:, :1].expand_as(clip))


def test_a_preemption_signal_to_every_process_while_the_source_workers_start_kills_none_of_them(kinetics):
    # Slurm signals every process of a job step: a worker that gets SIGTERM before its own code ignores it would die
    # of it and fail the pipeline (pipelines.loader.handled_signals_blocked). Here every child of this process gets
    # SIGTERM as soon as it appears, and again every millisecond, while a loader with 2 source workers starts and
    # runs an epoch; this process gets one too, noted by its handler as train.py's Preemption does
    import signal
    import threading
    import time

    from test_reproducibility import process_tree
    noted, stop = [], threading.Event()

    def signal_every_process():
        os.kill(os.getpid(), signal.SIGTERM)
        while not stop.is_set():
            for pid in process_tree(os.getpid())[1:]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            time.sleep(0.001)

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
    sender = threading.Thread(target=signal_every_process)
    try:
        loader = build_loader(kinetics_cfg(kinetics, py_workers=2), "train", batch_size=2, seed=1)
        sender.start()
        batches = run_epoch(loader)
        stop.set()
        sender.join()
        for _ in range(100):  # the handler runs between two bytecodes of this thread
            time.sleep(0.001)
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)
    assert noted == [signal.SIGTERM]
    expected = run_epoch(build_loader(kinetics_cfg(kinetics), "train", batch_size=2, seed=1))
    assert [index for index, *_ in batches] == [index for index, *_ in expected]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, expected))
