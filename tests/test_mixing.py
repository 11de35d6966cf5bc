"""Random erasing, mixup and cutmix of training clips (pipelines/batch_augment.py): against timm's math, one region in
every frame, draws that are functions of (seed, epoch, batch, video), soft targets in the loss, and in training."""
import copy
import dataclasses
import math
import random
import types

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import timm.data.random_erasing as timm_erasing
import torch

from pipelines.batch_augment import (BatchAugment, cutmix_box, draw_mixing, erase_clips, erased_regions,
                                     mixed_targets, mixing_rng)
from pipelines.sampling import ERASE, sample_rng
from runtime import TrainingLoss

AREA, ASPECT = (0.02, 1 / 3), (0.3, 1 / 0.3)  # timm's RandomErasing defaults


def mixer(**settings) -> BatchAugment:
    return BatchAugment(**{"seed": 3, "num_classes": 6, **settings})


def distinct_clips(rows=6, frames=4, height=24, width=32, seed=0):
    """(rows, 3, frames, height, width) normal values: any two differ, so a changed value marks a changed pixel."""
    return torch.randn(rows, 3, frames, height, width, generator=torch.Generator().manual_seed(seed))


def changed_window(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(H, W) mask of the pixels a clip (C, T, H, W) changed at; asserts it is the same in every channel and frame."""
    changed = after != before
    window = changed[0, 0]
    assert torch.equal(changed, window.expand_as(changed)), "the changed pixels differ between frames or channels"
    return window


def as_rectangle(window: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a mask that must be one filled rectangle."""
    ys, xs = window.nonzero(as_tuple=True)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    assert window[top:bottom, left:right].all() and int(window.sum()) == (bottom - top) * (right - left)
    return top, bottom, left, right


# ---------------------------------------------------------------------------------------------------------------
# Mixup and cutmix


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cutmix_pastes_one_window_in_every_frame_and_its_area_is_one_minus_lambda(mode):
    clips, rows = distinct_clips(), 6
    labels = torch.arange(rows)  # row i mixes with row 5 - i, whose label is 5 - i
    augment = mixer(cutmix=1.0, mixup_mode=mode)
    cut = 0
    for batch in range(12):
        out, targets = augment(clips, labels, torch.arange(rows), epoch=0, batch=batch, rank=0)
        assert targets.dtype == torch.float32 and torch.allclose(targets.sum(1), torch.ones(rows))
        for row in range(rows):
            partner = rows - 1 - row
            lam = float(targets[row, row])
            assert targets[row, partner] == pytest.approx(1 - lam, abs=1e-6)
            window = changed_window(clips[row], out[row])
            if not window.any():
                assert lam == 1.0
                continue
            cut += 1
            as_rectangle(window)
            assert int(window.sum()) / (24 * 32) == pytest.approx(1 - lam, abs=1e-6)  # lambda corrected to the box
            assert torch.equal(out[row][:, :, window], clips[partner][:, :, window])  # the partner's clip, every frame
    assert cut > 30  # prob 1: nearly every row was mixed (a box can come out empty)


def test_mixup_blends_each_clip_with_the_flipped_batch_and_keeps_the_rest():
    clips, labels = distinct_clips(rows=5), torch.tensor([0, 1, 2, 3, 4])
    out, targets = mixer(mixup=0.8, mixup_mode="elem")(clips, labels, torch.arange(5), epoch=1, batch=0, rank=0)
    for row in range(5):
        lam = float(targets[row, labels[row]])
        if row == 2:  # the middle row of an odd micro-batch is its own partner: left as it is
            assert lam == 1.0 and torch.equal(out[row], clips[row])
            continue
        assert 0 < lam < 1
        assert torch.allclose(out[row], lam * clips[row] + (1 - lam) * clips[4 - row], atol=1e-6)
    assert torch.equal(clips, distinct_clips(rows=5))  # the loader's tensor is not written to


def test_targets_are_timms_mixup_target_and_the_smoothed_one_hot_labels_mixed():
    labels, classes, smoothing = torch.tensor([3, 0, 6, 6, 1, 2]), 7, 0.2
    mixing = draw_mixing(mixing_rng(0, 2, 5, 0), 6, 32, 32, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5,
                         mode="elem")
    targets = mixed_targets(labels, mixing, classes, smoothing)
    lam = torch.tensor(mixing.lam, dtype=torch.float32)[:, None]
    assert torch.equal(targets, timm_mixup.mixup_target(labels, classes, lam, smoothing))
    one_hot = torch.nn.functional.one_hot(labels, classes).float()
    smoothed = one_hot * (1 - smoothing) + smoothing / classes  # cross_entropy's label_smoothing
    assert torch.allclose(targets, lam * smoothed + (1 - lam) * smoothed.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(6))


class TimmNumpy:
    """numpy for timm.data.mixup, whose global-RNG draws come from `rng` instead (in the order timm makes them)."""

    def __init__(self, rng: np.random.Generator):
        self.random = types.SimpleNamespace(rand=lambda *size: rng.random(size) if size else rng.random(),
                                            beta=lambda a, b, size=None: rng.beta(a, b, size),
                                            randint=lambda low, high=None, size=None: rng.integers(low, high,
                                                                                                   size=size))

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (7, 5)])
def test_the_cutmix_box_and_its_corrected_lambda_are_timms(monkeypatch, size):
    height, width = size
    for seed, lam in enumerate(np.linspace(0.0, 0.99, 34)):
        theirs = np.random.default_rng(seed)
        monkeypatch.setattr(timm_mixup, "np", TimmNumpy(theirs))
        (top, bottom, left, right), timm_lam = timm_mixup.cutmix_bbox_and_lam((3, height, width), lam)
        box, corrected = cutmix_box(np.random.default_rng(seed), lam, height, width)
        assert box.tolist() == [top, bottom, left, right] and corrected == timm_lam


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_batch_mode_equals_timms_mixup_on_the_clip_with_its_frames_as_channels(monkeypatch, mixup, cutmix):
    # timm's Mixup on (B, C*T, H, W) images, fed the same draws: the clips bit for bit, the targets to float32
    clips, labels = distinct_clips(rows=6), torch.tensor([5, 1, 4, 0, 2, 3])
    augment = mixer(mixup=mixup, cutmix=cutmix, mixup_prob=0.9, label_smoothing=0.1)
    for batch in range(8):
        out, targets = augment(clips, labels, torch.arange(6), epoch=4, batch=batch, rank=1)
        monkeypatch.setattr(timm_mixup, "np", TimmNumpy(mixing_rng(3, 4, batch, 1)))
        theirs = timm_mixup.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=0.9, switch_prob=0.5, mode="batch",
                                  label_smoothing=0.1, num_classes=6)
        images, their_targets = theirs(clips.flatten(1, 2).clone(), labels)
        assert torch.equal(out, images.view_as(clips))
        assert torch.allclose(targets, their_targets, atol=1e-6)


