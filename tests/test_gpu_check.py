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
    exits = gpu_check.run_check("sampler speed", lambda: sys.exit("--device cuda: no CUDA GPU here"))
    assert exits.status == gpu_check.FAIL and "no CUDA GPU here" in exits.detail  # a script's exit is a FAIL too


def test_steps_run_in_their_guards_and_the_summary_is_written_after_each(tmp_path):
    ctx = gpu_check.Context(out=tmp_path / "out", work=tmp_path / "work")
    seen = []

    def first(ctx):
        return gpu_check.Check("first", gpu_check.PASS, "fine", {"x": 1})

    def second(ctx):  # the first check's figures are already on disk when the second runs
        seen.append(json.loads((ctx.out / "gpu_check.json").read_text())["checks"][0]["figures"])
        raise ZeroDivisionError("in the middle of a check")

    steps = [gpu_check.Step("a", "first", first, ("json",), 1), gpu_check.Step("b", "second", second, (), 1),
             gpu_check.Step("c", "third", first, ("no_such_module_for_gpu_check",), 1)]
    checks = gpu_check.run_steps(steps, ctx, {"python": "3.12"}, [], "python bench/gpu_check.py --call 1")
    assert seen == [{"x": 1}]
    assert [c.status for c in checks] == [gpu_check.PASS, gpu_check.FAIL, gpu_check.FAIL]
    assert "ZeroDivisionError: in the middle of a check" in checks[1].detail
    assert checks[2].detail.startswith("cannot run: no_such_module_for_gpu_check (ModuleNotFoundError")
    summary = (ctx.out / "gpu_check.md").read_text()
    assert summary.strip().endswith("1 of 3 checks passed; failed: second, third")


def test_the_sequence_runs_every_check_once_within_the_time_budget():
    names = [name for call in gpu_check.SEQUENCE.values() for name in call]
    assert sorted(names) == sorted(step.name for step in gpu_check.STEPS)  # each check in exactly one call
    parts = 4  # bench/gpu_kit.py prepare: 191 MiB in parts of 60 MiB
    assert sorted(gpu_check.SEQUENCE) == list(range(1, parts + 1))
    estimate = {k: sum(s.estimate_s for s in gpu_check.STEPS if s.name in call)
                for k, call in gpu_check.SEQUENCE.items()}
    # besides the checks: a cold start (120 s), and per call a transfer and the wait between calls (30 s): 12 minutes
    # in all (bench/gpu/README.md)
    assert 120 + 30 * parts + sum(estimate.values()) <= 12 * 60, estimate
    dali = {s.name for s in gpu_check.STEPS if "nvidia.dali" in s.modules}
    assert dali <= set(gpu_check.SEQUENCE[parts])  # DALI arrives whole with the last part only


