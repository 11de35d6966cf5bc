"""The confusion matrix: counted from labels and predictions (runtime.py), in eval.py's results.json and
confusion.png, in train.py's validation and its TensorBoard images; the heat map of vis.py."""
import csv
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import torch
from PIL import Image

from config import Config, load_config
from eval import compute_metrics, results_text, score_videos
from models import KCenterViT, build_model
from pipelines import build_loader
from runtime import VAL_STARTS, class_recall, count_confusion, kcenter_seeds, save_checkpoint
from test_train import SMALL, clip_batch, demo_root, run, write_config  # noqa: F401 (fixture)
from train import evaluate
from vis import EMPTY_ROW_COLOUR, HEAT_HIGH, HEAT_LOW, confusion_colours, draw_confusion_matrix, save_png


def brute_force_confusion(labels, predictions, K: int) -> np.ndarray:
    matrix = np.zeros((K, K), np.int64)
    for label, prediction in zip(labels, predictions):
        matrix[label, prediction] += 1
    return matrix


def test_the_matrix_of_known_labels_and_predictions_counts_each_pair_and_gives_the_class_accuracies():
    rng = np.random.default_rng(0)
    K, N = 7, 300
    labels = rng.choice([0, 1, 2, 4, 5, 6], N)  # class 3 has no video
    predictions = np.where(rng.random(N) < 0.6, labels, rng.integers(0, K, N))
    expected = brute_force_confusion(labels, predictions, K)
    for dtype in (torch.int64, torch.float64):  # eval.py counts in int64, train.py in float64 (one all_reduce)
        confusion = torch.zeros(K, K, dtype=dtype)
        for part in np.array_split(np.arange(N), 4):  # batch by batch, as validation counts
            count_confusion(confusion, torch.from_numpy(labels[part]), torch.from_numpy(predictions[part]))
        assert np.array_equal(confusion.numpy(), expected)
    assert np.array_equal(expected.sum(1), np.bincount(labels, minlength=K))  # rows: the true class
    assert np.array_equal(expected.sum(0), np.bincount(predictions, minlength=K))  # columns: the prediction
    assert np.trace(expected) == (labels == predictions).sum()
    recall = class_recall(confusion)
    present = [c for c in range(K) if c != 3]
    assert torch.isnan(recall[3]) and not torch.isnan(recall[present]).any()
    for c in present:
        assert recall[c].item() == (predictions[labels == c] == c).mean()
    assert recall.nanmean().item() == pytest.approx(np.mean([(predictions[labels == c] == c).mean() for c in present]))
    # a stack of matrices (a model and its moving average) gives each its own
    stacked = class_recall(torch.stack([confusion, confusion.T.contiguous()]))
    assert stacked.shape == (2, K) and torch.equal(stacked[0].nan_to_num(-1), recall.nan_to_num(-1))
    assert torch.equal(stacked[1].nan_to_num(-1), class_recall(confusion.T.contiguous()).nan_to_num(-1))


def test_compute_metrics_carries_the_matrix_consistent_with_top1_and_the_per_class_accuracy():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c", "d", "e"]
    labels = rng.choice([0, 1, 2, 4], 50)
    scores = rng.normal(size=(50, 5))
    scores[np.arange(50), labels] += 1.0
    metrics = compute_metrics(scores, labels, names)
    matrix = np.array(metrics["confusion_matrix"]["counts"])
    assert metrics["confusion_matrix"]["classes"] == names
    assert np.array_equal(matrix, brute_force_confusion(labels, scores.argmax(1), 5))
    assert matrix.sum() == metrics["videos"] == 50
    assert 100 * np.trace(matrix) / 50 == pytest.approx(metrics["top1"], rel=1e-12)
    assert set(metrics["per_class_top1"]) == {"a", "b", "c", "e"}  # d has no video
    for c, name in enumerate(names):
        if name in metrics["per_class_top1"]:
            assert metrics["per_class_top1"][name] == pytest.approx(100 * matrix[c, c] / matrix[c].sum(), rel=1e-12)
    assert metrics["mean_class_accuracy"] == pytest.approx(np.mean(list(metrics["per_class_top1"].values())))

    # results.json's text: the same values, a row of the matrix a line
    summary = {"metrics": metrics, "labelled": True, "config": {"data": {"mean": [0.45, 0.45, 0.45]}}}
    text = results_text(summary)
    assert json.loads(text) == summary
    lines = text.splitlines()
    assert all(f"        {json.dumps(row)}" in (line.rstrip(",") for line in lines) for row in matrix.tolist())