def test_switch_and_mixing_probabilities_and_lambda_follow_the_settings():
    def draws(n=2000, **settings):
        settings = {"mixup": 0.8, "cutmix": 1.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch", **settings}
        return [draw_mixing(mixing_rng(0, 0, b, 0), 4, 32, 32, **settings) for b in range(n)]

    mixed = draws(prob=0.6, switch_prob=0.3)
    applied = np.array([m.lam[0] < 1 or m.cut[0] for m in mixed])
    cut = np.array([m.cut[0] for m in mixed])
    assert abs(applied.mean() - 0.6) < 0.04 and abs(cut[applied].mean() - 0.3) < 0.05
    lam = np.array([m.lam[0] for m in mixed])[applied & ~cut]  # mixup: Beta(0.8, 0.8), mean 1/2, var 1 / (4 x 2.6)
    assert abs(lam.mean() - 0.5) < 0.03 and abs(lam.var() - 1 / 10.4) < 0.015
    assert not any(m.cut.any() for m in draws(200, switch_prob=0.0))
    assert all(m.cut.all() for m in draws(200, switch_prob=1.0))
    assert not any(m.cut.any() for m in draws(200, cutmix=0.0))  # mixup only
    assert all(m.cut.all() for m in draws(200, mixup=0.0))  # cutmix only
    assert all((m.lam == 1).all() and not m.cut.any() for m in draws(200, prob=0.0))


def test_modes_draw_once_a_batch_once_a_pair_and_once_a_clip():
    def mixing(mode, cutmix=0.0):
        return draw_mixing(mixing_rng(1, 0, 0, 0), 7, 32, 32, mixup=0.0 if cutmix else 1.0, cutmix=cutmix, prob=1.0,
                           switch_prob=0.5, mode=mode)

    for cutmix in (0.0, 1.0):
        batch, pair, elem = (mixing(mode, cutmix) for mode in ("batch", "pair", "elem"))
        for m in (batch, pair, elem):  # row 3 of 7 is its own partner
            assert m.lam[3] == 1 and not m.cut[3]
        others = [0, 1, 2, 4, 5, 6]
        assert len(set(batch.lam[others])) == 1 and len({tuple(b) for b in batch.box[others]}) == 1
        assert all(pair.lam[i] == pair.lam[6 - i] and (pair.box[i] == pair.box[6 - i]).all() for i in range(3))
        assert len(set(pair.lam[:3])) == 3 and len(set(elem.lam[others])) == 6


def test_draws_are_a_function_of_seed_epoch_batch_and_rank_and_leave_the_global_rngs_alone():
    clips, labels, index = distinct_clips(), torch.arange(6), torch.arange(20, 26)
    augment = mixer(mixup=0.8, cutmix=1.0, mixup_mode="elem", re_prob=0.5, label_smoothing=0.1)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    def result(seed=3, epoch=1, batch=2, rank=0):
        return dataclasses.replace(augment, seed=seed)(clips, labels, index, epoch=epoch, batch=batch, rank=rank)

    first, again = result(), result()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (result(batch=3), result(rank=1), result(epoch=2), result(seed=4)):
        assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    assert torch.equal(torch.get_rng_state(), states[0]) and (np.random.get_state()[1] == states[1]).all()
    assert random.getstate() == states[2]


def test_a_micro_batch_of_no_clips_or_one_clip():
    augment = mixer(mixup=0.8, cutmix=1.0, re_prob=1.0, label_smoothing=0.1, mixup_mode="pair")
    empty = torch.zeros(0, 3, 4, 24, 32)
    clips, targets = augment(empty, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), epoch=0,
                             batch=0, rank=0)
    assert clips.shape == empty.shape and targets.shape == (0, 6)
    one = distinct_clips(rows=1)
    clips, targets = augment(one, torch.tensor([2]), torch.tensor([7]), epoch=0, batch=0, rank=0)
    assert torch.allclose(targets, torch.tensor([[0.1 / 6] * 2 + [0.9 + 0.1 / 6] + [0.1 / 6] * 3]))  # not mixed
    assert torch.equal(clips, erase_clips(one, torch.tensor([7]), 3, 0, prob=1.0, mode="pixel", count=1, area=AREA,
                                          aspect=ASPECT))  # erased only


