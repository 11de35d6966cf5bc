"""train.py / eval.py end to end on CPU: demo data, 2-process DDP (gloo), kill + resume, multi-view metrics."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import torch
import yaml

import eval as eval_script
import train
from eval import aggregate_views, compute_metrics, score_videos
from models import KCenterViT
from pipelines.loader import Batch
from preprocess.make_demo_data import make_demo_dataset
from runtime import TrainingLoss, empty_batch_loss
from train import (Preempted, Preemption, Trainer, build_schedule, check_epoch_length, check_resumable, end_epoch,
                   evaluate, saved_step_in_epoch, train_one_epoch)
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
    check_resumable(ckpt, saved, "runs/x/last.pt")  # the same run: resumes
    other = Config()
    other.train.micro_batch_size = saved.train.micro_batch_size // 2  # the same optimizer steps: resumes
    check_resumable(ckpt, other, "runs/x/last.pt")
    other.train.batch_size, other.train.seed, other.train.weight_decay = saved.train.batch_size * 2, 7, 0.5
    with pytest.raises(ValueError, match=rf"runs/x/last.pt .*train.seed: 0 -> 7; train.batch_size: "
                                         rf"{saved.train.batch_size} -> {other.train.batch_size}\. Resume"):
        check_resumable(ckpt, other, "runs/x/last.pt")  # (decay may change)
    views = Config()
    views.data.num_sample = 2  # twice the clips a step, each view with its own draws: another run
    with pytest.raises(ValueError, match=r"data.num_sample: 1 -> 2"):
        check_resumable(ckpt, views, "runs/x/last.pt")
    older = {"config": {**saved.to_dict(), "data": {k: v for k, v in saved.to_dict()["data"].items()
                                                     if k != "num_sample"}}, "rng": [{}]}
    check_resumable(older, saved, "runs/x/last.pt")  # a checkpoint from before the key: num_sample 1


def legacy_checkpoint(world: int, micro: int, batch: int, batch_in_epoch: int) -> dict:
    """A checkpoint as train.py wrote it before it stored the optimizer step of the epoch and the epoch's length."""
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.batch_size = micro, batch
    return {"config": cfg.to_dict(), "rng": [{}] * world, "epoch": 1, "batch_in_epoch": batch_in_epoch}


def test_the_optimizer_step_of_a_checkpoint_is_where_any_number_of_processes_resumes():
    # 2 processes x micro 2 x accumulation 2 = batch 8: after batch 6 of an epoch, 3 optimizer steps were taken; a
    # run of 1 process with accumulation 4 resumes at its batch 12, 4 processes with accumulation 1 at batch 3
    assert saved_step_in_epoch(legacy_checkpoint(2, 2, 8, 6), "a/last.pt") == 3
    assert saved_step_in_epoch({**legacy_checkpoint(2, 2, 8, 6), "step_in_epoch": 3}, "a/last.pt") == 3
    with pytest.raises(ValueError, match=r"a/last.pt was written after batch 5 of epoch 1, inside an optimizer step "
                                         r"of 2 accumulated micro-batches"):
        saved_step_in_epoch(legacy_checkpoint(2, 2, 8, 5), "a/last.pt")


def test_an_epoch_of_another_length_than_the_saved_runs_is_refused():
    # 12 videos, 2 processes of 2, accumulation 2: the old epoch was 3 batches a rank, 1 whole optimizer step (the
    # third batch dropped); padded to whole steps it is ceil(12 / 8) = 2
    with pytest.raises(ValueError, match=r"a/last.pt was written by a run whose epochs were 1 optimizer steps; this "
                                         r"run's are 2 \(12 training videos, train.batch_size 8\)"):
        check_epoch_length(legacy_checkpoint(2, 2, 8, 0), 2, 12, "a/last.pt")
    check_epoch_length(legacy_checkpoint(2, 2, 8, 0), 2, 16, "a/last.pt")  # 4 batches: 2 steps then and now
    check_epoch_length(legacy_checkpoint(2, 4, 8, 0), 2, 12, "a/last.pt")  # accumulation 1: as it always was
    check_epoch_length({**legacy_checkpoint(2, 2, 8, 0), "steps_per_epoch": 2}, 2, 12, "a/last.pt")
    with pytest.raises(ValueError, match="epochs were 3 optimizer steps"):
        check_epoch_length({**legacy_checkpoint(2, 2, 8, 0), "steps_per_epoch": 3}, 2, 12, "a/last.pt")


