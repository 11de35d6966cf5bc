"""preprocess/ takes any path a user types: SRC `.`, relative and absolute folders, symlinks, and file names that
ffmpeg would read as something else if handed over as they are (a leading '-' as an option, `a:b` as a protocol,
'%' in an image2 pattern), or that a shell would split (spaces, quotes), or that are not ASCII.

Both scripts run as a user runs them (a subprocess, from the folder the layout says), on tiny videos made here.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

av = pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("ffmpeg", reason="needs ffmpeg-python")
if not shutil.which("ffmpeg"):
    pytest.skip("needs the ffmpeg binary (preprocess/ runs it)", allow_module_level=True)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FRAMES = 6  # per source video: 1 s at 6 fps, 64x48
# Stems of the source videos, few (each is converted in every layout): a real Kinetics-400 name (YouTube ids may
# begin with '-'), and one with what else ffmpeg or a shell could misread: ':' (`a:` reads as a protocol), '%' (a
# field in an image2 pattern), spaces, quotes, letters that are not ASCII.
STEMS = ("--nQbRBEz2s_000104_000114", "a:b it's \"café\" 日本 50%")
KINETICS_SOURCES = {f"{stem}.mp4": f"{stem}.mp4" for stem in STEMS} | {
    "-dir/-y.mkv": "-dir/-y.mp4",  # recursive: a folder beginning with '-', another container
}
SSV2_SOURCES = {f"{stem}.webm": stem for stem in STEMS}  # not recursive: <id>.webm -> <id>/
ENCODERS = {".mp4": ("-c:v", "libx264", "-preset", "ultrafast"), ".mkv": ("-c:v", "ffv1"),
            ".webm": ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8")}
# How the user runs a script: (folder to run it from, SRC, DST), relative to the test's folder, which holds src/
# (the videos), dst 100%/ (made beforehand: a user may run from there) and the symlinks "src link" -> src and
# "out link" -> out. DST's name has a '%', which an image2 pattern would read as a field.
LAYOUTS = {
    "cd SRC; SRC . DST relative": ("src", ".", "../dst 100%"),
    "cd DST; SRC relative DST .": ("dst 100%", "../src", "."),  # output names, too, begin with '-'
    "relative SRC through a symlink, absolute DST through a symlink": (".", "src link", "{root}/out link/dst 100%"),
}


def make_video(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=64x48:r=6:d=1",
                    "-pix_fmt", "yuv420p", *ENCODERS[path.suffix], str(path.absolute())], check=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Every source video of both scripts, made once: kinetics/ and ssv2/."""
    root = tmp_path_factory.mktemp("sources")
    for name in KINETICS_SOURCES:
        make_video(root / "kinetics" / name)
    for name in SSV2_SOURCES:
        make_video(root / "ssv2" / name)
    return root


def layout(tmp_path: Path, videos: Path, name: str) -> tuple[Path, str, str, Path]:
    """A copy of `videos` as tmp_path/src, the folders and symlinks of LAYOUTS; (cwd, SRC, DST, DST folder)."""
    shutil.copytree(videos, tmp_path / "src")
    (tmp_path / "dst 100%").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "src link").symlink_to("src")
    (tmp_path / "out link").symlink_to("out")
    cwd, src, dst = LAYOUTS[name]
    dst = dst.format(root=tmp_path)
    return tmp_path / cwd, src, dst, tmp_path / cwd / dst


def run_script(script: str, cwd: Path, src: str, dst: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "preprocess" / f"{script}.py"), src, dst, "--workers", "3",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def manifest_rows(dst: Path) -> dict[str, dict[str, str]]:
    with open(dst / "manifest.csv", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def decoded_frames(path: Path) -> int:
    with av.open(str(path.absolute())) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_resize_kinetics_any_path(tmp_path, sources, layout_name):
    cwd, src, dst, out = layout(tmp_path, sources / "kinetics", layout_name)
    proc = run_script("resize_kinetics", cwd, src, dst, "--short-side", "32", "--preset", "ultrafast")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(KINETICS_SOURCES)} done, 0 skipped, 0 failed" in proc.stdout
    assert not (out / "failures.txt").exists()
    rows = manifest_rows(out)
    assert sorted(rows) == sorted(KINETICS_SOURCES.values())  # same names as the sources, '-' and all
    for name in KINETICS_SOURCES.values():
        assert decoded_frames(out / name) == int(rows[name]["frames"]) == FRAMES, name
        assert (rows[name]["width"], rows[name]["height"]) == ("42", "32")


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_ssv2_to_frames_any_path(tmp_path, sources, layout_name):
    cwd, src, dst, out = layout(tmp_path, sources / "ssv2", layout_name)
    proc = run_script("ssv2_to_frames", cwd, src, dst, "--short-side", "32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(SSV2_SOURCES)} done, 0 skipped, 0 failed" in proc.stdout
    rows = manifest_rows(out)
    assert sorted(rows) == sorted(SSV2_SOURCES.values())
    for video_id in SSV2_SOURCES.values():
        names = sorted(p.name for p in (out / video_id).iterdir())
        assert names == [f"{video_id}_{i:06d}.jpeg" for i in range(FRAMES)] and rows[video_id]["frames"] == "6"
        for name in (names[0], names[-1]):
            with Image.open(out / video_id / name) as frame:
                frame.load()  # decodes
                assert frame.size == (42, 32)


def test_failure_list_names_the_source_as_the_user_typed_it(tmp_path, sources):
    """SRC `.`: failures.txt names `-bad.mp4` as today (SRC/<relative path>), with the decoder's error, not
    ffprobe's complaint about an unknown option."""
    cwd, src, dst, out = layout(tmp_path, sources / "kinetics", "cd SRC; SRC . DST relative")
    shutil.rmtree(cwd / "-dir")
    (cwd / f"{STEMS[1]}.mp4").unlink()
    (cwd / "-bad.mp4").write_bytes(b"not a video" * 100)
    proc = run_script("resize_kinetics", cwd, src, dst, "--short-side", "32")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = (out / "failures.txt").read_text().splitlines()
    source, error = line.split("\t")
    assert source == "-bad.mp4" and "option" not in error and "bad.mp4" in error, line
    assert list(manifest_rows(out)) == [f"{STEMS[0]}.mp4"]
