"""Layer-wise learning-rate decay (train.layer_decay) and the moving average of the weights (train.model_ema): the
groups' rates, the average's updates, its validation and checkpoints, a resume, and testing it with eval.py and
predict.py."""
import copy
import json
import os
import signal
import sys

import pytest
import torch

pytest.importorskip("av", reason="needs PyAV")  # predict and train read videos with it

import predict
import train
from config import Config, config_from_dict
from models import ARCHS, KCenterViT
from runtime import load_model_weights, read_checkpoint, save_checkpoint
from test_train import SMALL, StopAfter, bare_trainer, clip_batch
from train import Preempted, build_optimizer, build_schedule, evaluate, saved_step_in_epoch, train_one_epoch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model(arch: str, depth: int = 3) -> KCenterViT:
    torch.manual_seed(0)
    segmented = ARCHS[arch].segmented  # one group of 4 x 4 places per segment
    return ARCHS[arch](**{**SMALL, "depth": depth, **({"num_segments": 2, "num_tokens": 32} if segmented else {})})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layer_decay_scales_each_layer_as_videomae_and_keeps_every_parameter_once(arch):
    model, depth, decay = small_model(arch), 3, 0.75
    cfg = Config()
    cfg.train.layer_decay, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_epochs, cfg.train.epochs = \
        decay, 1e-3, 1e-5, 1.0, 2
    optimizer = build_optimizer(model, cfg)
    names = {id(p): name for name, p in model.named_parameters()}
    placed = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert sorted(placed) == sorted(names.values())  # none lost, none twice

    def layer_of(name):  # VideoMAE's get_num_layer_for_vit, with the time embedding among the embeddings
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1 if name.startswith(("norm.", "head.")) else 0

    for group in optimizer.param_groups:
        layers = {layer_of(names[id(p)]) for p in group["params"]}
        assert layers == {group["layer_id"]}
        assert group["lr_scale"] == decay ** (depth + 1 - group["layer_id"])
        assert group["lr"] == cfg.train.lr * decay ** (depth + 1 - group["layer_id"])
    scale = {names[id(p)]: group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert scale["head.weight"] == scale["norm.bias"] == 1.0
    embeddings = ("patch_embed.proj.weight", "cls_token", "pos_embed", "time_embed")
    assert {scale[name] for name in embeddings} == {decay ** (depth + 1)} == {min(scale.values())}
    assert scale["blocks.0.norm1.weight"] == decay ** depth and scale[f"blocks.{depth - 1}.mlp.fc2.bias"] == decay
    if arch == "timesformer":  # a divided space-time block is one layer, its temporal branch included
        assert scale["blocks.1.temporal_fc.weight"] == scale["blocks.1.attn.qkv.weight"] == decay ** 2
    # the split of weight decay is the one without layer decay
    no_decay = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert no_decay == {names[id(p)] for p in model.param_groups(0.05)[1]["params"]}

    # warmup and cosine move every group by the same factor, from its own rate
    schedule, steps = build_schedule(optimizer, cfg, steps_per_epoch=4), []
    for _ in range(8):
        steps.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    for step, lrs in enumerate(steps):
        factor = schedule.lr_lambdas[0](step)
        assert lrs == [cfg.train.lr * group["lr_scale"] * factor for group in optimizer.param_groups]
    assert steps[0][-1] == pytest.approx(cfg.train.lr / 4) and steps[3][-1] == pytest.approx(cfg.train.lr)


def test_layer_decay_one_gives_the_optimizer_of_before():
    model, cfg = small_model("vit"), Config()
    optimizer = build_optimizer(model, cfg)  # train.layer_decay: 1.0
    before = torch.optim.AdamW(model.param_groups(cfg.train.weight_decay), lr=cfg.train.lr, betas=cfg.train.betas)
    assert optimizer.state_dict() == before.state_dict()  # the same groups, hyper-parameters and parameter order
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in before.param_groups]
    model(torch.randn(2, 3, 4, 32, 32)).sum().backward()
    before.step()
    optimizer.load_state_dict(before.state_dict())  # the state of an earlier checkpoint loads