# a model of 5 classes on clips of (3, 4, 32, 32)
SMALL = dict(num_classes=5, num_frames=4, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
             num_tokens=24, num_hybrid_frames=1)


class RefusesEmpty(torch.nn.Module):
    """The model, failing on a batch of no clips as fused attention kernels on the GPU do."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, clips, seeds=None, num_tokens=None):
        if not len(clips):
            raise RuntimeError("batch size must be positive")
        return self.model(clips, seeds=seeds, num_tokens=num_tokens)


def clip_batch(first_video: int, size: int, views: tuple = ()) -> Batch:
    index = torch.arange(first_video, first_video + size)
    return Batch(torch.randn(size, *views, 3, 4, 32, 32), index % 5, index)


def host_reads(monkeypatch, module, method: str) -> list:
    """Records each call of torch.Tensor.`method` made from `module`'s own code."""
    reads, original = [], getattr(torch.Tensor, method)

    def counted(self, *args):
        if sys._getframe(1).f_code.co_filename == module.__file__:
            reads.append(method)
        return original(self, *args)

    monkeypatch.setattr(torch.Tensor, method, counted)
    return reads


def test_an_empty_micro_batch_skips_the_model_and_gives_every_parameter_a_zero_gradient():
    torch.manual_seed(0)
    model = RefusesEmpty(KCenterViT(**SMALL))
    step = TrainingLoss(model, label_smoothing=0.1, rows_per_step=4)
    empty = clip_batch(0, 0)
    loss, logits = step(empty.clips, empty.labels, torch.zeros(0, dtype=torch.int64))
    assert logits is None and loss.item() == 0
    loss.backward()
    params = list(model.parameters())
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    model.zero_grad(set_to_none=True)
    empty_batch_loss(model).backward()  # what bench/gpu_check.py runs on the GPU
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in params)

    # the mean over the step's nominal 4 clips, as before: an empty micro-batch adds nothing, a full one its sum / 4
    batch, seeds = clip_batch(0, 2), torch.arange(2)
    loss, logits = step(batch.clips, batch.labels, seeds)
    reference = torch.nn.functional.cross_entropy(model(batch.clips, seeds=seeds), batch.labels,
                                                  label_smoothing=0.1, reduction="sum") / 4
    assert logits.shape == (2, 5) and torch.equal(loss, reference)
    model.zero_grad(set_to_none=True)
    loss.backward()
    alone = [p.grad.clone() for p in params]
    step(empty.clips, empty.labels, torch.zeros(0, dtype=torch.int64))[0].backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, alone))


def bare_trainer(model, batches: list, accum: int, **train_settings) -> Trainer:
    """A Trainer of one process on the CPU whose training loader is the list `batches`: no data on disk."""
    cfg = Config()
    for key, value in {"micro_batch_size": 2, "batch_size": 2 * accum, "save_every_steps": 0, **train_settings}.items():
        setattr(cfg.train, key, value)
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.rank, tr.world, tr.device, tr.accum, tr.amp_dtype = cfg, 0, 1, torch.device("cpu"), accum, None
    tr.model, tr.ddp = model, TrainingLoss(model, cfg.train.label_smoothing, 2 * accum)
    tr.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tr.steps_per_epoch, tr.step, tr.scaler, tr.train_loader = len(batches) // accum, 0, None, batches
    tr.scheduler = build_schedule(tr.optimizer, cfg, tr.steps_per_epoch)
    tr.writer = SimpleNamespace(scalars=[], add_scalar=lambda *scalar: tr.writer.scalars.append(scalar), images=[],
                                add_image=lambda *image, **kw: tr.writer.images.append(image))
    return tr


def record_losses(tr) -> list[float]:
    """The loss of each micro-batch `tr` trains on, appended to the returned list as they come."""
    losses, forward_loss = [], tr.forward_loss

    def recording(*args):
        loss, logits = forward_loss(*args)
        losses.append(loss.item())
        return loss, logits

    tr.forward_loss = recording
    return losses


