"""Budget-elastic training (model.train_budgets): the config's lists and ranges, the draw of each step's budget,
every micro-batch of a step on that budget, each family training on several, and a killed run on 2 processes that
resumes bit-identical."""
import signal

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="needs PyAV")  # train reads videos with it

import eval as evaluation
import train
from config import config_from_dict, load_config
from models import ARCHS, KCenterViT
from runtime import train_budgets
from test_train import SMALL, bare_trainer, clip_batch
from train import check_resumable, resolve_train_budgets, train_one_epoch


def demo_config(*overrides):
    return load_config("configs/demo.yaml", list(overrides))


@pytest.mark.parametrize("value, expected", [
    ([72, 216, 108], [72, 216, 108]),
    ("72-216/36", [72, 108, 144, 180, 216]),
    ("100-103", [100, 101, 102, 103]),
    ([], []),
])
def test_train_budgets_take_a_list_or_a_range(value, expected):
    cfg = config_from_dict({"data": {"num_frames": 8, "crop_size": 48},
                            "model": {"img_size": 48, "patch_size": 8, "num_frames": 8, "num_hybrid_frames": 1,
                                      "num_tokens": 144, "train_budgets": value}})
    assert cfg.model.train_budget_candidates() == expected


@pytest.mark.parametrize("override, error", [
    ("model.train_budgets=[72,108,72]", "model.train_budgets lists a budget twice: \\[72, 108, 72\\]"),
    ("model.train_budgets=[20,144]", "model.train_budgets \\[20\\] outside \\[36, 288\\]: a budget holds at least the "
                                     "1 hybrid frames of 36 patches"),
    ("model.train_budgets=36-300/12", "model.train_budgets '36-300/12' outside \\[36, 288\\]"),
    ("model.train_budgets=144-72", "'144-72': a range needs 0 < LO < HI and STEP > 0"),
    ("model.train_budgets=72:144", "must be a list of token counts or a range 'LO-HI' or 'LO-HI/STEP'"),
    ("model.train_budgets=144", "model.train_budgets must be list\\[int\\] or str, got int 144"),
    ("model.train_budgets=[72,1.5]", "model.train_budgets must be list\\[int\\] or str, got list \\[72, 1.5\\]"),
])
def test_a_bad_train_budgets_value_is_an_error_naming_the_key(override, error):
    with pytest.raises((TypeError, ValueError), match=error):
        demo_config(override)


def small_config(train_budgets):
    """A config of test_train's SMALL model (4 frames of 4 x 4 patches, one hybrid frame)."""
    return config_from_dict({"data": {"num_frames": 4, "crop_size": 32},
                             "model": {**SMALL, "train_budgets": train_budgets}})


def test_the_segmented_families_keep_the_budgets_of_a_range_they_can_run_on_and_refuse_others_listed():
    torch.manual_seed(0)
    model = ARCHS["timesformer"](**{**SMALL, "num_segments": 2, "num_tokens": 32})  # 4 frames, groups of 16
    cfg = small_config("16-64")
    assert resolve_train_budgets(model, cfg) == [16, 32, 64] == list(model.token_budgets())
    with pytest.raises(ValueError, match="model.train_budgets: token budget 40 is not one KCenterTimeSformer can "
                                         "run on: .* valid budgets: 16, 32, 64"):
        resolve_train_budgets(model, small_config([32, 40]))
    with pytest.raises(ValueError, match="token budget 17 is not one .* valid budgets: 16, 32, 64"):
        resolve_train_budgets(model, small_config("17-31"))
    vit = KCenterViT(**SMALL)  # any count from its hybrid frame's 16 tokens to all 64
    assert resolve_train_budgets(vit, small_config("16-20")) == list(range(16, 21))


def test_each_steps_budget_is_a_fixed_function_of_the_seed_and_the_step_spread_over_the_budgets():
    budgets = [72, 108, 144, 216]
    steps = np.arange(4000)
    drawn = train_budgets(0, steps, budgets)
    assert np.array_equal(drawn, train_budgets(0, steps, budgets))  # rerun, resume: the same draws
    assert [int(train_budgets(0, s, budgets)) for s in (0, 17, 3999)] == [drawn[0], drawn[17], drawn[3999]]
    counts = np.bincount(np.searchsorted(budgets, drawn), minlength=4)
    assert counts.sum() == 4000 and counts.min() > 900 and counts.max() < 1100, counts  # uniform: 1000 +- 3 sd
    assert not np.array_equal(drawn, train_budgets(1, steps, budgets))  # another seed, other draws
    assert (drawn[1:] != drawn[:-1]).mean() > 0.6  # not one budget for long runs of steps