def test_a_parameter_of_no_known_part_has_no_layer():
    model = small_model("vit")
    model.extra_scale = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="parameter 'extra_scale' has no layer for layer-wise learning-rate decay"):
        model.param_groups(0.05, layer_decay=0.75)
    assert len(model.param_groups(0.05)[1]["params"]) > 0  # without layer decay it is grouped as before


class Loader(list):
    """A list of batches as the training loader (class names for the checkpoint)."""
    class_names = ["a", "b", "c", "d", "e"]


def ema_trainer(batches, tmp_path=None, **train_settings):
    torch.manual_seed(0)
    settings = {"model_ema": True, "model_ema_decay": 0.5, "layer_decay": 0.75, **train_settings}
    if tmp_path is not None:
        settings["out_dir"] = str(tmp_path)
    tr = bare_trainer(KCenterViT(**SMALL), Loader(batches), accum=2, **settings)
    tr.optimizer = build_optimizer(tr.model, tr.cfg)
    tr.scheduler = build_schedule(tr.optimizer, tr.cfg, tr.steps_per_epoch)
    tr.ema = train.build_ema(tr.model, tr.cfg)
    tr.best_top1, tr.last_path = -1.0, os.path.join(tr.cfg.train.out_dir, "last.pt")
    return tr


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_follows_each_optimizer_step_and_leaves_training_as_it_was(warmup):
    batches = [clip_batch(2 * i, 2) for i in range(8)]  # 4 optimizer steps of 2 micro-batches
    tr = ema_trainer(batches, model_ema_warmup=warmup)
    seen, update = [], tr.ema.update

    def recording(model, step):
        seen.append((step, copy.deepcopy(model.state_dict())))
        update(model, step=step)

    tr.ema.update = recording
    train_one_epoch(tr, 0, 0)
    assert [step for step, _ in seen] == [1, 2, 3, 4]
    assert all(p.device == q.device and not p.requires_grad for p, q in zip(tr.ema.module.parameters(),
                                                                              tr.model.parameters()))
    # the first update copies the weights; then each step moves the average by 1 - decay towards them, the decay
    # ramping up as 1 - step^(-2/3) with the warmup
    expected = copy.deepcopy(seen[0][1])
    for step, weights in seen[1:]:
        decay = min(0.5, 1 - step ** (-2 / 3)) if warmup else 0.5
        for name, value in expected.items():
            value.lerp_(weights[name], 1 - decay)
    average = tr.ema.module.state_dict()
    assert average.keys() == expected.keys() and all(torch.equal(average[k], expected[k]) for k in expected)
    assert not torch.equal(average["head.weight"], tr.model.head.weight)

    without = ema_trainer(batches, model_ema=False)  # the same run without the average: the same weights, bit for bit
    assert without.ema is None
    train_one_epoch(without, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(tr.model.state_dict().values(), without.model.state_dict().values()))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_average_keeps_the_samplers_buffers_and_picks_the_same_tokens(arch):
    model = small_model(arch, depth=2)
    cfg = Config()
    cfg.train.model_ema, cfg.train.model_ema_decay = True, 0.5
    ema = train.build_ema(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=2)
    assert not any(name.startswith("sampler.") for name in ema.module.state_dict())  # nothing of it averaged
    own, copied = dict(model.sampler.named_buffers()), dict(ema.module.sampler.named_buffers())
    assert own.keys() == copied.keys() and all(torch.equal(own[k], copied[k]) and own[k] is not copied[k]
                                               for k in own)
    clips, seeds = torch.randn(3, 3, 4, 32, 32), torch.arange(3)
    for a, b in zip(model.select_tokens(clips, seeds=seeds), ema.module.select_tokens(clips, seeds=seeds)):
        assert torch.equal(a, b)


