"""predict.py on real encoded videos (H.264 and VP9 of several sizes and rates, a folder, a broken file) with a
checkpoint trained here; its predictions on the test videos equal eval.py's."""
import csv
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")

import videogen
from preprocess.make_demo_data import CLASSES
from test_train import demo_root, run, write_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):  # noqa: F811
    tmp = tmp_path_factory.mktemp("predict")
    config = write_config(tmp, demo_root, tmp / "run", train={"save_every_steps": 0})
    result = run(["train.py", "--config", config], timeout=900)  # also tests last.pt on the val list
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, tmp / "run"


def test_predict_prints_top5_writes_json_and_pictures_and_names_a_broken_file(trained, demo_root):  # noqa: F811
    tmp, out = trained
    videos = tmp / "videos"
    videogen.write_video(str(videos / "wide_h264.mp4"), 40, width=320, height=180, fps=25)
    videogen.write_video(str(videos / "folder" / "small_vp9.webm"), 30, width=160, height=120, codec="vp9")
    videogen.write_video(str(videos / "folder" / "tall.mkv"), 24, width=96, height=160, fps=12)
    (videos / "broken.mp4").write_bytes(os.urandom(4000))
    command = [sys.executable, "predict.py", "--checkpoint", str(out / "last.pt"), str(videos / "wide_h264.mp4"),
               str(videos / "folder"), str(videos / "broken.mp4"), "--json", str(tmp / "p.json"),
               "--save-patches", str(tmp / "patches")]
    result = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]  # the broken file, after the others
    assert "broken.mp4" in result.stderr and "cannot be read" in result.stderr
    report = json.loads((tmp / "p.json").read_text())
    assert sorted(os.path.basename(p) for p in report["predictions"]) == ["small_vp9.webm", "tall.mkv",
                                                                           "wide_h264.mp4"]
    assert list(report["failed"]) == [str(videos / "broken.mp4")] and report["ensemble"] == "sum_logits"
    for rows in report["predictions"].values():  # 4 classes: all of them, most probable first
        assert sorted(r["class"] for r in rows) == sorted(CLASSES)
        probabilities = [r["probability"] for r in rows]
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-4
        assert rows[0]["class"] in result.stdout
    assert sorted(os.listdir(tmp / "patches")) == ["small_vp9.png", "tall.png", "wide_h264.png"]
    assert not [p for p in os.listdir(videos) if p not in ("wide_h264.mp4", "folder", "broken.mp4")]  # nothing added


def test_predict_agrees_with_eval_on_the_test_videos(trained, demo_root):  # noqa: F811
    tmp, out = trained
    with open(out / "predictions.csv") as f:  # eval.py's multi-view test of last.pt, run by train.py
        expected = {row["path"]: row["prediction"] for row in csv.DictReader(f)}
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(out / "last.pt"),
                             *expected, "--json", str(tmp / "val.json")], cwd=os.path.dirname(os.path.dirname(__file__)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = {path: rows[0]["class"] for path, rows in json.loads((tmp / "val.json").read_text())
                 ["predictions"].items()}
    assert predicted == expected