def test_training_reads_the_loss_once_a_log_interval_and_logs_the_means_it_logged_before(monkeypatch):
    torch.manual_seed(0)
    batches = [clip_batch(2 * i, 2) for i in range(8)]
    batches[5] = clip_batch(10, 0)  # its videos were all bad
    tr = bare_trainer(RefusesEmpty(KCenterViT(**SMALL)), batches, accum=2, log_every_steps=2)  # 4 steps
    losses = record_losses(tr)
    reads = host_reads(monkeypatch, train, "item")
    stats = train_one_epoch(tr, 0, 0)
    assert tr.step == 4 and len(losses) == 8 and losses[5] == 0
    # what the loop logged when it added up each micro-batch's loss.item() in Python floats
    running = [sum(losses[: 2 * step]) / step for step in (1, 2, 3, 4)]
    assert [value for name, value, _ in tr.writer.scalars if name == "train/loss"] == [running[1], running[3]]
    assert stats["loss"] == running[3]
    assert len(reads) == 3, reads  # at the two log steps and the epoch's end, not once a micro-batch


class StopAfter:
    """`Preemption.requested` of a run whose ranks agree on a stop at question `calls` + 1."""

    def __init__(self, calls: int):
        self.calls, self.asked, self.agreed = calls, 0, 0

    def requested(self) -> int:
        self.asked += 1
        self.agreed = signal.SIGTERM if self.asked > self.calls else 0
        return self.agreed


def test_a_preemption_signal_is_noted_and_acted_on_at_the_next_question():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        preemption = Preemption()
        preemption.connect(1)
        # the handler is installed, so that the signals sent below cannot end the test run
        assert all(signal.getsignal(signum) == preemption._note for signum in previous)
        assert preemption.requested() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested() == signal.SIGUSR1 == preemption.agreed
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested() == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def recorded_saves(tr: Trainer) -> list:
    saves = []
    tr.save = lambda *args, **kw: saves.append((args, kw))
    return saves


def test_a_stop_comes_after_the_optimizer_step_it_was_asked_at_with_last_pt_written_there():
    torch.manual_seed(0)
    batches = [clip_batch(2 * i, 2) for i in range(8)]
    tr = bare_trainer(KCenterViT(**SMALL), batches, accum=2)  # 4 steps of 2 micro-batches
    saves, stop = recorded_saves(tr), StopAfter(1)
    with pytest.raises(Preempted) as raised:
        train_one_epoch(tr, 3, 0, stop)
    assert stop.asked == 2 and tr.step == 2 and saves == [((3, 4), {})]  # after step 2, batch 4 of epoch 3
    assert raised.value.record == {"signal": "SIGTERM", "stage": "training", "epoch": 3, "batch_in_epoch": 4,
                                   "step": 2}

    # a periodic checkpoint at that step is the one written
    tr = bare_trainer(KCenterViT(**SMALL), batches, accum=2, save_every_steps=2)
    saves = recorded_saves(tr)
    with pytest.raises(Preempted):
        train_one_epoch(tr, 0, 0, StopAfter(1))
    assert saves == [((0, 4), {})]

    # asked after every step but the epoch's last, which goes on to the epoch's end (validation, its checkpoint)
    tr = bare_trainer(KCenterViT(**SMALL), batches, accum=2)
    saves, stop = recorded_saves(tr), StopAfter(3)
    train_one_epoch(tr, 0, 0, stop)
    assert stop.asked == 3 and tr.step == 4 and saves == []


def test_a_stop_during_validation_saves_the_epochs_end_with_its_validation_pending():
    torch.manual_seed(0)
    tr = bare_trainer(KCenterViT(**SMALL), [], accum=1, epochs=2)
    tr.val_loader, tr.best_top1, tr.writer = [clip_batch(0, 2), clip_batch(2, 2)], -1.0, None
    saves = recorded_saves(tr)
    with pytest.raises(Preempted) as raised:
        end_epoch(tr, 0, StopAfter(1))  # before the second batch
    assert saves == [((1, 0), {"validation_pending": True})]
    assert raised.value.record == {"signal": "SIGTERM", "stage": "validation", "epoch": 1, "batch_in_epoch": 0,
                                   "step": 0}
    saves.clear()
    assert end_epoch(tr, 0, StopAfter(2))["videos"] == 4  # asked before each batch only
    assert saves == [((1, 0), {"best": True})] and tr.best_top1 >= 0


