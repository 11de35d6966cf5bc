"""bench/gpu_check.py as far as a machine without a GPU allows: the no-GPU exit, arguments, the environment report,
a check that raises, and the summary on recorded figures. Its GPU checks run where there is one."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check would run")
def test_without_cuda_one_line_and_a_non_zero_exit_nothing_run(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [result.stdout.strip()] and "no CUDA GPU" in result.stdout
    assert not out.exists()


def test_arguments(tmp_path):
    assert gpu_check.parse_args(["--quick", "--out", str(tmp_path)]).quick
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path / "file")])


def test_environment_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(gpu_check.PACKAGES, "NoSuchLib", "no_such_module_for_gpu_check")
    info, missing = gpu_check.environment()
    assert info["torch"] == torch.__version__ and info["NoSuchLib"] is None
    assert any(m.startswith("NoSuchLib (no_such_module_for_gpu_check: ModuleNotFoundError") for m in missing)


def test_a_check_that_raises_is_a_fail_and_the_others_run():
    def broken():
        raise RuntimeError("Critical error in pipeline: NVDEC is not available")

    check = gpu_check.run_check("NVDEC frames = PyAV frames", broken)
    assert check.status == gpu_check.FAIL and "NVDEC is not available" in check.detail


def test_summary_on_recorded_figures():
    env = {"python": "3.11.9", "torch": "2.14.1", "DALI": "2.4.0", "GPUs": ["NVIDIA H200"], "driver": "580.65"}
    checks = [gpu_check.Check("pytest -m gpu", "PASS", "12 passed in 40.1s", {"passed": 12}),
              gpu_check.Check("NVDEC frames = PyAV frames", "FAIL", "mean |diff| 4.20, max 87 (0..255)"),
              gpu_check.Check("sampler speed", "PASS", "| method | time |\n|---|---|\n| triton | 0.004 s |")]
    text = gpu_check.render_summary(env, ["PyAV (av: ModuleNotFoundError)"], checks, "python bench/gpu_check.py")
    assert "- GPUs: NVIDIA H200" in text and "- missing: PyAV" in text
    assert "| pytest -m gpu | PASS | 12 passed in 40.1s |" in text
    assert "| NVDEC frames = PyAV frames | FAIL | mean /diff/ 4.20, max 87 (0..255) |" in text
    assert "### sampler speed" in text and "| triton | 0.004 s |" in text
    assert text.strip().endswith("2 of 3 checks passed; failed: NVDEC frames = PyAV frames")


@pytest.mark.slow
def test_the_frame_comparison_on_the_cpu_pipeline(tmp_path, monkeypatch):
    # the CPU pipeline decodes with PyAV: the comparison code must find (nearly) no difference, on the check's own
    # videos (made with PyAV's x264, no ffmpeg binary)
    from bench import bench_pipeline
    monkeypatch.setattr(bench_pipeline, "SECONDS", 2)
    work = gpu_check.make_videos(tmp_path / "videos", 2)
    check = gpu_check.check_nvdec_against_pyav(work, device="cpu")
    assert check.status == gpu_check.PASS and check.figures["max_abs_diff"] < 1.0, check


@pytest.mark.slow
def test_pipeline_benchmark_runs_every_loader(tmp_path, monkeypatch, capsys):
    # a tiny run of bench/bench_pipeline.py (the peers' loaders, the decode floor, DALI): it keeps working
    from bench import bench_pipeline
    monkeypatch.setattr(bench_pipeline, "SECONDS", 2)
    assert bench_pipeline.main(["--work", str(tmp_path), "--videos", "4", "--batches", "1", "--warmup", "0",
                                "--rounds", "1", "--num-frames", "8", "--sampling-rate", "2", "--crop", "112"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("pyav_dataloader", "torchcodec_dataloader", "torchcodec_tuned", "decord_dataloader", "dali_pipeline",
                 "decode_floor"):
        assert report[name] > 0, name
    assert report["vs_best_peer"] > 0 and report["vs_decode_floor"] > 0
