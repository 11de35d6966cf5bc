"""The index of a split's video list (pipelines/index.py): the same videos as reading the list, rebuilt when what it
was read from changes, built by one process of many, and pickled by its path into DALI's workers."""
import logging
import multiprocessing
import os
import pickle

import pytest

pytest.importorskip("av", reason="needs PyAV")

from bench.synthetic_lists import make_kinetics, make_ssv2
from config import DataConfig
from pipelines.datasets import read_dataset
from pipelines.index import CACHE_FOLDER, VideoIndex, write_index


def index_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".kcindex"))


@pytest.fixture
def kinetics(tmp_path):
    fields = make_kinetics(tmp_path / "k", 300, show_progress=False)
    return lambda **kw: DataConfig(**{**fields, **kw}, device="cpu")


@pytest.fixture
def ssv2(tmp_path):
    fields = make_ssv2(tmp_path / "s", 120, show_progress=False)
    return lambda **kw: DataConfig(**{**fields, **kw}, device="cpu")


def same_dataset(a, b):
    assert list(a.videos) == list(b.videos)
    assert (a.class_names, a.frames, a.labelled, a.annotation, a.missing) == \
        (b.class_names, b.frames, b.labelled, b.annotation, b.missing)


@pytest.mark.parametrize("which", ["kinetics", "ssv2"])
def test_the_index_holds_what_the_reader_reads(which, request):
    cfg = request.getfixturevalue(which)
    plain = read_dataset(cfg(index_dir="off"), "train", show_progress=False)
    assert isinstance(plain.videos, list)
    built = read_dataset(cfg(), "train", show_progress=False)  # builds the index
    opened = read_dataset(cfg(), "train", show_progress=False)  # opens it
    assert isinstance(built.videos, VideoIndex) and isinstance(opened.videos, VideoIndex)
    same_dataset(plain, built)
    same_dataset(plain, opened)
    folder = os.path.join(os.path.dirname(plain.annotation), CACHE_FOLDER)
    assert len(index_files(folder)) == 1
    index = opened.videos
    assert index[-1] == plain.videos[-1] and index[10:13] == plain.videos[10:13]
    with pytest.raises(IndexError):
        index[len(plain.videos)]
    # a DALI worker unpickles the source: the index travels as its path, not as 300 records
    assert len(pickle.dumps(index)) < 300 and list(pickle.loads(pickle.dumps(index))) == list(plain.videos)


def test_a_changed_annotation_manifest_or_folder_builds_a_new_index(kinetics, caplog):
    cfg = kinetics()
    first = read_dataset(cfg, "train", show_progress=False)
    root, annotation = cfg.root, first.annotation
    folder = os.path.join(os.path.dirname(annotation), CACHE_FOLDER)
    del first  # closed: an index still open stays (the test below)

    manifest = os.path.join(root, "train", "manifest.csv")  # one video re-encoded: another frame count
    lines = open(manifest).read().splitlines()
    path, frames, *rest = lines[1].split(",")
    lines[1] = ",".join([path, str(int(frames) + 7), *rest])
    open(manifest, "w").write("\n".join(lines) + "\n")
    changed = read_dataset(cfg, "train", show_progress=False)
    target = os.path.normpath(os.path.join(root, "train", path))
    (video,) = [v for v in changed.videos if os.path.normpath(v.path) == target]
    assert video.num_frames == int(frames) + 7
    assert len(index_files(folder)) == 1  # the old one, no longer open, is removed

    with open(annotation, "a") as f:  # a new line: its video is not on disk
        f.write("class 999,AAAAAAAAAAA,0,10,train\n")
    with pytest.raises(FileNotFoundError, match=r"train\.csv:302"):  # the reader's checks run again
        read_dataset(cfg, "train", show_progress=False)

    lines = open(annotation).read().splitlines()[:-1]
    open(annotation, "w").write("\n".join(lines) + "\n")
    os.remove(target)  # a video deleted: its folder's time changes
    with pytest.raises(FileNotFoundError, match="1 missing video"):
        read_dataset(cfg, "train", show_progress=False)
    with caplog.at_level(logging.WARNING):
        left = read_dataset(kinetics(allow_missing=True), "train", show_progress=False)
        assert len(left.videos) == 299 and left.missing[0][0].endswith(os.path.basename(target))
        again = read_dataset(kinetics(allow_missing=True), "train", show_progress=False)
    assert isinstance(again.videos, VideoIndex) and again.missing == left.missing
    assert sum("left out" in r.message for r in caplog.records) == 2  # said at every start, not only when built


