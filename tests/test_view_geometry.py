"""The test views at real frame sizes: predict.py builds in torch the views eval.py's DALI test graph builds, from
one definition of their geometry (pipelines/sampling.py), and both are the original's (short side to the crop size,
long side floored; uniform_crop's offsets 0, ceil(free / 2) and free).

The geometry is checked exactly (the graph's resized sizes and crop offsets read off its outputs); the pixels on
noise-textured clips (tests/videogen.py), where a window one pixel off or a long side one pixel longer moves the
normalised values by more than 1. Both paths decode with PyAV, and predict.py resizes with torch as the original does
(equal to 1e-5; 3e-7 measured); DALI's CPU resize differs from torch's by a few hundredths of a level at 1280 x 720
(float32 sampling positions at large coordinates: 1.5e-4 measured on the normalised views, up to 2.2e-4 over whole
frames), hence PIXEL_ATOL.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import torch

import predict
import videogen
from config import DataConfig, EvalConfig
from pipelines import build_loader, sampling
from pipelines.decode import decode_frames, probe_video
from test_pipelines import original_normalize, original_resize

SIZE = 224
PIXEL_ATOL = 5e-4  # predict.py vs the DALI graph, normalised values (std 0.5: 0.06 of a level in 0..255)
# (width, height): 340 x 256 is where rounding the long side (297.5) gives one column more than the original's floor
SIZES = [(340, 256), (1280, 720)]


def original_geometry(height: int, width: int, size: int, num_crops: int) -> tuple[tuple[int, int], list]:
    """The original's resized (H, W) (transform.short_side_scale_jitter) and its crops' (top, left) (uniform_crop
    with spatial_idx 0, 1, 2 along the long side, or 1), written out independently of sampling.py."""
    if min(height, width) == size:  # left as it is
        new_h, new_w = height, width
    elif width < height:
        new_h, new_w = math.floor(height / width * size), size
    else:
        new_h, new_w = size, math.floor(width / height * size)
    free_y, free_x = new_h - size, new_w - size
    centre = (math.ceil(free_y / 2), math.ceil(free_x / 2))
    if num_crops == 1:
        return (new_h, new_w), [centre]
    if new_h > new_w:
        return (new_h, new_w), [(0, centre[1]), centre, (free_y, centre[1])]
    return (new_h, new_w), [(centre[0], 0), centre, (centre[0], free_x)]


# (height, width) of frames: landscape and portrait, long sides where floor and round differ, square, odd free space
FRAME_SIZES = [(256, 340), (340, 256), (720, 1280), (1280, 720), (240, 320), (256, 455), (331, 224), (224, 224),
               (225, 224), (360, 480), (1080, 1920), (101, 777), (224, 237), (230, 224)]  # the last two: short
# side already the crop size, where the floor rule alone would lose a column


@pytest.mark.parametrize("num_crops", [1, 3])
def test_geometry_is_the_originals(num_crops):
    for height, width in FRAME_SIZES:
        for size in (112, 160, 224, 256):
            if min(height, width) < size:
                continue
            resized, offsets = sampling.view_geometry(height, width, size, num_crops)
            assert (resized, offsets) == original_geometry(height, width, size, num_crops), (height, width, size)


def run_steps(step, inputs: list) -> list:
    """The outputs of a graph step (a function of one DALI node) on a batch of (F, H, W, C) arrays, on the CPU."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(inputs), num_threads=1, device_id=None)
    def steps():
        return step(fn.external_source(lambda: inputs, layout="FHWC"))
    pipe = steps()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(t) for t in out]


@pytest.mark.parametrize("num_crops", [1, 3])
def test_the_test_graph_places_its_views_by_view_geometry(num_crops):
    """The test graph's steps (short_side_resize, then uniform_crops) take the sizes and offsets of
    sampling.view_geometry, exactly: the resized frames' shapes, and the crops of frames whose pixels hold their own
    (row, column), which the crop's first pixel gives back."""
    from pipelines import graphs
    from pipelines.sources import ClipSpec

    sizes = [(h, w) for h, w in FRAME_SIZES if min(h, w) >= SIZE]
    resized = run_steps(lambda clip: graphs.short_side_resize(clip, SIZE),
                        [np.zeros((1, h, w, 3), np.uint8) for h, w in sizes])
    geometry = [sampling.view_geometry(h, w, SIZE, num_crops) for h, w in sizes]
    assert [r.shape[1:3] for r in resized] == [new for new, _ in geometry]
    spec = ClipSpec(mode="test", reader="pyav", device="cpu", num_frames=1, sampling_rate=1, target_fps=30,
                    crop_size=SIZE, mean=(0, 0, 0), std=(1 / 255,) * 3, num_crops=num_crops)  # no normalisation
    coordinates = [np.stack(np.meshgrid(np.arange(h), np.arange(w), np.zeros(1), indexing="ij"), -1)
                   .astype(np.float32).transpose(2, 0, 1, 3) for (h, w), _ in geometry]  # (1, H, W, 3)
    views = run_steps(lambda clip: graphs.uniform_crops(clip, spec), coordinates)  # each (V, C, T, S, S)
    assert [[tuple(int(c) for c in view[:2, 0, 0, 0]) for view in v] for v in views] == [o for _, o in geometry]


def original_views(frames: np.ndarray, cfg) -> torch.Tensor:
    """(V, C, T, S, S): the original's test transforms (normalise, resize, crop) of (clips*T, H, W, 3) frames."""
    size, T = cfg.data.crop_size, cfg.data.num_frames
    x = original_resize(original_normalize(frames.astype(np.float32), cfg.data), size)  # (clips*T, C, H', W')
    _, offsets = original_geometry(*frames.shape[1:3], size, cfg.eval.num_crops)
    return torch.stack([x[c * T:(c + 1) * T, :, top:top + size, left:left + size].permute(1, 0, 2, 3)
                        for c in range(len(frames) // T) for top, left in offsets])


@pytest.fixture(scope="module")
def real_sizes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("real_sizes"))
    videogen.write_kinetics(root, "val", [dict(label=f"c{i}", frames=12, width=w, height=h, texture=True)
                                          for i, (w, h) in enumerate(SIZES)])
    return root


def test_predict_views_equal_the_test_graphs_at_real_sizes(real_sizes):
    data = DataConfig(dataset="kinetics", root=real_sizes, train_list="val.csv", val_list="val.csv",
                      test_list="val.csv", num_frames=4, sampling_rate=2, target_fps=30, crop_size=SIZE,
                      device="cpu", num_threads=2, py_workers=0)
    cfg = SimpleNamespace(data=data, eval=EvalConfig(num_clips=2, num_crops=3))  # what predict.py reads of a Config
    loader = build_loader(cfg.data, "test", batch_size=1, num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops)
    checked = []
    for batch in loader:
        (index,) = batch.index.tolist()
        path = loader.dataset.videos[index].path
        info = probe_video(path)
        frames = decode_frames(path, predict.frame_indices(cfg, info.num_frames, info.fps), info.num_frames)
        views = predict.test_views(frames, cfg, torch.device("cpu"))
        assert views.shape == batch.clips[0].shape == (6, 3, 4, SIZE, SIZE)
        for name, expected, atol in (("eval.py's test graph", batch.clips[0], PIXEL_ATOL),
                                     ("the original", original_views(frames, cfg), 1e-5)):
            difference = (views - expected).abs().max().item()
            assert difference < atol, f"{frames.shape[2]}x{frames.shape[1]}: {difference:.3g} from {name}'s views"
        checked.append((frames.shape[2], frames.shape[1]))
    assert sorted(checked) == sorted(SIZES)
