"""runtime.py: safe checkpoints, RNG state, the command line, the test protocol's choices, seeded K-center starts."""
import logging
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import timm
import torch

from config import Config, ModelConfig
from eval import check_checkpoint_fits
from models import KCenterViT
from runtime import (CHECKPOINT_FORMAT, init_from_checkpoint, kcenter_seeds, load_model_weights, parse_command_line,
                     read_checkpoint, resolve_checkpoint, rng_state, save_checkpoint, set_rng_state, view_seeds)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_classes=5, num_frames=4, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
            num_tokens=24, num_hybrid_frames=1)


def tiny_checkpoint(path, model=None, **extra):
    model = model or KCenterViT(**TINY)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3, 4, 32, 32)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1, "step": 3,
             "rng": [rng_state()], "config": Config().to_dict(), "class_names": ["a", "b"], **extra}
    save_checkpoint(str(path), state)
    return state


def test_checkpoint_loads_weights_only_and_restores_every_rng(tmp_path):
    path = tmp_path / "last.pt"
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    tiny_checkpoint(path)
    expected = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal()
    ckpt = torch.load(path, weights_only=True)  # what every load of this project does
    assert ckpt["format"] == CHECKPOINT_FORMAT and read_checkpoint(str(path))["step"] == 3
    set_rng_state(ckpt["rng"][0])
    again = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal()
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_not_a_checkpoint_is_one_clear_error_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    tiny_checkpoint(good)
    cases = {}
    (tmp_path / "notes.txt").write_text("epoch 3, top-1 71%\n")
    cases["notes.txt"] = "is not a readable checkpoint"
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated.pt"] = "is not a readable checkpoint"
    vit2d = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3)
    torch.save(vit2d.state_dict(), tmp_path / "vit2d.pth")
    cases["vit2d.pth"] = "is not a checkpoint of this project: it is a state dict"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": {}, "config": {}, "epoch": 1}, tmp_path / "x.pt")
    cases["x.pt"] = r"lacks or has the wrong type of step"
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            read_checkpoint(str(tmp_path / name))
        assert str(tmp_path / name) in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(str(tmp_path / "missing.pt"))