def test_validation_skips_an_empty_batch_and_scores_the_same():
    torch.manual_seed(0)
    model = KCenterViT(**SMALL)
    tr = SimpleNamespace(ddp=model, model=RefusesEmpty(model), cfg=Config(), device=torch.device("cpu"),
                         amp_dtype=None, rank=0, world=1)
    batches = [clip_batch(0, 3), clip_batch(3, 2)]
    metrics, (clips, seeds) = evaluate(tr, batches)
    assert metrics["videos"] == 5
    for loader in ([batches[0], clip_batch(5, 0), batches[1]], [clip_batch(5, 0), *batches]):
        with_empty, vis = evaluate(tr, loader)
        assert with_empty == metrics
        assert torch.equal(vis[0], clips) and torch.equal(vis[1], seeds)  # pictures of the first clips scored


def test_testing_skips_an_empty_batch_and_reads_labels_once_a_batch(monkeypatch):
    torch.manual_seed(0)
    model = KCenterViT(**SMALL)
    cfg = Config()
    batches = [clip_batch(0, 3, views=(2,)), clip_batch(3, 0, views=(2,)), clip_batch(3, 2, views=(2,))]
    reads = host_reads(monkeypatch, eval_script, "__int__")
    results = score_videos(RefusesEmpty(model), batches, torch.device("cpu"), None, 0, cfg, "sum_logits")
    assert not reads, reads  # no int() a video
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert all(type(label) is int and label == index % 5 for index, (label, _) in results.items())
    with torch.no_grad():
        seeds = eval_script.view_seeds(cfg.train.seed, batches[2].index, 2)
        expected = model(batches[2].clips.flatten(0, 1), seeds=seeds).view(2, 2, -1).sum(1)
    assert np.array_equal(results[4][1], expected[1].numpy())


@pytest.mark.slow
def test_a_rank_with_an_empty_micro_batch_keeps_ddp_in_step(tmp_path):
    # rank 0 has no clips, rank 1 two: both finish the step with the same gradients, rank 1's over the 2 ranks, and
    # the model never sees the empty batch
    script = tmp_path / "empty_rank.py"
    script.write_text(
        "import copy, sys, torch, torch.distributed as dist\n"
        f"sys.path[:0] = [{REPO!r}, {os.path.dirname(os.path.abspath(__file__))!r}]\n"
        "import train\n"
        "from test_train import SMALL, RefusesEmpty, clip_batch\n"
        "from models import KCenterViT\n"
        "from runtime import TrainingLoss\n"
        "\n"
        "def main():\n"
        "    dist.init_process_group('gloo')\n"
        "    rank = dist.get_rank()\n"
        "    torch.manual_seed(0)\n"
        "    model = RefusesEmpty(KCenterViT(**SMALL))\n"
        "    alone = copy.deepcopy(model)\n"
        "    ddp = torch.nn.parallel.DistributedDataParallel(TrainingLoss(model, 0.1, 2))\n"
        "    train.settle_gradient_buckets(ddp, model, torch.device('cpu'))\n"
        "    assert all(p.grad is None for p in model.parameters())\n"
        "    torch.manual_seed(1)\n"
        "    batch, seeds = clip_batch(0, 2 * rank), torch.arange(2 * rank)\n"
        "    ddp(batch.clips, batch.labels, seeds)[0].backward()\n"
        "    grads = torch.cat([p.grad.flatten() for p in model.parameters()])\n"
        "    gathered = [torch.zeros_like(grads) for _ in range(2)]\n"
        "    dist.all_gather(gathered, grads)\n"
        "    assert torch.equal(gathered[0], gathered[1]), 'ranks differ'\n"
        "    if rank == 1:\n"
        "        TrainingLoss(alone, 0.1, 2)(batch.clips, batch.labels, seeds)[0].backward()\n"
        "        reference = torch.cat([p.grad.flatten() for p in alone.parameters()]) / 2\n"
        "        assert torch.equal(grads, reference) and grads.abs().sum() > 0\n"
        "        open(sys.argv[1], 'w').write('ok')\n"
        "    dist.destroy_process_group()\n"
        "\n"
        "if __name__ == '__main__':\n"
        "    main()\n")
    done = tmp_path / "in_step"
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(done)],
                 timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert done.exists()


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

    # the official unlabelled test CSV's form: predictions only, said so
    rows = (Path(demo_root) / "annotations" / "val.csv").read_text().strip().splitlines()[1:]
    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text("youtube_id,time_start,time_end,split\n" + "".join(
        ",".join(row.split(",")[1:4] + ["test"]) + "\n" for row in rows))
    result = run(["eval.py", "--config", config, f"data.test_list={unlabelled}", f"eval.out_dir={tmp_path / 'un'}"],
                 timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "un" / "results.json").read_text())
    assert summary["labelled"] is False and summary["metrics"] == {"videos": 8} and summary["scored_videos"] == 8
    assert "has no labels, so predictions only" in result.stderr + result.stdout
    predictions = (tmp_path / "un" / "predictions.csv").read_text().strip().splitlines()
    assert predictions[0] == "path,label,prediction,score,top5,top5_classes,budget" and len(predictions) == 9
    assert all(line.split(",")[1] == "" and len(line.split(",")[-2].split("|")) == 4 and line.split(",")[-1] == "60"
               for line in predictions[1:])