def test_validation_scores_the_average_beside_the_model_on_the_same_clips():
    tr = ema_trainer([])
    tr.val_loader = [clip_batch(0, 3), clip_batch(3, 0), clip_batch(3, 2)]
    with torch.no_grad():
        tr.ema.module.head.bias[0] = 100.0  # the average says class 0 for every clip
    metrics, ema_vis = evaluate(tr, tr.val_loader)
    ema, tr.ema = tr.ema, None
    alone, vis = evaluate(tr, tr.val_loader)
    tr.ema = ema
    # 1 of 5 videos is of class 0; 5 classes, each of one video: the average's confusion matrix is column 0
    said_zero = [[int(c == 0) for c in range(tr.cfg.model.num_classes)] if r < 5 else [0] * tr.cfg.model.num_classes
                 for r in range(tr.cfg.model.num_classes)]
    assert metrics == {**alone, "top1_ema": 20.0, "top5_ema": 100.0, "mean_class_acc_ema": 20.0,
                       "confusion_ema": said_zero}
    assert all(torch.equal(a, b) for a, b in zip(vis, ema_vis))
    tr.cfg.train.num_vis_clips, saves = 0, []  # no pictures of patches: the writer records the matrices only
    tr.save = lambda *args, **kw: saves.append((args, kw))
    assert train.end_epoch(tr, 0, StopAfter(99)) == metrics
    assert [name for name, *_ in tr.writer.scalars] == ["val/top1", "val/top5", "val/mean_class_acc", "val/top1_ema",
                                                        "val/top5_ema", "val/mean_class_acc_ema"]
    assert [name for name, *_ in tr.writer.images] == ["val/confusion", "val/confusion_ema"]
    assert saves == [((1, 0), {"best": True})]  # chosen by the model's top-1


def test_a_run_stopped_mid_epoch_and_resumed_ends_with_the_same_weights_average_and_optimizer(tmp_path):
    batches = [clip_batch(2 * i, 2) for i in range(8)]  # epochs of 4 steps, drop path on (SMALL's default)
    straight = ema_trainer(batches, tmp_path / "straight", model_ema_warmup=True)
    for epoch in range(2):
        train_one_epoch(straight, epoch, 0)

    stopped = ema_trainer(batches, tmp_path / "stopped", model_ema_warmup=True)
    with pytest.raises(Preempted):
        train_one_epoch(stopped, 0, 0, StopAfter(1))  # after step 2: last.pt written there
    ckpt = read_checkpoint(stopped.last_path)
    assert ckpt["step"] == 2 and ckpt["model_ema"].keys() == ckpt["model"].keys()

    resumed = ema_trainer(batches, tmp_path / "stopped", model_ema_warmup=True)
    resumed.epoch, resumed.step, resumed.validation_pending = ckpt["epoch"], ckpt["step"], False
    resumed.batch_in_epoch = saved_step_in_epoch(ckpt, resumed.last_path) * resumed.accum
    resumed._restore(ckpt)
    resumed.train_loader = Loader(batches[resumed.batch_in_epoch:])  # the loader starts at the saved batch
    train_one_epoch(resumed, 0, resumed.batch_in_epoch)
    resumed.train_loader = Loader(batches)
    train_one_epoch(resumed, 1, 0)

    for a, b in ((straight.model, resumed.model), (straight.ema.module, resumed.ema.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    a, b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and straight.scheduler.state_dict() == resumed.scheduler.state_dict()
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in ("exp_avg", "exp_avg_sq"))

    without = {k: v for k, v in ckpt.items() if k != "model_ema"}  # a run without the average cannot continue one
    with pytest.raises(ValueError, match="without train.model_ema, so there is no moving average to continue"):
        ema_trainer(batches, tmp_path / "stopped")._restore(without)


def tiny_config() -> Config:
    return config_from_dict({
        "data": {"num_frames": 4, "crop_size": 32, "train_jitter_scales": [32, 40]},
        "model": dict(SMALL),
        "eval": {"num_clips": 1, "num_crops": 1}})


def test_eval_and_predict_test_the_average_and_name_a_checkpoint_without_one(tmp_path, monkeypatch, capsys):
    cfg = tiny_config()
    torch.manual_seed(0)
    model, average = KCenterViT(**SMALL), KCenterViT(**SMALL)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1, "step": 3,
             "class_names": Loader.class_names}
    save_checkpoint(str(tmp_path / "plain.pt"), state)
    save_checkpoint(str(tmp_path / "ema.pt"), {**state, "model_ema": average.state_dict()})

    loaded = KCenterViT(**SMALL)
    load_model_weights(loaded, read_checkpoint(str(tmp_path / "ema.pt")), "ema.pt", "ema")
    assert torch.equal(loaded.head.weight, average.head.weight)
    with pytest.raises(ValueError, match=r"plain.pt holds no EMA weights \('model_ema'\): the run that wrote it "
                                         r"trained without train.model_ema"):
        load_model_weights(loaded, read_checkpoint(str(tmp_path / "plain.pt")), "plain.pt", "ema")

    heads = []

    def classify(model, cfg, path, device, ensemble, num_tokens=None):  # what predict.py scores a video with, no read
        heads.append(model.head.weight.detach().clone())
        return torch.full((5,), 0.2), None, None

    monkeypatch.setattr(predict, "predict_video", classify)
    for weights, expected in (("model", model), ("ema", average)):
        assert predict.main(["--checkpoint", str(tmp_path / "ema.pt"), "clip.mp4", "--weights", weights]) == 0
        assert torch.equal(heads[-1], expected.head.weight)
    with pytest.raises(SystemExit, match="error: .*plain.pt holds no EMA weights"):
        predict.main(["--checkpoint", str(tmp_path / "plain.pt"), "clip.mp4", "--weights", "ema"])