class _RunsCode:
    """A pickle that creates a file when it is loaded with the full unpickler."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": _RunsCode(str(target))}, path)
    with pytest.raises(pickle.UnpicklingError):  # the test's pickle is real: it would run under weights_only=False
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=r"evil.pt: refused to load: .*run code"):
        read_checkpoint(str(path))
    assert not target.exists()
    torch.load(path, weights_only=False)  # what the old code did: the file appears
    assert target.exists()


def test_eval_script_on_a_text_file_says_what_is_wrong(tmp_path):
    (tmp_path / "ckpt.txt").write_text("not a checkpoint\n")
    result = subprocess.run([sys.executable, "eval.py", "--config", "configs/demo.yaml", "--checkpoint",
                             str(tmp_path / "ckpt.txt"), "data.device=cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert f"{tmp_path / 'ckpt.txt'} is not a readable checkpoint" in result.stderr.strip().splitlines()[-1]


def test_weights_that_do_not_fit_name_each_tensor(tmp_path):
    path = tmp_path / "other.pt"
    tiny_checkpoint(path, model=KCenterViT(**{**TINY, "num_classes": 7}))
    with pytest.raises(ValueError,
                       match=r"other.pt: .*head.weight: \(7, 48\) in the checkpoint, \(5, 48\) in the model"):
        load_model_weights(KCenterViT(**TINY), read_checkpoint(str(path)), str(path))


def test_eval_refuses_a_checkpoint_of_other_model_settings_or_classes(tmp_path):
    cfg = Config()
    ckpt = {"config": cfg.to_dict(), "class_names": ["a", "b"]}
    check_checkpoint_fits(ckpt, cfg, "x.pt", ["a", "b"])
    cfg.model.num_tokens, cfg.model.drop_path_rate = 784, 0.3  # drop path does not act at test time
    with pytest.raises(ValueError, match=r"x.pt .* model.num_tokens: 1568 in the checkpoint, 784 in the config"
                                         r"[^;]*$"):
        check_checkpoint_fits(ckpt, cfg, "x.pt", ["a", "b"])
    with pytest.raises(ValueError, match=r"class 1 is 'b' in the checkpoint and 'c' in the data"):
        check_checkpoint_fits(ckpt, Config(), "x.pt", ["a", "c"])


def test_overrides_anywhere_on_the_command_line():
    def options(parser):
        parser.add_argument("--checkpoint")
        parser.add_argument("--save-patches")

    args = parse_command_line("", ["--config", "c.yaml", "data.root=D", "--checkpoint", "X", "eval.out_dir=E",
                                   "--save-patches", "P", "train.lr=1"], options)
    assert (args.config, args.checkpoint, args.save_patches) == ("c.yaml", "X", "P")
    assert args.overrides == ["data.root=D", "eval.out_dir=E", "train.lr=1"]
    assert parse_command_line("", ["train.seed=1", "--config", "c.yaml"]).overrides == ["train.seed=1"]


def test_checkpoint_choice_and_test_set_selection_warning(caplog):
    cfg = Config()
    cfg.train.out_dir, cfg.data.val_list, cfg.data.test_list = "runs/x", "val.csv", "val.csv"
    assert cfg.eval.checkpoint == "last" and resolve_checkpoint(cfg) == os.path.join("runs/x", "last.pt")
    assert resolve_checkpoint(cfg, "/w/ckpt.pt") == "/w/ckpt.pt"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="kcenter"):
        assert resolve_checkpoint(cfg, "best") == os.path.join("runs/x", "best.pt")
    assert "chosen on the test set" in caplog.text
    caplog.clear()
    cfg.data.val_list = "minival.csv"
    with caplog.at_level(logging.WARNING, logger="kcenter"):
        resolve_checkpoint(cfg, "best")
    assert not caplog.records


def test_kcenter_seeds_depend_on_seed_video_and_view_only():
    index = torch.tensor([5, 9, 5])
    seeds = view_seeds(0, index, 6)  # (3 videos x 6 views)
    assert seeds.dtype == torch.int64 and seeds.shape == (18,)
    assert torch.equal(seeds[:6], seeds[12:])  # the same video, the same views: the same seeds
    assert len(set(seeds[:12].tolist())) == 12
    assert torch.equal(view_seeds(0, index[1:2], 6), seeds[6:12])  # whatever the batch holds
    assert not torch.equal(view_seeds(1, index, 6), seeds)  # another run seed
    train = kcenter_seeds(0, 0, 3, index)
    assert not torch.equal(train, kcenter_seeds(0, 0, 4, index))  # another epoch
    # the augmented views of a training video (data.num_sample): view 0 starts where a clip without views does
    views = kcenter_seeds(0, 0, 3, index.repeat_interleave(2), torch.tensor([0, 1] * 3))
    assert torch.equal(views[0::2], train) and torch.equal(kcenter_seeds(0, 0, 3, index, torch.zeros(3)), train)
    assert len(set(views[:4].tolist())) == 4 and torch.equal(views[:2], views[4:])
    assert torch.equal(kcenter_seeds(0, 0, 3, index[1:2].repeat(2), torch.tensor([0, 1])), views[2:4])


def test_eval_does_not_import_train():
    code = "import sys, eval; assert 'train' not in sys.modules, 'eval imports train'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_a_spawned_worker_rerunning_the_script_imports_no_torch(script):
    # what multiprocessing's "spawn" does in each DALI source worker before it unpickles its work
    code = (f"import runpy, sys; runpy.run_path({script!r}, run_name='__mp_main__'); "
            "heavy = sorted(m for m in ('torch', 'timm', 'numba', 'models', 'nvidia.dali') if m in sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_init_from_replaces_the_head_when_classes_differ_and_loads_the_rest(tmp_path, caplog):
    path = tmp_path / "k400.pt"
    source = tiny_checkpoint(path, model=KCenterViT(**{**TINY, "num_classes": 7}))["model"]
    model = KCenterViT(**TINY)
    fresh_head = model.head.weight.clone()
    with caplog.at_level(logging.INFO, logger="kcenter"):
        loaded, skipped = init_from_checkpoint(model, read_checkpoint(str(path)), str(path), skip=[])
    assert skipped == ["head.bias", "head.weight"] and "the class count differs" in caplog.text
    assert torch.equal(model.head.weight, fresh_head)
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in loaded) and "blocks.1.attn.qkv.weight" in loaded


def test_init_from_names_every_tensor_that_does_not_fit_unless_skipped(tmp_path):
    from models import KCenterTimeSformer

    path = tmp_path / "vit.pt"
    tiny_checkpoint(path)
    ckpt = read_checkpoint(str(path))
    segmented = dict(TINY, num_tokens=4 * 16, num_segments=4)
    with pytest.raises(ValueError, match=r"vit.pt: 16 tensors do not fit .*blocks.0.temporal_norm1.weight: not in the "
                                         r"checkpoint"):
        init_from_checkpoint(KCenterTimeSformer(**segmented), ckpt, str(path), skip=[])
    model = KCenterTimeSformer(**segmented)  # a ViT's weights into a TimeSformer, its temporal branch left at init
    loaded, skipped = init_from_checkpoint(model, ckpt, str(path), skip=["blocks.*.temporal_*"])
    assert len(skipped) == 16 and "blocks.0.attn.qkv.weight" in loaded
    wide = KCenterViT(**{**TINY, "num_frames": 8, "num_tokens": 40})
    with pytest.raises(ValueError, match=r"time_embed: \(1, 4, 48\) in the checkpoint, \(1, 8, 48\) in the model"):
        init_from_checkpoint(wide, ckpt, str(path), skip=[])
    init_from_checkpoint(wide, ckpt, str(path), skip=["time_embed"])


def test_init_from_settings_are_checked():
    with pytest.raises(ValueError, match="model.init_from .* and model.pretrained .* are both set"):
        ModelConfig(init_from="a.pt", pretrained="vit.pth")
    with pytest.raises(ValueError, match="model.init_skip .* without model.init_from"):
        ModelConfig(init_skip=["head"])
