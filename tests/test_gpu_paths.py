"""What would break the GPU paths on their first run, checked here as far as a CPU allows.

- Streams NVDEC cannot decode (profile, pixel format, size, codec) are bad videos, named, before they reach it.
- A batch the video decoder fails on is decoded one video at a time, so only the bad video is dropped: run on DALI's
  CPU video decoder, which fails an H.264 sample (it decodes VP8/VP9/MJPEG only) the way NVDEC fails one it
  cannot decode, in the same graph.
- Frames asked for past the end of a stream repeat its last frame instead of coming back black.
- A container without NVDEC's library is told so at start-up; the nvJPEG settings reach the GPU graph.
"""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV (decoding and test videos)")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
from nvidia.dali import fn, pipeline_def  # noqa: E402

import videogen
from pipelines import build_loader, read_dataset
from pipelines.decode import demux_encoded, nvdec_unsupported
from pipelines.graphs import decode_clip
from pipelines.loader import ClipLoader, check_nvdec_library, clip_spec, make_pipeline
from pipelines.sources import BAD, OK, ClipSource
from test_pipelines import (assert_views_of_one_decode, cloned, frame_numbers, kinetics, kinetics_cfg,  # noqa: F401
                            ssv2, ssv2_cfg)  # (fixtures)

ENCODERS = videogen.encoders()  # the ffmpeg binary's, else PyAV's


def encoder_of(codec: str) -> str:
    args = videogen.CODECS[codec]
    return args[args.index("-c:v") + 1]


# codec key, size, what the check says
UNDECODABLE = [
    ("h264_444", (64, 48), "h264 profile 'High 4:4:4 Predictive' is not decoded by NVDEC"),
    ("h264_10bit", (64, 48), "h264 profile 'High 10' is not decoded by NVDEC"),
    ("h264_422", (64, 48), "h264 profile 'High 4:2:2' is not decoded by NVDEC"),
    ("vp9", (64, 48), "64x48 is outside what NVDEC decodes for vp9 (128x128 to 8192x8192)"),
    ("hevc", (128, 128), "128x128 is outside what NVDEC decodes for hevc (144x144 to 8192x8192)"),
    ("av1", (160, 128), "codec av1 is not decoded on the GPU path"),
]


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory):
    """One Kinetics train split: a good H.264 video first, then one of each stream NVDEC cannot decode."""
    root = str(tmp_path_factory.mktemp("undecodable"))
    cases = [case for case in UNDECODABLE if encoder_of(case[0]) in ENCODERS]
    videos = [dict(label="a", frames=20, width=160, height=128)]
    videos += [dict(label="b", frames=20, codec=codec, width=w, height=h) for codec, (w, h), _ in cases]
    videogen.write_kinetics(root, "train", videos)
    return root, cases


def test_streams_nvdec_cannot_decode_are_bad_videos_named_before_the_decoder(undecodable):
    root, cases = undecodable
    assert len(cases) == len(UNDECODABLE), f"ffmpeg lacks encoders: {set(UNDECODABLE) - set(cases)}"
    cfg = kinetics_cfg(root, device="gpu")
    data = read_dataset(cfg, "train", show_progress=False)
    spec = clip_spec(cfg, "val", data)  # no augmentation parameters: the rows hold what NVDEC would get
    source = ClipSource(data.videos, spec, seed=0, rank=0, world_size=1, batch_size=len(data.videos))
    rows = [dict(zip(spec.output_names(), source(SimpleNamespace(epoch_idx=0, idx_in_epoch=i))))
            for i in range(len(data.videos))]
    assert int(rows[0]["status"]) == OK  # H.264 High 4:2:0 goes to NVDEC
    for row, (codec, _, message) in zip(rows[1:], cases):
        text = bytes(row["message"]).rstrip(b"\0").decode()
        assert int(row["status"]) == BAD and message in text, (codec, text)
        stream = demux_encoded(open(data.videos[int(row["index"])].path, "rb").read())
        assert nvdec_unsupported(stream) == text


@pytest.fixture(scope="module")
def mixed_codecs(tmp_path_factory):
    """VP9 videos (DALI's CPU decoder reads them) and one H.264 video second in the list (it cannot)."""
    root = str(tmp_path_factory.mktemp("mixed"))
    size = dict(width=160, height=128)
    videogen.write_kinetics(root, "val", [
        dict(label="a", frames=30, codec="vp9", **size), dict(label="b", frames=30, **size),
        dict(label="c", frames=34, codec="vp9", **size), dict(label="a", frames=26, codec="vp9", **size),
        dict(label="b", frames=30, codec="vp9", **size)])
    return root


