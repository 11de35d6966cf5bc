"""train.py / eval.py end to end on CPU: demo data, 2-process DDP (gloo), kill + resume, multi-view metrics."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import torch
import yaml

from eval import aggregate_views, compute_metrics
from preprocess.make_demo_data import make_demo_dataset
from train import build_schedule, check_resumable
from config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "data": {"py_workers": 1, "num_threads": 1},
    "model": {"embed_dim": 32, "depth": 1, "num_heads": 2, "num_tokens": 60},
    "train": {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "save_every_steps": 1, "log_every_steps": 1,
              "warmup_epochs": 0.5, "num_vis_clips": 1},
    "eval": {"num_clips": 2, "num_crops": 3, "batch_size": 2},
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "data")
    make_demo_dataset(root, {"train": 3, "val": 2})  # 12 train, 8 val videos, through resize_kinetics.py
    return root


def write_config(tmp_path, demo_root, out_dir, **sections):
    with open(os.path.join(REPO, "configs", "demo.yaml")) as f:
        raw = yaml.safe_load(f)
    for section, values in list(TINY.items()) + list(sections.items()):
        raw[section].update(values)
    raw["data"]["root"], raw["train"]["out_dir"] = demo_root, str(out_dir)
    path = tmp_path / f"{os.path.basename(str(out_dir))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_aggregate_views_each_ensemble_and_metrics_known_answer():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [-3.0, 1.5, 0.0]],    # sum -1 2.5 0; max 2 1.5 0
                           [[0.0, 0.0, 1.0], [0.0, 0.0, 0.5]]])
    assert torch.equal(aggregate_views(logits, "sum_logits"), torch.tensor([[-1.0, 2.5, 0.0], [0.0, 0.0, 1.5]]))
    assert torch.equal(aggregate_views(logits, "max"), torch.tensor([[2.0, 1.5, 0.0], [0.0, 0.0, 1.0]]))
    mean_softmax = aggregate_views(logits, "mean_softmax")
    assert torch.allclose(mean_softmax, logits.softmax(-1).mean(1)) and torch.allclose(mean_softmax.sum(1),
                                                                                         torch.ones(2))
    # the ensembles rank differently: one confident view wins under max, the views' sum under sum_logits
    assert aggregate_views(logits, "max")[0].argmax() == 0 and aggregate_views(logits, "sum_logits")[0].argmax() == 1
    with pytest.raises(ValueError, match="eval.ensemble .* got 'mean'"):
        aggregate_views(logits, "mean")

    scores = np.array([[0.4, 0.5, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    metrics = compute_metrics(scores, np.array([1, 0, 1]), ["a", "b", "c"])
    assert metrics["top1"] == pytest.approx(100 / 3)
    assert metrics["top5"] == pytest.approx(100.0)  # 3 classes: top-5 always hits
    assert metrics["per_class_top1"] == {"a": 0.0, "b": 50.0}  # class c has no video: not averaged in
    assert metrics["mean_class_accuracy"] == pytest.approx(25.0)
    assert metrics["videos"] == 3


def test_schedule_warmup_then_cosine():
    cfg = Config()
    cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_epochs, cfg.train.epochs = 1.0, 0.1, 1.0, 3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr)
    sched = build_schedule(opt, cfg, steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1


def test_resume_refuses_a_run_with_other_settings():
    saved = Config()
    ckpt = {"config": saved.to_dict(), "rng": [{}, {}]}
    check_resumable(ckpt, saved, 2, "runs/x/last.pt")  # the same run: resumes
    other = Config()
    other.train.batch_size, other.train.weight_decay = saved.train.batch_size * 2, 0.5  # decay may change
    with pytest.raises(ValueError, match=rf"runs/x/last.pt .*train.batch_size: {saved.train.batch_size} -> "
                                         rf"{other.train.batch_size}; world size: 2 -> 4 processes"):
        check_resumable(ckpt, other, 4, "runs/x/last.pt")


@pytest.mark.slow
def test_demo_train_then_eval_writes_results(tmp_path, demo_root):
    out = tmp_path / "run"
    config = write_config(tmp_path, demo_root, out)
    result = run(["train.py", "--config", config], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("last.pt", "best.pt", "config.yaml", "train.log", "results.json", "predictions.csv"):
        assert (out / name).exists(), name
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic writes left no temp files
    summary = json.loads((out / "results.json").read_text())
    assert summary["scored_videos"] == summary["split_videos"] == 8 and summary["excluded"] == []
    assert summary["views"] == {"clips": 2, "crops": 3, "ensemble": "sum_logits"}  # the ViT's default, as the original
    assert summary["checkpoint"]["path"] == str(out / "last.pt") and summary["checkpoint"]["epoch"] == 2  # the paper's
    assert len((out / "predictions.csv").read_text().strip().splitlines()) == 1 + 8
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 3  # 12 videos / (2 x 2 accumulation) = 3 steps per epoch
    assert ckpt["config"]["train"]["batch_size"] == 4
    assert os.listdir(out / "tensorboard")

    # eval.py on its own, with patch pictures
    pictures = tmp_path / "patches"
    # overrides before, between and after the options
    result = run(["eval.py", "--config", config, "eval.num_clips=1", "--checkpoint", str(out / "best.pt"),
                  "eval.num_crops=1", "--save-patches", str(pictures), "eval.ensemble=max",
                  f"eval.out_dir={tmp_path / 'ev'}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert summary["views"] == {"clips": 1, "crops": 1, "ensemble": "max"}
    assert summary["checkpoint"]["path"] == str(out / "best.pt")
    assert len(list(pictures.glob("*.png"))) == 8


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path, demo_root):
    config = write_config(tmp_path, demo_root, tmp_path / "ddp", train={"batch_size": 8, "micro_batch_size": 2,
                                                                        "epochs": 2, "save_every_steps": 0})
    script = tmp_path / "ddp_check.py"
    # DALI starts its source workers with "spawn", which re-imports __main__: the guard keeps them from training
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import train\n"
        "\n"
        "def main():\n"
        f"    cfg = train.load_config({config!r}, ['data.test_list=', 'data.val_list='])\n"
        "    kept = []\n"
        "    class Keep(train.Trainer):\n"
        "        def __init__(self, *a, **kw):\n"
        "            super().__init__(*a, **kw)\n"
        "            kept.append(self)\n"
        "    train.Trainer = Keep\n"
        "    train.run_training(cfg)\n"
        "    tr = kept[0]\n"
        "    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])\n"
        "    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]\n"
        "    dist.all_gather(gathered, flat)\n"
        "    assert torch.equal(gathered[0], gathered[1]), 'ranks diverged'\n"
        "    assert tr.step == 2 and tr.accum == 2, (tr.step, tr.accum)\n"  # 3 batches of 2 per rank: 1 step/epoch
        "    if dist.get_rank() == 0:\n"
        "        open(os.path.join(cfg.train.out_dir, 'ranks_identical'), 'w').write('ok')\n"
        "\n"
        "if __name__ == '__main__':\n"
        "    main()\n")
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)], timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "ddp" / "ranks_identical").exists()


@pytest.mark.slow
def test_fine_tuning_from_a_video_checkpoint_starts_at_its_accuracy(tmp_path, demo_root):
    # A learns the 12 training clips; B starts from A's last.pt (lr so small that its weights stay A's) and its first
    # validation on the same clips scores what A scored, far above chance (25%); its own step, schedule and epoch
    # start anew
    root = tmp_path / "fit"  # the 12 training clips are also the validation split
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / split).symlink_to(os.path.join(demo_root, "train"))
        (root / "annotations" / f"{split}.csv").write_text(
            open(os.path.join(demo_root, "annotations", "train.csv")).read())
    fit = dict(data={"random_flip": False, "train_jitter_scales": [48, 48], "generate_demo": False},
               model={"embed_dim": 64, "depth": 2, "num_heads": 4},
               train={"epochs": 60, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_epochs": 0,
                      "label_smoothing": 0.0, "save_every_steps": 0, "val_every_epochs": 60})
    first = write_config(tmp_path, str(root), tmp_path / "a", **fit)
    assert run(["train.py", "--config", first, "data.test_list="], timeout=900).returncode == 0
    top1 = [float(line.split("top-1 ")[1].split("%")[0]) for line in (tmp_path / "a" / "train.log").read_text()
            .splitlines() if "validation: top-1" in line]
    second = write_config(tmp_path, str(root), tmp_path / "b", **{**fit, "train": {
        **fit["train"], "epochs": 1, "lr": 1e-9, "min_lr": 1e-10, "val_every_epochs": 1}})
    result = run(["train.py", "--config", second, "data.test_list=", f"model.init_from={tmp_path / 'a' / 'last.pt'}"],
                 timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "b" / "train.log").read_text()
    assert "initialised from" in log and "0 left at initialisation" in log
    start = float(log.split("validation: top-1 ")[1].split("%")[0])
    assert top1[-1] >= 75 and abs(start - top1[-1]) <= 100 / 12, (top1, start)
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)
