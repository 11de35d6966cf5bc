"""Activation checkpointing of the blocks (model.grad_checkpointing): the same loss and gradients as without it, drop
path included, in every family; the blocks run twice and the K-center sampler once; off outside training."""
import pytest
import torch

from config import Config, config_from_dict
from models import ARCHS, KCenterViT, build_model

SMALL = dict(num_classes=5, num_frames=4, img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
             num_tokens=24, num_hybrid_frames=1)


def small_model(arch: str, **kwargs) -> KCenterViT:
    torch.manual_seed(0)
    segmented = ARCHS[arch].segmented  # one group of 4 x 4 places per segment
    return ARCHS[arch](**{**SMALL, **({"num_segments": 2, "num_tokens": 32} if segmented else {}), **kwargs})


def loss_and_gradients(model: KCenterViT, clips: torch.Tensor, labels: torch.Tensor, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout and drop path draws
    loss = torch.nn.functional.cross_entropy(model(clips, seeds=torch.arange(len(clips))), labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpointed_blocks_give_the_same_loss_and_gradients_with_drop_path_and_dropout(arch):
    model = small_model(arch, drop_path_rate=0.5, drop_rate=0.2, attn_drop_rate=0.2).train()
    for name, p in model.named_parameters():  # the TimeSformer's temporal branch starts at zero: open it
        if "temporal_fc" in name:
            torch.nn.init.normal_(p, std=0.02)
    clips, labels = torch.randn(3, 3, 4, 32, 32), torch.tensor([0, 3, 4])
    plain, plain_grads = loss_and_gradients(model, clips, labels, seed=7)
    other, _ = loss_and_gradients(model, clips, labels, seed=8)
    assert other != plain  # the draws matter: another seed gives another loss

    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    checked, checked_grads = loss_and_gradients(model, clips, labels, seed=7)
    assert torch.equal(checked, plain)  # the forward is the same computation
    assert checked_grads.keys() == plain_grads.keys()
    # the head reads the class token only, which in the Motionformer's last block attends without the trajectory
    unused = {f"blocks.{SMALL['depth'] - 1}.attn.{n}.{p}" for n in ("proj_q", "proj_k") for p in ("weight", "bias")}
    for name, grad in plain_grads.items():  # the recomputed forward drew the same masks
        assert grad.abs().sum() > 0 or (arch == "motionformer" and name in unused), name
        torch.testing.assert_close(checked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_blocks_run_again_in_the_backward_and_the_sampler_only_once(arch):
    model = small_model(arch).train()
    runs = {"blocks": 0, "sampler": 0}

    def count(name):
        def hook(module, args):
            runs[name] += 1
        return hook

    model.sampler.register_forward_pre_hook(count("sampler"))
    model.blocks[0].register_forward_pre_hook(count("blocks"))
    clips = torch.randn(2, 3, 4, 32, 32)

    def step():
        runs.update(blocks=0, sampler=0)
        model(clips, seeds=torch.arange(2)).sum().backward()
        return dict(runs)

    assert step() == {"blocks": 1, "sampler": 1}
    model.set_grad_checkpointing(True)
    assert step() == {"blocks": 2, "sampler": 1}  # recomputed in the backward; the sampler is outside the region
    with torch.no_grad():  # no backward to recompute for: nothing checkpointed
        runs.update(blocks=0, sampler=0)
        model(clips, seeds=torch.arange(2))
        assert runs == {"blocks": 1, "sampler": 1}
    model.eval()
    assert step() == {"blocks": 1, "sampler": 1}  # in evaluation mode neither


def test_the_config_key_reaches_the_model_and_is_off_by_default():
    cfg = Config()
    assert cfg.model.grad_checkpointing is False
    small = {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 32, "patch_size": 8, "num_frames": 4,
             "num_tokens": 24, "num_hybrid_frames": 1, "num_classes": 5}
    for arch in ARCHS:
        segmented = {"num_segments": 2, "num_tokens": 32} if ARCHS[arch].segmented else {}
        for on in (False, True):
            cfg = config_from_dict({"data": {"num_frames": 4, "crop_size": 32, "train_jitter_scales": [32, 40]},
                                    "model": {**small, **segmented, "arch": arch, "grad_checkpointing": on}})
            assert build_model(cfg.model).grad_checkpointing is on
    with pytest.raises(TypeError, match="model.grad_checkpointing must be bool"):
        config_from_dict({"model": {"grad_checkpointing": "yes"}})


def test_eval_takes_a_checkpoint_trained_with_checkpointing_under_a_config_without_it():
    pytest.importorskip("av", reason="needs PyAV")  # eval reads videos with it
    from eval import check_checkpoint_fits
    trained = Config()
    trained.model.grad_checkpointing = True  # a training setting: the function the weights compute is the same
    ckpt = {"config": trained.to_dict(), "class_names": ["a", "b"]}
    check_checkpoint_fits(ckpt, Config(), "last.pt", ["a", "b"])
    other = Config()
    other.model.depth = 6
    with pytest.raises(ValueError, match="model.depth"):  # a setting that does change it is still refused
        check_checkpoint_fits(ckpt, other, "last.pt", ["a", "b"])