def test_arguments_name_the_calls_and_checks(tmp_path):
    assert gpu_check.parse_args(["--call", "2"]).call == 2
    assert gpu_check.parse_args(["--checks", "kernel,sampler"]).checks == ["kernel", "sampler"]
    for bad in (["--call", "9"], ["--checks", "kernel,nvdecc"], ["--call", "1", "--preflight"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_preflight_ends_with_one_line_ready_or_what_is_missing(tmp_path, monkeypatch, capsys):
    ctx = gpu_check.Context(out=tmp_path, work=tmp_path)
    monkeypatch.setattr(gpu_check, "preflight_items", lambda ctx: [("imports", lambda: "every module imports"),
                                                                   ("fused kernel", lambda: "compiles")])
    assert gpu_check.preflight(ctx) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("preflight: ready (13 checks in 4 calls")

    def lacking():
        raise RuntimeError("does not import: nvidia.dali (ModuleNotFoundError: No module named 'nvidia.dali')")

    monkeypatch.setattr(gpu_check, "preflight_items", lambda ctx: [("imports", lacking), ("GPU graphs", lambda: "ok")])
    assert gpu_check.preflight(ctx) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("preflight: NOT READY: imports: RuntimeError: does not import: nvidia.dali")


def test_collected_gpu_tests_are_counted_and_collection_errors_named():
    out = "tests/test_a.py::test_x\n\n10/540 tests collected (530 deselected) in 3.1s\n"
    assert gpu_check.collected_gpu_tests(out) == (10, [])
    broken = "ERROR tests/test_gpu_paths.py - FileNotFoundError: ffmpeg\n3/400 tests collected, 1 error in 2s\n"
    assert gpu_check.collected_gpu_tests(broken) == (3, ["tests/test_gpu_paths.py"])


def test_preflight_compiles_the_kernel_for_sm90_and_counts_its_registers():
    """What the preflight reports of the fused kernel, here with this machine's Triton (in a fresh process: this one
    may have Triton in interpreter mode)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = "import json; from bench import gpu_check; print(json.dumps(gpu_check.compile_kernel_sm90()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert 32 <= info["registers"] <= 255 and info["blocks_per_sm"] >= 1 and info["local_bytes"] == 0


def test_collection_without_pyav_dali_or_ffmpeg_skips_with_reasons(tmp_path):
    """As on the GPU machine before its parts arrive: no PyAV, DALI or ffmpeg-python, no ffmpeg binary. Every test
    module still collects (those that need them are skipped with the reason), and the GPU tests that need only
    torch and Triton are among the collected."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('av', 'ffmpeg') or name.startswith('nvidia.dali'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)')\n"
        "sys.meta_path.insert(0, Block())\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PATH": str(bin_dir)}
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                             "no:cacheprovider", "-rs", "tests"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    count, errors = gpu_check.collected_gpu_tests(result.stdout)
    assert not errors and result.returncode == 0, result.stdout[-3000:]
    assert count >= 3  # test_kcenter_triton's CUDA tests
    assert "needs PyAV" in result.stdout or "needs NVIDIA DALI" in result.stdout


def test_summary_on_recorded_figures():
    env = {"python": "3.11.9", "torch": "2.14.1", "DALI": "2.4.0", "GPUs": ["NVIDIA H200"], "driver": "580.65"}
    checks = [gpu_check.Check("pytest -m gpu", "PASS", "12 passed in 40.1s", {"passed": 12}),
              gpu_check.Check("NVDEC frames = PyAV frames", "FAIL", "mean |diff| 4.20, max 87 (0..255)"),
              gpu_check.Check("sampler speed", "PASS", "| method | time |\n|---|---|\n| triton | 0.004 s |")]
    text = gpu_check.render_summary(env, ["PyAV (av: ModuleNotFoundError)"], checks, "python bench/gpu_check.py")
    assert "- GPUs: NVIDIA H200" in text and "- missing: PyAV" in text
    assert "| pytest -m gpu | PASS | 0 | 12 passed in 40.1s |" in text
    assert "| NVDEC frames = PyAV frames | FAIL | 0 | mean /diff/ 4.20, max 87 (0..255) |" in text
    assert "### sampler speed" in text and "| triton | 0.004 s |" in text
    assert text.strip().endswith("2 of 3 checks passed; failed: NVDEC frames = PyAV frames")


@pytest.mark.slow
def test_the_frame_comparison_on_the_cpu_pipeline(tmp_path, monkeypatch):
    # the CPU pipeline decodes with PyAV: the comparison code must find (nearly) no difference, on the check's own
    # videos (made with PyAV's x264, no ffmpeg binary)
    from bench import videos
    monkeypatch.setattr(videos, "SECONDS", 2)
    work = videos.make_videos(tmp_path / "videos", 2, processes=1)
    check = gpu_check.compare_with_pyav(work, device="cpu")
    assert check.status == gpu_check.PASS and check.figures["max_abs_diff"] < 1.0, check


@pytest.mark.slow
def test_pipeline_benchmark_runs_every_loader(tmp_path, monkeypatch, capsys):
    # a tiny run of bench/bench_pipeline.py (the peers' loaders, the decode floor, DALI): it keeps working
    from bench import bench_pipeline, videos
    monkeypatch.setattr(videos, "SECONDS", 2)
    assert bench_pipeline.main(["--work", str(tmp_path), "--videos", "4", "--batches", "1", "--warmup", "0",
                                "--rounds", "1", "--num-frames", "8", "--sampling-rate", "2", "--crop", "112"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("pyav_dataloader", "torchcodec_dataloader", "torchcodec_tuned", "decord_dataloader", "dali_pipeline",
                 "decode_floor"):
        assert report[name] > 0, name
    assert report["vs_best_peer"] > 0 and report["vs_decode_floor"] > 0


def test_the_train_run_overrides_are_a_valid_config(tmp_path):
    from config import load_config
    cfg = load_config(gpu_check.TRAIN_RUN_CONFIG, gpu_check.train_run_overrides(tmp_path, tmp_path / "run", 3))
    assert cfg.train.epochs == 3 and cfg.model.num_classes == 4 and not cfg.model.pretrained
    assert cfg.data.device == "gpu" and cfg.train.micro_batch_size == 8 and cfg.eval.num_crops == 1


@pytest.mark.slow
def test_the_frame_checks_on_the_cpu_pipeline(tmp_path):
    """The JPEG comparison and the real clips of the torch-only checks, run on the CPU."""
    from bench import videos
    ctx = gpu_check.Context(out=tmp_path, work=tmp_path)
    check = gpu_check.check_nvjpeg(ctx, device="cpu")
    assert check.status == gpu_check.PASS and check.figures["mean_abs_diff"] < 0.5, check
    clips = gpu_check.real_clips(gpu_check.Context(out=tmp_path, work=tmp_path, quick=True), 1, "cpu")
    assert clips.shape == (1, 3, 32, 224, 224) and -1 <= float(clips.min()) and float(clips.max()) <= 1
    assert len(list((tmp_path / "videos").rglob("*.mp4"))) == 8 and videos.SECONDS == 10