def test_a_broken_test_list_stops_training_before_its_first_step(tmp_path, demo_root):
    out = tmp_path / "run"
    broken = tmp_path / "test.csv"
    broken.write_text("label,youtube_id,time_start,time_end,split\nno such class,abc,0,10,test\n")
    config = write_config(tmp_path, demo_root, out, data={"test_list": str(broken)})
    result = run(["train.py", "--config", config], timeout=300)
    assert result.returncode != 0
    assert f"{broken}:2: unknown label 'no such class'" in result.stderr
    assert not (out / "last.pt").exists() and "epoch 0:" not in (out / "train.log").read_text()


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
        "    assert tr.step == 4 and tr.accum == 2, (tr.step, tr.accum)\n"  # ceil(12 / 8) = 2 steps an epoch
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


# data.num_sample 2 with erasing, mixup and drop path on: a tiny model, 12 videos, 2 epochs of 3 optimizer steps of 2
# micro-batches of 2 videos (4 clips each), a checkpoint after each step
REPEATED_RUN = ["data.num_sample=2", "data.re_prob=0.5", "train.mixup=0.8", "train.mixup_mode=elem",
                "model.drop_path_rate=0.1", "train.epochs=2", "train.batch_size=4", "train.micro_batch_size=2",
                "train.save_every_steps=1", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                "model.num_tokens=60", "data.py_workers=1", "data.num_threads=1"]


@pytest.mark.slow
def test_train_py_with_repeated_augmentation_counts_videos_and_a_killed_run_resumes_bit_identical(tmp_path,
                                                                                                   demo_root):
    from test_reproducibility import assert_same_training_state, command, run_and_kill, run_to_end
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(straight, demo_root, 1, *REPEATED_RUN))
    log = (straight / "train.log").read_text()
    assert "12 train videos, 3 optimizer steps/epoch" in log  # ceil(12 / 4): the views do not lengthen an epoch
    assert log.count("'seen': 12, 'bad': 0") == 2  # every video once an epoch, with its two views
    losses = [float(line.split(": loss ")[1].split(",")[0]) for line in log.splitlines() if ": loss " in line]
    # the mean over the clips, ln 4 = 1.39 for the 4 classes at the start: one summed over the 2 views would be twice
    assert len(losses) == 2 and all(0 < loss < 2.0 for loss in losses), losses

    args = command(killed, demo_root, 1, *REPEATED_RUN)
    resumed_from = run_and_kill(args, killed / "last.pt", 1)  # SIGKILL, every process it started
    assert 0 < resumed_from < 6, resumed_from
    run_to_end(args)
    assert (killed / "train.log").read_text().count("resumed from") == 1
    assert_same_training_state(straight / "last.pt", killed / "last.pt", epochs=2, steps_per_epoch=3)