def test_validation_counts_the_matrix_of_its_top1_predictions():
    torch.manual_seed(0)
    model = KCenterViT(**SMALL)
    with torch.no_grad():
        model.head.weight.mul_(50)  # predictions that differ from clip to clip
    cfg = Config()
    cfg.model.num_classes = SMALL["num_classes"]
    tr = SimpleNamespace(ddp=model, model=model, cfg=cfg, device=torch.device("cpu"), amp_dtype=None, rank=0,
                         world=1)
    batches = [clip_batch(0, 3), clip_batch(3, 0), clip_batch(3, 4)]
    metrics, _ = evaluate(tr, batches)
    labels, predictions = [], []
    with torch.no_grad():
        for batch in batches:
            if len(batch.labels):
                seeds = kcenter_seeds(cfg.train.seed, VAL_STARTS, 0, batch.index)
                predictions += model(batch.clips, seeds=seeds).argmax(1).tolist()
                labels += batch.labels.tolist()
    matrix = np.array(metrics["confusion"])
    assert len(set(predictions)) > 1, predictions
    assert np.array_equal(matrix, brute_force_confusion(labels, predictions, 5))
    assert matrix.sum() == metrics["videos"] == 7
    assert 100 * np.trace(matrix) / 7 == pytest.approx(metrics["top1"])
    expected = np.mean([(np.array(predictions)[np.array(labels) == c] == c).mean() for c in set(labels)])
    assert metrics["mean_class_acc"] == pytest.approx(100 * expected)


def centroid(image: np.ndarray, colour) -> np.ndarray:
    ys, xs = np.nonzero((image == np.array(colour, np.uint8)).all(-1))
    return np.array([ys.mean(), xs.mean()])


