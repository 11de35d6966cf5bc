"""Token budgets at test time: a model run on another number of tokens computes what the same weights built with that
number compute; invalid budgets are errors naming the valid ones; eval.py's sweep scores every budget on the same
views and seeds, and at the model's own budget gives exactly the plain evaluation; predict.py --budget."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import torch

import eval as eval_script
from config import Config, EvalConfig, load_config
from models import KCenterMotionformer, KCenterTimeSformer, KCenterViT
from models.flops import view_gflops
from test_train import REPO, SMALL, RefusesEmpty, clip_batch, demo_root, run, write_config  # noqa: F401 (fixture)
from vis import SERIES_COLOURS, draw_line_plot, draw_series_plot

# 8 frames of 4x4 places: the segmented families in 4 groups of 16 (a hybrid segment and 3 k-center mosaics)
SEGMENTED = dict(num_classes=5, num_frames=8, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                 num_tokens=4 * 16, num_hybrid_frames=1, num_segments=4, drop_path_rate=0.0)


def built_at(model, family, settings: dict, num_tokens: int):
    """The same weights in a model built with `num_tokens` (and, for the segmented families, its segments)."""
    extra = {"num_segments": num_tokens // 16} if family.segmented else {}
    twin = family(**{**settings, "num_tokens": num_tokens, **extra}).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("family, budgets", [
    (KCenterViT, [16, 17, 40, 64, 128]),  # from the hybrid frame's 16 tokens to all 8 x 16 patches
    (KCenterTimeSformer, [16, 32, 64, 128]),  # 1, 2, 4, 8 segments
    (KCenterMotionformer, [16, 32, 64, 128])])
def test_a_budget_gives_the_logits_of_the_model_built_with_it(family, budgets):
    settings = {**SEGMENTED, "num_tokens": 40 if not family.segmented else 64}
    torch.manual_seed(0)
    model = family(**settings).eval()
    with torch.no_grad():  # a temporal branch that is not a no-op, and embeddings that differ by frame
        for p in model.parameters():
            p.normal_(0, 0.05)
    assert list(model.token_budgets()) == (list(range(16, 129)) if not family.segmented else [16, 32, 64, 128])
    clip, seeds = torch.randn(3, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 6, 7])
    with torch.no_grad():
        own = model(clip, seeds=seeds)
        assert torch.equal(model(clip, seeds=seeds, num_tokens=settings["num_tokens"]), own)
        outputs = []
        for budget in budgets:
            twin = built_at(model, family, settings, budget)
            tokens, t_index, s_index = model.select_tokens(clip, seeds=seeds, num_tokens=budget)
            expected = twin.select_tokens(clip, seeds=seeds)
            assert tokens.shape[1] == budget
            assert all(torch.equal(a, b) for a, b in zip((tokens, t_index, s_index), expected)), budget
            logits = model(clip, seeds=seeds, num_tokens=budget)
            assert torch.equal(logits, twin(clip, seeds=seeds)), budget
            outputs.append(logits)
            assert view_gflops(model, budget) == view_gflops(twin)
        assert not any(torch.equal(a, b) for a, b in zip(outputs, outputs[1:]))  # the budget changes the answer
    assert model.pos_embed.device.type == "cpu"  # counting on a meta copy leaves the model as it is
    gflops = [view_gflops(model, b) for b in budgets]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]


def test_the_vits_budgets_pick_the_same_start_and_keep_the_hybrid_frame():
    torch.manual_seed(0)
    model = KCenterViT(**{**SEGMENTED, "num_tokens": 40}).eval()
    clip, seeds = torch.randn(2, 3, 8, 32, 32), torch.tensor([3, 4])
    _, t_small, s_small = model.select_tokens(clip, seeds=seeds, num_tokens=20)
    _, t_large, s_large = model.select_tokens(clip, seeds=seeds, num_tokens=100)
    assert (t_small[:, :16] == 0).all() and (t_large[:, :16] == 0).all()  # the hybrid frame first, whole
    # greedy k-center from the same start: the smaller budget's picks are the first of the larger one's
    assert torch.equal(t_small[:, 16:], t_large[:, 16:20]) and torch.equal(s_small[:, 16:], s_large[:, 16:20])


def test_budgets_below_the_hybrid_frames_or_above_the_clip_are_errors_naming_the_range():
    model = KCenterViT(**{**SEGMENTED, "num_tokens": 40})
    for budget in (15, 129, 0):
        with pytest.raises(ValueError, match=rf"token budget {budget} is outside \[16, 128\].*1 hybrid frames of 16 "
                                             r"patches to all 8 x 16 patches"):
            model(torch.randn(1, 3, 8, 32, 32), num_tokens=budget)
    with pytest.raises(ValueError, match="a token budget is an int, got float 40.0"):
        model.check_budget(40.0)
    # at config time, for every family: the hybrid frames' tokens to the clip's patches, the values named
    overrides = ["model.num_tokens=40", "model.num_hybrid_frames=1", "data.num_frames=8", "model.num_frames=8",
                 "model.img_size=32", "data.crop_size=32", "data.train_jitter_scales=[32,40]", "model.patch_size=8"]
    with pytest.raises(ValueError, match=r"eval.budgets \[8, 200\] outside \[16, 128\]: .* 1 hybrid frames of 16 "
                                         r"patches and at most all 8 x 16 patches"):
        load_config(os.path.join(REPO, "configs", "demo.yaml"), overrides + ["eval.budgets=[8,40,200]"])
    assert load_config(os.path.join(REPO, "configs", "demo.yaml"),
                       overrides + ["eval.budgets=[16,128]"]).eval.budgets == [16, 128]
    assert Config().eval.budgets == [] and EvalConfig().budgets == []  # off by default
    with pytest.raises(ValueError, match=r"eval.budgets must be distinct token counts > 0, got \[64, 64\]"):
        EvalConfig(budgets=[64, 64])


@pytest.mark.parametrize("family", [KCenterTimeSformer, KCenterMotionformer])
def test_a_segmented_familys_budget_is_whole_groups_of_segments_that_divide_the_clip(family):
    model = family(**{**SEGMENTED, "num_hybrid_frames": 2})  # 2 hybrid segments: at least 2 segments
    assert model.token_budgets() == [32, 64, 128]
    for budget in (40, 16, 48, 96, 144):  # not whole groups; fewer segments than hybrid ones; 3 and 6 do not divide
        with pytest.raises(ValueError, match=rf"token budget {budget} is not one {family.__name__} can run on: its "
                                             r"tokens are segments x 16 .* 8 frames .* 2 hybrid segments\), valid "
                                             r"budgets: 32, 64, 128$"):
            model(torch.randn(1, 3, 8, 32, 32), num_tokens=budget)


def test_the_sweep_scores_each_budget_on_the_same_views_and_equals_the_plain_test_at_the_models_own():
    torch.manual_seed(0)
    model = RefusesEmpty(KCenterViT(**SMALL))  # 4 frames of 4x4 places, 24 tokens, 1 hybrid frame
    cfg = Config()
    batches = [clip_batch(0, 3, views=(2,)), clip_batch(3, 0, views=(2,)), clip_batch(3, 2, views=(2,))]
    plain = eval_script.score_videos(model, batches, torch.device("cpu"), None, 0, cfg, "sum_logits")
    budgets = [16, 24, 40, 64]
    swept, timing = eval_script.score_budgets(model, batches, torch.device("cpu"), None, 0, cfg, "sum_logits",
                                              budgets)
    assert sorted(swept) == budgets and all(sorted(r) == [0, 1, 2, 3, 4] for r in swept.values())
    assert all(np.array_equal(plain[i][1], swept[24][i][1]) and plain[i][0] == swept[24][i][0] for i in plain)
    for budget in (16, 64):  # each budget as the model built with it scores the same views
        twin = KCenterViT(**{**SMALL, "num_tokens": budget})
        twin.load_state_dict(model.model.state_dict())
        alone = eval_script.score_videos(twin, batches, torch.device("cpu"), None, 0, cfg, "sum_logits")
        assert all(np.array_equal(alone[i][1], swept[budget][i][1]) for i in alone)
    # timed after the first batch (warm-up): the last batch's 2 videos x 2 views
    assert all(views == 4 and seconds > 0 for views, seconds in timing.values())

    class Data:
        labelled, class_names = True, [f"c{i}" for i in range(5)]
    cfg.model.num_tokens = 24
    entries = eval_script.budget_entries(model.model, cfg, swept, timing, SimpleLoader(Data()))
    assert [e["budget"] for e in entries] == budgets and [e["trained"] for e in entries] == [0, 1, 0, 0]
    labels = np.array([plain[i][0] for i in sorted(plain)])
    own = eval_script.compute_metrics(np.stack([plain[i][1] for i in sorted(plain)]), labels, Data.class_names)
    assert entries[1]["metrics"] == own
    assert [e["hybrid_tokens"] for e in entries] == [16] * 4 and [e["kcenter_tokens"] for e in entries] == [0, 8,
                                                                                                               24, 48]
    assert entries[0]["gflops_per_view"] < entries[-1]["gflops_per_view"]


class SimpleLoader:
    def __init__(self, dataset):
        self.dataset, self.class_names = dataset, dataset.class_names


def test_the_line_plot_marks_each_point():
    image = draw_line_plot([1.0, 2.0, 4.0], [50.0, 60.0, 62.5], ["a", "b", "c"], "GFLOPs", "top-1")
    assert image.shape == (440, 640, 3) and image.dtype == np.uint8
    marker = np.array([255, 140, 0])  # the points' fill
    assert (np.abs(image.astype(int) - marker).sum(-1) == 0).sum() >= 3 * 20


def test_the_series_plot_draws_each_line_in_its_colour_with_its_bars_and_legend():
    series = [{"name": "one", "xs": [1.0, 2.0], "ys": [50.0, 60.0], "lows": [45.0, 58.0], "highs": [55.0, 61.0]},
              {"name": "two", "xs": [1.0, 2.0], "ys": [40.0, 70.0], "labels": ["a", "b"]}]
    image = draw_series_plot(series, "GFLOPs", "top-1").astype(int)
    for colour in SERIES_COLOURS[:2]:
        assert (np.abs(image - np.array(colour)).sum(-1) == 0).sum() > 100  # its line, markers and legend
    first = np.abs(image - np.array(SERIES_COLOURS[0])).sum(-1) == 0
    # the bar at x = 1 spans 45..55 on axes 40..70 (ticks): its column is coloured from 1/6 to 1/2 up the plot
    column = first[:, 70 + 4 - 4 : 70 + 4 + 5].any(1)  # left margin 70, the bar's caps 4 pixels either side
    rows = np.flatnonzero(column)
    plot_top, plot_bottom = 40, 440 - 55
    assert rows.min() <= plot_bottom - (55 - 40) / 30 * (plot_bottom - plot_top) + 2
    assert rows.max() >= plot_bottom - (45 - 40) / 30 * (plot_bottom - plot_top) - 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):  # noqa: F811
    """A tiny demo ViT (8 frames of 6x6 places, 60 tokens = 1 hybrid frame + 24 picks), trained and tested."""
    tmp = tmp_path_factory.mktemp("budgets")
    config = write_config(tmp, demo_root, tmp / "run", train={"save_every_steps": 0})
    result = run(["train.py", "--config", config], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, config


def test_the_budget_benchmark_reuses_a_run_only_of_its_own_commands_and_commit(tmp_path, monkeypatch):
    from bench import bench_budgets
    ran, entries = [], [{"budget": 72}, {"budget": 144}]
    out = tmp_path / "one_budget_seed0"

    def run(args, log):  # train.py and eval.py, faked: eval.py writes the results
        ran.append(args[0])
        if args[0] == "eval.py":
            (out / "test").mkdir()
            (out / "test" / "results.json").write_text(json.dumps({"budgets": entries}))

    monkeypatch.setattr(bench_budgets, "run", run)
    out.mkdir()
    (out / "last.pt").write_bytes(b"of older code")  # a run folder from before run.json
    with pytest.raises(SystemExit, match="without a run.json"):
        bench_budgets.train_and_test(str(out), 0, [], [72, 144], [])
    (out / "last.pt").unlink()
    (out / "test").mkdir()
    (out / "test" / "results.json").write_text(json.dumps({"budgets": entries}))  # a finished run...
    with pytest.raises(SystemExit, match="without a run.json"):  # ... of unknown making is not taken in
        bench_budgets.train_and_test(str(out), 0, [], [72, 144], [])
    assert ran == []
    (out / "test" / "results.json").unlink()
    (out / "test").rmdir()
    assert bench_budgets.train_and_test(str(out), 0, [], [72, 144], []) == entries  # runs, and stamps the folder
    assert ran == ["train.py", "eval.py"] and json.loads((out / "run.json").read_text())["commit"]
    assert bench_budgets.train_and_test(str(out), 0, [], [72, 144], []) == entries  # its own: reused, not rerun
    assert ran == ["train.py", "eval.py"]
    with pytest.raises(SystemExit, match="other commands"):  # other settings in the same folder
        bench_budgets.train_and_test(str(out), 0, ["train.epochs=5"], [72, 144], [])
    monkeypatch.setattr(bench_budgets, "commit", lambda: "another")
    with pytest.raises(SystemExit, match="other commands"):  # other code
        bench_budgets.train_and_test(str(out), 0, [], [72, 144], [])


@pytest.mark.slow
def test_eval_sweep_writes_each_budget_and_its_own_budget_equals_the_plain_test(trained):
    tmp, config = trained
    plain = json.loads((tmp / "run" / "results.json").read_text())  # train.py's test of last.pt at 60 tokens
    assert plain["budget"] == 60 and "budgets" not in plain
    out = tmp / "sweep"
    result = run(["eval.py", "--config", config, "eval.budgets=[36,60,144,288]", f"eval.out_dir={out}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    entries = {e["budget"]: e for e in summary["budgets"]}
    assert sorted(entries) == [36, 60, 144, 288] and summary["budget"] == 60
    assert entries[60]["metrics"] == plain["metrics"] == summary["metrics"]  # equal, not close
    assert (out / "predictions.csv").read_text() == (tmp / "run" / "predictions.csv").read_text()
    assert entries[36]["kcenter_tokens"] == 0 and entries[288]["kcenter_tokens"] == 288 - 36
    assert all(e["clips_per_s"] > 0 and e["metrics"]["videos"] == 8 for e in entries.values())
    gflops = [entries[b]["gflops_per_view"] for b in sorted(entries)]
    assert gflops == sorted(gflops)
    log = (out / "train.log").read_text()
    assert "| tokens | segments | GFLOPs / view | clips/s | top-1 | top-5 |" in log and "| 60 * | 1 |" in log
    assert (out / "budgets.png").stat().st_size > 0 and os.listdir(out / "tensorboard")

    # budgets a family cannot run on stop eval.py before a video is read, naming the valid ones
    result = run(["eval.py", "--config", config, "eval.budgets=[30,60]", f"eval.out_dir={tmp / 'bad'}"], timeout=300)
    assert result.returncode != 0 and "eval.budgets [30] outside [36, 288]" in result.stderr


@pytest.mark.slow
def test_predict_runs_at_a_budget_and_records_it(trained, demo_root):  # noqa: F811
    tmp, _ = trained
    with open(tmp / "run" / "predictions.csv") as f:  # two of the test videos
        videos = [line.split(",")[0] for line in f.read().splitlines()[1:3]]
    for budget, expected in ((None, 60), (144, 144)):
        extra = [] if budget is None else ["--budget", str(budget)]
        result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(tmp / "run" / "last.pt"), *videos,
                                 "--json", str(tmp / f"p{expected}.json"), *extra], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((tmp / f"p{expected}.json").read_text())["budget"] == expected
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(tmp / "run" / "last.pt"), *videos,
                             "--budget", "300"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "token budget 300 is outside [36, 288]" in result.stderr
