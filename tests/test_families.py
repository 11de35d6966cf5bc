"""The three K-center families: token layout, the one-per-place rule, hybrid frames at segment centres, 2-D weights
loading into each, gradients, and the families learning through train.py."""
import os

import pytest

pytest.importorskip("av", reason="needs PyAV")
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
import timm
import torch

import config
from config import ModelConfig
from models import ARCHS, KCenterMotionformer, KCenterTimeSformer, KCenterViT, build_model, kcenter_sample
from models.kcenter import patch_coordinates, patchify
from test_train import demo_root, run, write_config  # noqa: F401 (fixture)

SMALL = dict(num_classes=5, num_frames=8, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
             num_tokens=4 * 16, num_hybrid_frames=1, num_segments=4, drop_path_rate=0.0)  # 4 groups of 4x4 places
FAMILIES = [KCenterViT, KCenterTimeSformer, KCenterMotionformer]


def test_arch_table_and_config_names_agree():
    assert tuple(ARCHS) == config.ARCHS
    with pytest.raises(ValueError, match="model.arch must be one of .* got 'swin'"):
        ModelConfig(arch="swin")


@pytest.mark.parametrize("family", [KCenterTimeSformer, KCenterMotionformer])
def test_token_budget_must_be_one_group_per_segment(family):
    with pytest.raises(ValueError, match=r"model.num_tokens 60 must be model.num_segments x 4x4 places = 64"):
        family(**{**SMALL, "num_tokens": 60})
    cfg = ModelConfig(arch=family.__name__.removeprefix("KCenter").lower(), num_classes=5, num_frames=8, img_size=32,
                      patch_size=8, embed_dim=48, depth=1, num_heads=3, num_tokens=60, num_hybrid_frames=1,
                      num_segments=4)
    with pytest.raises(ValueError, match="model.num_tokens"):
        build_model(cfg)
    with pytest.raises(ValueError, match="model.num_segments 3 must divide num_frames 8"):
        family(**{**SMALL, "num_segments": 3, "num_tokens": 48})


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_shapes_and_gradients(family):
    torch.manual_seed(0)
    model = family(**SMALL)
    if family is KCenterTimeSformer:  # zero-initialised: the temporal branch learns from the second step on
        assert all(b.temporal_fc.weight.abs().sum() == 0 for b in model.blocks)
        for block in model.blocks:
            torch.nn.init.normal_(block.temporal_fc.weight, std=0.02)
    logits = model(torch.randn(2, 3, 8, 32, 32), seeds=torch.tensor([3, 4]))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    # the last block's patch outputs never reach the class token: its trajectory projections learn nothing (as in
    # the original Motionformer)
    dead = {f"blocks.{len(model.blocks) - 1}.attn.{name}" for name in ("proj_q.weight", "proj_q.bias",
                                                                       "proj_k.weight", "proj_k.bias")}
    for name, p in model.named_parameters():
        if family is KCenterMotionformer and name in dead:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_timesformer_groups_are_mosaics_one_patch_per_place_in_place_order():
    model = KCenterTimeSformer(**SMALL)
    clip = torch.randn(3, 3, 8, 32, 32)
    tokens, t_index, s_index = model.select_tokens(clip, seeds=torch.tensor([0, 1, 2]))
    t, s = t_index.view(3, 4, 16), s_index.view(3, 4, 16)
    assert (t[:, 0] == 1).all()  # the hybrid group first: segment 0's centre frame (2 frames a segment)
    assert torch.equal(s, torch.arange(16).expand(3, 4, 16))  # every group: each place once, in place order
    for g in range(1, 4):  # a k-center group takes its patches from its own segment's frames only
        assert set(t[:, g].flatten().tolist()) <= {2 * g, 2 * g + 1}
    patches = patchify(clip, 8).flatten(2, 3)  # (B, T, places, C*p*p)
    assert torch.equal(tokens, patches[torch.arange(3)[:, None], t_index, s_index])