@pytest.mark.gpu
def test_on_the_gpu_the_same_bits_as_on_the_cpu_without_waiting_for_the_device():
    augment = mixer(mixup=0.8, cutmix=1.0, mixup_mode="elem", re_prob=1.0, re_count=2, label_smoothing=0.1)
    clips, labels, index = distinct_clips(), torch.tensor([5, 1, 4, 0, 2, 3]), torch.arange(30, 36)
    on_cpu = augment(clips, labels, index, epoch=2, batch=1, rank=0)
    clips_gpu, labels_gpu = clips.cuda(), labels.cuda()
    torch.cuda.set_sync_debug_mode("error")  # an operation that makes the host wait for the device raises
    try:
        on_gpu = augment(clips_gpu, labels_gpu, index, epoch=2, batch=1, rank=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_gpu[0].cpu(), on_cpu[0]) and torch.equal(on_gpu[1].cpu(), on_cpu[1])


# ---------------------------------------------------------------------------------------------------------------
# Random erasing


def timm_random(rng: np.random.Generator):
    """Python's `random` for timm.data.random_erasing, drawing from `rng` (randint's range includes its end)."""
    return types.SimpleNamespace(random=rng.random, uniform=rng.uniform,
                                 randint=lambda low, high: int(rng.integers(low, high + 1)))


