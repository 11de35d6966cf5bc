"""The README's reproducibility promises, checked with the user's own commands at the demo's full size.

256 training videos, batch 16 (16 optimizer steps an epoch), 3 epochs (2 with two processes), a checkpoint every 5
steps (mid-epoch), drop path on (it draws random numbers whose state must resume), the machine's threads (the
failure this guards against only showed with more than one intra-op thread). A run killed with SIGKILL twice,
mid-epoch, and restarted each time must end with the same weights and optimizer state, bit for bit, as a run never
stopped; so must two processes (torchrun, gloo). Testing one checkpoint twice, with other batch sizes and process
counts, gives the same predictions.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from preprocess.make_demo_data import make_demo_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# the demo's full size, as configs/demo.yaml has it, over fewer epochs and with mid-epoch checkpoints
DEMO_RUN = ["train.epochs=3", "train.save_every_steps=5", "train.val_every_epochs=1", "model.drop_path_rate=0.1",
            "data.test_list="]
# 2 processes x 8 = the demo's batch of 16; 2 epochs and one DALI worker each, so that 2 x 2 processes fit 2 cores
TWO_PROCESSES = ["train.micro_batch_size=8", "train.epochs=2", "data.py_workers=1", "data.num_threads=1"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo_full") / "data")
    make_demo_dataset(root)  # 256 train, 64 val videos
    return root


@pytest.fixture(scope="module")
def small_demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo_small") / "data")
    make_demo_dataset(root, {"train": 3, "val": 1})  # 12 train, 4 val videos
    return root


def command(out_dir, demo_root, processes, *extra):
    script = ["train.py"] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={processes}", "train.py"]
    return [sys.executable, *script, "--config", "configs/demo.yaml", f"data.root={demo_root}",
            f"train.out_dir={out_dir}", *DEMO_RUN, *extra]


def environment():
    # the machine's intra-op threads (torchrun would set 1 per process): at least 2, where the order of a
    # parallel reduction can change from run to run
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(2, os.cpu_count() or 2)))


def run_to_end(args):
    result = subprocess.run(args, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def saved_step(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def process_tree(pid):
    """pid and all its descendants (from /proc): torchrun starts its workers in sessions of their own, so killing
    torchrun's process group would leave them running."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def run_and_kill(args, last, kill_after_step):
    """Start the command and SIGKILL it with every process it started (a node lost), once last.pt holds a step
    >= kill_after_step."""
    proc = subprocess.Popen(args, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and saved_step(last) < kill_after_step:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    tree = process_tree(proc.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    while any(alive(pid) for pid in tree):
        time.sleep(0.05)
    return saved_step(last)


def assert_same_training_state(a_path, b_path, epochs, steps_per_epoch=16):
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (epochs, steps_per_epoch * epochs)
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} of {len(a['model'])} weight tensors differ: {differ[:5]}"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("processes", [1, 2])
def test_killed_twice_and_restarted_equals_a_run_never_stopped(tmp_path, demo_root, processes):
    extra = TWO_PROCESSES if processes == 2 else []
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(straight, demo_root, processes, *extra))

    args = command(killed, demo_root, processes, *extra)
    last = killed / "last.pt"
    resumed_from = [run_and_kill(args, last, 7)]  # mid epoch 0 (checkpoints at steps 5, 10, 15, 16, 20, ...)
    resumed_from.append(run_and_kill(args, last, 21))  # mid epoch 1, after a validation
    assert 0 < resumed_from[0] < 16 and 16 < resumed_from[1] < 32, resumed_from
    result = run_to_end(args)
    log = (killed / "train.log").read_text()
    assert log.count("resumed from") == 2, log[-2000:]
    assert_same_training_state(straight / "last.pt", last, epochs=2 if processes == 2 else 3)
    # the validation of the last epoch saw the same model and the same K-center starts
    assert log.splitlines()[-1].split("validation:")[-1] == \
        (straight / "train.log").read_text().splitlines()[-1].split("validation:")[-1], result.stdout[-500:]


def test_three_processes_killed_mid_epoch_and_resumed_equal_a_run_never_stopped(tmp_path, small_demo_root):
    # With 3 processes the allreduce sums each element of a gradient bucket in an order that depends on its offset
    # there (with 2, a + b == b + a): the resumed run's first step must see the bucket layout the run never stopped
    # had at that step, although DDP rebuilt its buckets after that run's first backward. 12 videos over 3 processes,
    # one video a micro-batch: 4 optimizer steps in one epoch, a checkpoint after each
    extra = ["data.val_list=", "train.epochs=1", "train.batch_size=3", "train.micro_batch_size=1",
             "train.save_every_steps=1", "data.py_workers=1", "data.num_threads=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(straight, small_demo_root, 3, *extra))
    args = command(killed, small_demo_root, 3, *extra)
    resumed_from = run_and_kill(args, killed / "last.pt", 1)
    assert 0 < resumed_from < 4, resumed_from  # mid-epoch
    run_to_end(args)
    assert (killed / "train.log").read_text().count("resumed from") == 1
    assert_same_training_state(straight / "last.pt", killed / "last.pt", epochs=1, steps_per_epoch=4)


def test_testing_one_checkpoint_twice_gives_the_same_predictions(tmp_path, demo_root):
    out = tmp_path / "run"
    run_to_end(command(out, demo_root, 1, "train.epochs=1", "train.save_every_steps=0"))
    results = []
    for name, processes, batch in (("a", 1, 8), ("b", 2, 3)):
        script = ["eval.py"] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={processes}", "eval.py"]
        # overrides before and after the options, as a user types them
        run_to_end([sys.executable, *script, "--config", "configs/demo.yaml", f"data.root={demo_root}",
                    f"eval.batch_size={batch}", "--checkpoint", str(out / "last.pt"), f"eval.out_dir={tmp_path / name}",
                    f"train.out_dir={out}"])
        results.append((json.loads((tmp_path / name / "results.json").read_text()),
                        (tmp_path / name / "predictions.csv").read_text()))
    (a, a_rows), (b, b_rows) = results
    assert a["scored_videos"] == b["scored_videos"] == 64 and a["views"]["ensemble"] == "sum_logits"
    assert a["metrics"] == b["metrics"]
    assert a_rows == b_rows  # every video's prediction and combined score (4 decimals)
