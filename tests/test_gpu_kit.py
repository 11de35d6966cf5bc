"""bench/gpu_kit.py: the carried parts, cut and taken in again as the GPU machine's calls do, on small archives
made here; and the test videos written without an ffmpeg binary, as on that machine."""
import json
import shutil

import numpy as np
import pytest

from bench import gpu_kit


def make_archive(folder, name, files):
    site = folder / f"site-{name}"
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    gpu_kit.pack(site, folder / f"{name}.tar.xz")
    return folder / f"{name}.tar.xz"


@pytest.fixture
def parts(tmp_path):
    rng = np.random.default_rng(0)
    files = {"av": {"av/__init__.py": b"x = 1\n", "av.libs/libx.so": rng.bytes(9000)},
             "dali": {"nvidia/dali/__init__.py": b"y = 2\n", "nvidia/dali/lib.so": rng.bytes(30000)}}
    archives = {make_archive(tmp_path, name, content): 0 for name, content in files.items()}
    archives = {path: path.stat().st_size for path in archives}
    out = tmp_path / "repo"
    out.mkdir()
    count = gpu_kit.write_parts(archives, {"av": ["av==1"], "dali": ["dali==2"]}, out, part_bytes=12000)
    return out, count, files


def test_parts_hold_at_most_their_size_and_the_first_archive_comes_whole_first(parts):
    out, count, _ = parts
    assert count == 4  # ~9 + ~30 KB of incompressible data in parts of 12000 bytes
    manifest = json.loads((out / ".gpu-part1" / "manifest.json").read_text())
    for k in range(1, count + 1):
        chunks = [c for c in manifest["chunks"] if c["part"] == k]
        assert sum(c["length"] for c in chunks) <= 12000
    assert {c["archive"] for c in manifest["chunks"] if c["part"] == 1} == {"av.tar.xz", "dali.tar.xz"}
    assert all(c["part"] == 1 for c in manifest["chunks"] if c["archive"] == "av.tar.xz")


def test_each_call_takes_its_part_in_and_complete_archives_unpack(parts, tmp_path, capsys):
    out, count, files = parts
    home = tmp_path / "kit"
    assert gpu_kit.receive(1, out, home) == 0
    assert (home / "site" / "av" / "__init__.py").read_bytes() == b"x = 1\n"  # usable from the first call on
    assert not (home / "site" / "nvidia").exists()
    assert "waiting for the rest of dali.tar.xz" in capsys.readouterr().out
    for k in range(2, count + 1):
        assert gpu_kit.receive(k, out, home) == 0
    for content in files.values():
        for rel, data in content.items():
            assert (home / "site" / rel).read_bytes() == data
    assert not list((home / "chunks").iterdir())  # joined and removed


def test_a_restarted_machine_names_the_lost_parts_and_a_damaged_part_is_refused(parts, tmp_path, capsys):
    out, count, _ = parts
    home = tmp_path / "kit"
    assert gpu_kit.receive(1, out, home) == 0
    shutil.rmtree(home)  # the machine went back between two calls: /tmp is new
    assert gpu_kit.receive(2, out, home) == 3
    assert "parts [1] are not here" in capsys.readouterr().err
    chunk = next(p for p in (out / ".gpu-part3").iterdir() if p.name != "manifest.json")
    chunk.write_bytes(chunk.read_bytes()[:-1])
    assert gpu_kit.receive(3, out, home) == 2
    assert "does not match the manifest" in capsys.readouterr().err
    assert gpu_kit.receive(5, out, home) == 2  # not carried


def test_carry_list_and_what_python_3_12_never_loads(tmp_path):
    groups = gpu_kit.read_carry()
    assert list(groups) == ["av", "dali"] and "nvidia-dali-cuda130==2.4.0" in groups["dali"]
    (tmp_path / "carry.txt").write_text("av av\n")
    with pytest.raises(ValueError, match="carry.txt:1: expected 'group name==version'"):
        gpu_kit.read_carry(tmp_path / "carry.txt")
    drop = [n for n in ("backend_impl.cpython-311-x86_64-linux-gnu.so", "b.cpython-314t-x86_64-linux-gnu.so",
                        "b.cpython-310-x86_64-linux-gnu.so") if gpu_kit.OTHER_ABI.search(n)]
    keep = [n for n in ("backend_impl.cpython-312-x86_64-linux-gnu.so", "_core.abi3.so", "libdali.so")
            if not gpu_kit.OTHER_ABI.search(n)]
    assert len(drop) == 3 and len(keep) == 3


def test_test_videos_without_an_ffmpeg_binary_carry_the_same_frames(tmp_path, monkeypatch):
    import av

    import videogen
    monkeypatch.setattr(videogen.shutil, "which", lambda name: None)  # as on the GPU machine
    assert {"libx264", "libvpx-vp9"} <= videogen.encoders()
    for codec, ext in (("h264", ".mp4"), ("vp9", ".webm")):
        path = videogen.write_video(str(tmp_path / f"v{ext}"), 12, fps=15, codec=codec)
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            rate = container.streams.video[0].average_rate
        assert [videogen.frame_number(f[..., 0]) for f in frames] == list(range(12)) and rate == 15, codec


def test_bench_videos_are_encoded_as_resize_kinetics_encodes():
    from bench import videos
    from preprocess.resize_kinetics import EncodeSettings
    settings = EncodeSettings()
    assert (videos.PRESET, videos.CRF, videos.GOP, videos.BFRAMES) == (settings.preset, settings.crf, settings.gop,
                                                                       settings.bframes)