@pytest.mark.parametrize("count", [1, 3])
def test_the_erased_regions_are_timms_random_erasing_regions(monkeypatch, count):
    # timm's RandomErasing on one frame, fed the draws of each video's stream: the same regions ('const' fill,
    # whose zeros timm's own noise cannot change)
    erased = 0
    for video in range(40):
        monkeypatch.setattr(timm_erasing, "random", timm_random(sample_rng(3, 1, video, ERASE)))
        frame = torch.randn(3, 40, 48, generator=torch.Generator().manual_seed(video))
        theirs = timm_erasing.RandomErasing(probability=0.6, mode="const", max_count=count, device="cpu")(
            frame.clone())
        clip = frame[:, None].repeat(1, 5, 1, 1)[None]  # (1, C, 5 frames, H, W)
        ours = erase_clips(clip, torch.tensor([video]), 3, 1, prob=0.6, mode="const", count=count, area=AREA,
                           aspect=ASPECT)
        assert torch.equal(ours[0], theirs[:, None].expand(3, 5, 40, 48))
        erased += not torch.equal(theirs, frame)
    assert 10 < erased < 35


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erasing_is_one_region_with_the_same_fill_in_every_frame(mode):
    clips, index = distinct_clips(rows=8, frames=5, height=40, width=48), torch.arange(100, 108)
    out = erase_clips(clips, index, 0, 2, prob=1.0, mode=mode, count=1, area=AREA, aspect=ASPECT)
    for row in range(8):
        window = changed_window(clips[row], out[row])
        top, bottom, left, right = as_rectangle(window)
        assert 0.015 < window.float().mean() < 0.4  # 2% to 1/3 of the frame (each side rounded to a pixel)
        fill = out[row][:, :, top:bottom, left:right]  # (C, T, h, w)
        assert torch.equal(fill, fill[:, :1].expand_as(fill))  # the same fill in every frame
        first = fill[:, 0]
        if mode == "pixel":
            assert first.std() > 0.5  # normal noise, pixel by pixel
        elif mode == "rand":
            assert torch.equal(first, first[:, :1, :1].expand_as(first)) and len(set(first[:, 0, 0].tolist())) == 3
        else:
            assert not first.any()  # 0: the mean colour in the normalised space


def test_erasing_with_probability_zero_or_nothing_on_changes_nothing():
    clips, labels, index = distinct_clips(), torch.arange(6), torch.arange(6)
    assert erase_clips(clips, index, 0, 0, prob=0.0, mode="pixel", count=1, area=AREA, aspect=ASPECT) is clips
    out, targets = mixer()(clips, labels, index, epoch=0, batch=0, rank=0)  # the defaults: all off
    assert out is clips and targets is labels
    assert not any(erased_regions(0, 0, video, 3, 24, 32, prob=0.0, mode="pixel", count=1, area=AREA, aspect=ASPECT)
                   for video in range(500))


def test_each_clip_is_erased_alike_in_any_batch():
    clips, labels, index = distinct_clips(rows=6), torch.arange(6), torch.tensor([40, 11, 7, 93, 2, 60])
    augment = mixer(re_prob=0.7, re_count=2, re_mode="pixel")
    whole, _ = augment(clips, labels, index, epoch=3, batch=0, rank=0)
    assert not torch.equal(whole, clips)
    order = torch.tensor([4, 0, 5])
    part, _ = augment(clips[order], labels[order], index[order], epoch=3, batch=9, rank=1)
    assert torch.equal(part, whole[order])
    assert not torch.equal(augment(clips, labels, index, epoch=4, batch=0, rank=0)[0], whole)  # another epoch


def test_each_augmented_view_is_erased_on_its_own_and_view_0_as_without_views():
    clips, labels = distinct_clips(rows=6), torch.arange(6)
    index, view = torch.tensor([40, 40, 11, 11, 7, 7]), torch.tensor([0, 1] * 3)  # 3 videos x 2 views (num_sample 2)
    augment = mixer(re_prob=1.0, re_mode="const")
    erased, _ = augment(clips, labels, index, epoch=3, batch=0, rank=0, view=view)
    without_views, _ = augment(clips[0::2], labels[0::2], index[0::2], epoch=3, batch=0, rank=0)
    assert torch.equal(erased[0::2], without_views)
    for row in range(0, 6, 2):  # every clip is erased (p = 1), each view of a video at its own place
        assert not torch.equal(changed_window(clips[row], erased[row]), changed_window(clips[row + 1], erased[row + 1]))
    assert torch.equal(augment(clips, labels, index, epoch=3, batch=5, rank=1, view=view)[0], erased)


