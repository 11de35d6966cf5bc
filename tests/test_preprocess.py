"""preprocess/: Kinetics -> 256p MP4 and SSv2 WebM -> JPEG frames, on small videos made here with ffmpeg.

Outputs are checked with ffprobe (size, frame count, frame rate) and against the source pixels with PyAV/PIL
(mean absolute difference under a stated tolerance), and the runs for being resumable and atomic.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("ffmpeg", reason="needs ffmpeg-python")
if not shutil.which("ffmpeg"):
    pytest.skip("needs the ffmpeg binary (preprocess/ runs it)", allow_module_level=True)
from PIL import Image

from preprocess import common, resize_kinetics, ssv2_to_frames

REPO = Path(__file__).resolve().parents[1]
MP4_TOLERANCE = 5.0  # mean |difference| (0..255) after x264 crf 23 and a resize (about 3); next frame: 5 to 7
JPEG_TOLERANCE = 6.0  # after VP9 -> JPEG q2 only


# ------------------------------------------------------------------------------------------------- helpers


def make_video(path: Path, size: str, rate: str, seconds: float, *args: str, vf: str = "",
               audio: bool = False) -> Path:
    """A testsrc2 video (moving shapes and a counter) made with ffmpeg; `args` are extra output options."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = (int(n) for n in size.split("x"))
    # testsrc2 rounds its size down to even numbers: draw at that size, then scale to odd sizes
    inputs = ["-f", "lavfi", "-i", f"testsrc2=s={width // 2 * 2}x{height // 2 * 2}:r={rate}:d={seconds}"]
    if audio:
        inputs += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    filters = ",".join(f for f in (f"scale={width}:{height},setsar=1", vf) if f)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *inputs, "-vf", filters, "-pix_fmt", "yuv420p", *args,
                    str(path)], check=True)
    return path


def make_vfr_video(path: Path, *args: str) -> Path:
    """60 frames: 20 at 30 fps, 20 at 15 fps, 20 at 30 fps (2.67 s), timestamps kept as they are."""
    speed = "if(lt(N,20),N/30,if(lt(N,40),2/3+(N-20)/15,2+(N-40)/30))/TB"
    return make_video(path, "160x120", "30", 2, "-fps_mode", "vfr", *args, vf=f"setpts='{speed}'")