def test_an_index_a_run_still_reads_stays_when_other_settings_build_their_own(kinetics):
    # a second experiment on the same data with other reader settings builds an index of its own, and removes the
    # older ones of the list, but not one a run still has open: its DALI workers reopen it by path when they start
    first = read_dataset(kinetics(), "train", show_progress=False)
    path = first.videos.path
    second = read_dataset(kinetics(allow_missing=True), "train", show_progress=False)
    assert second.videos.path != path and os.path.exists(path)
    worker = pickle.loads(pickle.dumps(first.videos))  # a worker started after the other build
    assert list(worker) == list(first.videos)
    del first, worker  # that run ended: the next build removes its index, and keeps the one still open
    third = read_dataset(kinetics(frame_start=1), "train", show_progress=False)
    folder = os.path.dirname(path)
    assert index_files(folder) == sorted(os.path.basename(d.videos.path) for d in (second, third))


def test_an_unreadable_index_is_built_again(kinetics, caplog):
    first = read_dataset(kinetics(), "train", show_progress=False)
    path, expected = first.videos.path, list(first.videos)
    del first  # its mapping of the file (a file changed in place under a mapping faults its readers: the index
    # itself is only ever replaced by a rename)
    open(path, "wb").write(b"not an index")
    with caplog.at_level(logging.WARNING):
        again = read_dataset(kinetics(), "train", show_progress=False)
    assert "not a readable index" in caplog.text
    assert list(again.videos) == expected and open(path, "rb").read(8) == b"KCVINDEX"


def test_index_dir_setting(kinetics, tmp_path):
    cfg = kinetics(index_dir="cache")  # relative to root
    data = read_dataset(cfg, "train", show_progress=False)
    assert os.path.dirname(data.videos.path) == os.path.join(cfg.root, "cache")
    assert not os.path.exists(os.path.join(os.path.dirname(data.annotation), CACHE_FOLDER))


def test_an_empty_list_and_strings_beyond_ascii(tmp_path):
    from pipelines.datasets import VideoDataset, VideoRecord
    videos = [VideoRecord(f"/data/vidéo {i}/clip.mp4", i, 10 + i, 29.97, f"list.txt:{i + 1}", error="é" * i)
              for i in range(3)]
    for dataset in (VideoDataset(videos, ["a", "b", "c"]), VideoDataset([], [])):
        write_index(str(tmp_path / "x.kcindex"), dataset, key="k")
        index = VideoIndex(str(tmp_path / "x.kcindex"))
        assert list(index) == list(dataset.videos) and index.header["key"] == "k"


def _read_in_a_process(fields: dict, log_path: str) -> list:
    import pipelines.datasets as datasets
    real = datasets.read_kinetics

    def counted(*args, **kwargs):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    datasets.read_kinetics = counted
    data = datasets.read_dataset(DataConfig(**fields, device="cpu"), "train", show_progress=False)
    return [v.path for v in data.videos]


def test_many_processes_at_once_build_the_index_once(tmp_path):
    fields = make_kinetics(tmp_path / "k", 2000, show_progress=False)
    log_path = str(tmp_path / "builds.txt")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_read_in_a_process, [(fields, log_path)] * 4)
    assert len(open(log_path).read().split()) == 1  # one reader ran; the others waited and opened its index
    assert all(paths == results[0] for paths in results) and len(results[0]) == 2000


def test_the_training_source_pickles_small(kinetics):
    from pipelines.sources import ClipSource
    from pipelines.loader import clip_spec
    cfg = kinetics()
    data = read_dataset(cfg, "train", show_progress=False)
    source = ClipSource(data.videos, clip_spec(cfg, "train", data), seed=0, rank=0, world_size=1, batch_size=2)
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 2000
    assert copy.videos[5] == data.videos[5]
    assert copy.frame_indices(copy.videos[5], 3, 5).tolist() == source.frame_indices(data.videos[5], 3, 5).tolist()
