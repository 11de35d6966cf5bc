import pytest
import timm
import torch

from config import ModelConfig
from models import KCenterViT, build_model, load_pretrained_2d

TINY = dict(num_classes=5, num_frames=4, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
            num_tokens=24, num_hybrid_frames=1, drop_path_rate=0.1)


def test_forward_backward_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = KCenterViT(**TINY)
    clip = torch.randn(2, 3, 4, 32, 32)
    logits = model(clip)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_tokens_get_their_place_and_frame_embeddings():
    model = KCenterViT(**TINY).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    tokens, t_index, s_index = model.select_tokens(clip, start=torch.tensor([0]))
    # moving a token's frame embedding changes the output; identical embeddings everywhere would not
    with torch.no_grad():
        model.time_embed.normal_()
        model.pos_embed.normal_()
        model.head.weight.normal_()
    a = model.forward_tokens(tokens, t_index, s_index)
    t2 = t_index.clone()
    t2[0, -1] = (t2[0, -1] + 1) % 4
    assert not torch.allclose(a, model.forward_tokens(tokens, t2, s_index), atol=1e-2)
    s2 = s_index.clone()
    s2[0, -1] = (s2[0, -1] + 1) % 16
    assert not torch.allclose(a, model.forward_tokens(tokens, t_index, s2), atol=1e-2)
    assert torch.allclose(a, model.forward_tokens(tokens, t_index, s_index))


def test_param_groups_exclude_embeddings_norms_and_biases():
    model = KCenterViT(**TINY)
    decay, rest = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in rest["params"]}
    assert {"pos_embed", "time_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.norm1.weight"} <= no_decay
    assert all(not n.endswith("bias") and "norm" not in n for n in (names[id(p)] for p in decay["params"]))
    assert "patch_embed.proj.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def timm_tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=10)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_local_timm_vit_weights(tmp_path, suffix):
    vit2d = timm_tiny_vit()
    path = str(tmp_path / f"vit{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(vit2d.state_dict(), path)
    else:
        torch.save({"model": vit2d.state_dict()}, path)
    cfg = ModelConfig(**{k: v for k, v in TINY.items()}, pretrained=path)
    model = build_model(cfg)
    ours, theirs = model.state_dict(), vit2d.state_dict()
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
                "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(ours["head.weight"][:5], theirs["head.weight"][:5])  # head is new (5 classes)
    assert torch.equal(ours["time_embed"], torch.zeros_like(ours["time_embed"]))  # starts as the image model
    assert not torch.equal(KCenterViT(**TINY).time_embed, torch.zeros(1, 4, 48))  # from scratch: random


def test_embedding_gradients_are_bit_identical_across_backward_passes():
    # the gradient of a position embedding gathered by advanced indexing was summed in a thread-dependent order
    torch.manual_seed(0)
    model = KCenterViT(**{**TINY, "num_frames": 8, "num_tokens": 96, "img_size": 64, "drop_path_rate": 0.0})
    tokens, t_index, s_index = model.select_tokens(torch.randn(16, 3, 8, 64, 64))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        grads = []
        for _ in range(10):
            model.zero_grad()
            model.forward_tokens(tokens, t_index, s_index).square().sum().backward()
            grads.append((model.pos_embed.grad.clone(), model.time_embed.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for pos, time in grads[1:]:
        assert torch.equal(pos, grads[0][0]) and torch.equal(time, grads[0][1])


def test_pretrained_pos_embed_resampled_to_a_new_grid(tmp_path):
    vit2d = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3)
    torch.save(vit2d.state_dict(), tmp_path / "vit.pth")
    model = KCenterViT(**TINY)
    loaded = load_pretrained_2d(model, str(tmp_path / "vit.pth"))
    assert "pos_embed" in loaded and model.pos_embed.shape == (1, 17, 48)
    assert torch.equal(model.pos_embed[0, 0], vit2d.pos_embed[0, 0])  # class token's position kept


def test_pretrained_errors_are_clear(tmp_path):
    model = KCenterViT(**TINY)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained_2d(model, str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no ViT block weights"):
        load_pretrained_2d(model, str(tmp_path / "bad.pth"))
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=4)
    torch.save(other.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="shapes differ"):
        load_pretrained_2d(model, str(tmp_path / "wide.pth"))
    with pytest.raises(RuntimeError, match="could not load pretrained weights 'no_such_model_name'"):
        load_pretrained_2d(model, "no_such_model_name")


def test_pretrained_file_that_is_not_weights_is_a_clear_error(tmp_path):
    (tmp_path / "notes.pth").write_text("weights are on the shared drive\n")
    with pytest.raises(ValueError, match=r"pretrained weights .*notes.pth cannot be read"):
        load_pretrained_2d(KCenterViT(**TINY), str(tmp_path / "notes.pth"))
