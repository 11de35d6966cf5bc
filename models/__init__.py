"""Clips -> patches -> K-center tokens -> logits: the sampler and the paper's three model families."""
from .kcenter import KCenterTokenSampler, kcenter_sample
from .motionformer import KCenterMotionformer
from .timesformer import KCenterTimeSformer
from .vit import KCenterViT, load_pretrained_2d

# model.arch -> family: the one place a name is looked up
ARCHS = {"vit": KCenterViT, "timesformer": KCenterTimeSformer, "motionformer": KCenterMotionformer}


def build_model(cfg, pixel_std: float = 0.5, load_pretrained: bool = True) -> KCenterViT:
    """The family `cfg.arch` names, from a `config.ModelConfig`; `pixel_std` is the data normalisation std (sets
    coordinate scale). `load_pretrained=False` skips `cfg.pretrained` where a checkpoint replaces every weight
    (resume, eval), so that those need neither the file nor the hub."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {list(ARCHS)}, got {cfg.arch!r}")
    model = ARCHS[cfg.arch](
        num_classes=cfg.num_classes, num_segments=cfg.num_segments, num_frames=cfg.num_frames,
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, num_tokens=cfg.num_tokens,
        num_hybrid_frames=cfg.num_hybrid_frames, pixel_std=pixel_std, temporal_coef=cfg.temporal_coef,
        spatial_coef=cfg.spatial_coef, drop_rate=cfg.drop_rate, pos_drop_rate=cfg.pos_drop_rate,
        attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.pretrained and load_pretrained:
        load_pretrained_2d(model, cfg.pretrained)
    return model