def test_erasing_probability_count_and_shape_follow_the_settings():
    regions = [erased_regions(5, 0, video, 3, 224, 224, prob=0.25, mode="const", count=3, area=AREA, aspect=ASPECT)
               for video in range(3000)]
    assert abs(np.mean([bool(r) for r in regions]) - 0.25) < 0.03
    counts = np.bincount([len(r) for r in regions if r], minlength=4)
    assert counts[0] == 0 and all(abs(c / counts.sum() - 1 / 3) < 0.06 for c in counts[1:])  # 1 to 3 regions
    single = [r[0] for r in regions if len(r) == 1]
    fractions = np.array([r.height * r.width / 224 ** 2 for r in single])
    assert fractions.min() > 0.019 and fractions.max() < 0.34 and abs(fractions.mean() - (0.02 + 1 / 3) / 2) < 0.03
    log_aspect = np.log([r.height / r.width for r in single])
    assert log_aspect.min() > np.log(0.27) and log_aspect.max() < np.log(3.7) and abs(log_aspect.mean()) < 0.15


# ---------------------------------------------------------------------------------------------------------------
# The loss, and training


class Logits(torch.nn.Module):
    """A model of fixed logits per clip (its first value picks the row), failing on a batch of no clips."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))

    def forward(self, clips, seeds=None, num_tokens=None):
        if not len(clips):
            raise RuntimeError("batch size must be positive")
        return self.table[clips.flatten(1)[:, 0].long()]


def test_training_loss_takes_soft_targets_without_smoothing_them_again():
    model, labels = Logits(), torch.tensor([1, 4, 0, 5])
    clips = torch.arange(4).float().view(4, 1, 1, 1, 1)
    step = TrainingLoss(model, label_smoothing=0.1, rows_per_step=8)
    hard, _ = step(clips, labels, None)
    # unmixed soft targets (mixup_prob 0) carry the smoothing: the same loss as the hard labels
    unmixed = mixer(mixup=0.8, mixup_prob=0.0, label_smoothing=0.1)(clips, labels, torch.arange(4), epoch=0, batch=0,
                                                                     rank=0)[1]
    soft, logits = step(clips, unmixed, None)
    assert unmixed.shape == (4, 6) and torch.allclose(soft, hard, atol=1e-6)
    mixed = mixer(mixup=0.8, label_smoothing=0.1)(clips, labels, torch.arange(4), epoch=0, batch=0, rank=0)[1]
    expected = -(mixed * logits.log_softmax(1)).sum() / 8
    assert torch.allclose(step(clips, mixed, None)[0], expected, atol=1e-6)
    empty, none = step(clips[:0], mixed[:0], None)  # no clips: the model is not called, every parameter a zero grad
    assert none is None and empty.item() == 0
    empty.backward()
    assert torch.equal(model.table.grad, torch.zeros(6, 6))


MIXING = dict(mixup=0.8, cutmix=1.0, mixup_mode="elem", label_smoothing=0.1)


def mixing_trainer(batches):
    from test_train import SMALL, bare_trainer  # its module needs DALI and PyAV
    from models import KCenterViT
    torch.manual_seed(0)
    tr = bare_trainer(KCenterViT(**SMALL), batches, accum=2, **MIXING)  # drop path on: the global RNG is in play
    tr.cfg.data.re_prob, tr.cfg.data.re_count, tr.cfg.model.num_classes = 0.6, 2, SMALL["num_classes"]
    tr.inputs, forward_loss = [], tr.forward_loss

    def recording(clips, targets, seeds, num_tokens=None):
        loss, logits = forward_loss(clips, targets, seeds, num_tokens)
        tr.inputs.append((clips, targets, loss.item()))
        return loss, logits

    tr.forward_loss = recording
    torch.manual_seed(1)  # the dropout / drop path stream (Trainer: seed x 1000 + rank)
    return tr


def weights(tr):
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


def test_training_with_mixing_and_erasing_is_finite_repeatable_and_resumes_bit_identical():
    from test_train import StopAfter, clip_batch
    from train import Preempted, train_one_epoch
    batches = [clip_batch(2 * i, 2) for i in range(8)]
    batches[5], batches[6] = clip_batch(10, 0), clip_batch(12, 1)  # a micro-batch of no clips, one of a single clip
    straight = mixing_trainer(batches)
    train_one_epoch(straight, 1, 0)
    losses = [loss for _, _, loss in straight.inputs]
    assert straight.step == 4 and all(np.isfinite(losses)) and losses[5] == 0
    assert all(t.dtype == torch.float32 and t.shape == (len(t), 5) for _, t, _ in straight.inputs)
    mixed = [i for i, (clips, _, _) in enumerate(straight.inputs) if len(clips) == 2
             and not torch.equal(clips, batches[i].clips)]
    assert len(mixed) == 6  # every clip pair was erased or mixed
    again = mixing_trainer(batches)
    train_one_epoch(again, 1, 0)
    assert all(torch.equal(a, b) for a, b in zip(weights(straight).values(), weights(again).values()))

    # stopped after optimizer step 2 (batch 4) and resumed from what last.pt would hold
    stopped, saved = mixing_trainer(batches), {}
    stopped.save = lambda epoch, batch_in_epoch: saved.update(
        model=weights(stopped), optimizer=copy.deepcopy(stopped.optimizer.state_dict()),
        scheduler=stopped.scheduler.state_dict(), step=stopped.step, rng=torch.get_rng_state(), batch=batch_in_epoch)
    with pytest.raises(Preempted):
        train_one_epoch(stopped, 1, 0, StopAfter(1))
    resumed = mixing_trainer(batches)
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.scheduler.load_state_dict(saved["scheduler"])
    resumed.step, resumed.train_loader = saved["step"], batches[saved["batch"]:]  # the loader resumes at batch 4
    torch.set_rng_state(saved["rng"])
    train_one_epoch(resumed, 1, saved["batch"])
    assert saved["batch"] == 4 and resumed.step == 4
    for (a, ta, _), (b, tb, _) in zip(straight.inputs[4:], resumed.inputs):
        assert torch.equal(a, b) and torch.equal(ta, tb)  # the same erased, mixed clips and targets
    assert all(torch.equal(a, b) for a, b in zip(weights(straight).values(), weights(resumed).values()))


# the demo with mixup, cutmix and erasing on, and drop path (the global RNG stream a resume must also restore); a tiny
# model, 12 videos, 2 epochs of 3 optimizer steps of 2 micro-batches of 2, a checkpoint after each step
AUGMENTED_RUN = ["train.mixup=0.8", "train.cutmix=1.0", "train.mixup_mode=elem", "data.re_prob=0.5", "data.re_count=2",
                 "train.epochs=2", "train.batch_size=4", "train.micro_batch_size=2", "train.save_every_steps=1",
                 "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.num_tokens=60",
                 "data.py_workers=1", "data.num_threads=1"]


@pytest.fixture(scope="module")
def small_demo_root(tmp_path_factory):
    pytest.importorskip("av", reason="needs PyAV")
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
    from preprocess.make_demo_data import make_demo_dataset
    root = str(tmp_path_factory.mktemp("demo_mixing") / "data")
    make_demo_dataset(root, {"train": 3, "val": 1})  # 12 train, 4 val videos
    return root


@pytest.mark.slow
def test_train_py_with_mixing_and_erasing_is_finite_and_a_killed_run_resumes_bit_identical(tmp_path, small_demo_root):
    from test_reproducibility import assert_same_training_state, command, run_and_kill, run_to_end
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(straight, small_demo_root, 1, *AUGMENTED_RUN))
    losses = [float(line.split(": loss ")[1].split(",")[0])
              for line in (straight / "train.log").read_text().splitlines() if ": loss " in line]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses), losses

    args = command(killed, small_demo_root, 1, *AUGMENTED_RUN)
    resumed_from = run_and_kill(args, killed / "last.pt", 1)  # SIGKILL, every process it started
    assert 0 < resumed_from < 6, resumed_from
    run_to_end(args)
    assert (killed / "train.log").read_text().count("resumed from") == 1
    assert_same_training_state(straight / "last.pt", killed / "last.pt", epochs=2, steps_per_epoch=3)
