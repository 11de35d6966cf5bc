"""slurm/*.sbatch on a real Slurm: the one-machine cluster of slurm/local_cluster.sh, started once for the session.

Preprocessing as a job array gives the manifest of an unsharded run; train.sbatch trains 2 CPU processes to the end;
and its signal path: SIGUSR1 before the time limit reaches every training process with torchrun still alive, and the
job is requeued; `scancel` stops it for good. The signal tests run tests/slurm_signal_worker.py as `train.py` under
the unchanged train.sbatch (train.py's own preemption handling is checked by its own tests).
"""
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocess.make_demo_data import make_demo_dataset

REPO = Path(__file__).resolve().parent.parent
# slow: about 140 s in all, on 2 cores; the default tier checks sharding itself (tests/test_preprocess.py)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged")),
                       reason="slurm-wlm is not installed: apt-get install slurm-wlm munge"),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="the local Slurm cluster needs root (slurmd runs jobs as their users)"),
]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment for sbatch, squeue, ... talking to a cluster of this host alone."""
    state = tmp_path_factory.mktemp("slurm")
    script = REPO / "slurm" / "local_cluster.sh"
    started = subprocess.run(["bash", script, "start", state], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr + log_tails(state)
    yield dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    subprocess.run(["bash", script, "stop", state], timeout=120)


def log_tails(state: Path) -> str:
    return "".join(f"\n--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:])
                   for log in sorted(state.glob("*.log")))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    make_demo_dataset(str(root), {"train": 2, "val": 1})  # 8 train and 4 val videos, raw/ and resized
    return root


def submit(env, *args, cwd=REPO) -> str:
    result = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_until_gone(env, job: str, timeout: float) -> None:
    """Poll squeue until the job (all its array tasks, and every requeued run) has left the queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        if queued.returncode == 0 and not queued.stdout.strip():
            return
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} still in the queue after {timeout} s")