def truncate(source: Path, path: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


def probe(path: Path) -> list[dict]:
    """ffprobe's streams, with the video frames counted by decoding."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["streams"]


def video_stream(path: Path) -> dict:
    return next(s for s in probe(path) if s["codec_type"] == "video")


def decode_rgb(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def resized(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


def read_csv_rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


def failure_sources(dst: Path) -> set[str]:
    return {line.split("\t")[0] for line in (dst / "failures.txt").read_text().splitlines()}


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def temporaries(root: Path) -> list[Path]:
    # os.walk, not rglob: a running conversion may rename a temporary folder while it is listed (rglob raised)
    return [Path(folder) / name for folder, dirs, files in os.walk(root) for name in dirs + files if ".tmp-" in name]


# ----------------------------------------------------------------------------------------------- Kinetics

# name: (size, rate, seconds, extra ffmpeg options, expected output size)
KINETICS_GOOD = {
    "landscape/a.mp4": ("320x240", "30", 2, (), (342, 256)),
    "portrait.mov": ("180x320", "25", 1, (), (256, 456)),
    "odd size.mkv": ("161x97", "24", 1, ("-c:v", "ffv1", "-pix_fmt", "yuv444p"), (424, 256)),
    "small.avi": ("64x48", "15", 1, ("-c:v", "mpeg4"), (342, 256)),
    "vp9.webm": ("200x150", "12", 2, ("-c:v", "libvpx-vp9", "-b:v", "200k"), (342, 256)),
    "anamorphic.mp4": ("320x240", "30", 1, ("-aspect", "16:9"), (456, 256)),  # non-square pixels
}


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """SRC with good and bad videos, converted once (2 worker processes); returns (src, dst, exit status)."""
    src, dst = tmp_path_factory.mktemp("kinetics_src"), tmp_path_factory.mktemp("kinetics") / "dst"
    for name, (size, rate, seconds, args, _) in KINETICS_GOOD.items():
        make_video(src / name, size, rate, seconds, *args, audio=name.endswith(".mp4"))
    make_vfr_video(src / "vfr.mp4")
    (src / "bad").mkdir()
    (src / "bad/zero.mp4").touch()
    (src / "bad/garbage.avi").write_bytes(os.urandom(5000))
    indexed_first = make_video(src / "tmp/whole.mp4", "320x240", "30", 3, "-movflags", "+faststart")
    truncate(indexed_first, src / "bad/truncated.mp4")
    truncate(make_video(src / "tmp/whole.webm", "160x120", "30", 3, "-c:v", "libvpx-vp9"),
             src / "bad/truncated_vp9.webm")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(src / "bad/audio_only.mp4")],
                   check=True)
    for name in ("tmp/whole.mp4", "tmp/whole.webm"):
        (src / name).unlink()
    make_video(src / "dup/x.mkv", "64x48", "10", 1)
    make_video(src / "dup/x.webm", "64x48", "10", 1, "-c:v", "libvpx-vp9")  # same output as dup/x.mkv
    (src / "notes.txt").write_text("not a video")
    status = resize_kinetics.main([str(src), str(dst), "--workers", "2"])
    return src, dst, status


KINETICS_BAD = {"bad/zero.mp4", "bad/garbage.avi", "bad/truncated.mp4", "bad/truncated_vp9.webm", "bad/audio_only.mp4",
                "dup/x.webm"}


def test_kinetics_failures_are_listed_and_leave_no_output(kinetics):
    src, dst, status = kinetics
    assert status == 1
    assert failure_sources(dst) == {str(src / name) for name in KINETICS_BAD}
    lines = (dst / "failures.txt").read_text()
    assert "truncated" in lines and "no video stream" in lines and "dup/x.mp4 is also the output of dup/x.mkv" in lines
    for name in KINETICS_BAD - {"dup/x.webm"}:
        assert not (dst / resize_kinetics.output_name(name)).exists()
    assert (dst / "dup/x.mp4").exists()  # the first of the two sources
    assert temporaries(dst) == []


@pytest.mark.parametrize("name", sorted(KINETICS_GOOD))
def test_kinetics_output_format(kinetics, name):
    src, dst, _ = kinetics
    size, rate, seconds, _, (width, height) = KINETICS_GOOD[name]
    streams = probe(dst / resize_kinetics.output_name(name))
    assert [s["codec_type"] for s in streams] == ["video"]  # audio dropped by default
    out = streams[0]
    assert (out["codec_name"], out["pix_fmt"]) == ("h264", "yuv420p")
    assert (out["width"], out["height"]) == (width, height)
    assert min(width, height) == 256 and width % 2 == 0 and height % 2 == 0
    assert out.get("sample_aspect_ratio", "1:1") in ("1:1", "N/A")
    assert Fraction(out["r_frame_rate"]) == Fraction(out["avg_frame_rate"]) == Fraction(rate)  # constant rate
    assert int(out["nb_read_frames"]) == int(video_stream(src / name)["nb_read_frames"])


def test_kinetics_keyframe_interval(kinetics):
    _, dst, _ = kinetics
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts,flags",
                          "-of", "csv=p=0", str(dst / "landscape/a.mp4")], check=True, capture_output=True,
                         text=True).stdout
    packets = sorted((int(pts), "K" in flags) for pts, flags in (line.split(",")[:2] for line in out.split()))
    keyframes = [i for i, (_, key) in enumerate(packets) if key]  # frame indices, presentation order
    assert keyframes[0] == 0 and len(keyframes) >= 2
    assert max(np.diff(keyframes + [len(packets)])) <= resize_kinetics.DEFAULT_GOP


def test_kinetics_rejects_bad_arguments(tmp_path, capsys):
    for args in (["--short-side", "255"], ["--crf", "60"], ["--workers", "0"], ["--fps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            resize_kinetics.main([str(tmp_path), str(tmp_path / "dst"), *args])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        resize_kinetics.main([str(tmp_path / "missing"), str(tmp_path / "dst")])
    assert "missing" in capsys.readouterr().err


def test_kinetics_variable_rate_becomes_constant(kinetics):
    src, dst, _ = kinetics
    out = video_stream(dst / "vfr.mp4")
    # 60 frames over 2.67 s: the average rate, 22.5 fps, constant; the frame count is kept
    assert Fraction(out["r_frame_rate"]) == Fraction(out["avg_frame_rate"]) == Fraction(45, 2)
    assert abs(int(out["nb_read_frames"]) - 60) <= 1
    with av.open(str(dst / "vfr.mp4")) as container:
        pts = [frame.pts for frame in container.decode(video=0)]
    assert len(set(np.diff(pts))) == 1


def test_kinetics_pixels_match_source(kinetics):
    src, dst, _ = kinetics
    for name in ("landscape/a.mp4", "portrait.mov", "anamorphic.mp4"):
        source, output = decode_rgb(src / name), decode_rgb(dst / resize_kinetics.output_name(name))
        height, width = output[0].shape[:2]
        source = [resized(frame, width, height) for frame in source]
        for k in (0, len(source) // 2, len(source) - 1):
            assert mean_abs_diff(output[k], source[k]) < MP4_TOLERANCE, (name, k)
        k = len(source) // 2  # frame k is closer to source frame k than to its neighbours: no frame shifted
        assert mean_abs_diff(output[k], source[k]) < min(mean_abs_diff(output[k], source[k + d]) for d in (-1, 1))


def test_kinetics_manifest_matches_outputs(kinetics):
    _, dst, _ = kinetics
    rows = read_csv_rows(dst / "manifest.csv")
    assert rows[0] == ["path", "frames", "fps", "width", "height"]
    paths = [row[0] for row in rows[1:]]
    assert paths == sorted(paths)
    assert set(paths) == {resize_kinetics.output_name(n) for n in KINETICS_GOOD} | {"vfr.mp4", "dup/x.mp4"}
    for path, frames, fps, width, height in rows[1:]:
        out = video_stream(dst / path)
        assert int(frames) == int(out["nb_read_frames"])
        assert float(fps) == pytest.approx(float(Fraction(out["r_frame_rate"])), abs=1e-5)
        assert (int(width), int(height)) == (out["width"], out["height"])


def test_kinetics_rerun_does_no_work(kinetics, monkeypatch, capsys):
    src, dst, _ = kinetics
    outputs = sorted(p for p in dst.rglob("*.mp4"))
    before = {p: p.stat().st_mtime_ns for p in outputs}
    manifest = (dst / "manifest.csv").read_text()
    converted = []
    convert = resize_kinetics.Mp4Resizer.convert
    monkeypatch.setattr(resize_kinetics.Mp4Resizer, "convert",
                        lambda self, task: converted.append(task.source) or convert(self, task))
    assert resize_kinetics.main([str(src), str(dst), "--workers", "1"]) == 1
    assert set(converted) == KINETICS_BAD - {"dup/x.webm"}  # only the failed inputs are tried again
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert (dst / "manifest.csv").read_text() == manifest
    assert "0 done, 8 skipped, 6 failed" in capsys.readouterr().out


def test_rerun_with_other_settings_is_refused(kinetics, capsys):
    src, dst, _ = kinetics
    before = sorted(p.name for p in dst.iterdir())
    assert resize_kinetics.main([str(src), str(dst), "--crf", "18", "--gop", "16"]) == 2
    err = capsys.readouterr().err
    assert "crf 23 -> 18" in err and "gop 32 -> 16" in err and str(dst) in err
    assert sorted(p.name for p in dst.iterdir()) == before  # nothing written, nothing removed
    assert json.loads((dst / "settings.json").read_text())["crf"] == 23


def test_kinetics_fps_and_audio_options_from_the_command_line(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_video(src / "a.mp4", "160x120", "30", 2, audio=True)
    proc = subprocess.run([sys.executable, "preprocess/resize_kinetics.py", str(src), str(dst), "--fps", "15",
                           "--keep-audio", "--short-side", "128"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 done, 0 skipped, 0 failed" in proc.stdout
    assert not (dst / "failures.txt").exists()
    video, audio = probe(dst / "a.mp4")
    assert Fraction(video["r_frame_rate"]) == Fraction(video["avg_frame_rate"]) == 15
    assert int(video["nb_read_frames"]) == 30
    assert (video["width"], video["height"]) == (170, 128)
    assert audio["codec_name"] == "aac"
    assert read_csv_rows(dst / "manifest.csv")[1] == ["a.mp4", "30", "15.0", "170", "128"]


def test_kinetics_manifest_keeps_old_outputs_and_drops_deleted_ones(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        make_video(src / name, "64x48", "10", 1)
    assert resize_kinetics.main([str(src), str(dst), "--workers", "1", "--short-side", "32"]) == 0
    (src / "a.mp4").unlink()  # its output stays, and so does its row
    (src / "b.mp4").unlink()
    (dst / "b.mp4").unlink()  # gone: its row goes
    make_video(src / "d.mp4", "64x48", "10", 1)
    assert resize_kinetics.main([str(src), str(dst), "--workers", "1", "--short-side", "32"]) == 0
    assert [row[0] for row in read_csv_rows(dst / "manifest.csv")[1:]] == ["a.mp4", "c.mp4", "d.mp4"]


# ---------------------------------------------------------------------------------------------------- SSv2


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    """SRC with WebM videos, good and bad, extracted once (2 worker processes)."""
    src, dst = tmp_path_factory.mktemp("ssv2_src"), tmp_path_factory.mktemp("ssv2") / "dst"
    vp9 = ("-c:v", "libvpx-vp9", "-b:v", "300k")
    make_video(src / "1.webm", "160x120", "12", 2, *vp9, audio=True)
    make_video(src / "22.webm", "97x61", "12", 1, *vp9)
    make_vfr_video(src / "333.webm", *vp9)
    (src / "zero.webm").touch()
    truncate(make_video(src / "whole.webm", "160x120", "12", 3, *vp9), src / "truncated.webm")
    (src / "whole.webm").unlink()
    status = ssv2_to_frames.main([str(src), str(dst), "--workers", "2"])
    return src, dst, status


def test_ssv2_one_jpeg_per_decoded_frame(ssv2):
    src, dst, status = ssv2
    assert status == 1
    assert failure_sources(dst) == {str(src / "zero.webm"), str(src / "truncated.webm")}
    assert sorted(p.name for p in dst.iterdir()) == ["1", "22", "333", "failures.txt", "manifest.csv", "settings.json"]
    # 333 has a variable rate: 60 frames, none dropped or repeated
    for video_id, size, frames in (("1", (160, 120), 24), ("22", (97, 61), 12), ("333", (160, 120), 60)):
        assert int(video_stream(src / f"{video_id}.webm")["nb_read_frames"]) == frames
        names = sorted(p.name for p in (dst / video_id).iterdir())
        assert names == [f"{video_id}_{i:06d}.jpeg" for i in range(frames)]
        with Image.open(dst / video_id / names[-1]) as last:
            assert last.size == size


def test_ssv2_pixels_match_source(ssv2):
    src, dst, _ = ssv2
    source = decode_rgb(src / "1.webm")
    for k in (0, len(source) // 2, len(source) - 1):
        jpeg = np.asarray(Image.open(dst / "1" / f"1_{k:06d}.jpeg").convert("RGB"))
        assert mean_abs_diff(jpeg, source[k]) < JPEG_TOLERANCE, k
    assert mean_abs_diff(np.asarray(Image.open(dst / "1/1_000000.jpeg").convert("RGB")), source[-1]) > 20


def test_ssv2_manifest(ssv2):
    _, dst, _ = ssv2
    assert read_csv_rows(dst / "manifest.csv") == [
        ["path", "frames", "fps", "width", "height"],
        ["1", "24", "12.0", "160", "120"],
        ["22", "12", "12.0", "97", "61"],
        ["333", "60", "22.5", "160", "120"],  # variable rate: frames / duration
    ]


def test_ssv2_rerun_does_no_work_and_clears_a_killed_runs_folder(ssv2, monkeypatch, capsys):
    src, dst, _ = ssv2
    before = {p: p.stat().st_mtime_ns for p in dst.rglob("*.jpeg")}
    stale = dst / "1.tmp-999999"  # what a run killed in the middle of video 1 leaves
    stale.mkdir()
    (stale / "1_000000.jpeg").write_bytes(b"partial")
    converted = []
    convert = ssv2_to_frames.FrameExtractor.convert
    monkeypatch.setattr(ssv2_to_frames.FrameExtractor, "convert",
                        lambda self, task: converted.append(task.source) or convert(self, task))
    assert ssv2_to_frames.main([str(src), str(dst), "--workers", "1"]) == 1
    assert sorted(converted) == ["truncated.webm", "zero.webm"]
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.jpeg")} == before
    assert not stale.exists()
    assert "0 done, 3 skipped" in capsys.readouterr().out


def test_ssv2_short_side_and_quality(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_video(src / "7.webm", "160x120", "12", 1, "-c:v", "libvpx-vp9")
    proc = subprocess.run([sys.executable, "preprocess/ssv2_to_frames.py", str(src), str(dst), "--short-side", "64",
                           "--quality", "10", "--workers", "1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with Image.open(dst / "7/7_000000.jpeg") as first:
        assert first.size == (86, 64)
    assert read_csv_rows(dst / "manifest.csv")[1] == ["7", "12", "12.0", "86", "64"]


# ------------------------------------------------------------------------------------------ killed midway


@pytest.mark.parametrize("script", ["resize_kinetics", "ssv2_to_frames"])
def test_killed_run_resumes_to_a_complete_output(tmp_path, script):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(6):
        make_video(src / f"{i}.mp4", "320x240", "30", 2, "-preset", "ultrafast")
    cmd = [sys.executable, f"preprocess/{script}.py", str(src), str(dst), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # kill once one video is complete (and not yet in the manifest) and the next one is half written
        while not (temporaries(dst) and any(p for p in dst.glob("*") if ".tmp-" not in p.name
                                            and p.name != "failures.txt")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script, its workers and their ffmpeg
        proc.wait()
        while process_group_alive(proc.pid):  # ffmpeg children die a moment later
            time.sleep(0.01)
    main = resize_kinetics.main if script == "resize_kinetics" else ssv2_to_frames.main
    expected = [f"{i}.mp4" if script == "resize_kinetics" else str(i) for i in range(6)]
    finals = sorted(p.name for p in dst.iterdir() if p.name in expected)
    for name in finals:  # whatever has its final name is complete
        count = (int(video_stream(dst / name)["nb_read_frames"]) if script == "resize_kinetics"
                 else len(list((dst / name).iterdir())))
        assert count == 60
    assert main([str(src), str(dst), "--workers", "2"]) == 0
    assert temporaries(dst) == []
    rows = read_csv_rows(dst / "manifest.csv")[1:]
    assert [row[0] for row in rows] == expected and all(row[1] == "60" for row in rows)


# --------------------------------------------------------------------------------------------------- common


class KilledByOneInput:
    """A converter whose worker process is killed (like the out-of-memory killer does) by the input 'oom'."""

    def __init__(self, src: Path, dst: Path):
        self.src, self.dst = src, dst

    def is_complete(self, output: Path) -> bool:
        return output.exists()

    def convert(self, task: common.Task) -> common.ManifestRow:
        if task.source == "oom":
            os.kill(os.getpid(), signal.SIGKILL)
        (self.dst / task.output).write_text(task.source)
        return self.describe(task)

    def describe(self, task: common.Task) -> common.ManifestRow:
        return common.ManifestRow(task.output, 1, 1.0, 1, 1)


def test_a_killed_worker_fails_its_own_input_only(tmp_path):
    names = ["a", "b", "oom", "c", "d", "e", "f", "g"]
    tasks = [common.Task(name, name) for name in names]
    status = []
    run = threading.Thread(target=lambda: status.append(
        common.run_tasks(KilledByOneInput(tmp_path, tmp_path / "out"), tasks, tmp_path / "out", 2, "test", {})))
    run.start()
    run.join(timeout=120)
    assert not run.is_alive(), "the run waits forever for the killed worker"
    assert status == [1]
    failures = (tmp_path / "out" / "failures.txt").read_text().splitlines()
    assert len(failures) == 1 and failures[0].startswith(str(tmp_path / "oom")) and "died" in failures[0]
    assert sorted(common.read_manifest(tmp_path / "out" / "manifest.csv")) == sorted(set(names) - {"oom"})


def test_find_videos_skips_temporaries_other_files_and_the_output_folder(tmp_path):
    for name in ("a.mp4", "b/c.WEBM", "b/d.mkv.tmp-12", "e.txt", "out/f.mp4", "b/g.mp4.tmp-3"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    assert common.find_videos(tmp_path, exclude=tmp_path / "out") == ["a.mp4", "b/c.WEBM"]
    assert common.find_videos(tmp_path, recursive=False) == ["a.mp4"]


def test_manifest_round_trip_is_sorted_and_atomic(tmp_path):
    rows = [common.ManifestRow("b/x.mp4", 300, 30000 / 1001, 342, 256), common.ManifestRow("a.mp4", 10, 12.0, 2, 4)]
    path = tmp_path / "manifest.csv"
    common.write_manifest(path, rows)
    assert path.read_text().splitlines() == ["path,frames,fps,width,height", "a.mp4,10,12.0,2,4",
                                             "b/x.mp4,300,29.97003,342,256"]
    assert set(common.read_manifest(path)) == {"a.mp4", "b/x.mp4"}
    assert os.listdir(tmp_path) == ["manifest.csv"]
    (tmp_path / "bad.csv").write_text("file,frames\n")
    with pytest.raises(ValueError, match="bad.csv"):
        common.read_manifest(tmp_path / "bad.csv")


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("script,merge", [("resize_kinetics", "--merge-only"), ("ssv2_to_frames", "--merge-only"),
                                          ("resize_kinetics", "a run without --shard")])
def test_two_shards_at_once_then_a_merge_equal_one_unsharded_run(tmp_path, kinetics, ssv2, script, merge):
    src, reference, _ = kinetics if script == "resize_kinetics" else ssv2
    dst = tmp_path / "dst"
    command = [sys.executable, str(REPO / "preprocess" / f"{script}.py"), str(src), str(dst), "--workers", "1"]
    shards = [subprocess.Popen([*command, "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for i in range(2)]  # at the same time, into one DST
    outputs = [proc.communicate(timeout=600)[0] for proc in shards]
    assert [proc.returncode for proc in shards] != [0, 0] or not (reference / "failures.txt").exists(), outputs
    manifests = [common.read_manifest(dst / f"manifest.shard-{i}-of-2.csv") for i in range(2)]
    assert manifests[0] and manifests[1] and not set(manifests[0]) & set(manifests[1])  # each its own outputs
    assert not (dst / "manifest.csv").exists()
    extra = ["--merge-only"] if merge == "--merge-only" else []  # the plain run skips what the shards converted
    merged = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600)
    assert merged.returncode == (1 if (reference / "failures.txt").exists() else 0), merged.stdout + merged.stderr
    if not extra:
        assert " 0 done, " in merged.stdout, merged.stdout
    ours, theirs = tree_files(dst), tree_files(reference)
    failures = [set(files.pop("failures.txt", b"").decode().splitlines()) for files in (ours, theirs)]
    assert failures[0] == failures[1]
    assert ours.keys() == theirs.keys()  # no shard files left, every output there
    differ = [name for name in ours if ours[name] != theirs[name]]
    assert not differ, differ[:5]  # outputs, manifest and settings byte for byte


def test_shard_arguments_are_checked(tmp_path, capsys):
    for bad in (["--shard", "2/2"], ["--shard", "1"], ["--shard", "0/2", "--merge-only"]):
        with pytest.raises(SystemExit) as exit_:
            resize_kinetics.main([str(tmp_path), str(tmp_path / "dst"), *bad])
        assert exit_.value.code == 2
    assert "--shard must be I/N with 0 <= I < N" in capsys.readouterr().err