def test_the_heat_map_of_a_tiny_matrix_has_each_rows_shares_in_place(tmp_path):
    counts = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class c has no video
    colours = confusion_colours(counts)
    low, high = np.array(HEAT_LOW, float), np.array(HEAT_HIGH, float)
    quarter, three_quarters = (np.rint(low + s * (high - low)).astype(np.uint8) for s in (0.25, 0.75))
    assert colours.shape == (3, 3, 3) and colours.dtype == np.uint8
    assert (colours[0, 0] == three_quarters).all() and (colours[0, 1] == quarter).all()
    assert (colours[0, 2] == HEAT_LOW).all() and (colours[1, 0] == HEAT_LOW).all()
    assert (colours[1, 1] == HEAT_HIGH).all() and (colours[2] == EMPTY_ROW_COLOUR).all()

    image = draw_confusion_matrix(counts, ["a", "b", "c"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert 3 * 12 < image.shape[0] < 400 and 3 * 12 < image.shape[1] < 400
    for colour in (three_quarters, quarter, HEAT_HIGH, EMPTY_ROW_COLOUR):  # cells of >= 12 x 12 pixels, less text
        assert (image == np.array(colour, np.uint8)).all(-1).sum() >= 100
    # rows are the true class, columns the prediction: a->a left of a->b, b->b below a->b, the empty row below both
    aa, ab, bb, empty = (centroid(image, colour) for colour in (three_quarters, quarter, HEAT_HIGH, EMPTY_ROW_COLOUR))
    assert abs(aa[0] - ab[0]) < 1 and aa[1] < ab[1]
    assert abs(ab[1] - bb[1]) < 1 and bb[0] > ab[0]
    assert empty[0] > bb[0] and abs(empty[1] - bb[1]) < 1  # the row's three cells, centred on the middle column
    assert (image[:, :, 0] < 60).any()  # black text: names, counts and the caption

    path = tmp_path / "m" / "confusion.png"
    save_png(image, str(path))
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)
    assert os.listdir(path.parent) == ["confusion.png"]


def test_the_heat_map_of_400_classes_is_one_square_a_class_without_names():
    K = 400
    counts = np.eye(K, dtype=np.int64) * 3
    counts[7] = 0  # no video
    counts[9, 9], counts[9, 10] = 1, 1  # half of class 9 taken for class 10
    image = draw_confusion_matrix(counts, [f"class {i}" for i in range(K)])
    assert 400 <= image.shape[1] <= 1000 and 400 <= image.shape[0] <= 1100
    blue = (image == np.array(HEAT_HIGH, np.uint8)).all(-1)
    cell = int(round(np.sqrt(blue.sum() / (K - 2))))
    assert cell >= 2 and blue.sum() == (K - 2) * cell ** 2  # the diagonal only: no names, no counts over it
    ys, xs = np.nonzero(blue)
    assert ys.max() - ys.min() + 1 == xs.max() - xs.min() + 1 == K * cell  # a square of K x K cells
    cells = image[ys.min():ys.max() + 1, xs.min():xs.max() + 1][::cell, ::cell]  # a pixel a cell
    assert np.array_equal(cells, confusion_colours(counts))
    assert (cells[7] == EMPTY_ROW_COLOUR).all() and (cells[9, 9] == cells[9, 10]).all()


@pytest.mark.slow  # ~20 s on 2 cores besides the demo data: a scoring pass here and eval.py's
def test_eval_writes_the_matrix_consistent_with_its_predictions_and_the_picture(tmp_path, demo_root):  # noqa: F811
    config = write_config(tmp_path, demo_root, tmp_path / "run")
    cfg = load_config(config, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, pixel_std=float(np.mean(cfg.data.std)), load_pretrained=False)
    # untrained, and its features alike up to small differences, which a random head centred on their mean turns
    # into predictions that differ from video to video
    head, model.head = model.head, torch.nn.Identity()
    loader = build_loader(cfg.data, "test", batch_size=8, rank=0, world_size=1, device_id=None, seed=0)
    features = np.stack([f for _, f in score_videos(model, loader, torch.device("cpu"), None, 0, cfg,
                                                    "sum_logits").values()])  # (videos, embed_dim)
    model.head = head
    with torch.no_grad():
        head.weight.normal_(0, 1)
        head.bias.copy_(-head.weight @ torch.from_numpy(features.mean(0)))
    checkpoint = tmp_path / "untrained.pt"
    save_checkpoint(str(checkpoint), {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0, "step": 0})
    out = tmp_path / "ev"
    result = run(["eval.py", "--config", config, "--checkpoint", str(checkpoint), "eval.num_clips=1",
                  "eval.num_crops=1", f"eval.out_dir={out}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "results.json").read_text()
    metrics = json.loads(text)["metrics"]
    classes, matrix = metrics["confusion_matrix"]["classes"], np.array(metrics["confusion_matrix"]["counts"])
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = [(classes.index(row["label"]), classes.index(row["prediction"])) for row in rows]
    assert matrix.shape == (4, 4) and matrix.sum() == len(rows) == metrics["videos"] == 8
    assert (matrix.sum(0) > 0).sum() > 1, matrix  # more than one class predicted
    assert np.array_equal(matrix, brute_force_confusion(*zip(*pairs), 4))
    assert 100 * np.trace(matrix) / 8 == pytest.approx(metrics["top1"])
    assert all(metrics["per_class_top1"][name] == pytest.approx(100 * matrix[c, c] / matrix[c].sum())
               for c, name in enumerate(classes))
    assert metrics["mean_class_accuracy"] == pytest.approx(100 * np.mean(np.diag(matrix) / matrix.sum(1)))
    assert len(text.splitlines()) < 400  # a row of the matrix a line
    picture = Image.open(out / "confusion.png")
    assert picture.mode == "RGB" and min(picture.size) > 4 * 12
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.slow
def test_training_logs_the_validation_matrix_and_mean_class_accuracy_to_tensorboard(tmp_path, demo_root):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    config = write_config(tmp_path, demo_root, out, train={"epochs": 1}, eval={"num_clips": 1, "num_crops": 1})
    result = run(["train.py", "--config", config], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "val/confusion" in events.Tags()["images"] and "val/mean_class_acc" in events.Tags()["scalars"]
    image = events.Images("val/confusion")[0]
    assert image.step == 0 and image.width > 4 * 12 and image.height > 4 * 12
    mean_class = events.Scalars("val/mean_class_acc")[0].value
    assert 0 <= mean_class <= 100
    assert f"mean class {mean_class:.2f}%" in (out / "train.log").read_text()
    metrics = json.loads((out / "results.json").read_text())["metrics"]  # the test after training
    assert np.array(metrics["confusion_matrix"]["counts"]).sum() == 8 and (out / "confusion.png").exists()