def job_record(env, job: str) -> dict:
    """Fields of `scontrol show job` (kept MinJobAge seconds after the end): JobState, Restarts, ExitCode, ..."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout.splitlines()[0]))


def wait_for_files(paths, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not written within {timeout} s: {[str(p) for p in paths]}"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("dataset, script", [("kinetics", "resize_kinetics.py"), ("ssv2", "ssv2_to_frames.py")])
def test_preprocess_array_gives_the_manifest_of_an_unsharded_run(tmp_path, slurm, demo_root, dataset, script):
    src = tmp_path / "src"
    shutil.copytree(demo_root / "raw" / "train", src)
    (src / "broken.mp4").write_bytes(b"not a video")  # a failed input: its shard still counts, the merge lists it
    options = ["--short-side", "64"]
    plain = subprocess.run([sys.executable, f"preprocess/{script}", src, tmp_path / "plain", "--workers", "1",
                            *options], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1, plain.stdout + plain.stderr  # 1: an input failed

    dst, logs = tmp_path / "sharded", tmp_path / "logs"
    logs.mkdir()
    submitted = subprocess.run(["bash", "slurm/preprocess.sh", "--shards=3", "--cpus-per-task=1", f"--chdir={REPO}",
                                f"--output={logs}/%x-%A_%a.out", dataset, src, dst, *options],
                               cwd=REPO, env=slurm, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    array, merge = submitted.stdout.split()
    wait_until_gone(slurm, merge, timeout=300)
    outputs = "".join(f"\n--- {p.name}\n{p.read_text()}" for p in sorted(logs.iterdir()))
    shard_logs = sorted(p.name for p in logs.iterdir() if p.name.startswith("kcenter-preprocess"))
    assert shard_logs == [f"kcenter-preprocess-{array}_{i}.out" for i in range(3)], outputs
    assert job_record(slurm, merge)["ExitCode"] == "1:0", outputs  # the merge reports the failed input

    assert (dst / "manifest.csv").read_text() == (tmp_path / "plain" / "manifest.csv").read_text()
    assert len((dst / "manifest.csv").read_text().splitlines()) == 1 + 8
    assert (dst / "failures.txt").read_text() == (tmp_path / "plain" / "failures.txt").read_text()
    assert "broken.mp4" in (dst / "failures.txt").read_text()
    assert not list(dst.glob("*.shard-*")), "the merge leaves no shard files"


# ---------------------------------------------------------------------------------------------------- training


def test_train_sbatch_trains_two_cpu_processes_to_the_end(tmp_path, slurm, demo_root):
    import torch

    out = tmp_path / "run"
    overrides = [f"data.root={demo_root}", f"train.out_dir={out}", "data.val_list=", "data.test_list=",
                 "data.py_workers=1", "data.num_threads=1", "model.embed_dim=32", "model.depth=1",
                 "model.num_heads=2", "model.num_tokens=60", "train.epochs=1", "train.batch_size=4",
                 "train.micro_batch_size=2", "train.warmup_epochs=0.5", "train.num_vis_clips=1"]
    env = dict(slurm, CPU_PROCS_PER_NODE="2")
    job = submit(env, "--nodes=1", f"--output={tmp_path}/job.out", "slurm/train.sbatch", "configs/demo.yaml",
                 *overrides)
    wait_until_gone(slurm, job, timeout=300)
    output = (tmp_path / "job.out").read_text()
    record = job_record(slurm, job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0"), output
    assert "1 node(s) x 2 process(es)" in output
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2), output  # 8 videos, batch 4: 2 optimizer steps
    assert len(ckpt["rng"]) == 2  # one random state per process: both trained
    assert not (out / "preempted.json").exists()


# ---------------------------------------------------------------------------------------------------- signals


@pytest.fixture
def signal_checkout(tmp_path):
    """A folder laid out as the repository, with tests/slurm_signal_worker.py as its train.py."""
    checkout = tmp_path / "checkout"
    (checkout / "configs").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "slurm_signal_worker.py", checkout / "train.py")
    (checkout / "config.py").symlink_to(REPO / "config.py")
    (checkout / "configs" / "demo.yaml").symlink_to(REPO / "configs" / "demo.yaml")
    return checkout


def rank_logs(out: Path) -> list[list[str]]:
    return [(out / f"signals-rank{rank}.log").read_text().splitlines() for rank in (0, 1)]


def test_usr1_before_the_time_limit_reaches_each_worker_and_the_job_is_requeued(tmp_path, slurm, signal_checkout):
    # --signal without B: as train.sbatch has it. The job starts with a long limit; once both workers have installed
    # their handlers the limit is cut to whole minutes ending 45-105 s from now, so that the signal (due 100 s before
    # the limit) comes at once or at the next tick of Slurm's coarse timer (up to 30 s), with the workers surely
    # listening however slowly they started, and the limit still after their exit
    out = tmp_path / "out"
    env = dict(slurm, CPU_PROCS_PER_NODE="2")
    submitted = time.monotonic()
    job = submit(env, "--nodes=1", "--time=20", "--signal=USR1@100", f"--output={tmp_path}/job.out",
                 REPO / "slurm" / "train.sbatch", "configs/demo.yaml", f"train.out_dir={out}", cwd=signal_checkout)
    wait_for_files([out / "ready-rank0", out / "ready-rank1"], timeout=240)
    limit = math.ceil((time.monotonic() - submitted + 45) / 60)  # minutes; the job has run no longer than this
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], env=slurm, check=True)
    wait_until_gone(slurm, job, timeout=300)
    output = (tmp_path / "job.out").read_text()
    record = job_record(slurm, job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), output
    assert "preempted.json written: requeueing" in output
    for log in rank_logs(out):
        first, second = log[:log.index("start 1 SIG_IGN")], log[log.index("start 1 SIG_IGN"):]
        # the worker started with SIGUSR1 ignored (inherited from torchrun), got it from Slurm, and exited 75 with
        # torchrun still there to see it; (the slower rank may then get torchrun's SIGTERM as its peer ended)
        assert first[:2] == ["start 0 SIG_IGN", "got SIGUSR1"], log
        assert first[-1] == "exit 75 torchrun", log
        assert second == ["start 1 SIG_IGN", "exit 0 torchrun"], log  # the requeued run
    assert "exitcode  : 75" in output  # torchrun's own report of its workers' status


def test_scancel_signals_each_worker_and_the_job_is_not_requeued(tmp_path, slurm, signal_checkout):
    out = tmp_path / "out"
    env = dict(slurm, CPU_PROCS_PER_NODE="2")
    job = submit(env, "--nodes=1", f"--output={tmp_path}/job.out", REPO / "slurm" / "train.sbatch",
                 "configs/demo.yaml", f"train.out_dir={out}", cwd=signal_checkout)
    wait_for_files([out / "ready-rank0", out / "ready-rank1"], timeout=240)
    subprocess.run(["scancel", job], env=slurm, check=True)
    wait_until_gone(slurm, job, timeout=120)
    output = (tmp_path / "job.out").read_text()
    record = job_record(slurm, job)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), output
    assert "the job was cancelled; not requeued" in output
    assert (out / "preempted.json").exists()  # the workers saved all the same
    for log in rank_logs(out):
        assert log[:2] == ["start 0 SIG_IGN", "got SIGTERM"] and log[-1] == "exit 75 torchrun", log


# ---------------------------------------------------------------------------------------------------- preemption


def test_train_py_stopped_by_usr1_is_requeued_and_ends_as_a_run_never_stopped(tmp_path, slurm, demo_root):
    # the real train.py under train.sbatch: `scancel --signal=USR1` mid-epoch (as Slurm's --signal before the time
    # limit) -> every rank finishes its step, last.pt and preempted.json, the job requeued, the run resumed to its
    # end; and its weights are those of the same job never signalled, bit for bit
    import torch

    overrides = [f"data.root={demo_root}", "data.val_list=", "data.test_list=", "data.py_workers=1",
                 "data.num_threads=1", "model.drop_path_rate=0.0", "train.epochs=2", "train.batch_size=2",
                 "train.micro_batch_size=1", "train.save_every_steps=1", "train.warmup_epochs=0.5"]
    env = dict(slurm, CPU_PROCS_PER_NODE="2")

    def run(name):
        out = tmp_path / name
        job = submit(env, "--nodes=1", f"--output={tmp_path}/{name}.out", "slurm/train.sbatch", "configs/demo.yaml",
                     f"train.out_dir={out}", *overrides)
        return out, job

    straight, job = run("straight")
    wait_until_gone(slurm, job, timeout=400)
    assert job_record(slurm, job)["Restarts"] == "0"

    stopped, job = run("stopped")
    last, deadline = stopped / "last.pt", time.monotonic() + 300
    while not (last.exists() and torch.load(last, map_location="cpu", weights_only=True)["step"] >= 1):
        assert time.monotonic() < deadline, (tmp_path / "stopped.out").read_text()
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    wait_until_gone(slurm, job, timeout=400)
    output = (tmp_path / "stopped.out").read_text()
    record = job_record(slurm, job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), output
    assert "preempted.json written: requeueing" in output
    log = (stopped / "train.log").read_text()
    assert log.count("exiting with status 75, to be requeued") == 1 and log.count("resumed from") == 1, log[-3000:]
    assert not (stopped / "preempted.json").exists()

    a, b = (torch.load(d / "last.pt", map_location="cpu", weights_only=True) for d in (straight, stopped))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 8)  # 8 videos, 2 a step, 2 epochs
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