@pytest.mark.parametrize("py_workers", [0, 1])
def test_a_batch_the_decoder_fails_is_decoded_one_video_at_a_time(mixed_codecs, py_workers, caplog):
    cfg = kinetics_cfg(mixed_codecs, crop_size=128, train_jitter_scales=(128, 160), train_list="val.csv")
    data = read_dataset(cfg, "val", show_progress=False)
    spec = dataclasses.replace(clip_spec(cfg, "val", data), reader="nvdec")  # DALI's video decoder, on the CPU
    loader = ClipLoader(data, spec, split="val", batch_size=2, rank=0, world_size=1, device_id=None, seed=0,
                        start_epoch=0, start_batch=0, num_threads=1, py_workers=py_workers, max_bad_fraction=1.0)
    h264 = data.videos[1].path
    for epoch in range(2):  # the epoch after a failure starts a fresh pipeline and runs to its end
        batches = list(loader)
        assert [b.index.tolist() for b in batches] == [[0], [2, 3], [4]]  # only the H.264 video is gone
        for batch in batches:
            for clip, index in zip(batch.clips, batch.index.tolist()):
                ids = ClipSource(data.videos, spec, seed=0, rank=0, world_size=1, batch_size=1).frame_indices(
                    data.videos[index], epoch, index)
                assert frame_numbers(clip, cfg) == ids.tolist()
        assert loader.last_epoch_summary() == dict(epoch=epoch, seen=5, bad=1, padded=1)
    assert [path for path, _ in loader.bad_videos] == [h264]
    assert "the decoder failed on it" in loader.bad_videos[0][1]
    assert "failed to decode" in caplog.text and "one by one" in caplog.text


def test_num_sample_views_of_videos_decoded_in_the_graph_also_one_by_one(mixed_codecs):
    """Training views (data.num_sample) of VP9 videos decoded by DALI's video decoder in the graph: view 0 is the clip
    of num_sample 1 bit for bit, also in a batch decoded again one video at a time; the H.264 video (which that
    decoder fails on) is dropped with all its views."""
    cfg = kinetics_cfg(mixed_codecs, crop_size=128, train_jitter_scales=(128, 160), train_list="val.csv",
                       color_jitter=True)
    data = read_dataset(cfg, "val", show_progress=False)
    epochs = {}
    for n in (1, 2):
        spec = dataclasses.replace(clip_spec(dataclasses.replace(cfg, num_sample=n), "train", data), reader="nvdec")
        loader = ClipLoader(data, spec, split="train", batch_size=2, rank=0, world_size=1, device_id=None, seed=4,
                            start_epoch=0, start_batch=0, num_threads=1, py_workers=0, max_bad_fraction=1.0)
        epochs[n] = cloned(loader)
        assert [path for path, _ in loader.bad_videos] == [data.videos[1].path]
        assert loader.last_epoch_summary() == dict(epoch=0, seen=5, bad=1, padded=1)
    assert_views_of_one_decode(epochs[1], epochs[2], 2)
    assert sorted(i for b in epochs[2] for i in b.index.tolist()) == [0, 0, 2, 2, 3, 3, 4, 4]


def test_frames_past_the_end_of_the_stream_repeat_its_last_frame(tmp_path):
    path = videogen.write_video(str(tmp_path / "v.webm"), 12, 160, 128, codec="vp9")
    spec = SimpleNamespace(reader="nvdec", device="cpu")
    encoded = np.fromfile(path, np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        sample = {"encoded": fn.external_source(lambda: [encoded], batch=True),
                  "frame_ids": fn.external_source(lambda: [np.array([0, 11, 12, 20], np.int32)], batch=True)}
        return decode_clip(sample, spec)

    pipe = decode()
    pipe.build()
    (frames,) = pipe.run()
    frames = np.array(frames[0])  # (F, H, W, 3)
    assert [videogen.frame_number(frame[..., 0]) for frame in frames] == [0, 11, 11, 11]  # not black (0)


def test_missing_nvdec_library_is_one_clear_error(kinetics):
    with pytest.raises(RuntimeError, match="libnvcuvid_missing.so.1 cannot be loaded .*NVIDIA_DRIVER_CAPABILITIES"):
        check_nvdec_library("libnvcuvid_missing.so.1")
    try:
        check_nvdec_library()
    except RuntimeError:  # this machine has no NVDEC: the loader says so before it builds anything
        with pytest.raises(RuntimeError, match="NVIDIA_DRIVER_CAPABILITIES including 'video'"):
            build_loader(kinetics_cfg(kinetics, device="gpu"), "train", batch_size=2, device_id=0)


def test_gpu_graphs_carry_the_decoder_settings(kinetics, ssv2):
    for cfg in (kinetics_cfg(kinetics, device="gpu"), ssv2_cfg(ssv2, device="gpu")):
        data = read_dataset(cfg, "val", show_progress=False)
        source = ClipSource(data.videos, clip_spec(cfg, "val", data), seed=0, rank=0, world_size=1, batch_size=2)
        graph = make_pipeline(source, batch_size=2, num_threads=2, py_workers=1, device_id=None).serialize()
        if cfg.dataset == "kinetics":
            assert b"pad_mode" in graph and b"edge" in graph
        else:
            assert b"jpeg_fancy_upsampling" in graph and b"device_memory_padding" in graph
            assert b"host_memory_padding" in graph  # (values are protobuf-encoded: only the names are checked)