def test_motionformer_groups_hold_the_k_center_picks_of_their_segment_in_pick_order():
    model = KCenterMotionformer(**SMALL)
    clip = torch.randn(2, 3, 8, 32, 32)
    start = torch.tensor([[5, 0, 31], [7, 8, 9]])  # (clips, k-center segments)
    _, t_index, s_index = model.select_tokens(clip, start=start)
    t, s = t_index.view(2, 4, 16), s_index.view(2, 4, 16)
    assert (t[:, 0] == 1).all() and torch.equal(s[:, 0], torch.arange(16).expand(2, 16))
    coords = patch_coordinates(8, 4, 8, 0.5)
    points = torch.cat([patchify(clip, 8), coords.expand(2, -1, -1, -1, -1)], -1)  # (B, T, 4, 4, 195)
    for g in range(1, 4):
        segment = points[:, 2 * g: 2 * g + 2].flatten(1, 3)  # (B, 32, 195)
        picks = kcenter_sample(segment, 16, start[:, g - 1])  # no place constraint, pick order kept
        assert torch.equal(t[:, g], 2 * g + picks // 16) and torch.equal(s[:, g], picks % 16)


def test_paper_setting_hybrid_frames_are_segment_centres_and_one_patch_per_place():
    # K400 TimeSformer with the 4 hybrid frames the original intended: frames 2, 10, 18, 30; k-center segments
    # 1, 3, 5, 6 of 4 frames each, 196 places each (the sampler alone: no ViT-B needed)
    model = KCenterTimeSformer(num_classes=2, depth=1, embed_dim=24, num_heads=2, num_hybrid_frames=4)
    assert model.sampler.hybrid_frames.tolist() == [2, 10, 18, 30]
    assert model.sampler.run_frames.tolist() == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23], [24, 25, 26, 27]]
    clip = torch.rand(1, 3, 32, 224, 224) * 2 - 1
    _, t_index, s_index = model.select_tokens(clip, seeds=torch.tensor([9]))
    t, s = t_index.view(8, 196), s_index.view(8, 196)
    assert [set(row.tolist()) for row in t[:4]] == [{2}, {10}, {18}, {30}]
    assert torch.equal(s, torch.arange(196).expand(8, 196))
    for g, frames in zip(range(4, 8), model.sampler.run_frames.tolist()):
        assert set(t[g].tolist()) <= set(frames)
    motion = KCenterMotionformer(num_classes=2, depth=1, embed_dim=24, num_heads=2, num_hybrid_frames=1)
    assert motion.sampler.hybrid_frames.tolist() == [2]  # the K400 Motionformer: frame 2 whole
    assert motion.sampler.run_frames[0].tolist() == [4, 5, 6, 7] and len(motion.sampler.run_frames) == 7


def vit2d_file(tmp_path):
    vit2d = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=10)
    path = tmp_path / "vit.pth"
    torch.save(vit2d.state_dict(), path)
    return vit2d.state_dict(), str(path)


@pytest.mark.parametrize("arch", ["timesformer", "motionformer"])
def test_2d_weights_load_into_each_family(tmp_path, arch):
    source, path = vit2d_file(tmp_path)
    cfg = ModelConfig(**{k: v for k, v in SMALL.items() if k != "num_classes"}, num_classes=5, arch=arch,
                      pretrained=path)
    ours = build_model(cfg).state_dict()
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.1.attn.qkv.weight",
                "blocks.0.attn.proj.bias", "blocks.0.norm1.weight", "blocks.1.mlp.fc2.weight", "norm.bias"):
        assert torch.equal(ours[key], source[key]), key
    assert torch.equal(ours["time_embed"], torch.zeros_like(ours["time_embed"]))
    if arch == "timesformer":  # the temporal attention and its norm start as copies of the spatial ones
        for i in range(2):
            for part in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "norm1.weight", "norm1.bias"):
                assert torch.equal(ours[f"blocks.{i}.temporal_{part}"], source[f"blocks.{i}.{part}"]), part
            assert ours[f"blocks.{i}.temporal_fc.weight"].abs().sum() == 0
    else:
        assert not torch.equal(ours["blocks.0.attn.proj_q.weight"][:5], source["blocks.0.attn.proj.weight"][:5])


def test_each_family_has_its_originals_test_ensemble():
    assert (KCenterViT.test_ensemble, KCenterTimeSformer.test_ensemble, KCenterMotionformer.test_ensemble) == \
        ("sum_logits", "sum_logits", "mean_softmax")


def epoch_losses(log_text):
    return [float(line.split("loss ")[1].split(",")[0]) for line in log_text.splitlines() if ": loss " in line]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["timesformer", "motionformer"])
def test_family_overfits_a_handful_of_demo_clips_through_train_py(tmp_path, demo_root, arch):  # noqa: F811
    out = tmp_path / arch
    # 12 clips (3 a class), 80 epochs of 3 steps; random crops and K-center starts still change every epoch
    config = write_config(tmp_path, demo_root, out, model={"arch": arch, "num_tokens": 144, "num_segments": 4,
                                                           "embed_dim": 64, "depth": 2, "num_heads": 4},
                          train={"epochs": 80, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3,
                                 "warmup_epochs": 0, "label_smoothing": 0.0, "save_every_steps": 0,
                                 "clip_grad": 0.0},
                          data={"random_flip": False, "train_jitter_scales": [48, 48]})
    result = run(["train.py", "--config", config, "data.val_list=", "data.test_list="], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = epoch_losses((out / "train.log").read_text())
    assert len(losses) == 80 and losses[-1] < 0.4 * losses[0], losses
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["model"]["arch"] == arch and os.path.exists(out / "config.yaml")