def test_a_run_whose_test_would_want_an_average_it_does_not_keep_is_refused_before_it_starts():
    cfg = tiny_config()
    cfg.data.test_list, cfg.eval.weights = "annotations/val.csv", "ema"
    with pytest.raises(ValueError, match="eval.weights is 'ema' but train.model_ema is off"):
        train.run_training(cfg, preemption=object())  # before processes, logging or files


@pytest.mark.slow
def test_train_py_with_both_stopped_by_sigterm_and_resumed_equals_a_run_never_stopped_and_eval_tests_the_average(
        tmp_path, small_demo_root):
    from test_reproducibility import (SHORT_RUN, SHORT_STEPS, assert_same_best, assert_same_training_state,
                                      command, resume_to_end, run_and_signal, run_to_end, validation_lines)
    both = ["train.model_ema=true", "train.model_ema_decay=0.9", "train.model_ema_warmup=true",
            "train.layer_decay=0.75"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    run_to_end(command(straight, small_demo_root, 1, *SHORT_RUN, *both))
    status, output = run_and_signal(command(out, small_demo_root, 1, *SHORT_RUN, *both), out, 2, signal.SIGTERM)
    assert status == 75, output[-3000:]  # PREEMPTED_EXIT
    resumed = tmp_path / "resumed"
    resume_to_end(out, resumed, small_demo_root, 1, *both)
    assert_same_training_state(straight / "last.pt", resumed / "last.pt", epochs=2, steps_per_epoch=SHORT_STEPS)
    assert_same_best(straight, resumed)
    a, b = (torch.load(d / "last.pt", map_location="cpu", weights_only=True) for d in (straight, resumed))
    assert a["model_ema"].keys() == a["model"].keys()
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])
    assert not all(torch.equal(a["model_ema"][k], a["model"][k]) for k in a["model"])
    lines = validation_lines(resumed)
    assert lines == validation_lines(straight) and all("; EMA weights: top-1 " in line for line in lines)
    log = (resumed / "train.log").read_text()
    assert "layer-wise learning-rate decay 0.75" in log and "norm, head" in log

    result = run_to_end([sys.executable, "eval.py", "--config", "configs/demo.yaml", f"data.root={small_demo_root}",
                         f"train.out_dir={resumed}", "eval.weights=ema", f"eval.out_dir={tmp_path / 'ev'}",
                         "eval.num_clips=1", "eval.num_crops=1", "data.py_workers=1", "data.num_threads=1"])
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert summary["checkpoint"]["weights"] == "ema" and summary["scored_videos"] == 4, result.stdout[-1000:]


@pytest.fixture(scope="module")
def small_demo_root(tmp_path_factory):
    from preprocess.make_demo_data import make_demo_dataset
    root = str(tmp_path_factory.mktemp("demo_small") / "data")
    make_demo_dataset(root, {"train": 3, "val": 1})  # 12 train, 4 val videos
    return root