class CountsTokens(torch.nn.Module):
    """The model, recording the budget of each forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.budgets = model, []

    def forward(self, clips, seeds=None, num_tokens=None):
        self.budgets.append(num_tokens)
        return self.model(clips, seeds=seeds, num_tokens=num_tokens)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_micro_batch_of_a_step_runs_on_the_steps_budget_and_the_epoch_is_deterministic(arch):
    segmented = ARCHS[arch].segmented
    settings = {**SMALL, **({"num_segments": 2, "num_tokens": 32} if segmented else {})}
    budgets = [16, 32, 64] if segmented else [16, 24, 40, 64]
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = CountsTokens(ARCHS[arch](**settings))
        batches = [clip_batch(2 * i, 2) for i in range(16)]
        tr = bare_trainer(model, batches, accum=2, log_every_steps=4)  # 8 optimizer steps of 2 micro-batches
        tr.budgets = budgets
        train_one_epoch(tr, 0, 0)
        expected = train_budgets(tr.cfg.train.seed, np.arange(8), budgets)
        assert model.budgets == list(np.repeat(expected, 2)), model.budgets
        means = [value for name, value, _ in tr.writer.scalars if name == "train/tokens"]
        assert means == [expected[:4].mean(), expected.mean()]  # the epoch's mean budget at each log step
        results.append([p.detach().clone() for p in model.parameters()])
    assert len(set(map(int, expected))) > 1  # the steps ran on more than one budget
    assert all(torch.equal(a, b) for a, b in zip(*results))  # the same command, the same bits


def test_a_run_without_train_budgets_trains_every_step_at_the_models_budget():
    torch.manual_seed(0)
    model = CountsTokens(KCenterViT(**SMALL))
    tr = bare_trainer(model, [clip_batch(2 * i, 2) for i in range(4)], accum=2)
    train_one_epoch(tr, 0, 0)
    assert model.budgets == [None] * 4 and tr.step_budget() is None


def test_resuming_with_other_train_budgets_is_refused_and_eval_ignores_them(tmp_path):
    saved = demo_config("model.train_budgets=[72,144]")
    ckpt = {"config": saved.to_dict()}
    check_resumable(ckpt, saved, "runs/x/last.pt")
    with pytest.raises(ValueError, match=r"model.train_budgets: \[72, 144\] -> '72-216/36'"):
        check_resumable(ckpt, demo_config("model.train_budgets=72-216/36"), "runs/x/last.pt")
    # a model trained elastic is tested with any config that builds the same model
    evaluation.check_checkpoint_fits(ckpt, demo_config(), "runs/x/last.pt", class_names=[])


def test_the_start_of_an_elastic_run_logs_each_budget_its_cost_and_its_steps(caplog):
    torch.manual_seed(0)
    model = KCenterViT(**SMALL)
    with caplog.at_level("INFO", logger="kcenter"):
        train.log_train_budgets([16, 40, 64], seed=0, total_steps=30, model=model)
        train.log_train_budgets(list(range(16, 65)), seed=0, total_steps=30, model=model)
    table, summary = caplog.messages
    rows = [line.split() for line in table.splitlines()[2:]]
    counts = np.bincount(np.searchsorted([16, 40, 64], train_budgets(0, np.arange(30), [16, 40, 64])), minlength=3)
    assert [(int(r[0]), int(r[2])) for r in rows] == list(zip([16, 40, 64], counts.tolist()))
    assert float(rows[0][1]) < float(rows[1][1]) < float(rows[2][1])  # GFLOPs grow with the tokens
    assert "49 token budgets" in summary and "16 to 64 tokens" in summary and "of the run's 30 steps" in summary


@pytest.mark.slow
def test_train_py_elastic_on_two_processes_killed_and_resumed_equals_a_run_never_stopped(tmp_path):
    from test_reproducibility import (SHORT_RUN, SHORT_STEPS, assert_same_training_state, command, run_and_kill,
                                      run_to_end)
    from preprocess.make_demo_data import make_demo_dataset
    root = str(tmp_path / "data")
    make_demo_dataset(root, {"train": 3, "val": 1})  # 12 train, 4 val videos
    elastic = ["model.train_budgets=[72,108,144,216]", "data.val_list=", "train.batch_size=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(straight, root, 2, *SHORT_RUN, *elastic))
    args = command(killed, root, 2, *SHORT_RUN, *elastic)
    resumed_from = run_and_kill(args, killed / "last.pt", 3)
    assert 0 < resumed_from < 2 * SHORT_STEPS, resumed_from
    run_to_end(args)
    log = (killed / "train.log").read_text()
    assert log.count("resumed from") == 1 and log.count("budget-elastic training (model.train_budgets)") == 2
    assert_same_training_state(straight / "last.pt", killed / "last.pt", epochs=2, steps_per_epoch=SHORT_STEPS)
